"""Chance level of a pool's spectrum: is what looks shared more than random subspaces would give?

Two subspaces of dimensions r₁, r₂ drawn at random in ℝⁿ are not orthogonal: the eigenvalues of
P₁P₂ (cos² of their principal angles) are spread over [0, 1] with mean r₂/n each (E tr P₁P₂ =
r₁r₂/n). Low-rank task vectors trained independently overlap more than that, but often far below
the paper's τ = 0.85; dense deltas kept at high rank overlap a lot *by chance*. This module gives
each spectrum its null distribution — the same chained product, with every vector's column space
replaced by an independent uniformly random subspace of the same dimension in the same ℝⁿ — and
three things computed from it (docs/METHOD.md, "Chance level and the suggested τ"):

  per module   the observed top eigenvalue (real part), the null's median and 95th percentile, a
               z-score and a Monte-Carlo tail probability p (and Benjamini–Hochberg q-values
               over the modules of the pool);
  per pool     the expected number of chance eigenvalues above any threshold t, hence a
               false-discovery estimate FDR(t) = E_null[# above t] / # observed above t;
  a suggested τ the lowest t whose FDR(t) ≤ ``fdr`` (5 %), moved up into the widest spectral gap
               above it when the pooled spectrum has a clear gap (≥ ``min_gap``), so a pool with a
               planted common part gets a τ between the shared and the rest; ``None`` when nothing
               is above chance. The user's τ is never changed: this is advice, shown beside it.
  a regime     "shared" (real sharing at the user's τ), "weak" (above chance, but below τ),
               "chance" (nothing above chance) or "saturated" (the chance level itself reaches τ:
               ranks too high for the dimension, so the threshold cannot tell anything apart).

The null depends only on n, the ranks and the mode's tuple structure, so it is simulated once per
(n, ranks, orders) and cached in memory: a FLUX pool of 494 modules has a handful of distinct keys.
Random bases cost one QR of an (n, r) Gaussian; the spectra reuse ``algorithm.chain_spectrum``.
Torch only.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import algorithm

DEFAULT_DRAWS = 200
DEFAULT_FDR = 0.05
MIN_GAP = 0.25  # a gap in the pooled spectrum at least this wide is "clear"
_GRID = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)  # thresholds t for FDR(t)


# ---------------------------------------------------------------------------------------------
# 1. The null: spectra of random subspaces with the same n, ranks and tuple structure
# ---------------------------------------------------------------------------------------------


def random_bases(n: int, r: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """(draws, n, r) orthonormal bases of independent uniformly random r-dim subspaces of ℝⁿ."""
    G = torch.randn(draws, n, r, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(G)[0]


@lru_cache(maxsize=256)
def _null_eigs(n: int, ranks: tuple[int, ...], orders: tuple[tuple[int, ...], ...], draws: int,
               symmetric: bool, seed: int) -> torch.Tensor:
    """Real parts of every eigenvalue of every order, per draw: (draws, Σ_order r_order[0])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    chunk = max(1, min(draws, int(4e7 // max(1, n * max(ranks)))))  # bound memory: ~0.3 GB float64
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        Q = [random_bases(n, r, d, g) for r in ranks]
        vals = []
        for order in orders:
            chain = [Q[a].mT @ Q[b] for a, b in zip(order, order[1:] + order[:1])]
            ev, _ = algorithm.chain_spectrum(chain, symmetric=symmetric)
            vals.append(ev.real)
        out.append(torch.cat(vals, -1))
    return torch.cat(out, 0)


@lru_cache(maxsize=256)
def _null_summary(key, bins: int):
    """Per null key: the draws, their top eigenvalue, expected # above each grid t, expected histogram."""
    n, ranks, orders, draws, symmetric, seed = key
    null = null_eigenvalues(n, ranks, orders, draws, symmetric, seed)
    ntop = null.max(-1).values if null.shape[-1] else torch.zeros(draws, dtype=torch.float64)
    n_exp = (null.unsqueeze(-1) > _GRID).sum(1).double().mean(0)
    n_hist = torch.histc(null.clamp(0, 1).flatten(), bins=bins, min=0, max=1) / draws
    return null, ntop, n_exp, n_hist


def null_eigenvalues(n: int, ranks, orders=None, draws: int = DEFAULT_DRAWS, symmetric: bool = False,
                     seed: int = 0) -> torch.Tensor:
    """Monte-Carlo null of a module's spectrum: (draws, #eigenvalues) real parts.

    Args:
        n: the dimension the column spaces live in (out features).
        ranks: the vectors' ranks, in pool order.
        orders: the tuples whose chained projection is taken (positions into ``ranks``); default
            the joint chain (0, 1, …, k−1).
        draws: number of random draws.
    """
    ranks = tuple(int(r) for r in ranks)
    if len(ranks) < 2 or min(ranks) < 0 or any(r > n for r in ranks):
        raise ValueError(f"null_eigenvalues needs ≥ 2 ranks in [0, n={n}]; got {ranks}")
    orders = tuple(tuple(o) for o in (orders or [tuple(range(len(ranks)))]))
    if min(ranks) == 0:  # an empty subspace shares nothing, by chance or not
        return torch.zeros(draws, sum(ranks[o[0]] for o in orders), dtype=torch.float64)
    return _null_eigs(n, ranks, orders, int(draws), bool(symmetric), int(seed))


# ---------------------------------------------------------------------------------------------
# 2. Per module and per pool
# ---------------------------------------------------------------------------------------------


@dataclass
class ModuleChance:
    module: str
    top: float  # observed largest Re(eigenvalue)
    null_median: float  # of the null's largest eigenvalue
    null_q95: float
    z: float  # (top − null mean) / null std of the largest eigenvalue
    p: float  # Monte-Carlo tail probability P_null(top ≥ observed), (1 + #) / (1 + draws)
    q: float = 1.0  # Benjamini–Hochberg adjusted over the pool's modules
    above_tau: int = 0  # observed eigenvalues above the user's τ
    null_above_tau: float = 0.0  # expected number under the null


@dataclass
class ChanceReport:
    tau: float
    draws: int
    modules: list[ModuleChance]
    thresholds: list[float]  # the grid t
    observed_above: list[int]  # pooled # observed eigenvalues above t
    expected_above: list[float]  # pooled expected # under the null above t
    suggested_tau: float | None
    regime: str
    message: str
    null_hist: list[float] = field(default_factory=list)  # expected counts per histogram bin
    hist_edges: list[float] = field(default_factory=list)

    @property
    def significant(self) -> int:
        return sum(1 for m in self.modules if m.q < DEFAULT_FDR)

    def fdr(self, t: float) -> float:
        """Estimated false-discovery rate of calling every eigenvalue above t shared."""
        i = min(range(len(self.thresholds)), key=lambda j: abs(self.thresholds[j] - t))
        obs = self.observed_above[i]
        return min(1.0, self.expected_above[i] / obs) if obs else float("nan")

    def to_dict(self) -> dict:
        return {
            "tau": self.tau, "draws": self.draws, "regime": self.regime, "message": self.message,
            "suggested_tau": self.suggested_tau, "significant_modules": self.significant,
            "modules": len(self.modules),
            "fdr_at_tau": None if math.isnan(self.fdr(self.tau)) else self.fdr(self.tau),
            "per_module": [m.__dict__ for m in self.modules],
        }


def _bh(p: list[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values), same order as p."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q, running = [0.0] * m, 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


def _structure(dec, members: list[int]):
    """The tuples (positions into members) whose spectra the decomposition takes for a module."""
    k, cfg, names = len(members), dec.config, dec.names
    if k < 2:  # a module in one vector has no spectrum: nothing to compare with chance
        return []
    if cfg.mode == "joint":
        return [tuple(range(k))]
    if cfg.mode == "pairwise":
        return [(a, b) for a in range(k) for b in range(k) if a != b]
    t = names.index(cfg.target)
    if t not in members:
        return []
    refs = cfg.references or tuple(x for x in names if x != cfg.target)
    pos = [members.index(names.index(r)) for r in refs if names.index(r) in members]
    return [(members.index(t), p) for p in pos]


_REPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # decomposition → {args: report}


def pool_chance(dec, draws: int = DEFAULT_DRAWS, fdr: float = DEFAULT_FDR, min_gap: float = MIN_GAP,
                bins: int = 40, seed: int = 0) -> ChanceReport:
    """Chance level of every module of a decomposition, the pool's FDR curve, τ advice, regime.

    Uses only the decomposition's public summary (shape, members, numerical ranks, eigenvalues),
    so it follows any mode. Ranks are the numerical ranks the engine kept (docs/METHOD.md).
    One report per decomposition and arguments is kept while the decomposition lives (the Studio's
    report and its spectrum plot ask for the same one on every τ change).
    """
    memo = _REPORTS.setdefault(dec, {})
    key = (draws, fdr, min_gap, bins, seed)
    if key not in memo:
        memo[key] = _pool_chance(dec, draws, fdr, min_gap, bins, seed)
    return memo[key]


def _pool_chance(dec, draws: int, fdr: float, min_gap: float, bins: int, seed: int) -> ChanceReport:
    tau = dec.tau
    rows = dec.summary()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    mods: list[ModuleChance] = []
    obs_all, exp_above, null_hist = [], torch.zeros_like(_GRID), torch.zeros(bins, dtype=torch.float64)
    for row in rows:
        members = [dec.names.index(x) for x in row["members"]]
        orders = _structure(dec, members)
        if not orders:
            continue
        ev = torch.tensor([re for re, _ in row["eigenvalues"]], dtype=torch.float64)
        key = (row["shape"][0], tuple(int(r) for r in row["ranks"]), tuple(orders), draws, dec.config.symmetric, seed)
        null, ntop, n_exp, n_hist = _null_summary(key, bins)
        top = float(ev.max()) if ev.numel() else 0.0
        std = max(float(ntop.std()) if draws > 1 else 0.0, 1e-9)  # finite z (strict JSON) when the null is a point
        z = (top - float(ntop.mean())) / std
        p = (1 + int((ntop >= top - 1e-12).sum())) / (1 + draws)
        mods.append(ModuleChance(
            module=row["module"], top=top, null_median=float(ntop.median()), null_q95=float(ntop.quantile(0.95)),
            z=z, p=p, above_tau=int((ev > tau).sum()), null_above_tau=float((null > tau).sum(-1).double().mean()),
        ))
        obs_all.append(ev)
        exp_above += n_exp
        null_hist += n_hist
    for m, q in zip(mods, _bh([m.p for m in mods])):
        m.q = q
    obs = torch.cat(obs_all) if obs_all else torch.zeros(0, dtype=torch.float64)
    obs_above = (obs.unsqueeze(-1) > _GRID).sum(0)
    suggested = suggest_tau(obs, _GRID, obs_above, exp_above, fdr, min_gap)
    i_tau = int(torch.argmin((_GRID - tau).abs()))
    fdr_tau = float(exp_above[i_tau] / obs_above[i_tau]) if int(obs_above[i_tau]) else float("nan")
    regime, message = _regime(mods, tau, suggested, fdr, fdr_tau)
    return ChanceReport(
        tau=tau, draws=draws, modules=mods, thresholds=_GRID.tolist(), observed_above=obs_above.tolist(),
        expected_above=exp_above.tolist(), suggested_tau=suggested, regime=regime, message=message,
        null_hist=null_hist.tolist(), hist_edges=edges.tolist(),
    )


def suggest_tau(obs: torch.Tensor, grid: torch.Tensor, obs_above: torch.Tensor, exp_above: torch.Tensor,
                fdr: float = DEFAULT_FDR, min_gap: float = MIN_GAP) -> float | None:
    """The lowest threshold whose estimated FDR ≤ ``fdr``, moved into a clear spectral gap above it.

    FDR(t) = E_null[# eigenvalues > t] / # observed > t, pooled over modules (Storey-style with
    π₀ = 1, conservative). Among the thresholds at or above the lowest admissible one, if the
    sorted pooled eigenvalues have a gap of at least ``min_gap`` there, the suggestion is the
    middle of the widest such gap — a τ anywhere in it gives the same split, and the middle is
    the most robust to noise. None when no threshold reaches the FDR (nothing above chance).
    """
    ok = (obs_above > 0) & (exp_above <= fdr * obs_above.double())
    # admissible from t on upwards: every higher threshold must also pass (monotone region)
    admissible = None
    for i in range(len(grid) - 1, -1, -1):
        if obs_above[i] == 0:
            continue
        if not ok[i]:
            break
        admissible = i
    if admissible is None:
        return None
    t0 = float(grid[admissible])
    above = torch.sort(obs[obs > t0]).values
    pts = torch.cat([torch.tensor([t0], dtype=torch.float64), above])
    if pts.numel() >= 2:
        gaps = pts[1:] - pts[:-1]
        j = int(gaps.argmax())
        if float(gaps[j]) >= min_gap:
            return round(float(pts[j] + pts[j + 1]) / 2, 2)
    return round(t0, 2)


SATURATED_FDR = 0.2  # above this share of chance among the eigenvalues above τ, the split says little


def _regime(mods: list[ModuleChance], tau: float, suggested: float | None, fdr: float,
            fdr_tau: float = float("nan")) -> tuple[str, str]:
    """shared | weak | chance | saturated | none, and a sentence for the user.

    "saturated" when chance alone reaches τ in most modules, or when more than ``SATURATED_FDR``
    of the eigenvalues above τ are expected from random subspaces (pooled FDR at τ): then even
    significant modules are split mostly along chance directions (README, "Chance level": dense
    SmolLM2 deltas kept at rank 160 are the example).
    """
    if not mods:
        return "none", "No module is in two or more vectors: there is nothing to compare with chance."
    sig = [m for m in mods if m.q < fdr]
    most_null = sum(m.null_median >= tau for m in mods) > len(mods) / 2
    if most_null or (fdr_tau == fdr_tau and fdr_tau > SATURATED_FDR):
        share = f" (about {min(fdr_tau, 1.0):.0%} of what lies above τ is expected by chance)" if fdr_tau == fdr_tau else ""
        return "saturated", (
            f"**Chance alone reaches τ = {tau:.2f}**{share}: the ranks are high for the dimension "
            "(e.g. dense deltas kept at high rank), so random subspaces would look 'shared' too and the split "
            "says little. Lower `dense_energy`/`dense_rank` or use LoRA factors.")
    if not sig:
        return "chance", (
            f"**Nothing above chance.** No module's top eigenvalue exceeds what random subspaces of the same "
            f"ranks give (Benjamini–Hochberg q < {fdr:g}). This pool shares nothing detectable; DeVec = vanilla.")
    real_at_tau = [m for m in sig if m.above_tau > 0]
    hint = f" Suggested τ: **{suggested:.2f}** (FDR ≤ {fdr:.0%})." if suggested is not None else ""
    if len(real_at_tau) >= len(sig) / 2:
        return "shared", (
            f"**Real sharing at τ = {tau:.2f}.** {len(sig)} of {len(mods)} modules are above chance and "
            f"{len(real_at_tau)} of them share directions above τ (a common parent, as in the demo pools).{hint}")
    return "weak", (
        f"**Shared above chance, but below τ = {tau:.2f}.** {len(sig)} of {len(mods)} modules overlap more than "
        f"random subspaces would (typical of independently trained vectors), yet few eigenvalues reach τ, "
        f"so at this τ DeVec ≈ vanilla.{hint}")
