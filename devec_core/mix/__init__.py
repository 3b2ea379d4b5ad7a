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
    fused_weight(W0, B, A, col_scale, dense, dtype=, device=, name=)   the pure sum of one module

Modules: ``terms`` (the mix value), ``fuse`` (the fused weight of a mix on one module: pure
functions), ``parts`` (the cache of resolved and stacked parts), ``editor`` (write, roll back,
restore). Every public name is importable from ``devec_core.mix``.

Numerics: per module the sum is built in float32 on ``compute_device`` as
W0 + [λ_1 B_1 | … | λ_k B_k] @ [A_1; …; A_k] (+ Σ λ·dense), checked finite, then cast to the
parameter's dtype and checked again (bf16/fp16 overflow), and only then written. If any module of
an apply fails the check, the modules already rewritten by that apply are rolled back to the
previous mix and ValueError names the module. Terms are summed in a canonical order, so a mix's
weights do not depend on the history of switches.

A WeightEditor is not thread-safe by itself; the backends hold a lock around apply + generate.
"""

from .editor import ApplyStats, WeightEditor
from .fuse import fused_weight, fused_weight_into, lowrank_bound
from .parts import Part, PartCache
from .terms import EXTRA_KINDS, KINDS, Component, Mix, VectorPool, devec, vanilla

__all__ = [
    "KINDS", "EXTRA_KINDS", "Component", "Mix", "VectorPool", "vanilla", "devec",
    "fused_weight", "fused_weight_into", "lowrank_bound", "Part", "PartCache", "ApplyStats", "WeightEditor",
]
