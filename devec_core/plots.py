"""Matplotlib figures of a decomposition; they follow τ (redraw after ``with_tau``).

  spectrum_figure      histogram of the eigenvalues' real parts over all modules, τ as a line
                       (like the paper's toy figure); those above τ (shared) and complex ones
                       stacked in their own colours; the chance level (expected counts for random
                       subspaces of the same ranks, devec_core.chance) as a grey step line and the
                       suggested τ as a dotted marker
  shared_dims_figure   shared dimension per module as a heat-map: layer type (rows) × block (columns),
                       integer colour ticks; when every module has the same dimension, the shared
                       fraction of each module's ‖ΔW‖² instead (the title says so)
  norms_figure         per vector: ‖shared‖² vs ‖unique‖² as stacked fractions, norms written on

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state: safe in a server
with many users). matplotlib is imported inside the functions.
"""

from __future__ import annotations

import re

import numpy as np

from .chance import ChanceReport, pool_chance
from .pool import Decomposition

_UNIQUE, _SHARED, _TAU = "#4C72B0", "#DD8452", "#C44E52"
_BLOCK_RE = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def spectrum_figure(dec: Decomposition, bins: int = 40, chance: ChanceReport | None = None):
    """Histogram of Re(eigenvalue) of the chained projections over every module, with τ, the
    chance level (``chance``; computed when None) and the suggested τ.

    Returns:
        A matplotlib Figure.
    """
    fig, ax = _figure(6.0, 3.4)
    eig = dec.eigenvalues()
    vals = [ev for ev in eig.values() if ev.numel()]
    if not vals:
        ax.text(0.5, 0.5, "no module is in two or more vectors:\nno spectrum", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ev = np.concatenate([v.numpy() for v in vals])
    re_, cplx = np.clip(ev.real, 0.0, 1.0), np.abs(ev.imag) > 1e-6
    edges = np.linspace(0.0, 1.0, bins + 1)
    hi = ev.real > dec.tau
    groups = [(re_[~cplx & ~hi], _UNIQUE, "below τ"), (re_[~cplx & hi], _SHARED, "above τ: shared")]
    if cplx.any():
        groups.append((re_[cplx], "#8172B3", "complex pair (real part)"))
    ax.hist([g[0] for g in groups], bins=edges, stacked=True, log=True, color=[g[1] for g in groups], label=[g[2] for g in groups])
    chance = chance if chance is not None else pool_chance(dec, bins=bins)
    if len(chance.null_hist) == bins:  # expected count per bin under the null, floored for the log axis
        exp_counts = np.asarray(chance.null_hist)
        exp_counts = np.where(exp_counts >= 0.05, exp_counts, np.nan)  # nothing expected: no line
        ax.stairs(exp_counts, edges, color="#555555", lw=1.5, label="chance level")
    if chance.suggested_tau is not None:
        ax.axvline(chance.suggested_tau, color="#2a9d8f", lw=1.5, ls=":")
        ax.text(chance.suggested_tau, 0.03, f" suggested τ {chance.suggested_tau:.2f}", color="#2a9d8f", fontsize=8,
                rotation=90, va="bottom", ha="right", transform=ax.get_xaxis_transform())
    ax.axvline(dec.tau, color=_TAU, lw=2, ls="--")
    above = int(hi.sum())
    pairs = _chains(dec)
    per = f"\n ({pairs} spectra per module;\n shared dim counts their union)" if pairs > 1 else ""
    ax.text(dec.tau, 0.97, f" τ = {dec.tau:.2f}\n {above} eigenvalues above{per} ", color=_TAU, va="top", ha="left" if dec.tau < 0.8 else "right", transform=ax.get_xaxis_transform(), fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("eigenvalue of P₁P₂⋯P_k (real part; 1 = direction in every vector)")
    ax.set_ylabel("count (log)")
    fig.suptitle(f"Spectrum of the pool · {len(vals)} modules · mode {dec.config.mode}", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(groups) + 1), fontsize=7, frameon=False)
    return fig


def _chains(dec: Decomposition) -> int:
    """How many spectra each module has: isolate mode keeps one per (target, reference) pair, so
    the count of eigenvalues above τ exceeds the shared dimension (the dimension of their union)."""
    k = len(dec.names)
    if dec.config.mode == "pairwise":
        return max(1, k * (k - 1))  # one per ordered pair (pool.estimate_work)
    if dec.config.mode != "isolate":
        return 1
    refs = getattr(dec.config, "references", None)
    return len(refs) if refs else max(1, k - 1)


def _split(mod: str) -> tuple[str, int, str]:
    m = _BLOCK_RE.match(mod)
    return (m.group(1).rstrip("."), int(m.group(2)), m.group(3)) if m else ("", 0, mod)


def _shared_fractions(dec: Decomposition) -> dict[str, float]:
    """Per module: Σ_vectors ‖shared‖² / Σ_vectors ‖ΔW‖² (0 when the module has no energy)."""
    out = {}
    for row in dec.summary():
        tot = sum(v["delta"] ** 2 for v in row["norms"].values())
        sh = sum(v["shared"] ** 2 for v in row["norms"].values())
        out[row["module"]] = sh / tot if tot > 0 else 0.0
    return out


def shared_dims_figure(dec: Decomposition, max_cols: int = 24):
    """Heat-map per module: rows = layer type, columns = block index.

    Colour = the shared dimension at τ (integer colour ticks) — or, when every module has the same
    shared dimension (a colour that says nothing), the shared fraction of each module's ‖ΔW‖²,
    with the common dimension in the title.
    Module names "prefix.N.leaf" are grouped by (prefix, leaf) into rows and N into columns
    (FLUX's double and single blocks stacked, separated by a white line);
    e.g. FLUX's "transformer_blocks.3.attn.to_q", an LLM's "model.layers.12.mlp.down_proj".
    Missing modules are grey.
    """
    dims = dec.shared_dims()
    fig, ax = _figure(6.0, 3.4)
    if not dims:
        ax.text(0.5, 0.5, "no modules", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    parts = [_split(m) for m in dims]
    prefixes = list(dict.fromkeys(p for p, _, _ in parts))  # in module order (FLUX: double, single)
    rows = list(dict.fromkeys((p, leaf) for p, _, leaf in parts))
    rows.sort(key=lambda r: prefixes.index(r[0]))
    blocks = sorted({i for _, i, _ in parts})
    ri = {r: k for k, r in enumerate(rows)}
    ci = {b: k for k, b in enumerate(blocks)}
    same = len(set(dims.values())) == 1
    d = next(iter(dims.values()))
    if same and d == 0:  # nothing shared anywhere: how close each module comes (its largest eigenvalue)
        values = {m: float(ev.real.max()) if ev.numel() else np.nan for m, ev in dec.eigenvalues().items()}
    else:
        values = _shared_fractions(dec) if same else dims
    M = np.full((len(rows), len(blocks)), np.nan)
    for mod in dims:
        p, i, leaf = _split(mod)
        M[ri[(p, leaf)], ci[i]] = values.get(mod, np.nan)
    import matplotlib
    from matplotlib.colors import BoundaryNorm
    from matplotlib.ticker import MaxNLocator

    total = int(sum(dims.values()))
    if same:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
        what = "largest eigenvalue" if d == 0 else "shared fraction of ‖ΔW‖²"
        hi = 1.0 if d == 0 else max(1e-6, float(np.nanmax(M)) if np.isfinite(M).any() else 1.0)
        im = ax.imshow(np.ma.masked_invalid(M), aspect="auto", cmap=cmap, vmin=0.0, vmax=hi, interpolation="nearest")
        ax.set_title(f"Every module has shared dimension {d} at τ = {dec.tau:.2f} (total {total});\n"
                     f"colour: each module's {what}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label=what)
    else:
        vmax = max(1, int(np.nanmax(M)))
        cmap = matplotlib.colormaps["magma_r"].resampled(vmax + 1).with_extremes(bad="#eeeeee")
        norm = BoundaryNorm(np.arange(-0.5, vmax + 1.5), cmap.N)  # one colour per whole number
        im = ax.imshow(np.ma.masked_invalid(M), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"Shared dimension per module at τ = {dec.tau:.2f} (total {total})", fontsize=10)
        cb = fig.colorbar(im, ax=ax, shrink=0.8, label="shared dim")
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    short = {p: ("double" if p == "transformer_blocks" else "single" if p == "single_transformer_blocks" else p.split(".")[-1]) for p in prefixes}
    fs = 7 if len(rows) <= 20 else 5
    ax.set_yticks(range(len(rows)), [leaf if len(prefixes) == 1 else f"{short[p]} · {leaf}" for p, leaf in rows], fontsize=fs)
    step = max(1, -(-len(blocks) // max_cols))
    ax.set_xticks(range(0, len(blocks), step), [str(blocks[k]) for k in range(0, len(blocks), step)], fontsize=7)
    for k in range(1, len(rows)):
        if rows[k][0] != rows[k - 1][0]:
            ax.axhline(k - 0.5, color="white", lw=2)
    ax.set_xlabel("block index")
    return fig


def norms_figure(dec: Decomposition):
    """Per vector: the fraction of ‖ΔW‖² in its shared vs unique part (they add up: orthogonal
    projection per module), with ‖shared‖ and ‖unique‖ written on the bars."""
    tot = {n: 0.0 for n in dec.names}
    sh = dict(tot)
    for row in dec.summary():
        for n, v in row["norms"].items():
            tot[n] += v["delta"] ** 2
            sh[n] += v["shared"] ** 2
    fig, ax = _figure(6.0, 0.6 + 0.45 * len(dec.names))
    names = list(dec.names)[::-1]
    fs = np.array([sh[n] / tot[n] if tot[n] > 0 else 0.0 for n in names])
    ax.barh(names, fs, color=_SHARED, label="shared")
    ax.barh(names, 1 - fs, left=fs, color=_UNIQUE, label="unique")
    for k, n in enumerate(names):
        u = max(tot[n] - sh[n], 0.0) ** 0.5
        ax.text(0.995, k, f"‖S‖={sh[n] ** 0.5:.3g}  ‖U‖={u:.3g}", va="center", ha="right", color="white", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of ‖ΔW‖² (summed over modules)")
    ax.set_title(f"Shared vs unique per vector at τ = {dec.tau:.2f}", fontsize=10)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.12), ncol=2, fontsize=8, frameon=False)
    return fig


def all_figures(dec: Decomposition) -> tuple:
    """(spectrum, shared dims, norms) for one τ."""
    return spectrum_figure(dec), shared_dims_figure(dec), norms_figure(dec)
