"""Evaluate style mixing on the tiny FLUX-architecture model: vanilla task arithmetic vs DeVec.

    python demo/style/evaluate.py [--assets assets/style_flux] [--out demo/style/results] [--seeds 4] [--threads 2] [--quick]

What it does (all on the CPU, fixed seeds; needs the assets built by demo/style/build.py):
  1. The spectrum of each pool first: the storybook family (palette, stripes, outline: each
     parent ⊕ child) and the independent pair (mono, neon), joint mode: shared dimension per
     module and the share of each vector's squared norm that is shared at τ = 0.85.
  2. Mixes of 2 and 3 family styles and of the independent pair. Per mix:
        vanilla λ=1        W0 + Σ ΔW_i
        vanilla λ=1/k      W0 + Σ ΔW_i / k      (what users do against overcooking)
        DeVec λˢ=1         W0 + Σ U_i + 1·S     (the mixed vectors' own joint decomposition)
        DeVec λˢ ∈ {0, 0.5, 1.5, 2}             (the shared part swept)
     and each single style at λ = 1, and the base, on 6 prompts (one per class) × seeds.
  3. Measures per condition (95 % bootstrap CIs over prompt × seed items, paired):
        strength[s]   (mean det_s(mix) − mean det_s(base)) / (mean det_s(single s) − mean det_s(base))
        parent        the same with the parent's detector (vignette), relative to the mean level of
                      the mixed singles (each has the parent once): > 1 = overcooked
        content       the content classifier's accuracy on the prompted class
        clipped, hf   clipped channel values, high-frequency energy (artefacts)
  4. Detector AUROC (single style vs base, generated images) for the style detectors and the
     generic measures (which of them would transfer to real FLUX images).
Writes results.json, table.md, grid.png, strength.png, sweep.png, spectrum.png into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devec_core import style_metrics as M  # noqa: E402
from devec_core import toy_flux as TF  # noqa: E402

FAMILY = ("palette", "stripes", "outline")
INDEPENDENT = ("mono", "neon")
PARENT = "storybook"
SWEEP = (0.0, 0.5, 1.5, 2.0)
TAU = 0.85


def prompts_and_seeds(n_seeds: int) -> list[tuple[str, int]]:
    """One prompt per class (rotating colours, "big … in the middle": the form the model draws best) × ``n_seeds`` seeds."""
    items = []
    for ci, cls in enumerate(TF.CLASSES):
        p = TF.caption(cls, TF.COLOURS[(ci + 3) % len(TF.COLOURS)], "big", "middle")
        items += [(p, 1000 + s) for s in range(n_seeds)]
    return items


def mix_sets(quick: bool = False) -> list[tuple[str, ...]]:
    pairs = list(itertools.combinations(FAMILY, 2))
    out = [pairs[0]] if quick else pairs + ([FAMILY] if len(FAMILY) >= 3 else [])
    return out + [INDEPENDENT]


def load_vectors(assets: Path, names) -> dict:
    from devec_core.formats import load_task_vector

    return {n: load_task_vector(str(assets / "loras" / f"{n}.safetensors"), name=n) for n in names}


# ---- 1. spectra -------------------------------------------------------------------------------------
def spectrum_report(vecs: dict, pools: dict[str, tuple[str, ...]]) -> dict:
    from devec_core.pool import decompose

    out = {}
    for label, names in pools.items():
        dec = decompose([vecs[n] for n in names], tau=TAU, mode="joint")
        rows = dec.summary()
        evs = sorted((float(e[0]) for r in rows for e in r["eigenvalues"]), reverse=True)
        share = {n: sum(r["norms"][n]["shared"] ** 2 for r in rows) / max(sum(r["norms"][n]["delta"] ** 2 for r in rows), 1e-30) for n in names}
        dims = [r["shared_dim"] for r in rows]
        out[label] = {
            "names": list(names),
            "modules": len(rows),
            "modules_with_shared": int(sum(d > 0 for d in dims)),
            "mean_shared_dim": float(np.mean(dims)),
            "shared_norm_share": share,
            "largest_eigenvalue": evs[0] if evs else 0.0,
            "eigenvalues_above_tau": int(sum(e > TAU for e in evs)),
            "n_eigenvalues": len(evs),
            "eigenvalues": evs,
        }
    return out


# ---- 2. conditions ----------------------------------------------------------------------------------
def conditions(sets: list[tuple[str, ...]]) -> list[dict]:
    conds = [{"id": "base", "kind": "base", "styles": []}]
    singles = sorted({s for st in sets for s in st} | {PARENT})
    conds += [{"id": f"single:{s}", "kind": "single", "styles": [s]} for s in singles]
    for st in sets:
        k = len(st)
        key = "+".join(st)
        conds.append({"id": f"{key}|vanilla_1", "kind": "vanilla", "styles": list(st), "lam": 1.0})
        conds.append({"id": f"{key}|vanilla_1/k", "kind": "vanilla", "styles": list(st), "lam": 1.0 / k})
        for ls in (1.0, *SWEEP):
            conds.append({"id": f"{key}|devec_s{ls:g}", "kind": "devec", "styles": list(st), "lam_s": ls})
    return conds


def build_mix(cond: dict, vecs: dict, decs: dict):
    from devec_core.mix import VectorPool, devec, vanilla

    if cond["kind"] == "base":
        return None
    if cond["kind"] == "single":
        s = cond["styles"][0]
        return vanilla(VectorPool([vecs[s]]), {s: 1.0}, label=cond["id"])
    if cond["kind"] == "vanilla":
        pool = VectorPool([vecs[s] for s in cond["styles"]])
        return vanilla(pool, {s: cond["lam"] for s in cond["styles"]}, label=cond["id"])
    dec = decs[tuple(cond["styles"])]
    return devec(dec, {s: 1.0 for s in cond["styles"]}, shared=cond["lam_s"], label=cond["id"])


def render_all(assets: Path, conds: list[dict], items: list[tuple[str, int]], cache: Path) -> dict[str, np.ndarray]:
    """Images (N,32,32,3) per condition; cached per condition id in ``cache``."""
    from devec_core.backends.flux import FluxBackend
    from devec_core.pool import decompose

    from tqdm.auto import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    need = [c for c in conds if not (cache / f"{_fname(c['id'])}.npy").exists()]
    out = {}
    if need:
        names = sorted({s for c in conds for s in c["styles"]})
        vecs = load_vectors(assets, names)
        decs = {tuple(c["styles"]): decompose([vecs[s] for s in c["styles"]], tau=TAU, mode="joint") for c in need if c["kind"] == "devec"}
        be = FluxBackend(TF.load_model(assets / "model"))
        prompts, seeds = [p for p, _ in items], [s for _, s in items]
        for c in tqdm(need, desc="conditions", mininterval=5):
            be.apply(build_mix(c, vecs, decs))
            ims = TF.generate(be.pipe, prompts, seeds).permute(0, 2, 3, 1).numpy().astype(np.float32)
            np.save(cache / f"{_fname(c['id'])}.npy", ims)
        be.restore()
    for c in conds:
        out[c["id"]] = np.load(cache / f"{_fname(c['id'])}.npy")
    return out


def _fname(cid: str) -> str:
    return cid.replace("|", "__").replace(":", "_").replace("/", "_").replace("+", "-")


# ---- 3. measures -------------------------------------------------------------------------------------
def boot_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """mean(num)/mean(den) with a paired 95 % percentile bootstrap over items."""
    rng = np.random.default_rng(seed)
    n = len(num)
    est = float(num.mean() / den.mean()) if abs(den.mean()) > 1e-12 else float("nan")
    idx = rng.integers(0, n, (n_boot, n))
    d = den[idx].mean(1)
    r = np.where(np.abs(d) > 1e-12, num[idx].mean(1) / np.where(np.abs(d) > 1e-12, d, 1), np.nan)
    lo, hi = np.nanpercentile(r, [2.5, 97.5])
    return {"mean": est, "lo": float(lo), "hi": float(hi)}


def boot_mean(v: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi)}


def measure(images: dict[str, np.ndarray], conds: list[dict], items, classifier) -> dict:
    y = np.array([TF.CLASSES.index(TF.prompt_class(p)) for p, _ in items])
    det = {cid: {s: np.atleast_1d(f(x)) for s, f in M.DETECTORS.items()} for cid, x in images.items()}
    base = det["base"]
    res = {}
    for c in conds:
        cid = c["id"]
        x = images[cid]
        with torch.no_grad():
            pred = classifier(torch.from_numpy(x).permute(0, 3, 1, 2)).argmax(1).numpy()
        r = {
            "content": boot_mean((pred == y).astype(np.float64)),
            "clipped": boot_mean(np.atleast_1d(M.clipping(x))),
            "hf_energy": boot_mean(np.atleast_1d(M.hf_energy(x))),
            "strength": {},
        }
        for s in c["styles"]:
            r["strength"][s] = boot_ratio(det[cid][s] - base[s], det[f"single:{s}"][s] - base[s])
        fam = [s for s in c["styles"] if s in FAMILY]
        if fam:
            ref = np.mean([det[f"single:{s}"][PARENT] for s in fam], axis=0)
            r["parent"] = boot_ratio(det[cid][PARENT] - base[PARENT], ref - base[PARENT])
            r["parent_vs_parent_lora"] = boot_ratio(det[cid][PARENT] - base[PARENT], det[f"single:{PARENT}"][PARENT] - base[PARENT])
        res[cid] = r
    return res


def detector_auroc(images: dict[str, np.ndarray], styles) -> dict:
    """AUROC single style vs base for each style's detector and every generic measure."""
    base = images["base"]
    out = {}
    gb = {g: np.atleast_1d(f(base)) for g, f in M.GENERIC.items()}
    for s in styles:
        x = images[f"single:{s}"]
        row = {"detector": M.auroc(np.atleast_1d(M.DETECTORS[s](x)), np.atleast_1d(M.DETECTORS[s](base)))}
        row["generic"] = {g: M.auroc(np.atleast_1d(f(x)), gb[g]) for g, f in M.GENERIC.items()}
        out[s] = row
    return out


# ---- 4. outputs ----------------------------------------------------------------------------------------
METHOD_LABEL = {"vanilla_1": "vanilla λ=1", "vanilla_1/k": "vanilla λ=1/k", "devec_s1": "DeVec λˢ=1"}


def _fmt(d: dict) -> str:
    return f"{d['mean']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def table_markdown(res: dict, sets, sweep: bool = True) -> str:
    lines = [
        "| mix | method | style strength (1 = single style) | parent amplitude (1 = one parent; >1 overcooked) | content acc. | clipped | HF energy |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in sets:
        key = "+".join(st)
        methods = ["vanilla_1", "vanilla_1/k", "devec_s1"] + ([f"devec_s{ls:g}" for ls in SWEEP] if sweep else [])
        for m in methods:
            r = res.get(f"{key}|{m}")
            if r is None:
                continue
            strengths = "; ".join(f"{s} {_fmt(v)}" for s, v in r["strength"].items())
            par = _fmt(r["parent"]) if "parent" in r else "–"
            lab = METHOD_LABEL.get(m, m.replace("devec_s", "DeVec λˢ="))
            lines.append(f"| {key} | {lab} | {strengths} | {par} | {_fmt(r['content'])} | {100 * r['clipped']['mean']:.2f}% | {r['hf_energy']['mean']:.3f} |")
    singles = [k for k in res if k.startswith("single:")] + ["base"]
    lines += ["", "| single | content acc. | clipped | HF energy |", "|---|---|---|---|"]
    for k in singles:
        r = res[k]
        lines.append(f"| {k} | {_fmt(r['content'])} | {100 * r['clipped']['mean']:.2f}% | {r['hf_energy']['mean']:.3f} |")
    return "\n".join(lines)


def save_grid(images: dict[str, np.ndarray], rows: list[tuple[str, str]], items, path: Path, per_row: int, n_seeds: int) -> None:
    """Rows of images (label, condition id): the first ``per_row`` prompts at their first seed."""
    from PIL import Image, ImageDraw

    idx = [i * n_seeds for i in range(per_row)]
    s, lab_w, gap = 64, 150, 2
    W = lab_w + per_row * (s + gap)
    H = len(rows) * (s + gap)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for r, (label, cid) in enumerate(rows):
        d.text((4, r * (s + gap) + s // 2 - 6), label, fill=(0, 0, 0))  # ASCII: PIL's default font
        for j, i in enumerate(idx):
            arr = (images[cid][i] * 255).round().clip(0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(arr).resize((s, s), Image.NEAREST), (lab_w + j * (s + gap), r * (s + gap)))
    canvas.save(path, optimize=True)



def _save(fig, path: Path) -> str:
    """Lay out, write (90 dpi) and close a figure; its file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def plots(res: dict, spec: dict, sets, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # strength / parent per method, per mix
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.2), sharey=True, squeeze=False)
    for ax, st in zip(axes[0], sets):
        key = "+".join(st)
        ms = ["vanilla_1", "vanilla_1/k", "devec_s1"]
        xs = np.arange(len(ms))
        for j, s in enumerate(st):
            v = [res[f"{key}|{m}"]["strength"][s] for m in ms]
            ax.errorbar(xs + 0.1 * j, [x["mean"] for x in v], yerr=[[x["mean"] - x["lo"] for x in v], [x["hi"] - x["mean"] for x in v]], fmt="o", label=s, capsize=2)
        if all("parent" in res[f"{key}|{m}"] for m in ms):
            v = [res[f"{key}|{m}"]["parent"] for m in ms]
            ax.errorbar(xs - 0.15, [x["mean"] for x in v], yerr=[[x["mean"] - x["lo"] for x in v], [x["hi"] - x["mean"] for x in v]], fmt="s", color="k", label="parent", capsize=2)
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.set_xticks(xs, [METHOD_LABEL[m] for m in ms], rotation=30, fontsize=7)
        ax.set_title(key, fontsize=8)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("relative to single style")
    files.append(_save(fig, out / "strength.png"))
    # λˢ sweep
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for st in sets:
        key = "+".join(st)
        lss = sorted((1.0, *SWEEP))
        if "parent" in res[f"{key}|devec_s1"]:
            ax.plot(lss, [res[f"{key}|devec_s{ls:g}"]["parent"]["mean"] for ls in lss], "o-", label=f"{key}: parent")
        ax.plot(lss, [np.mean([v["mean"] for v in res[f"{key}|devec_s{ls:g}"]["strength"].values()]) for ls in lss], "x--", label=f"{key}: mean style")
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("DeVec λˢ")
    ax.set_ylabel("relative to single style")
    ax.legend(fontsize=5)
    files.append(_save(fig, out / "sweep.png"))
    # spectra
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for label, s in spec.items():
        ax.plot(s["eigenvalues"][:200], label=label)
    ax.axhline(TAU, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("eigenvalue rank (all modules)")
    ax.set_ylabel("eigenvalue (cos²)")
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "spectrum.png"))
    return files


def main(argv=None) -> int:
    global FAMILY, INDEPENDENT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=str(ROOT / "assets" / "style_flux"))
    ap.add_argument("--out", default=str(ROOT / "demo" / "style" / "results"))
    ap.add_argument("--cache", default=None, help="image cache (default: <assets>/.work/eval_cache)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one family pair + the independent pair")
    ap.add_argument("--family", default="palette,stripes,outline", help="children of the parent to mix (comma list)")
    ap.add_argument("--independent", default="mono,neon", help="independently trained styles (comma list, 2)")
    a = ap.parse_args(argv)
    FAMILY, INDEPENDENT = tuple(a.family.split(",")), tuple(a.independent.split(","))
    if len(FAMILY) < 2 or len(INDEPENDENT) != 2:
        ap.error(f"--family needs at least 2 styles and --independent exactly 2; got {FAMILY}, {INDEPENDENT}")
    torch.set_num_threads(a.threads)
    assets, out = Path(a.assets), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sets = mix_sets(a.quick)
    items = prompts_and_seeds(a.seeds)
    vecs = load_vectors(assets, [*FAMILY, *INDEPENDENT])
    spec = spectrum_report(vecs, {f"family ({', '.join(FAMILY)})": FAMILY, f"independent ({', '.join(INDEPENDENT)})": INDEPENDENT, f"family pair ({', '.join(FAMILY[:2])})": FAMILY[:2]})
    conds = conditions(sets)
    cache = Path(a.cache) if a.cache else assets / ".work" / f"eval_cache_s{a.seeds}"
    images = render_all(assets, conds, items, cache)
    clf = TF.load_classifier(assets / "classifier.safetensors")
    res = measure(images, conds, items, clf)
    aur = detector_auroc(images, sorted({s for c in conds for s in c["styles"]}))
    table = table_markdown(res, sets)
    gsets = [st for st in sets if len(st) == 2][:1] + [st for st in sets if len(st) == 3][:1]
    grid_files = []
    for st in gsets:
        key = "+".join(st)
        rows = [("base", "base")] + [(f"{s} alone", f"single:{s}") for s in st]
        rows += [("vanilla, lambda=1", f"{key}|vanilla_1"), ("vanilla, lambda=1/k", f"{key}|vanilla_1/k"), ("DeVec, shared once", f"{key}|devec_s1")]
        f = out / f"grid_{_fname(key)}.png"
        save_grid(images, rows, items, f, per_row=len(TF.CLASSES), n_seeds=a.seeds)
        grid_files.append(f.name)
    st = INDEPENDENT
    rows = [("base", "base")] + [(f"{s} alone", f"single:{s}") for s in st] + [("vanilla, lambda=1", f"{'+'.join(st)}|vanilla_1"), ("DeVec, shared once", f"{'+'.join(st)}|devec_s1")]
    f = out / f"grid_{_fname('+'.join(st))}.png"
    save_grid(images, rows, items, f, per_row=len(TF.CLASSES), n_seeds=a.seeds)
    grid_files.append(f.name)
    files = plots(res, spec, sets, out)
    for s in spec.values():
        s["eigenvalues"] = s["eigenvalues"][:64]  # keep the JSON small
    report = {
        "command": "python demo/style/evaluate.py" + (" --quick" if a.quick else "") + (f" --seeds {a.seeds}" if a.seeds != 3 else ""),
        "items": len(items), "seeds": a.seeds, "tau": TAU, "spectrum": spec, "results": res, "auroc": aur,
        "files": grid_files + files + ["table.md"], "seconds": round(time.time() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(json.dumps({"spectrum": {k: {kk: vv for kk, vv in v.items() if kk != "eigenvalues"} for k, v in spec.items()}, "auroc": aur}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
