"""``python -m devec_core decompose``: split the inputs, write each part as a LoRA and a report.

Every argument is checked before any tensor is read; the decomposition goes through the cache
(any τ of the same inputs and options is a hit); the output folder is replaced atomically
(``outdir.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..algorithm import PAPER_TAU
from ..cache import DecompositionCache, cached_decompose
from ..chance import pool_chance
from ..export import write_parts
from ..formats import check_pool_contents, load_pool, module_report
from ..modes import ISOLATE_ORDERS, MODES
from ..paths import cache_root
from ..pool import METHOD_VERSION, Config, decompose
from .common import EXIT_OK, UsageError, _alpha_args, _Bars, _check_duplicate_paths, _config_arg, _names_for, check_tau_arg
from .outdir import _check_out, _clean_stale_temps, _publish


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``decompose`` subcommand on ``sub`` (argparse subparsers)."""
    d = sub.add_parser("decompose", help="decompose LoRAs / adapters / checkpoints and export the parts as LoRAs")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="LoRA file, PEFT folder, checkpoint, or Hub id")
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--tau", type=float, default=PAPER_TAU, help=f"eigenvalue threshold (default {PAPER_TAU}, the paper's)")
    d.add_argument("--mode", choices=MODES, default="joint")
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
    d.add_argument("--isolate-order", choices=ISOLATE_ORDERS, default="union")
    d.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    d.add_argument("--device", default="auto")
    d.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt with torch.load(weights_only=True)")
    d.add_argument("--no-cache", action="store_true", help="neither read nor write the decomposition cache")
    d.add_argument("--cache-dir", type=Path, help="cache folder (default $DEVEC_CACHE_DIR, else $XDG_CACHE_HOME/devec, else ~/.cache/devec)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--max-work", type=float, metavar="FLOPS",
                   help="refuse a pool whose estimated work exceeds this many flops (default: the engine's)")
    d.add_argument("--max-memory-gb", type=float, metavar="GB",
                   help="refuse a pool whose estimated memory exceeds this many GiB (default: the engine's)")
    return d


def _check_args(args) -> None:
    """Every argument that needs no file: τ, ranks, energies, mode/target, device (UsageError)."""
    check_tau_arg(args.tau)
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
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            raise UsageError(f"--device: not a device: {args.device!r} (auto, cpu, cuda, cuda:N)") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here")
    for flag, v in (("--max-work", args.max_work), ("--max-memory-gb", args.max_memory_gb)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{flag}: must be a positive number; got {v!r}")
    _budget_options(args)


def _target_name(target: str | None, inputs: list[str], names: list[str]) -> str | None:
    if target is None or target in names:
        return target
    if target in inputs:
        return names[inputs.index(target)]
    raise UsageError(f"--target: {target!r} is neither a name {names} nor one of the inputs")


def run_decompose(args) -> int:
    t0 = time.perf_counter()
    inputs = [str(s) for s in args.inputs]
    # 1. Check every argument, then the inputs' paths: no tensor is read before this is done
    _check_args(args)
    paths = _check_duplicate_paths(inputs)
    names = _names_for(inputs, args.names)
    target = _target_name(args.target, inputs, names)
    out: Path = args.out
    _check_out(out, paths, None if args.no_cache else (args.cache_dir or cache_root()))
    options = dict(
        mode=args.mode, target=target, symmetric=args.symmetric, isolate_order=args.isolate_order,
        dense_rank=args.rank, dense_energy=args.energy if args.energy is not None else (None if args.rank else 0.9),
        dtype=args.dtype, device=args.device, **_budget_options(args),
    )
    try:
        cfg = Config(**options)
        cfg.validate(names)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
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
            dec, hit = decompose(vectors, tau=args.tau, progress=bars, **options), False
    except ValueError as e:  # the engine names the vector; say which input that is
        raise ValueError(_with_inputs(str(e), names, inputs)) from e
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


def _budget_options(args) -> dict:
    """``--max-work`` / ``--max-memory-gb`` as the engine's Config fields ``max_work`` / ``max_memory``."""
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
    return {
        "method_version": METHOD_VERSION,
        "tau": dec.tau,
        "config": dataclasses.asdict(dec.config),
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
