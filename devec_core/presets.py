"""Presets: validated YAML descriptions of a pool of task vectors and how to show it.

A preset names a base model, a pool of task vectors (Hub ids, local files, or a deterministic
synthetic pool), the decomposition mode and τ, and generation defaults. ``load_preset(path)``
validates one file in one call (``Preset.model_validate(yaml.safe_load(...))``, as mergekit does);
``list_presets()`` loads every ``presets/*.yaml``. Unknown keys are errors, so a typo in a preset
fails the test that loads every file instead of being silently ignored.

Sources of a vector (``VectorSpec.source``):
  "owner/repo"             a Hub repository (``weight_name`` picks the file inside it)
  "path/to/file_or_dir"    a local file or PEFT folder, relative to the repository root
  "synthetic:<pool>/<name>" a deterministic synthetic vector made by ``devec_core.studio``
  "demo:<folder>/<name>"   a child of the SmolLM2 demo pool (``devec_core.toxicity.load_demo_pool``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algorithm import PAPER_TAU

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VectorSpec(_Strict):
    """One task vector of a preset's pool."""

    name: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1)
    weight_name: str | None = None  # file inside a Hub repo / folder
    confirmed: bool = True  # False: repo id / file name could not be checked against the Hub
    strength: float = 1.0  # the LoRA's usual strength: default vanilla and unique coefficient
    trigger: str | None = None  # words a style LoRA expects in the prompt
    role: Literal["member", "target", "reference"] = "member"
    url: str | None = None
    note: str = ""


class BaseSpec(_Strict):
    """The base model the pool's task vectors were trained on."""

    id: str  # Hub id, or "smollm2" (the offline GGUF model), or "synthetic"
    note: str = ""
    needs_gpu: bool = False
    confirmed: bool = True


class Generation(_Strict):
    """Generation defaults shown in the UI."""

    seed: int = 0
    steps: int = Field(4, ge=1, le=100)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    guidance: float = 0.0
    max_new_tokens: int = Field(48, ge=1, le=1024)


class StartCoefficients(_Strict):
    """Slider values a preset opens with (names not given start at 0).

    E.g. the toxicity demo starts from the toxic fine-tune T = W0 + Δ_toxic and removes the
    toxic vector: vanilla λ_toxic = 1 − λ_remove, DeVec λᵘ_toxic = 1 − λ_remove with the
    target's shared part kept (λˢ = 1).
    """

    vanilla: dict[str, float] = Field(default_factory=dict)
    unique: dict[str, float] = Field(default_factory=dict)
    shared: float = 0.0


class Preset(_Strict):
    """A pool of task vectors on one base model, with the mode and τ to show it at."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    title: str
    backend: Literal["flux", "llm"]
    description: str = ""
    offline: bool = False  # works on a fresh CPU machine with no Hub access
    synthetic: bool = False  # vectors are made up (labelled so in the UI)
    base: BaseSpec
    vectors: list[VectorSpec] = Field(min_length=1)
    mode: Literal["joint", "pairwise", "isolate"] = "joint"
    tau: float = Field(PAPER_TAU, gt=0.0, le=1.0)
    target: str | None = None
    user_slot: bool = False  # the UI invites the user to add their own vector (e.g. a toxic adapter)
    recipe: str | None = None  # where to learn to make the user's vector
    prompts: list[str] = Field(default_factory=list)
    generation: Generation = Generation()
    coefficients: StartCoefficients | None = None  # None: the mode's defaults (studio.default_coefficients)
    scores: list[Literal["toxicity", "offensive", "title", "capitals"]] = Field(default_factory=lambda: ["toxicity", "offensive"])  # LLM: per output
    order: int = 100  # position in the preset menu
    subpools: dict[str, list[str]] = Field(default_factory=dict)  # named subsets of the pool (e.g. the paper's reference sets)

    @field_validator("vectors")
    @classmethod
    def _unique_names(cls, vs: list[VectorSpec]) -> list[VectorSpec]:
        names = [v.name for v in vs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate vector names {dup}")
        return vs

    @model_validator(mode="after")
    def _check_target(self) -> "Preset":
        names = [v.name for v in self.vectors]
        if self.target is not None and self.target not in names:
            raise ValueError(f"target {self.target!r} is not a vector of the pool {names}")
        if self.mode == "isolate" and self.target is None and not self.user_slot:
            raise ValueError("isolate mode needs a target (or user_slot: true for the user's own vector)")
        for sub, members in self.subpools.items():
            bad = sorted(set(members) - set(names))
            if bad or not members:
                raise ValueError(f"subpool {sub!r} names vectors {bad} that are not in the pool {names}" if bad else f"subpool {sub!r} is empty")
        if self.coefficients is not None:
            bad = sorted((set(self.coefficients.vanilla) | set(self.coefficients.unique)) - set(names))
            if bad:
                raise ValueError(f"coefficients name vectors {bad} that are not in the pool {names}")
        return self

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]


def load_preset(path: str | Path) -> Preset:
    """Load and validate one preset file.

    Args:
        path: a ``.yaml`` file.
    Returns:
        The validated ``Preset``.
    Raises:
        ValueError naming the file and what is wrong.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"preset {str(path)!r}: cannot read YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"preset {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Preset.model_validate(data)
    except ValidationError as e:  # say which file
        raise ValueError(f"preset {str(path)!r}: {e}") from e


def list_presets(folder: str | Path = PRESET_DIR, backend: str | None = None) -> list[Preset]:
    """Every preset in ``folder`` (sorted by ``order`` then id), optionally of one backend.

    Args:
        folder: where the ``*.yaml`` files are.
        backend: "flux" or "llm" to filter, None for all.
    Returns:
        Validated presets; duplicate ids are an error.
    """
    presets = [load_preset(p) for p in sorted(Path(folder).glob("*.yaml"))]
    ids = [p.id for p in presets]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate preset ids in {str(folder)!r}: {dup}")
    if backend is not None:
        presets = [p for p in presets if p.backend == backend]
    return sorted(presets, key=lambda p: (p.order, p.id))


def get_preset(preset_id: str, folder: str | Path = PRESET_DIR) -> Preset:
    """The preset with this id, or ValueError listing the ids there are."""
    for p in list_presets(folder):
        if p.id == preset_id:
            return p
    raise ValueError(f"Unknown preset {preset_id!r}; presets are {[p.id for p in list_presets(folder)]}")
