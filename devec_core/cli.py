"""The command line: ``python -m devec_core decompose|inspect``.

    decompose INPUT... --out DIR [--tau 0.85] [--mode joint|pairwise|isolate] [--target NAME]
              [--rank R | --energy E] [--base MODEL]
        Writes in DIR: ``unique-<name>.safetensors`` (or PEFT folder ``unique-<name>/``) per input,
        ``shared.safetensors`` (or ``shared/``), and ``report.json``. Served from the cache when
        the same inputs and options were decomposed before (any τ).
    inspect INPUT... [--base MODEL]
        Format, base model guess, modules, ranks, norms, pairwise overlap.

Exit codes: 0 success; 1 bad input or failure (one line ``error: <input>: <reason>``, nothing
left in DIR); 2 usage error; 3 internal error (add ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Bars:
    """progress(done, total, stage) → one tqdm bar per stage (stderr)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, done: int, total: int, stage: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=total, desc=f"{stage:>10}", unit="mod", leave=False, file=sys.stderr), stage
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devec_core", description="DeVec: split task vectors into shared and unique parts.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("decompose", help="decompose LoRAs / adapters / checkpoints and export the parts as LoRAs")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="LoRA file, PEFT folder, checkpoint, or Hub id")
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--tau", type=float, default=0.85, help="eigenvalue threshold (default 0.85, the paper's)")
    d.add_argument("--mode", choices=("joint", "pairwise", "isolate"), default="joint")
    d.add_argument("--target", help="isolate mode: the vector to clean (a name, or one of the INPUTs)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="dense deltas (DoRA, checkpoints): keep this many directions")
    g.add_argument("--energy", type=float, help="dense deltas: keep this energy fraction (default 0.9)")
    d.add_argument("--export-energy", type=float, default=0.99, help="dense parts → LoRA: energy kept (default 0.99)")
    d.add_argument("--base", help="base model (path or Hub id) for DoRA adapters and full checkpoints")
    d.add_argument("--compress", action="store_true",
                   help="full checkpoints: cut each dense delta to LoRA factors (--rank / --energy) as it is read, "
                        "so memory holds factors, not dense deltas")
    d.add_argument("--names", help="comma-separated names, one per input (default: file names)")
    d.add_argument("--format", choices=("diffusers", "peft"), help="export layout (default: the inputs' family)")
    d.add_argument("--symmetric", action="store_true", help="symmetric spectrum variant")
    d.add_argument("--isolate-order", choices=("union", "sequential"), default="union")
    d.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    d.add_argument("--device", default="auto")
    d.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt with torch.load(weights_only=True)")
    d.add_argument("--no-cache", action="store_true", help="neither read nor write the decomposition cache")
    d.add_argument("--cache-dir", type=Path, help="cache folder (default $DEVEC_CACHE_DIR or ~/.cache/devec)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="describe inputs: format, base model, modules, ranks, norms, overlap")
    i.add_argument("inputs", nargs="+", metavar="INPUT")
    i.add_argument("--base", help="base model for DoRA adapters and full checkpoints")
    i.add_argument("--allow-pickle", action="store_true")
    i.add_argument("--tau", type=float, default=0.85, help="threshold for the overlap's shared dimension")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--quiet", action="store_true")

    from .merge_cli import add_parser as add_mix_parser

    add_mix_parser(sub)
    return p


# ---------------------------------------------------------------------------------------------
# decompose
# ---------------------------------------------------------------------------------------------


def _names_for(inputs: list[str], names_arg: str | None) -> list[str]:
    from .formats import default_name, resolve_source

    if names_arg:
        names = [n.strip() for n in names_arg.split(",")]
        if len(names) != len(inputs):
            raise ValueError(f"--names has {len(names)} names for {len(inputs)} inputs")
        if len(set(names)) != len(names):
            raise ValueError(f"--names must be unique; got {names}")
        return names
    names: list[str] = []
    for s in inputs:
        n = default_name(s, resolve_source(s))
        k, cand = 2, n
        while cand in names:
            cand, k = f"{n}-{k}", k + 1
        names.append(cand)
    return names


def _check_duplicate_paths(inputs: list[str]) -> list[Path]:
    from .formats import FormatError, resolve_source

    if not inputs:
        raise FormatError("empty pool: give at least one input")
    paths, seen = [], {}
    for s in inputs:
        p = resolve_source(s)
        key = str(p.resolve())
        if key in seen:
            raise FormatError(f"{s!r}: duplicate input (same file as {seen[key]!r})")
        seen[key] = s
        paths.append(p)
    return paths


def _target_name(target: str | None, inputs: list[str], names: list[str]) -> str | None:
    if target is None or target in names:
        return target
    if target in inputs:
        return names[inputs.index(target)]
    raise ValueError(f"--target {target!r} is neither a name {names} nor one of the inputs")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished outputs from tmp into out (renames on one filesystem)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(item, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def run_decompose(args) -> int:
    from .cache import DecompositionCache, cached_decompose
    from .export import export_decomposition
    from .formats import load_pool, module_report
    from .pool import Config

    t0 = time.perf_counter()
    inputs = [str(s) for s in args.inputs]
    # 1. Check inputs (cheap): paths, duplicates, names, options
    paths = _check_duplicate_paths(inputs)
    names = _names_for(inputs, args.names)
    target = _target_name(args.target, inputs, names)
    if args.mode == "isolate" and target is None:
        raise ValueError("--mode isolate needs --target NAME")
    options = dict(
        mode=args.mode, target=target, symmetric=args.symmetric, isolate_order=args.isolate_order,
        dense_rank=args.rank, dense_energy=args.energy if args.energy is not None else (None if args.rank else 0.9),
        dtype=args.dtype, device=args.device,
    )
    cfg = Config(**options)
    cfg.validate(names)
    compress = (args.rank, args.energy if args.energy is not None else args.export_energy) if args.compress else None
    bars = _Bars(enabled=not args.quiet)
    msgs: list[str] = []
    report_msg = lambda m: (msgs.append(m), print(f"note: {m}", file=sys.stderr))  # noqa: E731

    # 2. Cache key by file content; 3. load, and decompose through the cache (a hit rebuilds the
    #    decomposition from the loaded inputs and the entry's small tensors: no SVD, no eigen-solve)
    cache = None if args.no_cache else DecompositionCache(args.cache_dir, report=report_msg)
    key = None
    if cache is not None:
        load_opts = {"base": args.base, "allow_pickle": args.allow_pickle, "compress": compress}
        key = cache.key_for_sources(paths, names, cfg, load_opts)
    vectors = load_pool(paths, names, base=args.base, allow_pickle=args.allow_pickle, progress=bars, compress=compress)
    for v, s in zip(vectors, inputs):
        v.meta["input"] = s
    bars.close()
    if cache is not None:
        dec, hit = cached_decompose(vectors, args.tau, cache=cache, key=key, progress=bars, **options)
    else:
        from .pool import decompose

        dec, hit = decompose(vectors, tau=args.tau, progress=bars, **options), False
    bars.close()
    t_dec = time.perf_counter() - t0

    # 4. Write everything in a temp folder next to --out, then move it in
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = export_decomposition(
            dec, tmp, family=args.format, rank=args.rank, energy=args.export_energy, dtype=None
        )
        report = make_report(dec, module_report(dec.vectors), hit=hit, seconds=t_dec, files=[p.name for p in written])
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dims = dec.shared_dims()
    print(
        f"decomposed {len(dec.names)} vectors ({', '.join(dec.names)}), {len(dims)} modules, mode {dec.config.mode}, "
        f"tau {dec.tau}: shared dims total {sum(dims.values())}; {'cache hit' if hit else 'computed'} in {t_dec:.2f} s"
    )
    for p in written + [out / "report.json"]:
        print(f"  wrote {out / Path(p).name}")
    return EXIT_OK


def make_report(dec, modules_of: dict[str, list[str]], *, hit: bool, seconds: float, files: list[str]) -> dict:
    """report.json: versions, τ, config, inputs, which vectors have which module, per-module numbers."""
    from dataclasses import asdict

    from .pool import METHOD_VERSION

    return {
        "method_version": METHOD_VERSION,
        "tau": dec.tau,
        "config": asdict(dec.config),
        "inputs": [
            {k: v.meta.get(k) for k in ("input", "source", "format", "family", "base_model", "dora")} | {"name": v.name}
            for v in dec.vectors
        ],
        "cache": "hit" if hit else "miss",
        "seconds": round(seconds, 3),
        "files": files,
        "modules_of_vectors": {n: sorted(m for m, vs in modules_of.items() if n in vs) for n in dec.names},
        "modules": dec.summary(),
    }


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def describe(vectors, tau: float = 0.85) -> dict:
    """Per input: format, family, base guess, module count, ranks, norms; per pair: overlap."""
    from collections import Counter

    from .pool import decompose
    from .taskvec import LowRank

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
            rows = decompose(sub, tau=tau).summary()
            mx = [max((e[0] for e in r["eigenvalues"]), default=0.0) for r in rows]
            out["pairs"].append({
                "pair": [a.name, b.name], "common_modules": len(common),
                "mean_max_cos2": sum(mx) / len(mx), "max_cos2": max(mx),
                "modules_sharing_at_tau": sum(r["shared_dim"] > 0 for r in rows),
                "shared_dims_total": sum(r["shared_dim"] for r in rows),
            })
    return out


def run_inspect(args) -> int:
    from .formats import load_task_vector

    paths = _check_duplicate_paths([str(s) for s in args.inputs])
    names = _names_for([str(s) for s in args.inputs], None)
    vectors = []
    for s, p, n in zip(args.inputs, paths, names):
        v = load_task_vector(p, n, base=args.base, allow_pickle=args.allow_pickle)
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
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    from .merge_cli import run_mix

    run = {"decompose": run_decompose, "inspect": run_inspect, "mix": run_mix}[args.command]
    try:
        return run(args)
    except (ValueError, OSError) as e:  # FormatError is a ValueError
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # a bug: say so in one line
        if args.debug:
            raise
        print(f"error: internal {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL
