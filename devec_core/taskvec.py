"""The one internal form of a task vector: per module, low-rank factors or a dense delta.

Orientation follows PyTorch ``nn.Linear``: a module's delta is an (n, m) matrix, n = out
features, m = in features. Every file format is converted into this form at load time
(``devec_core.formats``); the math (``devec_core.decompose``) sees nothing else.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass
class LowRank:
    """ΔW = scale · B @ A, with B: (n, r) and A: (r, m). A LoRA's alpha/r goes into ``scale``."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def __post_init__(self):
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank needs B (n, r) and A (r, m); got B {tuple(self.B.shape)}, A {tuple(self.A.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def scaled_B(self) -> torch.Tensor:
        return self.B * self.scale if self.scale != 1.0 else self.B

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or torch.promote_types(self.B.dtype, torch.float32)
        return (self.scaled_B().to(dtype) @ self.A.to(dtype))

    def to(self, device=None, dtype=None) -> "LowRank":
        return LowRank(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype), self.scale)

    def sq_norm(self) -> float:
        """‖scale·B A‖_F² from r×r Gram products (never the n×m matrix)."""
        B, A = self.scaled_B().double(), self.A.double()
        return float(torch.sum((B.T @ B) * (A @ A.T)))


@dataclass
class Dense:
    """A dense delta ΔW: (n, m), e.g. fine-tuned − base, or a DoRA adapter's effective delta."""

    W: torch.Tensor

    def __post_init__(self):
        if self.W.ndim != 2:
            raise ValueError(f"Dense needs a 2-D matrix; got shape {tuple(self.W.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.W.to(dtype or torch.promote_types(self.W.dtype, torch.float32))

    def to(self, device=None, dtype=None) -> "Dense":
        return Dense(self.W.to(device=device, dtype=dtype))

    def sq_norm(self) -> float:
        return float(self.W.double().pow(2).sum())


Delta = Union[LowRank, Dense]


def _update_tensor(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (memory order, on the CPU) into hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass
class TaskVector:
    """A named task vector: module name → delta, plus parameters that are not matrices.

    ``extras`` holds biases / norm scales (name → tensor delta). They are not decomposed
    (docs/METHOD.md): they stay with their vector and follow its unique coefficient.
    An input LoRA's rank may not exceed min(n, m) of its module (``check_ranks``, called first
    thing by ``decompose``): a larger declared rank adds no direction, only cost. Internal sums
    of LoRAs (e.g. a merge's concatenated factors) may exceed it; they are not decomposed.
    """

    name: str
    modules: dict[str, Delta]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def check_ranks(self) -> None:
        """Raise ValueError naming the vector (and its source file) and module if a LoRA's rank
        exceeds min(n, m): such a file declares more directions than the module has."""
        for mod, d in self.modules.items():
            if isinstance(d, LowRank) and d.B.shape[1] > min(d.B.shape[0], d.A.shape[1]):
                src = self.meta.get("source") or self.meta.get("input")
                where = f"task vector {self.name!r}" + (f" ({src})" if src else "")
                raise ValueError(
                    f"{where}, module {mod!r}: LoRA rank {d.rank} exceeds min(out, in) = {min(d.shape)} of its "
                    f"{d.shape[0]}×{d.shape[1]} delta; refused (a rank above that adds no direction, only work)"
                )

    def check_finite(self) -> None:
        """Raise ValueError naming the vector, module and the bad value if anything is NaN/Inf."""
        for mod, d in self.modules.items():
            tensors = {"B": d.B, "A": d.A} if isinstance(d, LowRank) else {"W": d.W}
            for part, t in tensors.items():
                if not torch.isfinite(t).all():
                    bad = t[~torch.isfinite(t)].flatten()[0].item()
                    raise ValueError(f"task vector {self.name!r}, module {mod!r}: {part} contains {bad} (NaN/Inf)")
            if isinstance(d, LowRank) and not math.isfinite(d.scale):
                raise ValueError(f"task vector {self.name!r}, module {mod!r}: scale is {d.scale}")
        for key, t in self.extras.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"task vector {self.name!r}, parameter {key!r} contains NaN/Inf")

    def sq_norm(self) -> float:
        return sum(d.sq_norm() for d in self.modules.values())

    def digest(self, include_name: bool = True) -> str:
        """SHA-256 of the vector's content: module names, factors, scales, dense deltas, extras.

        Args:
            include_name: mix the vector's name in (names label a decomposition's parts; two
                files with the same tensors under different names are the same content).
        Returns:
            Hex digest. ``meta`` (where it came from) is not part of the content.
        """
        h = hashlib.sha256()
        if include_name:
            h.update(b"name\0" + self.name.encode() + b"\0")
        for mod in sorted(self.modules):
            d = self.modules[mod]
            h.update(b"mod\0" + mod.encode() + b"\0")
            if isinstance(d, LowRank):
                h.update(f"lowrank {d.scale!r}".encode())
                _update_tensor(h, d.B)
                _update_tensor(h, d.A)
            else:
                h.update(b"dense")
                _update_tensor(h, d.W)
        for key in sorted(self.extras):
            h.update(b"extra\0" + key.encode() + b"\0")
            _update_tensor(h, self.extras[key])
        return h.hexdigest()
