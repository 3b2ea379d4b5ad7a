"""Chance level of a spectrum (devec_core/chance.py) against references from the definition.

References: for independent uniformly random subspaces of dimensions r₁, r₂ in ℝⁿ,
  * E tr(P₁P₂) = r₁r₂/n (E P₂ = (r₂/n)·I by rotation invariance), and
  * for r₁ = 1 the single eigenvalue cos²θ of P₁P₂ is Beta(r₂/2, (n − r₂)/2)
    (the squared length of the projection of a uniform unit vector onto a fixed r₂-dim subspace).
Pools: planted (a common part, eigenvalue 1), weak (tilted shared directions, cos² ≈ 0.3, like
independently trained LoRAs), random (nothing shared), saturated (ranks high for the dimension).
"""

import math

import pytest
import torch

from devec_core import decompose
from devec_core.chance import null_eigenvalues, pool_chance
from devec_core.taskvec import LowRank, TaskVector


def test_null_trace_matches_definition():
    n, r1, r2, draws = 40, 3, 5, 4000
    ev = null_eigenvalues(n, (r1, r2), draws=draws, seed=1)
    tr = ev.sum(-1)
    se = float(tr.std()) / math.sqrt(draws)
    assert abs(float(tr.mean()) - r1 * r2 / n) < 4 * se


def test_null_rank_one_is_beta():
    n, r, draws = 30, 6, 6000
    ev = null_eigenvalues(n, (1, r), draws=draws, seed=2)[:, 0]
    a, b = r / 2, (n - r) / 2
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(float(ev.mean()) - mean) < 4 * math.sqrt(var / draws)
    assert abs(float(ev.var()) - var) < 0.15 * var


def test_null_is_deterministic_and_validated():
    a = null_eigenvalues(50, (4, 4, 4), draws=16, seed=3)
    b = null_eigenvalues(50, (4, 4, 4), draws=16, seed=3)
    assert torch.equal(a, b) and a.shape == (16, 4)
    with pytest.raises(ValueError, match="ranks"):
        null_eigenvalues(10, (4, 11))
    with pytest.raises(ValueError, match="ranks"):
        null_eigenvalues(10, (4,))


N, M, R, MODS = 128, 64, 6, 12


def _pool(kind: str, k: int = 3, seed: int = 0) -> list[TaskVector]:
    g = torch.Generator().manual_seed(seed)
    vecs = [dict() for _ in range(k)]
    for j in range(MODS):
        S = torch.linalg.qr(torch.randn(N, 2, generator=g))[0]  # 2 directions per module
        for i in range(k):
            own = torch.linalg.qr(torch.randn(N, R, generator=g))[0]
            if kind == "planted":
                B = torch.cat([S, own[:, 2:]], 1)
            elif kind == "weak":  # the shared directions tilted: cos² ≈ 0.35 between two copies
                tilt = torch.linalg.qr(torch.randn(N, 2, generator=g))[0]
                B = torch.cat([0.75 * S + 0.66 * (tilt - S @ (S.T @ tilt)), own[:, 2:]], 1)
            else:
                B = own
            vecs[i][f"layers.{j}.proj"] = LowRank(B, torch.randn(R, M, generator=g))
    return [TaskVector(f"v{i}", v) for i, v in enumerate(vecs)]


def test_planted_pool_is_shared_and_suggested_tau_gives_the_same_split():
    dec = decompose(_pool("planted"), tau=0.85)
    rep = pool_chance(dec, draws=100)
    assert rep.regime == "shared"
    assert rep.significant == MODS
    assert all(m.top > 0.999 and m.p <= 1 / 101 + 1e-12 for m in rep.modules)
    assert rep.suggested_tau is not None and 0.3 < rep.suggested_tau < 1.0
    assert dec.tau == 0.85  # advice only
    assert dec.with_tau(rep.suggested_tau).shared_dims() == dec.shared_dims()
    assert set(dec.shared_dims().values()) == {2}


def test_random_pool_is_chance_and_gets_no_suggestion():
    dec = decompose(_pool("random", k=2), tau=0.85)
    rep = pool_chance(dec, draws=100)
    assert rep.regime == "chance"
    assert rep.suggested_tau is None
    assert rep.significant == 0
    assert "Nothing above chance" in rep.message


def test_weak_pool_is_above_chance_but_below_tau():
    dec = decompose(_pool("weak", k=2), tau=0.85)
    rep = pool_chance(dec, draws=100)
    assert rep.regime == "weak", rep.message
    assert sum(d for d in dec.shared_dims().values()) == 0  # nothing at the paper's τ
    tops = sorted(m.top for m in rep.modules)
    assert rep.suggested_tau is not None
    assert max(m.null_median for m in rep.modules) < rep.suggested_tau < tops[0]
    # at the suggestion the tilted directions count as shared, and few chance ones (FDR 5 %)
    dims = dec.with_tau(rep.suggested_tau).shared_dims()
    assert 0.9 * 2 * MODS <= sum(dims.values()) <= 1.1 * 2 * MODS


def test_saturated_when_chance_reaches_tau():
    g = torch.Generator().manual_seed(5)
    n, r = 24, 20  # rank near the dimension: random subspaces overlap almost fully
    vecs = [TaskVector(f"d{i}", {"w": LowRank(torch.randn(n, r, generator=g), torch.randn(r, 30, generator=g))}) for i in range(2)]
    rep = pool_chance(decompose(vecs, tau=0.85), draws=60)
    assert rep.regime == "saturated"
    assert rep.modules[0].null_median >= 0.85


def test_isolate_and_pairwise_nulls_follow_the_mode():
    vecs = _pool("planted", k=3)
    iso = decompose(vecs, tau=0.85, mode="isolate", target="v0")
    rep = pool_chance(iso, draws=40)
    assert rep.regime == "shared" and len(rep.modules) == MODS
    # isolate: spectra of (target, ref) for both refs -> 2·R eigenvalues per module, as observed
    assert null_eigenvalues(N, (R, R, R), [(0, 1), (0, 2)], draws=40).shape == (40, 2 * R)
    pw = decompose(vecs, tau=0.85, mode="pairwise")
    assert pool_chance(pw, draws=40).regime == "shared"


def test_saturated_when_chance_explains_most_of_what_lies_above_tau():
    """Every module beats chance (4 planted directions), yet at rank 120 in ℝ³⁰⁰ most eigenvalues
    above τ come from chance: the regime must say so (the dense rank-160 SmolLM2 case)."""
    g = torch.Generator().manual_seed(0)
    n, r = 300, 120
    vecs = [dict(), dict()]
    for j in range(4):
        S = torch.linalg.qr(torch.randn(n, 4, generator=g))[0]
        for i in range(2):
            own = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
            vecs[i][f"l.{j}.w"] = LowRank(torch.cat([S, own[:, 4:]], 1), torch.randn(r, 200, generator=g))
    rep = pool_chance(decompose([TaskVector(f"v{i}", v) for i, v in enumerate(vecs)], tau=0.85), draws=40)
    assert rep.fdr(0.85) > 0.5
    assert rep.regime == "saturated"
    assert "expected by chance" in rep.message


def test_single_vector_and_unshared_modules_have_no_chance_rows():
    vecs = _pool("planted", k=2)
    vecs[1].modules.pop("layers.0.proj")  # a module only v0 has
    rep = pool_chance(decompose(vecs, tau=0.85), draws=20)
    assert len(rep.modules) == MODS - 1
    alone = pool_chance(decompose(vecs[:1], tau=0.85), draws=20)
    assert alone.modules == [] and alone.regime == "none" and alone.suggested_tau is None
