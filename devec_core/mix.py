"""Mixes of decomposition components, and fusing them into a model's weights reversibly.

A *mix* is a list of (component, coefficient). A component is (kind, name) resolved against a
source — a ``devec_core.Decomposition`` (``dec.component(kind, name)``) or a plain
``VectorPool`` of task vectors (kind "delta" only). Kinds: "delta" (the original vector),
"unique", "shared" (that vector's shared part), "merged_shared" (eq. 14, joint mode, name None),
"pair_shared" (pairwise mode, name "a+b"). The model then runs with

    W = W0 + Σ_terms coefficient · ΔW_component           (per touched Linear weight)

Extras (biases etc. in ``TaskVector.extras``) follow the coefficient of their vector's "delta" or
"unique" term (docs/METHOD.md: not decomposed, they stay with their vector).

Public API:
    Component(kind, name=None)             frozen; str(c) == "unique:a"; Component.parse("unique:a")
    Mix(source, terms, label="")           frozen; terms = ((Component, float), ...); accepts
                                           tuples ("unique", "a", 1.0) / (("unique","a"), 1.0) too
    Mix.base(source=None)                  the empty mix (the base model)
    mix.to_spec() / Mix.from_spec(source, spec)   plain data {"label", "terms": [["unique:a", 1.0]]}
    mix.describe() -> "label: 1·unique:a + 0.5·unique:b"
    vanilla(source, weights, label="vanilla")          deltas only: {name: λ}
    devec(source, unique, shared=0.0, pairs=None, label="devec")
                                           {name: λ_u} on unique parts, + λ_s · merged_shared,
                                           + {"a+b": λ} on pairwise shared vectors
    VectorPool(vectors)                    a source without decomposition (kind "delta" only)
    WeightEditor(root, compute_device=None, originals_device="cpu")
        .apply(mix) -> ApplyStats          fuse the mix into ``root``'s weights; only modules whose
                                           terms changed since the last apply are rewritten, each
                                           once, from its saved original (never incrementally)
        .restore() -> int                  bit-identical base weights back; returns tensors written
        .current -> Mix | None             the mix now fused (None = base)
    ApplyStats(modules_written, params_written, modules_active, seconds)

Numerics: per module the sum is built in float32 on ``compute_device`` as
W0 + [λ_1 B_1 | … | λ_k B_k] @ [A_1; …; A_k] (+ Σ λ·dense), checked finite, then cast to the
parameter's dtype and checked again (bf16/fp16 overflow), and only then written. If any module of
an apply fails the check, the modules already rewritten by that apply are rolled back to the
previous mix and ValueError names the module. Terms are summed in a canonical order, so a mix's
weights do not depend on the history of switches.

A WeightEditor is not thread-safe by itself; the backends hold a lock around apply + generate.
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .taskvec import Delta, Dense, LowRank, TaskVector

KINDS = ("delta", "unique", "shared", "merged_shared", "pair_shared")
# kinds whose vector's extras (biases) follow the coefficient
_EXTRA_KINDS = ("delta", "unique")


# --- the mix ---------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Component:
    """One component of a decomposition: ``kind`` ∈ KINDS, ``name`` a vector (or "a+b" pair)."""

    kind: str
    name: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown component kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "merged_shared" and self.name is not None:
            raise ValueError(f"merged_shared takes no name; got {self.name!r}")
        if self.kind != "merged_shared" and not self.name:
            raise ValueError(f"component kind {self.kind!r} needs a name")

    def __str__(self) -> str:
        return self.kind if self.name is None else f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> "Component":
        """``"unique:a"`` → Component("unique", "a"); ``"merged_shared"`` → Component("merged_shared")."""
        kind, _, name = text.partition(":")
        return cls(kind.strip(), name.strip() or None)


def _as_term(t: Any) -> tuple[Component, float]:
    """Normalise (Component, λ) / ((kind, name), λ) / (kind, name, λ) / ("kind:name", λ)."""
    if isinstance(t, (tuple, list)) and len(t) == 3:
        comp, coef = Component(t[0], t[1]), t[2]
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        c, coef = t
        if isinstance(c, Component):
            comp = c
        elif isinstance(c, str):
            comp = Component.parse(c)
        elif isinstance(c, (tuple, list)):
            comp = Component(*c)
        else:
            raise ValueError(f"mix term {t!r}: component must be Component, 'kind:name' or (kind, name)")
    else:
        raise ValueError(f"mix term {t!r}: expected (component, coefficient) or (kind, name, coefficient)")
    coef = float(coef)
    if not math.isfinite(coef):
        raise ValueError(f"mix term {comp}: coefficient is {coef}")
    return comp, coef


@dataclass(frozen=True)
class Mix:
    """A mix: ``source`` (Decomposition or VectorPool) + ((Component, coefficient), ...)."""

    source: Any = field(compare=False, repr=False)
    terms: tuple = ()
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(_as_term(t) for t in self.terms))
        if self.terms and self.source is None:
            raise ValueError(f"mix {self.label!r} has terms but no source (Decomposition or VectorPool)")

    @classmethod
    def base(cls, source: Any = None) -> "Mix":
        """The empty mix: the base model's weights."""
        return cls(source, (), "base")

    def active(self) -> dict[Component, float]:
        """Coefficients summed per component, zeros dropped, in canonical (sorted) order."""
        acc: dict[Component, float] = {}
        for c, lam in self.terms:
            acc[c] = acc.get(c, 0.0) + lam
        return {c: acc[c] for c in sorted(acc) if acc[c] != 0.0}

    def to_spec(self) -> dict:
        """Plain data (JSON/YAML-safe): ``{"label": ..., "terms": [["unique:a", 1.0], ...]}``."""
        return {"label": self.label, "terms": [[str(c), lam] for c, lam in self.terms]}

    @classmethod
    def from_spec(cls, source: Any, spec: dict) -> "Mix":
        """Inverse of ``to_spec``, bound to ``source``.

        Args:
            source: a Decomposition or VectorPool.
            spec: ``{"label": str, "terms": [[ "kind:name", coefficient ], ...]}``.

        Returns:
            The mix.
        """
        if not isinstance(spec, dict) or not isinstance(spec.get("terms", []), list):
            raise ValueError(f"mix spec must be a dict with a 'terms' list; got {spec!r}")
        return cls(source, tuple(tuple(t) for t in spec.get("terms", [])), str(spec.get("label", "")))

    def describe(self) -> str:
        """``"label: 1·unique:a + 0.5·unique:b"``."""
        body = " + ".join(f"{lam:g}·{c}" for c, lam in self.terms) or "base"
        return f"{self.label}: {body}" if self.label else body


def vanilla(source: Any, weights: dict[str, float], label: str = "vanilla") -> Mix:
    """Vanilla task arithmetic: Σ λ_i ΔW_i over the vectors' original deltas.

    Args:
        source: a Decomposition or VectorPool.
        weights: vector name → λ.
        label: shown in side-by-side results.

    Returns:
        The mix.
    """
    return Mix(source, tuple((Component("delta", n), lam) for n, lam in weights.items()), label)


def devec(
    source: Any,
    unique: dict[str, float],
    shared: float = 0.0,
    pairs: dict[str, float] | None = None,
    label: str = "devec",
) -> Mix:
    """A DeVec mix: Σ λ_i^u U_i + λ^s S (joint) + Σ λ_ab S_ab (pairwise "a+b" shared vectors).

    Args:
        source: a Decomposition.
        unique: vector name → coefficient of its unique part.
        shared: coefficient of the merged shared vector (eq. 14); 0 leaves it out.
        pairs: "a+b" → coefficient of that pair's shared vector (pairwise mode).
        label: shown in side-by-side results.

    Returns:
        The mix.
    """
    terms = [(Component("unique", n), lam) for n, lam in unique.items()]
    if shared:
        terms.append((Component("merged_shared"), shared))
    terms += [(Component("pair_shared", p), lam) for p, lam in (pairs or {}).items()]
    return Mix(source, tuple(terms), label)


class VectorPool:
    """Task vectors without a decomposition: a mix source offering kind "delta" only.

    Args:
        vectors: the task vectors (unique names).
    """

    def __init__(self, vectors: Iterable[TaskVector]):
        self.vectors = list(vectors)
        self.names = [v.name for v in self.vectors]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"VectorPool needs unique vector names; got {self.names}")

    def component(self, kind: str, name: str | None = None) -> dict[str, Delta]:
        if kind != "delta":
            raise ValueError(f"a VectorPool has only 'delta' components; got {kind!r} (decompose the pool first)")
        if name not in self.names:
            raise ValueError(f"Unknown task vector {name!r}; the pool has {self.names}")
        return dict(self.vectors[self.names.index(name)].modules)


# --- fusing into a model ---------------------------------------------------------------------
@dataclass
class ApplyStats:
    """What one apply did: tensors rewritten, modules carrying a nonzero term, wall time."""

    modules_written: int
    params_written: int
    modules_active: int
    seconds: float


@dataclass
class _Part:
    """One resolved term on one module, as fp32 factors on the compute device."""

    key: tuple  # (source serial, kind, name)
    B: torch.Tensor | None  # (n, r), scale folded in
    A: torch.Tensor | None  # (r, m)
    W: torch.Tensor | None  # (n, m) dense


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
        self._orig: dict[str, torch.Tensor] = {}  # param path -> original tensor
        self._amax: dict[str, float] = {}  # param path -> max |original| (fp32 weights: the one-pass bound)
        self._record: dict[str, tuple] = {}  # param path -> ((key, coef), ...) now fused
        self._serials: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, int]] = {}  # for sources that are not weak-referenceable
        self._parts: dict[tuple, dict[str, _Part]] = {}  # component key -> module -> part
        self._extras_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._kinds: dict[str, str] = {}  # param path -> "weight" | "extra"
        self._stack: dict[str, tuple] = {}  # weight path -> (component keys, Bc, Ac, column→term)
        self._counter = itertools.count(1)
        self._recent: dict[int, None] = {}  # source serials, least recently used first
        self.max_sources = 4  # sources whose resolved parts stay cached
        self.current: Mix | None = None

    # -- resolving ------------------------------------------------------------------------
    def _serial(self, source: Any) -> int:
        """A number unique to ``source`` for this editor's lifetime (never reused, unlike id())."""
        try:
            if source not in self._serials:
                self._serials[source] = next(self._counter)
            return self._serials[source]
        except TypeError:  # not weak-referenceable: hold it, so its id stays unique
            if id(source) not in self._strong:
                self._strong[id(source)] = (source, next(self._counter))
            return self._strong[id(source)][1]

    def _resolve(self, source: Any, comp: Component) -> tuple[tuple, dict[str, _Part], dict[str, torch.Tensor]]:
        serial = self._serial(source)
        self._recent.pop(serial, None)
        self._recent[serial] = None
        while len(self._recent) > self.max_sources:  # forget parts of the least recent source
            old = next(iter(self._recent))
            del self._recent[old]
            for k in [k for k in self._parts if k[0] == old]:
                del self._parts[k], self._extras_cache[k]
            self._stack.clear()
        key = (serial, comp.kind, comp.name or "")
        if key not in self._parts:
            parts = {}
            for mod, d in source.component(comp.kind, comp.name).items():
                parts[mod] = self._part(key, mod, d)
            extras = {}
            if comp.kind in _EXTRA_KINDS:
                for v in getattr(source, "vectors", []):
                    if v.name == comp.name:
                        extras = {p: t.detach().float() for p, t in v.extras.items()}
            self._check_finite(comp, parts, extras)
            self._parts[key], self._extras_cache[key] = parts, extras
        return key, self._parts[key], self._extras_cache[key]

    def _part(self, key: tuple, mod: str, d: Delta) -> _Part:
        weight = self._weight(mod)
        if tuple(d.shape) != tuple(weight.shape):
            raise ValueError(
                f"component {key[1]}:{key[2]} module {mod!r}: delta shape {tuple(d.shape)} does not match "
                f"the model's weight {tuple(weight.shape)}"
            )
        dev = self.compute_device or weight.device
        if isinstance(d, LowRank):
            return _Part(key, d.scaled_B().to(dev, torch.float32), d.A.to(dev, torch.float32), None)
        if isinstance(d, Dense):
            return _Part(key, None, None, d.W.to(dev, torch.float32))
        raise ValueError(f"module {mod!r}: unsupported delta type {type(d).__name__}")

    def _weight(self, mod: str) -> torch.Tensor:
        try:
            sub = self.root.get_submodule(mod)
        except AttributeError:
            hint = ""
            head, _, rest = mod.partition(".")
            try:
                self.root.get_submodule(rest)
                hint = f"; did you mean {rest!r} (without the {head + '.'!r} prefix)?"
            except AttributeError:
                tail = mod.rsplit(".", 1)[-1]
                like = [n for n, _ in self.root.named_modules() if n.endswith("." + tail)][:2]
                hint = f"; modules of that kind here look like {like}" if like else ""
            raise ValueError(f"module {mod!r} does not exist in {type(self.root).__name__}{hint}") from None
        w = getattr(sub, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise ValueError(f"module {mod!r} ({type(sub).__name__}) has no 2-D weight to edit")
        if w.device.type == "meta":
            raise ValueError(
                f"module {mod!r}: weight is on the meta device (sequential CPU offload / not loaded); "
                "use model CPU offload or a loaded model"
            )
        return w

    def _param(self, path: str) -> torch.Tensor:
        try:
            return self.root.get_parameter(path)
        except AttributeError:
            raise ValueError(f"parameter {path!r} does not exist in {type(self.root).__name__}") from None

    @staticmethod
    def _check_finite(comp: Component, parts: dict[str, _Part], extras: dict[str, torch.Tensor]) -> None:
        for mod, p in parts.items():
            for t in (p.B, p.A, p.W):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"component {comp} module {mod!r} contains NaN/Inf; refusing to apply")
        for path, t in extras.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"component {comp} parameter {path!r} contains NaN/Inf; refusing to apply")

    def _targets(self, mix: Mix) -> tuple[dict[str, list], dict[str, list]]:
        """Per weight path: [(coef, part)], per extra path: [(coef, key, tensor)], canonical order."""
        mods: dict[str, list] = {}
        extras: dict[str, list] = {}
        for comp, lam in mix.active().items():
            key, parts, ex = self._resolve(mix.source, comp)
            for mod, part in parts.items():
                mods.setdefault(mod + ".weight", []).append((lam, part))
            for path, t in ex.items():
                extras.setdefault(path, []).append((lam, key, t))
        return mods, extras

    # -- writing --------------------------------------------------------------------------
    def _save_original(self, path: str, p: torch.Tensor) -> None:
        if path not in self._orig:
            if self.originals_device == "same":
                keep = p.detach().clone()
            else:
                keep = p.detach().to("cpu", copy=True)
                dev = self.compute_device or p.device
                if dev.type == "cuda":  # pinned host memory: faster copies back to the GPU
                    keep = keep.pin_memory()
            self._orig[path] = keep

    def _stacked(self, path: str, lows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B_1 | … | B_k], [A_1; …; A_k] and each column's term index, cached per module for its
        set of components: a switch that only changes coefficients re-uses them (constant op count)."""
        keys = tuple(part.key for _, part in lows)
        hit = self._stack.get(path)
        if hit is None or hit[0] != keys:
            Bc = torch.cat([part.B for _, part in lows], 1)  # (n, Σr)
            Ac = torch.cat([part.A for _, part in lows], 0)  # (Σr, m)
            col = torch.cat([torch.full((part.B.shape[1],), i, dtype=torch.long) for i, (_, part) in enumerate(lows)])
            hit = self._stack[path] = (keys, Bc, Ac, col.to(Bc.device))
        return hit[1], hit[2], hit[3]

    def _fused(self, path: str, p: torch.Tensor, terms: list, kind: str) -> torch.Tensor:
        """W0 + Σ terms in fp32 on the compute device, cast to p.dtype and checked; not written."""
        dev = self.compute_device or p.device
        W = self._orig[path].to(dev, torch.float32, copy=True)
        if kind == "weight":
            lows = [(lam, part) for lam, part in terms if part.W is None]
            if lows:
                Bc, Ac, col = self._stacked(path, lows)
                lam = torch.tensor([x for x, _ in lows], dtype=torch.float32, device=Bc.device)[col]  # (Σr,)
                W.addmm_((Bc * lam).to(dev), Ac.to(dev))  # one matmul of rank Σr
            for lam, part in terms:
                if part.W is not None:
                    W.add_(part.W.to(dev), alpha=lam)
        else:
            for lam, _, t in terms:
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"parameter {path!r}: extra shape {tuple(t.shape)} does not match {tuple(p.shape)}")
                W.add_(t.to(dev), alpha=lam)
        out = W.to(p.dtype)  # NaN/Inf in float32 stay NaN/Inf; overflow of a narrower dtype shows here
        if not torch.isfinite(out).all():
            raise ValueError(f"{path!r}: the mixed weight has NaN/Inf in {p.dtype}; refusing to write it")
        return out

    def _one_pass(self, path: str, p: torch.Tensor, terms: list) -> bool:
        """p = W0 + (B·λ)A written by one addmm straight into p: one read of W0, one write of p,
        no temporaries of p's size. Only for float32 weights whose original sits on the compute
        device, with LoRA terms only. Finiteness by a bound instead of a scan: |(BλA)_ij| ≤
        max_i ‖(Bλ)_i‖ · max_j ‖A_:j‖ (Cauchy–Schwarz), so max|W0| + that bound below float32's
        range means the result is finite (parts were checked finite when resolved); otherwise the
        general path runs and scans. Returns False when it does not apply (nothing written)."""
        orig = self._orig[path]
        dev = self.compute_device or p.device
        if p.dtype != torch.float32 or orig.dtype != torch.float32 or orig.device != p.device or torch.device(dev) != p.device:
            return False
        if any(part.W is not None for _, part in terms):
            return False
        Bc, Ac, col = self._stacked(path, terms)
        lam = torch.tensor([x for x, _ in terms], dtype=torch.float32, device=Bc.device)[col]
        Bl = Bc * lam
        if path not in self._amax:  # once per weight, and only where this path applies
            self._amax[path] = float(orig.abs().max()) if orig.numel() else 0.0
        bound = self._amax[path] + float(Bl.norm(dim=1).max()) * float(Ac.norm(dim=0).max())
        if not bound < torch.finfo(torch.float32).max / 4:  # also False for NaN
            return False
        torch.addmm(orig, Bl, Ac, out=p.data)
        return True

    def _write(self, path: str, terms: list, kind: str) -> None:
        p = self._param(path) if kind == "extra" else self._weight(path[: -len(".weight")])
        self._save_original(path, p)
        self._kinds[path] = kind
        with torch.no_grad():
            if terms and kind == "weight" and self._one_pass(path, p, terms):
                pass
            elif terms:
                p.copy_(self._fused(path, p, terms, kind).to(p.device))
            else:
                p.copy_(self._orig[path].to(p.device))

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
                want[path] = (self._kinds[path], [], ())
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
        except Exception:
            self._rollback(done, old)
            raise
        self.current = mix
        active = sum(1 for p in self._record if self._kinds[p] == "weight")
        return ApplyStats(len([p for p in changed if want[p][0] == "weight"]), len(changed), active, time.perf_counter() - t0)

    def _rollback(self, paths: list[str], old: dict[str, tuple]) -> None:
        """Rewrite ``paths`` to the record ``old`` (terms re-resolved from cached parts)."""
        self._record = dict(old)
        if not paths:
            return
        prev = self.current or Mix.base()
        mods, extras = self._targets(prev)
        for path in paths:
            if path in mods:
                self._write(path, mods[path], "weight")
            elif path in extras:
                self._write(path, extras[path], "extra")
            else:
                self._write(path, [], self._kinds[path])

    def restore(self) -> int:
        """Write every touched tensor back to its original (bit-identical); forget the mix.

        Returns:
            The number of tensors written.
        """
        n = 0
        with torch.no_grad():
            for path, orig in self._orig.items():
                p = self._param(path)
                p.copy_(orig.to(p.device))
                n += 1
        self._orig.clear()
        self._amax.clear()
        self._record.clear()
        self._kinds.clear()
        self.current = None
        return n

    def clear_cache(self) -> None:
        """Drop resolved components (call after a source's contents change in place)."""
        self._parts.clear()
        self._stack.clear()
        self._extras_cache.clear()
