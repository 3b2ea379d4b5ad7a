"""The decomposition engine: fast path vs the literal equations, invariants, toy, edge cases."""

import math

import pytest
import torch

from devec_core import Dense, LowRank, TaskVector, decompose
from devec_core import algorithm as D
from devec_core.algorithm import PAPER_TAU
from tests import literal as L

F64 = dict(dtype="float64")


def planted(k, n=48, m=40, r=6, s=3, noise=0.15, seed=0, dense=False, modules=("mod",)):
    """k vectors sharing s planted column directions (each copy tilted by `noise`), plus r−s own."""
    g = torch.Generator().manual_seed(seed)
    vecs = [dict() for _ in range(k)]
    for mod in modules:
        Dm = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64))[0]
        for i in range(k):
            own = torch.randn(n, r - s, generator=g, dtype=torch.float64) / math.sqrt(n)
            tilt = noise * torch.randn(n, s, generator=g, dtype=torch.float64) / math.sqrt(n)
            B = torch.cat([Dm + tilt, own], 1)
            A = torch.randn(r, m, generator=g, dtype=torch.float64)
            if dense:
                W = B @ A + 1e-3 * torch.randn(n, m, generator=g, dtype=torch.float64)
                vecs[i][mod] = Dense(W)
            else:
                vecs[i][mod] = LowRank(B, A, scale=0.5)
    return [TaskVector(f"v{i}", v) for i, v in enumerate(vecs)]


def rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


def gap_ok(vals, tau):
    return float((vals.real - tau).abs().min()) > 1e-4


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dense", [False, True])
def test_fast_path_equals_literal_equations(k, dense):
    tau = PAPER_TAU
    pool = planted(k, dense=dense, seed=k)
    cut = dict(rank=6) if dense else {}
    dec = decompose(pool, tau=tau, dense_rank=6 if dense else None, dense_energy=None, **F64)
    Ws = [v.modules["mod"].dense(torch.float64) for v in pool]
    Z, vals = L.shared_basis(Ws, tau, **cut)
    assert gap_ok(vals, tau), "test data must not put an eigenvalue on the threshold"
    assert Z.shape[1] >= 3
    S, U, merged = L.parts(Ws, Z)

    Zf = dec.shared_basis("mod")
    assert Zf.shape == Z.shape
    assert rel(Zf @ Zf.T, Z @ Z.T) <= 1e-8
    # the nonzero eigenvalues of the r1×r1 chain matrix are those of the n×n product
    nz = lambda ev: ev[ev.abs() > 1e-10]  # noqa: E731
    lit, fast = nz(vals), nz(dec.eigenvalues()["mod"])
    assert lit.numel() == fast.numel()
    assert torch.allclose(lit.real.sort().values, fast.real.sort().values, atol=1e-10)
    assert torch.allclose(lit.imag.abs().sort().values, fast.imag.abs().sort().values, atol=1e-10)
    for i, v in enumerate(pool):
        assert rel(dec.component("shared", v.name)["mod"].dense(torch.float64), S[i]) <= 1e-8
        assert rel(dec.component("unique", v.name)["mod"].dense(torch.float64), U[i]) <= 1e-8
    assert rel(dec.component("merged_shared")["mod"].dense(torch.float64), merged) <= 1e-8


def test_complex_pairs_appear_and_are_kept_whole():
    # k ≥ 3 with tilted copies: the chained product is not symmetric and shared directions
    # come as complex-conjugate pairs; each kept pair contributes 2 real dimensions.
    found = False
    for seed in range(20):
        pool = planted(3, seed=seed, noise=0.3)
        dec = decompose(pool, tau=0.5, **F64)
        ev = dec.eigenvalues()["mod"]
        kept_complex = ((ev.real > 0.5) & (ev.imag.abs() > 1e-8)).sum()
        if kept_complex:
            found = True
            Ws = [v.modules["mod"].dense(torch.float64) for v in pool]
            Z, vals = L.shared_basis(Ws, 0.5)
            assert dec.shared_dims()["mod"] == Z.shape[1] == int((ev.real > 0.5).sum())
            assert dec.summary()[0]["complex"] >= 2
            break
    assert found, "expected a complex pair among planted shared directions for k = 3"


@pytest.mark.parametrize("k", [2, 3, 4])
def test_shared_plus_unique_rebuilds_and_parts_are_orthogonal(k):
    pool = planted(k, seed=10 + k) + []
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    Z = dec.shared_basis("mod")
    for v in pool:
        s = dec.component("shared", v.name)["mod"]
        u = dec.component("unique", v.name)["mod"]
        W = v.modules["mod"].dense(torch.float64)
        assert rel(s.dense(torch.float64) + u.dense(torch.float64), W) <= 1e-12
        assert float((Z.T @ u.dense(torch.float64)).abs().max()) <= 1e-10  # unique ⟂ shared subspace
        assert abs(float((s.dense(torch.float64) * u.dense(torch.float64)).sum())) <= 1e-10 * float(W.norm() ** 2)
        # a LoRA's parts are LoRAs of the same rank, with the same A
        assert isinstance(u, LowRank) and u.rank == v.modules["mod"].rank
        assert torch.equal(u.A, v.modules["mod"].A)


def test_with_tau_equals_a_fresh_decomposition():
    pool = planted(3, seed=4, modules=("a", "b", "c"))
    base = decompose(pool, tau=PAPER_TAU, **F64)
    for tau in (0.3, 0.6, 0.95, 1.0):
        again = base.with_tau(tau)
        fresh = decompose(pool, tau=tau, **F64)
        assert again.shared_dims() == fresh.shared_dims()
        for name in ("v0", "v2"):
            a, b = again.component("unique", name), fresh.component("unique", name)
            for mod in a:
                assert torch.allclose(a[mod].dense(), b[mod].dense(), atol=1e-12)


def test_batched_modules_equal_one_at_a_time():
    pool = planted(3, seed=5, modules=("a", "b", "c", "d"))
    together = decompose(pool, tau=PAPER_TAU, **F64)
    assert len(together.blocks) == 1 and len(together.blocks[0].modules) == 4
    for mod in ("a", "b", "c", "d"):
        alone = decompose([TaskVector(v.name, {mod: v.modules[mod]}) for v in pool], tau=PAPER_TAU, **F64)
        for name in ("v0", "v1", "v2"):
            assert torch.allclose(
                together.component("unique", name)[mod].dense(), alone.component("unique", name)[mod].dense(), atol=1e-12
            )


def test_float32_default_is_close_to_float64():
    pool = planted(3, seed=6)
    d32, d64 = decompose(pool, tau=PAPER_TAU), decompose(pool, tau=PAPER_TAU, **F64)
    assert d32.shared_dims() == d64.shared_dims()
    u32 = d32.component("unique", "v1")["mod"]
    assert u32.B.dtype == torch.float32
    assert rel(u32.dense(torch.float64), d64.component("unique", "v1")["mod"].dense(torch.float64)) < 1e-5


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def test_isolate_union_equals_literal_and_ignores_reference_order():
    pool = planted(4, seed=7, noise=0.05, r=10)
    Ws = [v.modules["mod"].dense(torch.float64) for v in pool]
    want = L.isolate(Ws[1], [Ws[0], Ws[2], Ws[3]], PAPER_TAU)
    dec = decompose(pool, tau=PAPER_TAU, mode="isolate", target="v1", **F64)
    got = dec.component("unique", "v1")["mod"].dense(torch.float64)
    assert rel(got, want) <= 1e-8
    rev = decompose(pool, tau=PAPER_TAU, mode="isolate", target="v1", references=("v3", "v2", "v0"), **F64)
    assert rel(rev.component("unique", "v1")["mod"].dense(torch.float64), want) <= 1e-8
    # references are not edited
    assert torch.equal(dec.component("unique", "v0")["mod"].dense(), pool[0].modules["mod"].dense())


def test_isolate_sequential_is_offered_and_reported():
    pool = planted(4, seed=8, noise=0.1, r=10)
    union = decompose(pool, tau=PAPER_TAU, mode="isolate", target="v0", **F64)
    seq = decompose(pool, tau=PAPER_TAU, mode="isolate", target="v0", isolate_order="sequential", **F64)
    u1 = union.component("unique", "v0")["mod"].dense(torch.float64)
    u2 = seq.component("unique", "v0")["mod"].dense(torch.float64)
    W = pool[0].modules["mod"].dense(torch.float64)
    # both remove a shared part; how far they differ is reported, not asserted
    assert u1.norm() < W.norm() and u2.norm() < W.norm()
    print(f"isolate union vs sequential: relative difference {rel(u2, u1):.3e}")


def test_pairwise_shared_vectors_equal_literal():
    pool = planted(3, seed=9)
    Ws = [v.modules["mod"].dense(torch.float64) for v in pool]
    dec = decompose(pool, tau=PAPER_TAU, mode="pairwise", **F64)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        Z, _ = L.shared_basis([Ws[a], Ws[b]], PAPER_TAU)
        _, _, merged = L.parts([Ws[a], Ws[b]], Z)
        got = dec.component("pair_shared", f"v{a}+v{b}")["mod"].dense(torch.float64)
        assert rel(got, merged) <= 1e-8
    # a vector's unique part in pairwise mode = isolate it against all others
    iso = decompose(pool, tau=PAPER_TAU, mode="isolate", target="v2", **F64)
    assert rel(dec.component("unique", "v2")["mod"].dense(), iso.component("unique", "v2")["mod"].dense()) < 1e-12


def test_symmetric_variant_equals_chain_for_two_vectors():
    pool = planted(2, seed=11)
    a = decompose(pool, tau=PAPER_TAU, **F64)
    b = decompose(pool, tau=PAPER_TAU, symmetric=True, **F64)
    assert torch.allclose(a.eigenvalues()["mod"].real, b.eigenvalues()["mod"].real, atol=1e-12)
    Za, Zb = a.shared_basis("mod"), b.shared_basis("mod")
    assert rel(Za @ Za.T, Zb @ Zb.T) < 1e-10


# --------------------------------------------------------------------------------------------
# Appendix 6: principal vectors (k = 2)
# --------------------------------------------------------------------------------------------


# README: "the symmetric 'bisector' variant sits 9.1°–11.3° from our subspace at noise 0.4 (seeds 0–2)";
# the band's ends are seed 1 (9.1°) and seed 0 (11.3°): the largest principal angle, per seed
BISECTOR_MAX_ANGLE_README = {0: 11.3, 1: 9.1, 2: None}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_principal_angle_alternative_matches_projection_method(seed):
    pool = planted(2, seed=seed, noise=0.4, r=8, s=4)
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    Q1 = dec.blocks[0].basis(0, 0)
    Q2 = dec.blocks[0].basis(1, 0)
    p, q, bis, cos2 = D.principal_vectors(Q1, Q2, PAPER_TAU)
    Z = dec.shared_basis("mod")
    assert p.shape[1] == Z.shape[1]  # same number of directions selected at the same τ
    assert rel(p @ p.T, Z @ Z.T) < 1e-10  # the first side's principal vectors span Z
    if p.shape[1]:
        Zb = torch.linalg.qr(bis)[0]
        ang = D.subspace_angles_deg(Zb, Z)
        print(f"seed {seed}: bisector vs projection method: max {float(ang.max()):.2f}°, mean {float(ang.mean()):.2f}° (paper: within ~6°)")
    assert p.shape[1] > 0  # the README's angles need directions to compare
    worst = float(ang.max())
    assert 9.05 <= worst < 11.35, f"seed {seed}: {worst:.2f}° is outside README's 9.1°–11.3°"
    if BISECTOR_MAX_ANGLE_README[seed] is not None:
        assert round(worst, 1) == BISECTOR_MAX_ANGLE_README[seed]


# --------------------------------------------------------------------------------------------
# Appendix 7: the toy with 100 planted shared directions
# --------------------------------------------------------------------------------------------


def toy(sigma, scaling, n=600, m=300, shared=100, own=50, seed=0):
    """Two matrices sharing `shared` planted column directions.

    scaling = "relative": W_i = signal_i + N_i with ‖N_i‖_F = σ‖signal_i‖_F (noise relative to
              the whole matrix).
    scaling = "column":   each shared column is d_j + σ g, g ~ N(0, I/n) (noise of amplitude σ on
              each unit shared column), before mixing with random coefficients.
    Returns (W1, W2, true basis (n, shared)).
    """
    g = torch.Generator().manual_seed(seed)
    T = torch.linalg.qr(torch.randn(n, shared, generator=g, dtype=torch.float64))[0]
    Ws = []
    for _ in range(2):
        O = torch.randn(n, own, generator=g, dtype=torch.float64) / math.sqrt(n)
        Sh = T.clone()
        if scaling == "column":
            Sh = Sh + sigma * torch.randn(n, shared, generator=g, dtype=torch.float64) / math.sqrt(n)
        C = torch.randn(shared + own, m, generator=g, dtype=torch.float64)
        W = torch.cat([Sh, O], 1) @ C
        if scaling == "relative":
            N = torch.randn(n, m, generator=g, dtype=torch.float64)
            W = W + sigma * W.norm() / N.norm() * N
        Ws.append(W)
    return Ws[0], Ws[1], T


# README's appendix-7 table, (recovered directions, mean angle in degrees to 0.1°) per σ, both noise readings
TOY_TABLE_README = {
    "relative": {0.0: (100, 0.0), 0.1: (100, 4.9), 0.2: (98, 9.7), 0.3: (75, 12.9), 0.4: (53, 15.8)},
    "column": {0.0: (100, 0.0), 0.1: (100, 5.1), 0.2: (100, 10.2), 0.3: (77, 14.5), 0.4: (45, 18.1)},
}


@pytest.mark.parametrize("scaling", ["relative", "column"])
def test_toy_appendix7(scaling):
    rows = []
    for sigma in (0.0, 0.1, 0.2, 0.3, 0.4):
        W1, W2, T = toy(sigma, scaling)
        dec = decompose(
            [TaskVector("a", {"m": Dense(W1)}), TaskVector("b", {"m": Dense(W2)})],
            tau=PAPER_TAU, dense_rank=150, dense_energy=None, **F64,
        )
        Z = dec.shared_basis("m")
        ang = D.subspace_angles_deg(Z, T) if Z.shape[1] else torch.tensor([90.0])
        rows.append((sigma, Z.shape[1], float(ang.mean())))
        if sigma == 0.0:
            assert Z.shape[1] == 100 and float(ang.max()) < 1e-4  # all recovered, exactly
        else:
            assert Z.shape[1] > 0 and float(ang.mean()) < 30.0
    print(f"\ntoy ({scaling} noise): " + "; ".join(f"σ={s}: {c} recovered, mean angle {a:.1f}°" for s, c, a in rows))
    got = {s: (c, round(a, 1)) for s, c, a in rows}
    assert got == TOY_TABLE_README[scaling]  # the table README quotes


# --------------------------------------------------------------------------------------------
# Edge cases and bad input
# --------------------------------------------------------------------------------------------


def test_one_vector_is_all_unique():
    pool = planted(1)
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    assert dec.shared_dims() == {"mod": 0}
    assert torch.equal(dec.component("unique", "v0")["mod"].dense(), pool[0].modules["mod"].dense())
    assert dec.component("merged_shared") == {}


def test_module_in_only_one_vector_is_unique():
    pool = planted(3, modules=("a", "b"))
    del pool[1].modules["b"], pool[2].modules["b"]
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    assert dec.shared_dims()["b"] == 0 and dec.shared_dims()["a"] >= 3
    assert torch.equal(dec.component("unique", "v0")["b"].dense(), pool[0].modules["b"].dense())
    row = {r["module"]: r for r in dec.summary()}["b"]
    assert row["members"] == ["v0"]


def test_zero_module():
    # one module of a vector is exactly zero (the vector as a whole is not: an all-zero vector is
    # refused, tests/test_stress_engine.py)
    pool = planted(3, modules=("mod", "other"))
    pool[1].modules["mod"] = LowRank(torch.zeros(48, 6, dtype=torch.float64), torch.zeros(6, 40, dtype=torch.float64))
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    assert dec.shared_dims()["mod"] == 0  # nothing is shared with a zero vector
    assert dec.component("unique", "v1")["mod"].dense().abs().max() == 0
    assert torch.equal(dec.component("unique", "v0")["mod"].dense(), pool[0].modules["mod"].dense())
    assert {r["module"]: r for r in dec.summary()}["mod"]["ranks"][1] == 0


def test_rank_deficient_factors_use_numerical_rank():
    pool = planted(2, seed=3)
    lr = pool[0].modules["mod"]
    B = lr.B.clone()
    B[:, 5] = B[:, 4]  # rank 5 factors of nominal rank 6
    pool[0].modules["mod"] = LowRank(B, lr.A, lr.scale)
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    assert dec.summary()[0]["ranks"] == [5, 6]
    Ws = [v.modules["mod"].dense(torch.float64) for v in pool]
    Z, _ = L.shared_basis(Ws, PAPER_TAU)
    Zf = dec.shared_basis("mod")
    assert rel(Zf @ Zf.T, Z @ Z.T) <= 1e-8


def test_tau_one_keeps_exactly_shared_directions_only():
    pool = planted(3, noise=0.0, seed=2)  # 3 directions shared exactly
    dec = decompose(pool, tau=1.0, **F64)
    assert dec.shared_dims()["mod"] == 3
    tilted = decompose(planted(3, noise=0.1, seed=2), tau=1.0, **F64)
    assert tilted.shared_dims()["mod"] == 0
    tiny = decompose(pool, tau=1e-9, **F64)  # τ → 0+: every direction with any overlap
    assert tiny.shared_dims()["mod"] > 3


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, 1.01, float("nan"), "0.8"])
def test_tau_out_of_range_is_refused(tau):
    with pytest.raises(ValueError, match="tau must be in"):
        decompose(planted(2), tau=tau)
    with pytest.raises(ValueError, match="tau must be in"):
        decompose(planted(2)).with_tau(tau)


def test_mismatched_shapes_name_module_and_both_shapes():
    a = TaskVector("a", {"blocks.0.q": LowRank(torch.randn(8, 2), torch.randn(2, 6))})
    b = TaskVector("b", {"blocks.0.q": LowRank(torch.randn(8, 2), torch.randn(2, 7))})
    with pytest.raises(ValueError) as e:
        decompose([a, b])
    msg = str(e.value)
    assert "blocks.0.q" in msg and "(8, 6)" in msg and "(8, 7)" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(bad):
    pool = planted(2, modules=("x", "y"))
    pool[1].modules["y"].A[0, 0] = bad
    with pytest.raises(ValueError, match="'v1'.*'y'.*NaN/Inf"):
        decompose(pool)
    with pytest.raises(ValueError, match="'v1'.*'y'"):
        pool[1].check_finite()


def test_bad_pool_and_options():
    with pytest.raises(ValueError, match="empty pool"):
        decompose([])
    pool = planted(2)
    with pytest.raises(ValueError, match="duplicate"):
        decompose([pool[0], pool[0]])
    with pytest.raises(ValueError, match="Unknown mode 'merge'"):
        decompose(pool, mode="merge")
    with pytest.raises(ValueError, match="target"):
        decompose(pool, mode="isolate", target="nope")
    with pytest.raises(ValueError, match="Unknown component kind"):
        decompose(pool).component("everything", "v0")
    with pytest.raises(ValueError, match="merged_shared is defined in joint mode"):
        decompose(pool, mode="pairwise").component("merged_shared")


def test_summary_reports_ranks_norms_and_dims():
    pool = planted(3, seed=12)
    dec = decompose(pool, tau=PAPER_TAU, **F64)
    (row,) = dec.summary()
    assert row["ranks"] == [6, 6, 6] and row["shared_dim"] == 3 and row["members"] == ["v0", "v1", "v2"]
    for v in pool:
        nm = row["norms"][v.name]
        assert math.isclose(nm["shared"] ** 2 + nm["unique"] ** 2, nm["delta"] ** 2, rel_tol=1e-9)
        assert math.isclose(nm["delta"] ** 2, v.modules["mod"].sq_norm(), rel_tol=1e-9)
        assert math.isclose(nm["shared"], float(dec.component("shared", v.name)["mod"].dense().norm()), rel_tol=1e-9)


def test_progress_callback_reports_every_module():
    pool = planted(2, modules=tuple(f"m{i}" for i in range(5)))
    seen = []
    decompose(pool, progress=lambda done, total, stage: seen.append((done, total, stage)))
    assert seen[-1] == (5, 5, "bases and spectra") and [d for d, *_ in seen] == sorted(d for d, *_ in seen)


# --- the mode registry (issue 16 item 1) ------------------------------------------------------


def test_mode_names_come_from_the_registry():
    from devec_core import modes, pool

    assert pool.MODES is modes.MODES and set(modes.MODES) == {"joint", "pairwise", "isolate"}
    assert pool.ISOLATE_ORDERS is modes.ISOLATE_ORDERS
    for cls in [*modes.REGISTRY.values(), *modes.VARIANTS.values()]:
        assert cls.paper.startswith("arXiv 2512.22511"), cls  # each mode names its paper section


def test_decomposition_dispatches_through_the_registry(monkeypatch):
    """A mode added to the registry is used by Decomposition without any change to pool.py: one
    that removes from each vector its own whole column space leaves unique = 0, shared = delta."""
    from devec_core import modes
    from devec_core.modes.base import Mode

    class Everything(Mode):
        name, paper = "everything", "arXiv 2512.22511 (test mode)"

        def orders(self, names, members):
            return []

        def removed(self, dec, bi, pos):
            T = dec.blocks[bi].T[pos]  # Q_pos = s·F·T: Y = I keeps its whole basis
            return pos, torch.eye(T.shape[-1], dtype=T.dtype).expand_as(T) * (T.abs().sum(-2, keepdim=True) > 0)

        def parts(self, names):
            return [("unique", n) for n in names]

    monkeypatch.setitem(modes.REGISTRY, "everything", Everything)
    pool = planted(3, seed=4)
    dec = decompose(pool, tau=PAPER_TAU, mode="everything", **F64)
    assert dec.shared_dims() == {"mod": 6}
    for v in pool:
        want = v.modules["mod"].dense()
        assert rel(dec.component("shared", v.name)["mod"].dense(), want) < 1e-9
        assert float(dec.component("unique", v.name)["mod"].dense().norm()) < 1e-9 * float(want.norm())
    assert dec.parts() == [("unique", v.name) for v in pool]


@pytest.mark.parametrize("mode", ["joint", "pairwise", "isolate"])
def test_every_part_a_mode_lists_is_a_component(mode):
    """``Decomposition.parts()`` (what export writes, the studio mixes) resolves through component()."""
    pool = planted(3, seed=6)
    dec = decompose(pool, tau=PAPER_TAU, mode=mode, target="v1" if mode == "isolate" else None, **F64)
    kinds = {k for k, _ in dec.parts()}
    assert kinds == {"joint": {"unique", "merged_shared"}, "pairwise": {"unique", "pair_shared"},
                     "isolate": {"unique", "shared"}}[mode]
    for kind, name in dec.parts():
        assert set(dec.component(kind, name)) == {"mod"}


@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_work_split_over_threads_gives_the_serial_answer(mode, monkeypatch):
    """blocks.parallel_chunks can spread a block's small calls over Python threads (off by
    default): the result must not depend on it (same dims, same parts), and every module must be
    covered once."""
    from devec_core import blocks

    pool = planted(3, modules=tuple(f"m{i}" for i in range(40)), seed=8)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 1)
    one = decompose(pool, tau=PAPER_TAU, mode=mode, **F64)
    monkeypatch.setattr(blocks, "CHUNK_THREADS", 3)
    calls = []
    real = blocks.ThreadPoolExecutor
    monkeypatch.setattr(blocks, "ThreadPoolExecutor", lambda **kw: (calls.append(kw), real(**kw))[1])
    three = decompose(pool, tau=PAPER_TAU, mode=mode, **F64)
    assert calls, "the split did not run"
    assert one.shared_dims() == three.shared_dims() and set(one.shared_dims()) == {f"m{i}" for i in range(40)}
    for v in pool:
        a, b = one.component("unique", v.name), three.component("unique", v.name)
        assert all(rel(b[m].dense(), a[m].dense()) < 1e-12 for m in a)
