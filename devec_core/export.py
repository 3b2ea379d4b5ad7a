"""Task-vector parts out: LoRA files that diffusers, PEFT and ComfyUI load like any other.

A LoRA's unique part is a LoRA of the same rank (docs/METHOD.md); its shared part has rank s per
module. Both are written with the scale folded into B (alpha = r, so every loader's scale is 1):
  * FLUX (diffusers) family: one ``.safetensors`` with ``transformer.<module>.lora_A.weight`` /
    ``lora_B.weight`` keys (the layout ``FluxPipeline.save_lora_weights`` writes; never
    ``base_model.model.`` keys, which diffusers mistakes for another layout);
  * PEFT family: an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
    ``base_model.model.<module>.lora_A.weight``) for ``PeftModel.from_pretrained``.
Dense parts (DoRA, full checkpoints) are cut to a LoRA by truncated SVD (rank or energy).
Every file carries metadata under the safetensors header key ``"devec"`` (JSON: sources, τ,
mode, method version, component); PEFT folders also get ``devec.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .pool import METHOD_VERSION
from .taskvec import Delta, LowRank

FLUX_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "devec"


def to_lowrank(d: Delta, rank: int | None = None, energy: float | None = 0.99) -> LowRank | None:
    """A delta as LoRA factors with scale 1 (scale folded into B); None if it is zero.

    LowRank parts keep their rank (all-zero B → None). Dense parts are cut by SVD to ``rank``
    directions, or to the fewest keeping ``energy`` of ‖ΔW‖_F² (rank wins if both given).

    Args:
        d: the part. rank: fixed rank for dense parts. energy: energy fraction in (0, 1].
    Returns:
        LowRank(B, A, 1.0) or None.
    """
    if isinstance(d, LowRank):
        B = d.scaled_B()
        if d.rank == 0 or not torch.any(B) or not torch.any(d.A):
            return None
        # own storage: kohya's split q/k/v share one A, and safetensors refuses shared tensors
        return LowRank(B.clone(memory_format=torch.contiguous_format), d.A.clone(memory_format=torch.contiguous_format), 1.0)
    W = d.W.float() if d.W.dtype not in (torch.float32, torch.float64) else d.W
    if not torch.any(W):
        return None
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (n, p), (p,), (p, m)
    if rank is not None:
        k = min(rank, S.numel())
    else:
        e = (S.double() ** 2).cumsum(0) / (S.double() ** 2).sum()
        k = int(torch.searchsorted(e, torch.tensor(energy if energy is not None else 0.99, dtype=e.dtype)).item()) + 1
        k = min(k, S.numel())
    k = max(1, min(k, int((S > S[0] * max(W.shape) * torch.finfo(S.dtype).eps).sum())))
    return LowRank((U[:, :k] * S[:k]).contiguous().to(d.W.dtype), Vh[:k].contiguous().to(d.W.dtype), 1.0)


def _as_factors(parts: dict[str, Delta], rank: int | None, energy: float | None, dtype: torch.dtype | None) -> dict[str, LowRank]:
    out = {}
    for mod in sorted(parts):
        lr = to_lowrank(parts[mod], rank, energy)
        if lr is not None:
            out[mod] = lr if dtype is None else lr.to(dtype=dtype)
    return out


def _meta_header(metadata: dict | None) -> dict[str, str]:
    return {"format": "pt", METADATA_KEY: json.dumps(metadata or {}, sort_keys=True, default=str)}


def flux_lora_state_dict(
    parts: dict[str, Delta], *, extras: dict[str, torch.Tensor] | None = None, rank: int | None = None,
    energy: float | None = 0.99, dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Parts → diffusers FLUX LoRA state dict (``transformer.``-prefixed keys; text_encoder.* kept).

    ``extras`` entries ``<module>.bias`` of exported modules become ``lora_B.bias`` (diffusers'
    lora_bias); other extras cannot be expressed as a LoRA and are left out.
    """
    sd = {}
    for mod, lr in _as_factors(parts, rank, energy, dtype).items():
        key = mod if mod.startswith("text_encoder.") else FLUX_PREFIX + mod
        sd[f"{key}.lora_A.weight"] = lr.A
        sd[f"{key}.lora_B.weight"] = lr.B
        if extras and mod + ".bias" in extras:
            sd[f"{key}.lora_B.bias"] = extras[mod + ".bias"].to(lr.B.dtype).contiguous()
    return sd


def save_flux_lora(
    parts: dict[str, Delta], path: str | os.PathLike, *, metadata: dict | None = None, **kw
) -> Path:
    """Write a diffusers-format FLUX LoRA ``.safetensors`` (load with ``pipe.load_lora_weights``).

    Args:
        parts: module → delta (normalised FLUX module names).
        path: output file.
        metadata: JSON-able dict stored under the header key ``"devec"``.
        kw: rank / energy (dense parts), dtype, extras: see ``flux_lora_state_dict``.
    Returns:
        The path written.
    """
    path = Path(path)
    sd = flux_lora_state_dict(parts, **kw)
    save_file(sd, str(path), metadata=_meta_header({**(metadata or {}), "modules": len(sd) // 2}))
    return path


def peft_config_for(factors: dict[str, LowRank], base_config: dict | None = None, lora_bias: bool = False):
    """A ``peft.LoraConfig`` for exported factors: scale 1 everywhere (alpha = r per module).

    The most common rank is ``r``; others go to ``rank_pattern`` / ``alpha_pattern`` keyed by the
    regex-escaped full module path (PEFT matches patterns as regexes on the module name).
    """
    from peft import LoraConfig

    ranks = {m: lr.rank for m, lr in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    base_config = base_config or {}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(factors) or None,
        lora_dropout=0.0,
        bias="none",
        lora_bias=lora_bias,
        use_rslora=False,
        base_model_name_or_path=base_config.get("base_model_name_or_path"),
        task_type=base_config.get("task_type"),
        inference_mode=True,
    )


def save_peft_adapter(
    parts: dict[str, Delta], folder: str | os.PathLike, *, metadata: dict | None = None, base_config: dict | None = None,
    extras: dict[str, torch.Tensor] | None = None, rank: int | None = None, energy: float | None = 0.99,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a PEFT adapter folder (load with ``PeftModel.from_pretrained(model, folder)``).

    Args:
        parts: module → delta (module paths as in the model, e.g. "model.layers.0.self_attn.q_proj").
        folder: output folder (created).
        metadata: JSON-able dict (safetensors header ``"devec"`` and ``devec.json``).
        base_config: the input adapter's config (base model name, task type carried over).
        extras: ``<module>.bias`` entries become ``lora_B.bias`` (PEFT ``lora_bias=True``).
        rank, energy: cut for dense parts. dtype: output dtype.
    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factors = _as_factors(parts, rank, energy, dtype)
    biases = {m: extras[m + ".bias"] for m in factors if extras and m + ".bias" in extras}
    sd = {}
    for mod, lr in factors.items():
        sd[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = lr.A
        sd[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = lr.B
        if mod in biases:
            sd[f"{PEFT_PREFIX}{mod}.lora_B.bias"] = biases[mod].to(lr.B.dtype).contiguous()
    meta = {**(metadata or {}), "modules": len(factors)}
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata=_meta_header(meta))
    peft_config_for(factors, base_config, lora_bias=bool(biases)).save_pretrained(str(folder))
    (folder / "devec.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return folder


def read_devec_metadata(path: str | os.PathLike) -> dict:
    """The ``"devec"`` metadata of an exported file or PEFT folder ({} if none)."""
    p = Path(path)
    if p.is_dir():
        p = p / "adapter_model.safetensors"
    with safe_open(str(p), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def safe_filename(name: str, max_bytes: int = 120) -> str:
    """A vector name as a file-name component (keeps letters, digits, ``._+-``; at most
    ``max_bytes`` UTF-8 bytes). Lossy: ``x y`` and ``x_y`` give the same; ``unique_stems`` settles that."""
    s = re.sub(r"[^\w.+-]", "_", name).strip("._") or "vector"
    while len(s.encode()) > max_bytes:
        s = s[:-1]
    return s


def unique_stems(wanted: list[str], exact: list[bool] | None = None) -> list[str]:
    """File stems with no two alike (compared case-insensitively, as on macOS/Windows disks).

    A stem already taken gets ``-2``, ``-3``, … . Stems flagged ``exact`` (the name needed no
    change) are placed first, so a vector named ``x_y`` keeps ``unique-x_y`` even when a vector
    named ``x y`` comes before it.
    """
    exact = exact or [True] * len(wanted)
    out: list[str | None] = [None] * len(wanted)
    used: set[str] = set()
    for i, w in enumerate(wanted):  # 1. exact stems that are free keep themselves
        if exact[i] and w.casefold() not in used:
            out[i] = w
            used.add(w.casefold())
    for i, w in enumerate(wanted):  # 2. the rest get the first free suffix
        if out[i] is None:
            cand, k = w, 2
            while cand.casefold() in used:
                cand, k = f"{w}-{k}", k + 1
            out[i] = cand
            used.add(cand.casefold())
    return out  # type: ignore[return-value]


@dataclass
class Part:
    """One exported component: where it was written and what it holds (for report.json)."""

    path: Path
    component: str  # "unique", "merged_shared", "pair_shared" or "shared" (isolate: removed from the target)
    vector: str | None = None  # unique / shared: the vector
    pair: tuple[str, str] | None = None  # pair_shared: the two vectors, in pool order
    wanted: str = ""  # the stem before de-duplication

    def record(self) -> dict:
        """report.json's entry: file name, component, vector or pair; ``renamed`` when a collision moved it."""
        rec = {"file": self.path.name, "component": self.component}
        if self.vector is not None:
            rec["vector"] = self.vector
        if self.pair is not None:
            rec["pair"] = list(self.pair)
        if self.wanted and self.path.name.removesuffix(".safetensors") != self.wanted:
            rec["renamed"] = f"{self.wanted} was taken by another part"
        return rec


def export_family(vectors_meta: list[dict]) -> str:
    """"peft" when the inputs are PEFT adapters or LLM checkpoints, else "diffusers" (FLUX)."""
    fmts = {m.get("format") for m in vectors_meta}
    fams = {m.get("family") for m in vectors_meta}
    if fmts == {"peft"} or fams == {"llm"}:
        return "peft"
    return "diffusers"


def save_part(
    parts: dict[str, Delta], out_dir: Path, stem: str, family: str, *, metadata: dict, base_config: dict | None = None,
    extras: dict[str, torch.Tensor] | None = None, rank: int | None = None, energy: float | None = 0.99,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write one component as ``<stem>.safetensors`` (diffusers) or ``<stem>/`` (PEFT) in out_dir."""
    if family == "peft":
        return save_peft_adapter(
            parts, out_dir / stem, metadata=metadata, base_config=base_config, extras=extras, rank=rank, energy=energy, dtype=dtype
        )
    if family == "diffusers":
        return save_flux_lora(parts, out_dir / f"{stem}.safetensors", metadata=metadata, extras=extras, rank=rank, energy=energy, dtype=dtype)
    raise ValueError(f"Unknown export family {family!r}; expected 'diffusers' or 'peft'")


def export_decomposition(
    dec, out_dir: str | os.PathLike, *, family: str | None = None, rank: int | None = None, energy: float | None = 0.99,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write a decomposition's parts as LoRAs in ``out_dir`` (which must exist); the paths written.

    See ``write_parts``, which also says what each path holds.
    """
    return [p.path for p in write_parts(dec, out_dir, family=family, rank=rank, energy=energy, dtype=dtype)]


def plan_parts(dec) -> list[tuple[str, str, str | None, tuple[str, str] | None, str]]:
    """(stem, component, vector, pair, wanted stem) of every part a decomposition exports; stems all different.

    joint: ``unique-<name>`` per vector and ``shared`` (eq. 14 merged shared part);
    pairwise: ``unique-<name>`` per vector and ``shared-<a>+<b>`` per pair;
    isolate: ``unique-<target>`` and ``shared-<target>`` (what was removed from the target).
    Names become file names through ``safe_filename`` and collisions get a suffix
    (``unique_stems``); what a file holds is recorded, never parsed back from its name.
    """
    mode = dec.config.mode
    rows: list[tuple[str, str, str | None, tuple[str, str] | None, bool]] = []
    for name in [dec.config.target] if mode == "isolate" else list(dec.names):
        rows.append((f"unique-{safe_filename(name)}", "unique", name, None, safe_filename(name) == name))
    if mode == "joint":
        rows.append(("shared", "merged_shared", None, None, True))
    elif mode == "pairwise":
        for i, a in enumerate(dec.names):
            for b in dec.names[i + 1 :]:
                exact = safe_filename(a) == a and safe_filename(b) == b
                rows.append((f"shared-{safe_filename(a)}+{safe_filename(b)}", "pair_shared", None, (a, b), exact))
    else:
        t = dec.config.target
        rows.append((f"shared-{safe_filename(t)}", "shared", t, None, safe_filename(t) == t))
    stems = unique_stems([r[0] for r in rows], [r[4] for r in rows])
    return [(stem, c, v, p, w) for stem, (w, c, v, p, _) in zip(stems, rows)]


def write_parts(
    dec, out_dir: str | os.PathLike, *, family: str | None = None, rank: int | None = None, energy: float | None = 0.99,
    dtype: torch.dtype | None = None,
) -> list[Part]:
    """Write a decomposition's parts as LoRAs in ``out_dir`` (which must exist).

    File names: ``plan_parts``. Each file's ``devec`` metadata and the returned ``Part`` say
    which component (and vector or pair) it holds.

    Args:
        dec: a ``Decomposition``.
        family: "diffusers" or "peft" (default: the inputs' family, see ``export_family``).
        rank, energy: cut for dense parts. dtype: output dtype (default: the decomposition's).
    Returns:
        One ``Part`` per file or folder written, in ``plan_parts`` order.
    """
    out_dir = Path(out_dir)
    metas = [v.meta for v in dec.vectors]
    family = family or export_family(metas)
    base_config = next((m.get("config") for m in metas if m.get("config")), None)
    if base_config is None and family == "peft":
        base_model = next((m.get("base") for m in metas if m.get("base")), None)
        base_config = {"base_model_name_or_path": base_model, "task_type": "CAUSAL_LM"}
    common = {
        "method_version": METHOD_VERSION,
        "tau": dec.tau,
        "mode": dec.config.mode,
        "config": {k: getattr(dec.config, k) for k in dec.config.__dataclass_fields__},
        "sources": [m.get("input", m.get("source")) for m in metas],
        "names": list(dec.names),
    }
    written = []
    for stem, component, vector, pair, wanted in plan_parts(dec):
        extras = None
        if component == "unique":
            v = dec.vectors[dec.names.index(vector)]
            meta = {**common, "component": "unique", "vector": vector, "source": v.meta.get("input", v.meta.get("source"))}
            parts, extras = dec.component("unique", vector), v.extras
        elif component == "merged_shared":
            meta, parts = {**common, "component": "merged_shared"}, dec.component("merged_shared")
        elif component == "pair_shared":
            meta, parts = {**common, "component": "pair_shared", "pair": list(pair)}, dec.component("pair_shared", pair)
        else:
            meta, parts = {**common, "component": "shared", "vector": vector}, dec.component("shared", vector)
        path = save_part(parts, out_dir, stem, family, metadata=meta, base_config=base_config, extras=extras,
                         rank=rank, energy=energy, dtype=dtype)
        written.append(Part(path, component, vector, pair, wanted))
    return written
