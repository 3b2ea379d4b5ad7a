"""The weight editor: fuse a mix into a model's weights, roll back a failed switch, restore the
originals bit-identically.

State, and nothing else: the saved original of every touched tensor and what each one holds
now. The numbers come from ``fuse`` (pure), the resolved and stacked parts from ``parts``.
Only tensors whose terms changed since the last apply are rewritten, each from its saved
original (never incrementally), so a mix's weights do not depend on the switches before it.

A WeightEditor is not thread-safe by itself; the backends hold a lock around apply + generate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .fuse import fused_weight, fused_weight_into
from .parts import PartCache
from .terms import Mix


@dataclass
class ApplyStats:
    """What one apply did: tensors rewritten, modules carrying a nonzero term, wall time."""

    modules_written: int
    params_written: int
    modules_active: int
    seconds: float


@dataclass
class _Saved:
    """A touched tensor's original, and what kind of tensor it is."""

    tensor: torch.Tensor
    kind: str  # "weight" (a module's 2-D weight, path "<module>.weight") | "extra" (any parameter)
    absmax: float | None = None  # max |original|, for the float32 one-pass bound (computed once)


class WeightEditor:
    """Fuse mixes into the weights of ``root`` (an nn.Module) and restore them exactly.

    Module names in a source are paths under ``root`` (``root.get_submodule(name)``); extras are
    parameter paths (``root.get_parameter(name)``).

    Args:
        root: the model whose weights are edited in place (e.g. ``pipe.transformer``, an LM).
        compute_device: where sums are formed; default the parameter's own device (use the
            accelerator here when the model is CPU-offloaded).
        originals_device: where originals of touched tensors are kept: "cpu" (default) or "same"
            (the parameter's device; fastest restore on a GPU that has room).
    """

    def __init__(self, root: torch.nn.Module, compute_device: str | torch.device | None = None, originals_device: str = "cpu"):
        if originals_device not in ("cpu", "same"):
            raise ValueError(f"originals_device must be 'cpu' or 'same'; got {originals_device!r}")
        self.root = root
        self.compute_device = None if compute_device is None else torch.device(compute_device)
        self.originals_device = originals_device
        self.parts = PartCache(self._weight, self.compute_device)
        self._saved: dict[str, _Saved] = {}  # param path -> original (every tensor ever touched since restore)
        self._record: dict[str, tuple] = {}  # param path -> ((component key, λ), ...) fused now
        self.current: Mix | None = None

    # -- the model's tensors ----------------------------------------------------------------
    def _weight(self, mod: str) -> torch.Tensor:
        try:
            sub = self.root.get_submodule(mod)
        except AttributeError as e:
            raise ValueError(f"module {mod!r} does not exist in {type(self.root).__name__}{self._hint(mod)}") from e
        w = getattr(sub, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"module {mod!r} ({type(sub).__name__}) has no 2-D weight to edit")
        if w.device.type == "meta":
            raise ValueError(
                f"module {mod!r}: weight is on the meta device (sequential CPU offload / not loaded); "
                "use model CPU offload or a loaded model"
            )
        return w

    def _hint(self, mod: str) -> str:
        """A guess at what a missing module path meant (a prefix too many, or the usual naming)."""
        head, _, rest = mod.partition(".")
        try:
            self.root.get_submodule(rest)
            return f"; did you mean {rest!r} (without the {head + '.'!r} prefix)?"
        except AttributeError:
            tail = mod.rsplit(".", 1)[-1]
            like = [n for n, _ in self.root.named_modules() if n.endswith("." + tail)][:2]
            return f"; modules of that kind here look like {like}" if like else ""

    def _param(self, path: str) -> torch.Tensor:
        try:
            return self.root.get_parameter(path)
        except AttributeError as e:
            raise ValueError(f"parameter {path!r} does not exist in {type(self.root).__name__}") from e

    def original(self, path: str) -> torch.Tensor | None:
        """The unedited tensor at parameter ``path`` while a mix is fused into it, else None
        (the parameter itself is the original)."""
        saved = self._saved.get(path)
        return None if saved is None else saved.tensor

    # -- what a mix asks for ----------------------------------------------------------------
    def _targets(self, mix: Mix) -> tuple[dict[str, list], dict[str, list]]:
        """Per weight path: [(λ, Part)], per extra path: [(λ, key, tensor)], canonical order."""
        mods: dict[str, list] = {}
        extras: dict[str, list] = {}
        for comp, lam in mix.active().items():
            key, parts, ex = self.parts.resolve(mix.source, comp)
            for mod, part in parts.items():
                mods.setdefault(mod + ".weight", []).append((lam, part))
            for path, t in ex.items():
                extras.setdefault(path, []).append((lam, key, t))
        return mods, extras

    # -- writing ----------------------------------------------------------------------------
    def _save_original(self, path: str, p: torch.Tensor, kind: str) -> _Saved:
        if path not in self._saved:
            if self.originals_device == "same":
                keep = p.detach().clone()
            else:
                keep = p.detach().to("cpu", copy=True)
                dev = self.compute_device or p.device
                if dev.type == "cuda":  # pinned host memory: faster copies back to the GPU
                    keep = keep.pin_memory()
            self._saved[path] = _Saved(keep, kind)
        return self._saved[path]

    def _write(self, path: str, terms: list, kind: str) -> None:
        """Set parameter ``path`` to its original + ``terms`` (none: the original itself)."""
        p = self._param(path) if kind == "extra" else self._weight(path[: -len(".weight")])
        saved = self._save_original(path, p, kind)
        saved.kind = kind
        W0, dev = saved.tensor, self.compute_device or p.device
        with torch.no_grad():
            if not terms:
                p.copy_(W0.to(p.device))
                return
            if kind == "extra":
                p.copy_(fused_weight(W0, dense=[(lam, t) for lam, _, t in terms], dtype=p.dtype, device=dev, name=path).to(p.device))
                return
            lows = [(lam, part) for lam, part in terms if part.W is None]
            dense = [(lam, part.W) for lam, part in terms if part.W is not None]
            B = A = scale = None
            if lows:
                B, A, scale = self.parts.stacked(path, lows)
            if not dense and self._one_pass_fits(p, W0, dev):
                if saved.absmax is None:  # once per weight, and only where this path applies
                    saved.absmax = float(W0.abs().max()) if W0.numel() else 0.0
                if fused_weight_into(p.data, W0, B, A, scale, saved.absmax):
                    return
            p.copy_(fused_weight(W0, B, A, scale, dense, dtype=p.dtype, device=dev, name=path).to(p.device))

    @staticmethod
    def _one_pass_fits(p: torch.Tensor, W0: torch.Tensor, dev: torch.device) -> bool:
        """``fuse.fused_weight_into`` applies: float32 weight and original, both on the compute device."""
        return p.dtype == torch.float32 and W0.dtype == torch.float32 and W0.device == p.device and torch.device(dev) == p.device

    def apply(self, mix: Mix | None) -> ApplyStats:
        """Fuse ``mix`` (None = base): rewrite only weights whose terms differ from the current mix.

        Args:
            mix: the mix to fuse.

        Returns:
            ApplyStats of this switch.

        Raises:
            ValueError: unknown module/parameter, shape mismatch, or a non-finite result (the
                model is left at the previous mix).
        """
        t0 = time.perf_counter()
        mix = mix or Mix.base()
        mods, extras = self._targets(mix)
        want: dict[str, tuple[str, list, tuple]] = {}
        for path, terms in mods.items():
            want[path] = ("weight", terms, tuple((part.key, lam) for lam, part in terms))
        for path, terms in extras.items():
            want[path] = ("extra", terms, tuple((key, lam) for lam, key, _ in terms))
        for path in self._record:  # fused now, absent from the new mix: back to the original
            if path not in want:
                want[path] = (self._saved[path].kind, [], ())
        changed = [p for p, (_, _, rec) in want.items() if self._record.get(p, ()) != rec]
        done: list[str] = []
        old = dict(self._record)
        try:
            for path in changed:
                kind, terms, rec = want[path]
                self._write(path, terms, kind)
                done.append(path)
                if rec:
                    self._record[path] = rec
                else:
                    self._record.pop(path, None)
        except Exception:  # any failure mid-switch (a ValueError above, or a device error): roll back, re-raise
            self._rollback(done, old)
            raise
        self.current = mix
        active = sum(1 for p in self._record if self._saved[p].kind == "weight")
        return ApplyStats(len([p for p in changed if want[p][0] == "weight"]), len(changed), active, time.perf_counter() - t0)

    def _rollback(self, paths: list[str], old: dict[str, tuple]) -> None:
        """Rewrite ``paths`` to the record ``old`` (terms re-resolved from cached parts)."""
        self._record = dict(old)
        if not paths:
            return
        mods, extras = self._targets(self.current or Mix.base())
        for path in paths:
            if path in mods:
                self._write(path, mods[path], "weight")
            elif path in extras:
                self._write(path, extras[path], "extra")
            else:
                self._write(path, [], self._saved[path].kind)

    def restore(self) -> int:
        """Write every touched tensor back to its original (bit-identical); forget the mix.

        Returns:
            The number of tensors written.
        """
        with torch.no_grad():
            for path, saved in self._saved.items():
                p = self._param(path)
                p.copy_(saved.tensor.to(p.device))
        n = len(self._saved)
        self._saved.clear()
        self._record.clear()
        self.current = None
        return n

    def clear_cache(self) -> None:
        """Drop resolved components (call after a source's contents change in place)."""
        self.parts.clear()

    @property
    def max_sources(self) -> int:
        """Sources whose resolved parts stay cached (``PartCache.max_sources``)."""
        return self.parts.max_sources

    @max_sources.setter
    def max_sources(self, n: int) -> None:
        self.parts.max_sources = n
