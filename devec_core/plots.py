"""Matplotlib figures of a decomposition; they follow τ (redraw after ``with_tau``).

  spectrum_figure      histogram of the eigenvalues' real parts over all modules, τ as a line
                       (like the paper's toy figure); those above τ (shared) and complex ones
                       stacked in their own colours; the chance level (expected counts for random
                       subspaces of the same ranks, devec_core.chance) as a grey step line and the
                       suggested τ as a dotted marker
  shared_dims_figure   per module as a heat-map, rows = layer type × columns = block: the shared
                       fraction of ‖ΔW‖² (or the shared dimension, integer ticks); the title
                       gives the dimension (one number when it is the same everywhere)
  shared_dims_svg      the same heat-map as an inline SVG for the page (gr.HTML): hovering a cell
                       names its module, shared dimension and shared fraction (no plotting
                       library in the browser; the tooltip is the SVG's own <title> plus a
                       readout line under the map, shown by CSS)
  count_note           how the spectrum's "N above" relates to the total shared dimension
  norms_figure         per vector: ‖shared‖² vs ‖unique‖² as stacked fractions, norms written on
  page_figures         what the Studio's page shows: (spectrum, heat-map SVG, norms)

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state: safe in a server
with many users). matplotlib is imported inside the functions.
"""

from __future__ import annotations

import html
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
    per_pair = dec.config.mode != "joint" and max(pairs_per_module(dec).values(), default=0) > 1
    ax.text(dec.tau, 0.97, f" τ = {dec.tau:.2f}\n {above} above " + (f"\n (per pair; shared dim {sum(dec.shared_dims().values())}) " if per_pair else ""), color=_TAU, va="top", ha="left" if dec.tau < 0.8 else "right", transform=ax.get_xaxis_transform(), fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("eigenvalue of P₁P₂⋯P_k (real part; 1 = direction in every vector)")
    ax.set_ylabel("count (log)")
    fig.suptitle(f"Spectrum of the pool · {len(vals)} modules · mode {dec.config.mode}", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(groups) + 1), fontsize=7, frameon=False)
    return fig


def _split(mod: str) -> tuple[str, int, str]:
    m = _BLOCK_RE.match(mod)
    return (m.group(1).rstrip("."), int(m.group(2)), m.group(3)) if m else ("", 0, mod)


def pairs_per_module(dec: Decomposition) -> dict[str, int]:
    """How many spectra each module's eigenvalues come from: 1 (joint), the (target, reference)
    pairs (isolate) or the ordered pairs (pairwise); 0 where fewer than two vectors have it."""
    out = {}
    for blk in dec.blocks:
        n = len(dec.mode.orders(dec.names, blk.members))
        out.update((m, n) for m in blk.modules)
    return out


def count_note(dec: Decomposition) -> tuple[int, str]:
    """(eigenvalues above τ over all modules, a sentence saying how that count relates to the
    total shared dimension). In joint mode they are the same count; in isolate and pairwise mode
    every pair has its own spectrum, so a direction shared with several vectors is counted once
    per pair above τ, and once in the dimension (the union of the pairs' subspaces)."""
    above = sum(int((ev.real > dec.tau).sum()) for ev in dec.eigenvalues().values())
    total = sum(dec.shared_dims().values())
    pairs = max(pairs_per_module(dec).values(), default=0)
    if dec.config.mode == "joint" or pairs <= 1:
        if above == total:
            return above, f"{above} eigenvalues above τ = the total shared dimension {total}."
        return above, (
            f"{above} eigenvalues above τ, total shared dimension {total} (the dimension is the rank of the "
            f"selected subspace: a complex pair or a near-duplicate direction counts once)."
        )
    who = "(target, reference) pair" if dec.config.mode == "isolate" else "ordered pair of vectors"
    return above, (
        f"{above} eigenvalues above τ vs total shared dimension {total}: the spectrum has one set of eigenvalues "
        f"per {who} (up to {pairs} per module), so a direction shared with several vectors is counted once per pair; "
        f"the dimension counts it once (the union of the pairs' subspaces)."
    )


def shared_fractions(dec: Decomposition) -> dict[str, float]:
    """Per module: the fraction of ‖ΔW‖² that is in shared parts, ‖S‖² / ‖ΔW‖², summed over the
    vectors the mode removes from (isolate: the target; joint, pairwise: every member)."""
    out = {}
    for row in dec.summary():
        names = [dec.config.target] if dec.config.mode == "isolate" else row["members"]
        norms = [row["norms"][n] for n in names if n in row["norms"]]
        tot = sum(v["delta"] ** 2 for v in norms)
        out[row["module"]] = sum(v["shared"] ** 2 for v in norms) / tot if tot > 0 else 0.0
    return out


def _grid(mods: list[str]):
    """(rows, blocks, prefixes, cell of each module) for module names "prefix.N.leaf"."""
    parts = [_split(m) for m in mods]
    prefixes = list(dict.fromkeys(p for p, _, _ in parts))  # in module order (FLUX: double, single)
    rows = list(dict.fromkeys((p, leaf) for p, _, leaf in parts))
    rows.sort(key=lambda r: prefixes.index(r[0]))
    blocks = sorted({i for _, i, _ in parts})
    ri, ci = {r: k for k, r in enumerate(rows)}, {b: k for k, b in enumerate(blocks)}
    cell = {m: (ri[(p, leaf)], ci[i]) for m, (p, i, leaf) in zip(mods, parts)}
    return rows, blocks, prefixes, cell


def shared_dims_figure(dec: Decomposition, max_cols: int = 24, value: str = "fraction"):
    """Heat-map per module: rows = layer type, columns = block index.

    ``value="fraction"`` (default) colours the shared fraction of the module's ‖ΔW‖²
    (``shared_fractions``), which varies even where every module has the same shared dimension;
    ``value="dim"`` colours the shared dimension on a discrete scale with whole-number ticks.
    Either way the title gives the shared dimension (one number when it is the same in every
    module, else its range) and the total; on small grids where it varies, the dimension is written in each cell.

    Module names "prefix.N.leaf" are grouped by (prefix, leaf) into rows and N into columns
    (FLUX's double and single blocks stacked, separated by a white line);
    e.g. FLUX's "transformer_blocks.3.attn.to_q", an LLM's "model.layers.12.mlp.down_proj".
    Missing modules are grey.
    """
    if value not in ("fraction", "dim"):
        raise ValueError(f"value must be 'fraction' or 'dim', got {value!r}")
    dims = dec.shared_dims()
    fig, ax = _figure(6.0, 3.4)
    if not dims:
        ax.text(0.5, 0.5, "no modules", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    rows, blocks, prefixes, cell = _grid(list(dims))
    D = np.full((len(rows), len(blocks)), np.nan)
    for mod, d in dims.items():
        D[cell[mod]] = d
    import matplotlib
    from matplotlib.colors import BoundaryNorm

    if value == "fraction":
        F = np.full_like(D, np.nan)
        for mod, f in shared_fractions(dec).items():
            F[cell[mod]] = f
        cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#eeeeee")
        vmax = max(1e-12, float(np.nanmax(F)))
        im = ax.imshow(np.ma.masked_invalid(F), aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="shared fraction of ‖ΔW‖²")
    else:  # whole numbers: one colour per value, ticks at the values
        top = max(1, int(np.nanmax(D)))
        cmap = matplotlib.colormaps["magma_r"].resampled(top + 1).with_extremes(bad="#eeeeee")
        norm = BoundaryNorm(np.arange(top + 2) - 0.5, top + 1)
        im = ax.imshow(np.ma.masked_invalid(D), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, shrink=0.8, label="shared dim")
        step = max(1, -(-(top + 1) // 8))
        cb.set_ticks(range(0, top + 1, step), labels=[str(k) for k in range(0, top + 1, step)])  # never 0.5, 1.5, ...
    finite = D[np.isfinite(D)]
    if D.size <= 120 and finite.min() != finite.max():  # small grids where it varies: the dimension in each cell
        for (r, c), d in np.ndenumerate(D):
            if np.isfinite(d):
                ax.text(c, r, f"{int(d)}", ha="center", va="center", fontsize=6, color="#777777")
    fs = 7 if len(rows) <= 20 else 5
    ax.set_yticks(range(len(rows)), _row_labels(rows, prefixes), fontsize=fs)
    step = max(1, -(-len(blocks) // max_cols))
    ax.set_xticks(range(0, len(blocks), step), [str(blocks[k]) for k in range(0, len(blocks), step)], fontsize=7)
    for k in range(1, len(rows)):
        if rows[k][0] != rows[k - 1][0]:
            ax.axhline(k - 0.5, color="white", lw=2)
    ax.set_xlabel("block index")
    ax.set_title(f"{_what(value)} per module at τ = {dec.tau:.2f}\n{dims_caption(dims)}", fontsize=9)
    return fig


def _row_labels(rows: list[tuple[str, str]], prefixes: list[str]) -> list[str]:
    """A heat-map row's label: the layer's leaf name, with its block kind when there are several
    (FLUX: "double · attn.to_q", "single · proj_mlp")."""
    short = {p: ("double" if p == "transformer_blocks" else "single" if p == "single_transformer_blocks" else p.split(".")[-1]) for p in prefixes}
    return [leaf if len(prefixes) == 1 else f"{short[p]} · {leaf}" for p, leaf in rows]


_SVG_W = 600  # the SVG's own units (≈ px); it scales to the column's width
_SVG_CSS = (
    ".devec-heat text{font-family:system-ui,sans-serif;fill:#333}"
    ".devec-heat .devec-tip{visibility:hidden;pointer-events:none;font-size:11px;fill:#111}"
    ".devec-heat g.devec-cell:hover .devec-tip{visibility:visible}"
    ".devec-heat g.devec-cell:hover rect{stroke:#1f77b4;stroke-width:2}"
    ".devec-heat:has(g.devec-cell:hover) .devec-hint{visibility:hidden}"
)


def _hex(rgba) -> str:
    r, g, b = (max(0, min(255, round(255 * float(c)))) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def shared_dims_svg(dec: Decomposition, max_cols: int = 24, value: str = "fraction") -> str:
    """The heat-map of ``shared_dims_figure`` as an inline SVG with hover, for the page.

    Same grid (rows = layer type, columns = block), colours (magma_r; grey = no module) and title
    (the shared dimension: one number when it is the same everywhere, else its range). Each cell
    is a ``<g class="devec-cell" data-module=…>`` whose ``<title>`` (the browser's tooltip) and
    readout line (under the map, shown while the cell is hovered; CSS, no script) say the module
    name, its shared dimension, its shared fraction of ‖ΔW‖² and how many vectors have it.

    Args:
        dec: the decomposition (at the τ to show).
        max_cols: at most this many block labels on the x axis.
        value: "fraction" (colour = shared fraction of ‖ΔW‖²) or "dim" (colour = shared dimension).

    Returns:
        An ``<svg>`` element as a string (module names escaped).
    """
    if value not in ("fraction", "dim"):
        raise ValueError(f"value must be 'fraction' or 'dim', got {value!r}")
    esc = html.escape
    dims = dec.shared_dims()
    if not dims:
        return (f'<svg class="devec-heat" viewBox="0 0 {_SVG_W} 60" width="100%" xmlns="http://www.w3.org/2000/svg">'
                f'<text x="{_SVG_W / 2}" y="34" text-anchor="middle" font-size="13">no modules</text></svg>')
    import matplotlib

    rows, blocks, prefixes, cell = _grid(list(dims))
    frac = shared_fractions(dec)
    members = {m: len(blk.members) for blk in dec.blocks for m in blk.modules}
    if value == "fraction":
        vmax = max(1e-12, max(frac.values()))
        cmap = matplotlib.colormaps["magma_r"]
        colour = {m: _hex(cmap(min(1.0, frac[m] / vmax))) for m in dims}
        bar_label, ticks = "shared fraction of ‖ΔW‖²", [(0.0, "0"), (0.5, f"{vmax / 2:.2g}"), (1.0, f"{vmax:.2g}")]
    else:
        top = max(1, max(dims.values()))
        cmap = matplotlib.colormaps["magma_r"].resampled(top + 1)
        colour = {m: _hex(cmap(d / top)) for m, d in dims.items()}
        step = max(1, -(-(top + 1) // 8))
        bar_label, ticks = "shared dim", [(k / top, str(k)) for k in range(0, top + 1, step)]
    row_names = _row_labels(rows, prefixes)
    # 1. geometry (SVG units): labels left, colour bar right, title above, axis + readout below
    fs = 9 if len(rows) <= 20 else 7
    left = min(170, 12 + 0.56 * fs * max(len(n) for n in row_names))
    right, top_m, bottom = 62, 40, 76
    cw = (_SVG_W - left - right) / len(blocks)
    ch = max(7.0, min(22.0, 240 / len(rows)))
    gh = ch * len(rows)
    h = top_m + gh + bottom
    what = "the target's ‖ΔW‖²" if dec.config.mode == "isolate" else "its vectors' ‖ΔW‖²"
    out = [f'<svg class="devec-heat" viewBox="0 0 {_SVG_W} {h:.0f}" width="100%" xmlns="http://www.w3.org/2000/svg" '
           f'role="img" aria-label="{esc(_what(value))} per module">',
           f"<style>{_SVG_CSS}</style>",
           f'<text x="{_SVG_W / 2}" y="14" text-anchor="middle" font-size="12">{esc(_what(value))} per module at τ = {dec.tau:.2f}</text>',
           f'<text x="{_SVG_W / 2}" y="30" text-anchor="middle" font-size="11">{esc(dims_caption(dims))}</text>',
           f'<rect x="{left:.1f}" y="{top_m}" width="{cw * len(blocks):.1f}" height="{gh:.1f}" fill="#eeeeee"/>']
    # 2. row and column labels
    for k, name in enumerate(row_names):
        out.append(f'<text x="{left - 4:.1f}" y="{top_m + (k + 0.5) * ch + fs / 3:.1f}" text-anchor="end" font-size="{fs}">{esc(name)}</text>')
    step = max(1, -(-len(blocks) // max_cols))
    for k in range(0, len(blocks), step):
        out.append(f'<text x="{left + (k + 0.5) * cw:.1f}" y="{top_m + gh + 12:.1f}" text-anchor="middle" font-size="9">{blocks[k]}</text>')
    out.append(f'<text x="{left + cw * len(blocks) / 2:.1f}" y="{top_m + gh + 26:.1f}" text-anchor="middle" font-size="10">block index</text>')
    # 3. cells: colour, the dimension written in small varying grids, the hover text
    varies = len(set(dims.values())) > 1
    ry = top_m + gh + 46
    out.append(f'<text class="devec-hint" x="10" y="{ry:.1f}" font-size="11" fill="#777">'
               "Hover a cell: module, shared dimension, shared fraction</text>")
    for mod, d in dims.items():
        r, c = cell[mod]
        x, y = left + c * cw, top_m + r * ch
        facts = f"shared dim {d} · shared fraction {frac.get(mod, 0.0):.3f} of {what} · in {members.get(mod, 0)} of {len(dec.names)} vectors"
        tip = f"{mod} · {facts}"
        g = [f'<g class="devec-cell" data-module="{esc(mod, quote=True)}"><title>{esc(tip)}</title>',
             f'<rect x="{x:.2f}" y="{y:.2f}" width="{cw:.2f}" height="{ch:.2f}" fill="{colour[mod]}"/>']
        if varies and len(rows) * len(blocks) <= 120:
            g.append(f'<text x="{x + cw / 2:.2f}" y="{y + ch / 2 + 3:.2f}" text-anchor="middle" font-size="8" fill="#777">{d}</text>')
        g.append(f'<text class="devec-tip" x="10" y="{ry:.1f}"><tspan font-weight="bold">{esc(mod)}</tspan>'
                 f'<tspan x="10" dy="15">{esc(facts)}</tspan></text></g>')
        out.append("".join(g))
    for k in range(1, len(rows)):  # FLUX: double and single blocks apart
        if rows[k][0] != rows[k - 1][0]:
            out.append(f'<line x1="{left:.1f}" x2="{left + cw * len(blocks):.1f}" y1="{top_m + k * ch:.1f}" y2="{top_m + k * ch:.1f}" stroke="white" stroke-width="2"/>')
    # 4. colour bar (top = the largest value)
    bx, n_stops = _SVG_W - right + 10, 24
    out.append(f'<defs><linearGradient id="devec-bar-{value}" x1="0" y1="1" x2="0" y2="0">'
               + "".join(f'<stop offset="{k / (n_stops - 1):.3f}" stop-color="{_hex(cmap(k / (n_stops - 1)))}"/>' for k in range(n_stops))
               + "</linearGradient></defs>")
    out.append(f'<rect x="{bx}" y="{top_m}" width="12" height="{gh:.1f}" fill="url(#devec-bar-{value})"/>')
    for t, lab in ticks:
        out.append(f'<text x="{bx + 15}" y="{top_m + (1 - t) * gh + 3:.1f}" font-size="9">{esc(lab)}</text>')
    out.append(f'<text transform="translate({_SVG_W - 4},{top_m + gh / 2:.1f}) rotate(-90)" text-anchor="middle" font-size="9">{esc(bar_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _what(value: str) -> str:
    return "Shared fraction of ‖ΔW‖²" if value == "fraction" else "Shared dimension"


def dims_caption(dims: dict[str, int]) -> str:
    """"shared dimension 8 in every module (210 modules, total 1680)" or "shared dimension 0–3
    (418 modules, total 782)": the count the heat-map's title names."""
    vals = list(dims.values())
    lo, hi, total = min(vals), max(vals), sum(vals)
    if lo == hi:
        return f"shared dimension {lo} in every module ({len(vals)} modules, total {total})"
    return f"shared dimension {lo}–{hi} ({len(vals)} modules, total {total})"


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
    """(spectrum, shared dims, norms) for one τ, as matplotlib figures."""
    return spectrum_figure(dec), shared_dims_figure(dec), norms_figure(dec)


def page_figures(dec: Decomposition) -> tuple:
    """What the Studio's page shows for one τ: (spectrum figure, heat-map SVG with hover, norms figure)."""
    return spectrum_figure(dec), shared_dims_svg(dec), norms_figure(dec)
