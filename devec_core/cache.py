"""Content-hash keyed cache of decompositions on disk (work in progress: hashing first)."""

from __future__ import annotations

import hashlib

import torch

from .taskvec import LowRank, TaskVector


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def hash_task_vector(v: TaskVector, include_name: bool = True) -> str:
    """SHA-256 of a task vector's content: module names, factors, scales, extras (and its name).

    Args:
        v: the vector.
        include_name: mix the vector's name in (two identical vectors under different names
            give different decompositions' labels, so the cache key includes it).
    Returns:
        Hex digest.
    """
    h = hashlib.sha256()
    if include_name:
        h.update(b"name\0" + v.name.encode() + b"\0")
    for mod in sorted(v.modules):
        d = v.modules[mod]
        h.update(b"mod\0" + mod.encode() + b"\0")
        if isinstance(d, LowRank):
            h.update(f"lowrank {d.scale!r}".encode())
            _update_tensor(h, d.B)
            _update_tensor(h, d.A)
        else:
            h.update(b"dense")
            _update_tensor(h, d.W)
    for key in sorted(v.extras):
        h.update(b"extra\0" + key.encode() + b"\0")
        _update_tensor(h, v.extras[key])
    return h.hexdigest()
