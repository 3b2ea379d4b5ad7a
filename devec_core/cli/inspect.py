"""``python -m devec_core inspect``: what each input is, and how much the inputs overlap (and by chance)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from ..algorithm import PAPER_TAU
from ..chance import pool_chance
from ..formats import load_task_vector
from ..pool import decompose
from ..taskvec import LowRank
from .common import EXIT_OK, _alpha_args, _check_duplicate_paths, _config_arg, _names_for, check_tau_arg


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``inspect`` subcommand on ``sub`` (argparse subparsers)."""
    i = sub.add_parser("inspect", help="describe inputs: format, base model, modules, ranks, norms, overlap")
    i.add_argument("inputs", nargs="+", metavar="INPUT")
    i.add_argument("--base", help="base model for DoRA adapters and full checkpoints")
    i.add_argument("--allow-pickle", action="store_true")
    _alpha_args(i)
    i.add_argument("--tau", type=float, default=PAPER_TAU, help="threshold for the overlap's shared dimension")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--quiet", action="store_true")
    return i


def describe(vectors, tau: float = PAPER_TAU) -> dict:
    """Per input: format, family, base guess, module count, ranks, norms; per pair: overlap."""
    out = {"inputs": [], "pairs": []}
    for v in vectors:
        ranks = Counter(d.rank if isinstance(d, LowRank) else "dense" for d in v.modules.values())
        scales = sorted({round(d.scale, 6) for d in v.modules.values() if isinstance(d, LowRank)})
        norms = {m: d.sq_norm() ** 0.5 for m, d in v.modules.items()}
        top = sorted(norms.items(), key=lambda kv: -kv[1])[:3]
        out["inputs"].append({
            "name": v.name, "input": v.meta.get("input"), "format": v.meta.get("format"), "family": v.meta.get("family"),
            "base_model": v.meta.get("base_model"), "dora": v.meta.get("dora", False), "modules": len(v.modules),
            "extras": len(v.extras), "ranks": {str(k): n for k, n in sorted(ranks.items(), key=str)},
            "scales": scales[:5], "norm": sum(x * x for x in norms.values()) ** 0.5, "largest_modules": top,
        })
    for i, a in enumerate(vectors):
        for b in vectors[i + 1 :]:
            common = set(a.modules) & set(b.modules)
            if not common:
                out["pairs"].append({"pair": [a.name, b.name], "common_modules": 0})
                continue
            sub = [type(v)(v.name, {m: v.modules[m] for m in common}, {}, {}) for v in (a, b)]
            dec = decompose(sub, tau=tau)
            rows = dec.summary()
            mx = [max((e[0] for e in r["eigenvalues"]), default=0.0) for r in rows]
            ch = pool_chance(dec)
            out["pairs"].append({
                "pair": [a.name, b.name], "common_modules": len(common),
                "mean_max_cos2": sum(mx) / len(mx), "max_cos2": max(mx),
                "modules_sharing_at_tau": sum(r["shared_dim"] > 0 for r in rows),
                "shared_dims_total": sum(r["shared_dim"] for r in rows),
                "chance": _chance_summary(ch),
            })
    if len(vectors) > 1:
        out["pool"] = _chance_summary(pool_chance(decompose(vectors, tau=tau)))  # joint, pool order
    return out


def _chance_summary(ch) -> dict:
    """The pool-level numbers of a chance report (devec_core.chance) for inspect."""
    mods = ch.modules
    med = (lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0)
    return {
        "regime": ch.regime, "suggested_tau": ch.suggested_tau, "significant_modules": ch.significant,
        "modules": len(mods), "top_median": med([m.top for m in mods]), "chance_median": med([m.null_median for m in mods]),
        "chance_q95_median": med([m.null_q95 for m in mods]), "z_median": med([m.z for m in mods]),
        "fdr_at_tau": ch.to_dict()["fdr_at_tau"], "message": ch.message.replace("**", ""),
    }


def run_inspect(args) -> int:
    check_tau_arg(args.tau)
    paths = _check_duplicate_paths([str(s) for s in args.inputs])
    names = _names_for([str(s) for s in args.inputs], None)
    vectors = []
    for s, p, n in zip(args.inputs, paths, names):
        v = load_task_vector(p, n, base=args.base, allow_pickle=args.allow_pickle, alpha=args.alpha, config=_config_arg(args))
        v.meta["input"] = str(s)
        vectors.append(v)
    info = describe(vectors, args.tau)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return EXIT_OK
    for d in info["inputs"]:
        print(f"{d['input']}")
        print(f"  name {d['name']!r}  format {d['format']}  family {d['family']}  base model: {d['base_model']}"
              f"{'  (DoRA: dense deltas)' if d['dora'] else ''}")
        ranks = ", ".join(f"r{k}×{n}" if k != "dense" else f"dense×{n}" for k, n in d["ranks"].items())
        print(f"  modules {d['modules']} ({ranks}); extras {d['extras']}; scales {d['scales']}; ‖Δ‖_F {d['norm']:.4g}")
        print("  largest: " + ", ".join(f"{m} {x:.3g}" for m, x in d["largest_modules"]))
    for p in info["pairs"]:
        a, b = p["pair"]
        if not p["common_modules"]:
            print(f"overlap {a} ~ {b}: no common module")
            continue
        print(f"overlap {a} ~ {b}: {p['common_modules']} common modules, mean max cos² {p['mean_max_cos2']:.3f}, "
              f"max {p['max_cos2']:.3f}; at τ={args.tau}: {p['modules_sharing_at_tau']} modules share, "
              f"{p['shared_dims_total']} dims")
        print("  " + _chance_line(p["chance"]))
    if "pool" in info:
        print("pool (joint, in the order given): " + _chance_line(info["pool"]))
        print("  " + info["pool"]["message"])
    return EXIT_OK


def _chance_line(c: dict) -> str:
    sug = f"{c['suggested_tau']:.2f}" if c["suggested_tau"] is not None else "none"
    return (f"chance level: top eigenvalue median {c['top_median']:.3f} vs chance {c['chance_median']:.3f} "
            f"(95th pct {c['chance_q95_median']:.3f}); {c['significant_modules']}/{c['modules']} modules above chance "
            f"(BH q < 0.05); regime {c['regime']}; suggested τ {sug}")
