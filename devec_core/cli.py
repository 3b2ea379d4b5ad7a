"""The command line: ``python -m devec_core decompose|inspect``.

    decompose INPUT... --out DIR [--tau 0.85] [--mode joint|pairwise|isolate] [--target NAME]
              [--rank R | --energy E] [--base MODEL] [--compress] [--alpha A | --config adapter_config.json]
        Writes in DIR: ``unique-<name>.safetensors`` (or PEFT folder ``unique-<name>/``) per input,
        ``shared.safetensors`` (or ``shared/``), and ``report.json``. Served from the cache when
        the same inputs and options were decomposed before (any τ).
    inspect INPUT... [--base MODEL]
        Format, base model guess, modules, ranks, norms, pairwise overlap.

Every argument (τ, mode, target, names, ``--out``, ranks, energies, device) is checked before any
tensor is read. DIR is replaced atomically: the outputs are written in a sibling temp folder that
is then swapped in, so DIR holds the old run's files or the new run's, never a mix; temp folders
left by killed runs are removed by the next run. DIR must be new, empty, or an earlier output
(its report.json lists everything in it): nothing else is ever replaced.

Exit codes: 0 success; 1 bad input or failure (one line ``error: <input>: <reason>``, nothing
left in DIR); 2 usage error (one line ``error: <argument>: <reason>``); 3 internal error (add
``--debug`` for the traceback).
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


class UsageError(ValueError):
    """A bad argument: exit 2 with one line naming the argument and the value."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: …``) and exit 2."""

    def error(self, message):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


def _alpha_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="ADAPTER_CONFIG_JSON",
                   help="adapter_config.json for PEFT adapter files/folders that have none beside them (alpha, rsLoRA, patterns)")
    p.add_argument("--alpha", type=float,
                   help="lora_alpha for PEFT adapter files/folders that have no adapter_config.json (scale = alpha / r)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m devec_core", description="DeVec: split task vectors into shared and unique parts.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    _alpha_args(d)
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
    d.add_argument("--max-work", type=float, metavar="FLOPS",
                   help="refuse a pool whose estimated work exceeds this many flops (default: the engine's, ~2 min here)")
    d.add_argument("--max-memory-gb", type=float, metavar="GB",
                   help="refuse a pool whose estimated memory exceeds this many GiB (default: the engine's)")

    i = sub.add_parser("inspect", help="describe inputs: format, base model, modules, ranks, norms, overlap")
    i.add_argument("inputs", nargs="+", metavar="INPUT")
    i.add_argument("--base", help="base model for DoRA adapters and full checkpoints")
    i.add_argument("--allow-pickle", action="store_true")
    _alpha_args(i)
    i.add_argument("--tau", type=float, default=0.85, help="threshold for the overlap's shared dimension")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--quiet", action="store_true")

    from .merge_cli import add_parser as add_mix_parser

    add_mix_parser(sub)
    return p


# ---------------------------------------------------------------------------------------------
# decompose
# ---------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    """Every argument that needs no file: τ, ranks, energies, mode/target, device (UsageError)."""
    import math

    from .algorithm import check_tau

    try:
        check_tau(args.tau)
    except ValueError:
        raise UsageError(f"--tau: must be a number in (0, 1]; got {args.tau!r}") from None
    for flag, v in (("--energy", args.energy), ("--export-energy", args.export_energy)):
        if v is not None and not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise UsageError(f"{flag}: must be a number in (0, 1]; got {v!r}")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank: must be a positive integer; got {args.rank}")
    if args.mode == "isolate" and not args.target:
        raise UsageError("--mode isolate needs --target NAME (the vector to clean)")
    if args.target is not None and args.mode != "isolate":
        raise UsageError(f"--target: used only with --mode isolate; got --mode {args.mode}")
    if args.mode != "joint" and len(args.inputs) < 2:
        raise UsageError(f"--mode {args.mode}: needs at least two inputs; got {len(args.inputs)}")
    if args.device != "auto":
        import torch

        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device: not a device: {args.device!r} (auto, cpu, cuda, cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here")
    for flag, v in (("--max-work", args.max_work), ("--max-memory-gb", args.max_memory_gb)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{flag}: must be a positive number; got {v!r}")
    _budget_options(args)


def _names_for(inputs: list[str], names_arg: str | None) -> list[str]:
    from .formats import default_name, resolve_source

    if names_arg is not None:
        names = [n.strip() for n in names_arg.split(",")]
        if len(names) != len(inputs):
            raise UsageError(f"--names: {len(names)} names for {len(inputs)} inputs")
        if not all(names):
            raise UsageError(f"--names: empty name in {names_arg!r}")
        if len(set(names)) != len(names):
            raise UsageError(f"--names: must be unique; got {names}")
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
    raise UsageError(f"--target: {target!r} is neither a name {names} nor one of the inputs")


def _listed_files(report: dict) -> set[str]:
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, list):
        raise ValueError("no file list")
    return {f["file"] if isinstance(f, dict) else str(f) for f in files}


def _check_out(out: Path, paths: list[Path], cache_dir: Path | None) -> None:
    """--out must be new, empty, or an earlier output (everything in it listed by its report.json),
    and must neither hold nor sit inside an input or the cache: it is replaced as a whole."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r}: exists and is not a folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(out.parent)!r} is not a folder")
    ro = out.resolve()
    for p in paths:
        rp = p.resolve()
        if rp == ro or ro in rp.parents:
            raise UsageError(f"--out {str(out)!r}: holds the input {str(p)!r}, and would be replaced")
        if rp in ro.parents:
            raise UsageError(f"--out {str(out)!r}: lies inside the input {str(p)!r}")
    if cache_dir is not None:
        rc = cache_dir.resolve()
        if rc == ro or ro in rc.parents or rc in ro.parents:
            raise UsageError(f"--out {str(out)!r}: overlaps the cache folder {str(cache_dir)!r}")
    if not out.is_dir():
        return
    items = sorted(p.name for p in out.iterdir())
    if not items:
        return
    try:
        listed = _listed_files(json.loads((out / "report.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        raise UsageError(f"--out {str(out)!r}: holds {items[0]!r} and is not an earlier DeVec output (no readable "
                         "report.json); it would be replaced: choose a new folder") from None
    extra = [n for n in items if n not in listed | {"report.json"}]
    if extra:
        raise UsageError(f"--out {str(out)!r}: holds {extra[0]!r}, which no earlier DeVec run wrote; "
                         "it would be replaced: move it or choose a new folder")


def _clean_stale_temps(out: Path) -> None:
    """Remove ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>-*`` folders whose process is gone."""
    import glob

    from .cache import stale_temp

    if not out.parent.is_dir():
        return
    for pat in (f".{glob.escape(out.name)}.tmp-*", f".{glob.escape(out.name)}.old-*"):
        for d in out.parent.glob(pat):
            if d.is_dir() and stale_temp(d):
                shutil.rmtree(d, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` (a sibling: renames on one filesystem).

    out new: one rename. out existing: an atomic exchange, then the old folder is removed; where
    the exchange is missing, two renames (out is briefly absent, never a mix of two runs).
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # tmp now holds the old outputs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.replace(out, old / "out")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _config_arg(args) -> dict | None:
    """--config, parsed once (a broken file is an input error naming it)."""
    if args.config is None:
        return None
    from .formats import read_adapter_config

    if not args.config.is_file():
        raise ValueError(f"--config {str(args.config)!r}: no such file")
    return read_adapter_config(args.config)


def run_decompose(args) -> int:
    from .cache import DecompositionCache, cached_decompose
    from .export import write_parts
    from .formats import check_pool_contents, load_pool, module_report
    from .pool import Config

    t0 = time.perf_counter()
    inputs = [str(s) for s in args.inputs]
    # 1. Check every argument, then the inputs' paths: no tensor is read before this is done
    _check_args(args)
    paths = _check_duplicate_paths(inputs)
    names = _names_for(inputs, args.names)
    target = _target_name(args.target, inputs, names)
    out: Path = args.out
    _check_out(out, paths, None if args.no_cache else (args.cache_dir or _default_cache_dir()))
    options = dict(
        mode=args.mode, target=target, symmetric=args.symmetric, isolate_order=args.isolate_order,
        dense_rank=args.rank, dense_energy=args.energy if args.energy is not None else (None if args.rank else 0.9),
        dtype=args.dtype, device=args.device, **_budget_options(args),
    )
    try:
        cfg = Config(**options)
        cfg.validate(names)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    compress = (args.rank, args.energy if args.energy is not None else args.export_energy) if args.compress else None
    bars = _Bars(enabled=not args.quiet)
    msgs: list[str] = []
    report_msg = lambda m: (msgs.append(m), print(f"note: {m}", file=sys.stderr))  # noqa: E731
    _clean_stale_temps(out)

    # 2. Cache key by file content; 3. load, and decompose through the cache (a hit rebuilds the
    #    decomposition from the loaded inputs and the entry's small tensors: no SVD, no eigen-solve)
    #    An entry for these files' SHA-256 and options means their contents passed the checks when it
    #    was written: a hit skips them (most of a load's time); a miss runs them before computing.
    cache = None if args.no_cache else DecompositionCache(args.cache_dir, report=report_msg)
    key = None
    if cache is not None:
        load_opts = {"base": args.base, "allow_pickle": args.allow_pickle, "compress": compress, "alpha": args.alpha,
                     "config": _config_arg(args)}
        key = cache.key_for_sources(paths, names, cfg, load_opts)
    checked = cache is None or not cache.has(key)
    vectors = load_pool(paths, names, base=args.base, allow_pickle=args.allow_pickle, progress=bars, compress=compress,
                        alpha=args.alpha, config=_config_arg(args), check_contents=checked)
    for v, s in zip(vectors, inputs):
        v.meta["input"] = s
    bars.close()
    try:
        if cache is not None:
            dec, hit = cached_decompose(vectors, args.tau, cache=cache, key=key, progress=bars,
                                        before_compute=None if checked else lambda: check_pool_contents(vectors), **options)
        else:
            from .pool import decompose

            dec, hit = decompose(vectors, tau=args.tau, progress=bars, **options), False
    except ValueError as e:  # the engine names the vector; say which input that is
        raise ValueError(_with_inputs(str(e), names, inputs)) from None
    bars.close()
    t_dec = time.perf_counter() - t0

    # 4. Write everything in a temp folder next to --out, then swap it in
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        parts = write_parts(dec, tmp, family=args.format, rank=args.rank, energy=args.export_energy, dtype=None)
        report = make_report(dec, module_report(dec.vectors), hit=hit, seconds=t_dec, files=[p.record() for p in parts])
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
    for p in parts:
        print(f"  wrote {out / p.path.name}" + (f"  ({p.record()['renamed']})" if "renamed" in p.record() else ""))
    print(f"  wrote {out / 'report.json'}")
    return EXIT_OK


def _default_cache_dir() -> Path:
    from .cache import default_cache_dir

    return default_cache_dir()


def _budget_options(args) -> dict:
    """``--max-work`` / ``--max-memory-gb`` as the engine's Config fields ``max_work`` / ``max_memory``."""
    import dataclasses

    from .pool import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for flag, field, v in (("--max-work", "max_work", args.max_work),
                           ("--max-memory-gb", "max_memory", None if args.max_memory_gb is None else int(args.max_memory_gb * 2**30))):
        if v is None:
            continue
        if field not in fields:
            raise UsageError(f"{flag}: this engine has no work budget")
        out[field] = v
    return out


def _with_inputs(msg: str, names: list[str], inputs: list[str]) -> str:
    """An engine message naming vectors: say which input file each named vector is."""
    named = [(n, s) for n, s in zip(names, inputs) if (f"'{n}'" in msg or f'"{n}"' in msg) and s not in msg]
    if len(named) == 1:
        return f"{named[0][1]}: {msg}"
    if named:
        return f"{msg} [inputs: {', '.join(f'{n} = {s}' for n, s in named)}]"
    return msg


def make_report(dec, modules_of: dict[str, list[str]], *, hit: bool, seconds: float, files: list[dict]) -> dict:
    """report.json: versions, τ, config, inputs, each file's component and vector or pair (never
    parsed back from a file name), which vectors have which module, per-module numbers."""
    from dataclasses import asdict

    from .chance import pool_chance
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
        # how far each spectrum sits above random subspaces of the same ranks (docs/METHOD.md "Chance level")
        "chance": pool_chance(dec).to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def describe(vectors, tau: float = 0.85) -> dict:
    """Per input: format, family, base guess, module count, ranks, norms; per pair: overlap."""
    from collections import Counter

    from .chance import pool_chance
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
    from .algorithm import check_tau
    from .formats import load_task_vector

    try:
        check_tau(args.tau)
    except ValueError:
        raise UsageError(f"--tau: must be a number in (0, 1]; got {args.tau!r}") from None
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
    except UsageError as e:
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
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
