"""One user's choices: the ``Session`` (pool key, mode, target, τ, per-vector settings) and the
``StudioError`` every module of the Studio raises for a problem the user can fix.

A session is small plain data (the UI keeps it in ``gr.State``); heavy objects — pools,
decompositions, base models — live in the process caches (``studio.caches``), found by key.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from ..algorithm import PAPER_TAU

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
MAX_VECTORS = 12  # sliders the UI lays out (the paper's pool: 10 references + a target); larger pools are refused
log = logging.getLogger("devec.studio")


class StudioError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""


# What reading a task vector or a model can raise for a bad input, a missing file or the network
# (Hub errors are OSErrors, formats.FormatError is a ValueError, a corrupt .safetensors raises
# SafetensorError). Anything else is a bug and reaches the log with its traceback, not the user as
# "could not read ...".
READ_ERRORS = (OSError, ValueError, SafetensorError)


_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"`\\/]+)+[\\/]([^\s'\"`\\/]+)")


def clean_message(msg) -> str:
    """A message for the page without server paths: '/tmp/gradio/ab12/x.safetensors' → 'x.safetensors'
    (a visitor never sees where the server keeps uploads or caches)."""
    return _PATH_RE.sub(lambda m: m.group(1), str(msg))


@dataclass
class Session:
    """One user's pool and settings. Heavy objects stay in the process caches, found by key."""

    backend: str  # "llm" | "flux"
    pool_key: str  # content hash of the pool (cache key)
    names: list[str]
    base: str  # "smollm2", a Hub id, or "synthetic"
    title: str = ""
    preset_id: str | None = None
    synthetic: bool = False
    needs_gpu: bool = False
    mode: str = "joint"
    target: str | None = None
    references: tuple[str, ...] | None = None  # isolate: None = every other vector
    tau: float = PAPER_TAU
    strengths: dict[str, float] = field(default_factory=dict)
    triggers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    description: str = ""
    scores: tuple[str, ...] = ()  # LLM: scores shown per output ("toxicity", "offensive", "title", "capitals")
    start: dict | None = None  # a preset's opening sliders: {"mode", "target", "vanilla", "unique", "shared"}
    # how to load the pool again in a process that does not hold it (a ZeroGPU worker, or after
    # the LRU dropped it): ("preset", id) or ("custom", files, hub_ids, preset_id); plain strings
    source: tuple | None = None

    def key(self) -> tuple:
        iso = self.mode == "isolate"
        return (self.pool_key, self.mode, self.target if iso else None, self.references if iso else None)

    def effective_references(self) -> tuple[str, ...] | None:
        """isolate: the references that take part (None = every vector but the target)."""
        if self.mode != "isolate" or self.references is None:
            return None
        refs = tuple(r for r in self.references if r in self.names and r != self.target)
        return refs or None
