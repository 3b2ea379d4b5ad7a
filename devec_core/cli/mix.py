"""``python -m devec_core mix``: merge task vectors with any registered method and write the result.

    mix INPUT... --method devec|ta|ties|dare_linear|dare_ties|magnitude_prune|devec_ties|... \
        [--coef C | --coef C1 C2 ... | --coef name=C ...] [--pair-coef C | --pair-coef a+b=C ...] \
        [--density D] [--seed S] [--majority-sign total|frequency] [--convention peft|mergekit] \
        [--tau T] [--parts unique|delta] [--rank R] [--format peft|diffusers|model] [--base MODEL] [--config merge.yaml] --out PATH

Writes one LoRA — a PEFT folder or a diffusers FLUX ``.safetensors`` (default: the inputs'
family) — exact (factors concatenated for ta/devec; numerical-rank SVD factors of each dense module
for TIES/DARE/magnitude), or compressed to ``--rank R`` with the error printed and stored; or, with
``--format model --base MODEL``, the merged full model (``save_pretrained``: an LLM folder, or the
FLUX transformer's folder). The settings travel in the output's metadata (header key ``"devec"``,
``devec.json`` / ``devec_merge.json``). The output appears whole or not at all (written next to
--out under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..algorithm import PAPER_TAU
from ..export import export_family
from ..formats import load_pool
from ..merge.config import MergeConfig
from ..merge.engine import _pair_weights, _weights_for, iter_merge, merge, merged_extras, settings
from ..merge.registry import ALIASES, METHODS, get_method, resolve_params
from ..merge.writeout import write_lora, write_model
from ..models import load_causal_lm, load_flux_pipeline
from ..pool import METHOD_VERSION
from .common import _names_for


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``mix`` subcommand on ``sub`` (argparse subparsers)."""
    names = [m.value for m in METHODS] + sorted(ALIASES)
    p = sub.add_parser("mix", help="merge task vectors (TA, TIES, DARE, magnitude pruning, DeVec) into one LoRA or model")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="LoRA file, PEFT folder, checkpoint, or Hub id")
    p.add_argument("--method", choices=names, help="merge method (default: devec)")
    p.add_argument("--coef", nargs="+", metavar="C", help="one coefficient for all, one per input, or name=C pairs (default 1)")
    p.add_argument("--pair-coef", nargs="+", metavar="C", help="DeVec: one coefficient for every pair's shared vector, or a+b=C pairs "
                                                               "(default: mean of the pair's two coefficients)")
    p.add_argument("--density", type=float, help="TIES/DARE/magnitude: fraction kept")
    p.add_argument("--seed", type=int, help="DARE: mask seed (default 0)")
    p.add_argument("--majority-sign", choices=("total", "frequency"), help="TIES/DARE-TIES sign election")
    p.add_argument("--convention", choices=("peft", "mergekit"), help="how weights enter TIES/DARE (default peft)")
    p.add_argument("--tau", type=float, help=f"DeVec: eigenvalue threshold (default {PAPER_TAU})")
    p.add_argument("--parts", choices=("unique", "delta"), help="DeVec: merge the unique parts (default) or the original vectors, "
                                                                "each pair's shared vector added as an extra task vector")
    p.add_argument("--names", help="comma-separated names, one per input (default: file names)")
    p.add_argument("--rank", type=int, help="compress the LoRA to this rank (SVD on the factors; error reported)")
    p.add_argument("--format", choices=("peft", "diffusers", "model"), help="output: LoRA layout, or the merged model (needs --base)")
    p.add_argument("--base", help="base model: for --format model, DoRA adapters and full checkpoints")
    p.add_argument("--config", type=Path, help="a MergeConfig YAML (method, inputs, weights, params); flags override it")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--out", required=True, type=Path, help="output: PEFT/model folder or .safetensors file")
    return p


def _parse_coefs(values: list[str] | None, what: str):
    """"0.5" → 0.5; ["0.5", "1"] → [0.5, 1.0]; ["a=0.5", "b=1"] → {"a": 0.5, "b": 1.0}."""
    if not values:
        return None
    try:
        if all("=" in v for v in values):
            return {k.strip(): float(x) for k, _, x in (v.rpartition("=") for v in values)}
        if any("=" in v for v in values):
            raise ValueError("mix of name=C and plain numbers")
        nums = [float(v) for v in values]
    except ValueError as e:
        raise ValueError(f"{what} {' '.join(values)!r}: expected numbers or name=number pairs ({e})") from e
    return nums[0] if len(nums) == 1 else nums


def config_from_args(args):
    """The MergeConfig the flags (over --config) describe."""
    base = MergeConfig.from_yaml(args.config.read_text()).model_dump() if args.config else {"method": "devec"}
    if args.inputs:
        base["inputs"] = [str(s) for s in args.inputs]
    if args.method:
        base["method"] = args.method
    coef = _parse_coefs(args.coef, "--coef")
    if coef is not None:
        base["weights"] = coef
    pair = _parse_coefs(args.pair_coef, "--pair-coef")
    if pair is not None:
        if isinstance(pair, list):
            raise ValueError("--pair-coef takes one number for every pair, or a+b=C pairs")
        base["pair_weights"] = pair
    params = dict(base.get("params") or {})
    for key, val in (("density", args.density), ("seed", args.seed), ("majority_sign", args.majority_sign), ("tau", args.tau),
                     ("parts", args.parts)):
        if val is not None:
            params[key] = val
    base["params"] = params
    if args.convention:
        base["convention"] = args.convention
    cfg = MergeConfig.model_validate(base)
    if not cfg.inputs:
        raise ValueError("no inputs: give INPUT... or a --config with inputs")
    return cfg


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _replace(src: Path, out: Path) -> None:
    """Move ``src`` to ``out`` (replacing a previous output of the same kind)."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(src, out)


def run_mix(args) -> int:
    t0 = time.perf_counter()
    # 1. Check the settings and inputs (cheap), then load
    cfg = config_from_args(args)
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer; got {args.rank}")
    names = _names_for(cfg.inputs, args.names)
    method = get_method(cfg.method)
    params = resolve_params(method, cfg.params, cfg.convention)
    vectors = load_pool(cfg.inputs, names, base=args.base, allow_pickle=args.allow_pickle)
    w = _weights_for(names, cfg.weights)
    family = args.format or export_family([v.meta for v in vectors])
    if family == "model" and not args.base:
        raise ValueError("--format model needs --base MODEL (the base model's weights)")
    meta = {
        "method_version": METHOD_VERSION, "merge": settings(method, params, w, names, cfg.convention,
                                                            _pair_weights(names, w, cfg.pair_weights) if method.is_devec else None),
        "sources": [str(s) for s in cfg.inputs], "config": cfg.model_dump(mode="json"),
    }
    kw = dict(convention=cfg.convention, pair_weights=cfg.pair_weights, **cfg.params)

    # 2. Merge and write under a temporary name next to --out, then rename
    out: Path = args.out
    tmp = _staging(out)
    try:
        if family == "model":
            merged = merge(vectors, method.name, cfg.weights, **kw)
            target = _write_model(vectors, merged, args.base, tmp / "model", meta)
            line = f"merged model ({len(merged.modules)} modules fused)"
        else:
            stream = iter_merge(vectors, method.name, cfg.weights, **kw)
            extras = merged_extras(vectors, w) or None
            base_config = next((v.meta.get("config") for v in vectors if v.meta.get("config")), None)
            if base_config is None and family == "peft":
                base_config = {"base_model_name_or_path": next((v.meta.get("base") for v in vectors if v.meta.get("base")), None),
                               "task_type": "CAUSAL_LM"}
            dest = tmp / ("lora" if family == "peft" else "lora.safetensors")
            target, rep = write_lora(stream, dest, family=family, rank=args.rank, metadata=meta, base_config=base_config, extras=extras)
            line = (f"one LoRA ({rep.to_dict()['modules']} modules, "
                    + ("exact" if args.rank is None else f"rank {args.rank}")
                    + f", relative error {rep.relative_error:.3g})")
        _replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    desc = ", ".join(f"{n}={w[n]:g}" for n in names)
    print(f"mixed {len(names)} vectors with {method.name.value} ({desc}) into {line} in {time.perf_counter() - t0:.2f} s")
    print(f"  wrote {out}")
    return 0


def _write_model(vectors, merged, base: str, dest: Path, meta: dict) -> Path:
    """Load the base (an LLM, or a FLUX pipeline's transformer), fuse, save_pretrained (+ its tokenizer)."""
    families = {v.meta.get("family") for v in vectors}
    tok = None
    if families == {"flux"}:
        root = load_flux_pipeline(base, dtype="float32").transformer
    elif base.lower() == "smollm2" or base.endswith(".gguf"):
        root, tok = load_causal_lm(base, dtype="float32")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = AutoModelForCausalLM.from_pretrained(base, dtype="float32").eval()
        try:
            tok = AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError):  # a weights-only folder: the model is still written
            tok = None
    path = write_model(root, merged, dest, metadata=meta)
    if tok is not None:
        tok.save_pretrained(str(path))
    return path
