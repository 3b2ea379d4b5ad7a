"""Benchmark the merges: wall time of each method here vs PEFT's add_weighted_adapter and mergekit,
on the same adapters.

    python bench/bench_merge.py                      # SmolLM2-135M shapes, 4 layers, 4 rank-8 LoRAs
    python bench/bench_merge.py --layers 30 --threads 2 --rounds 3
    python bench/bench_merge.py --adapter-dirs /tmp/merge-evidence/adapters/{add,reverse,json,sentiment}
                                # the evidence's own trained adapters (PEFT folders, SmolLM2's 30 layers)

Setup: a LlamaForCausalLM with SmolLM2-135M's widths (hidden 576, MLP 1536, 9/3 heads) built from
its config with random weights (no download), ``--layers`` of its 30 decoder layers, and
``--adapters`` random LoRAs (rank ``--rank``) on all 7 projections of every layer. Each row merges
all adapters with weights 1/k, density 0.5 where a method takes one:
  * "here": ``devec_core.merge.merge`` (TA and DeVec on the factors; TIES/DARE/magnitude dense per
    module), and "here + rank r": the same plus ``writeout.to_lora(rank=r)`` — the output PEFT's
    "*_svd" variants produce (a rank-r LoRA of the merged product);
  * "PEFT": ``add_weighted_adapter`` on a PeftModel holding the adapters: "cat" (exact TA), the
    "*_svd" variants (dense merge + full SVD, svd_rank = r) and the plain factor-wise ones;
  * "mergekit": ``merge_tensors`` per module over the dense deltas (a zero base stands in for the
    model: mergekit merges full weights, so forming the dense deltas is its input, not timed).
DeVec rows include the pairwise decomposition of the pool. Medians over ``--rounds`` interleaved
rounds. Prints a markdown table; no assertion.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from devec_core.merge import merge  # noqa: E402
from devec_core.merge.writeout import to_lora  # noqa: E402
from tests.tiny_models import PEFT_PREFIX, llama_lora_config, lora_to_taskvector, random_llama_lora  # noqa: E402


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--adapter-dirs", nargs="+", type=Path, default=None,
                    help="PEFT adapter folders (e.g. demo/merge/evidence.py's) instead of random LoRAs; the model gets "
                         "SmolLM2's 30 layers (random weights: merge cost does not depend on them)")
    ap.add_argument("--skip-peft-svd", action="store_true", help="skip PEFT's *_svd rows (a full SVD per module)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    # 1. The same adapters for everyone
    from peft import get_peft_model, set_peft_model_state_dict

    if args.adapter_dirs:
        import json

        from safetensors.torch import load_file

        from devec_core.formats import load_task_vector

        cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in args.adapter_dirs]
        if len({(c["r"], c["lora_alpha"]) for c in cfgs}) != 1:
            raise SystemExit(f"--adapter-dirs: the adapters differ in r/alpha {[(c['r'], c['lora_alpha']) for c in cfgs]}")
        args.layers, args.adapters, args.rank = 30, len(cfgs), cfgs[0]["r"]
        model = smollm2_shaped(args.layers)
        k, r, dens = args.adapters, args.rank, args.density
        sds = [load_file(str(d / "adapter_model.safetensors")) for d in args.adapter_dirs]
        vecs = [load_task_vector(str(d), f"t{i}") for i, d in enumerate(args.adapter_dirs)]
    else:
        model = smollm2_shaped(args.layers)
        k, r, dens = args.adapters, args.rank, args.density
        sds = [random_llama_lora(model, rank=r, seed=s + 1) for s in range(k)]
        vecs = [lora_to_taskvector(sd, f"t{i}", PEFT_PREFIX) for i, sd in enumerate(sds)]
    w = [1.0 / k] * k
    if args.adapter_dirs:  # the files' own r / alpha / targets
        from peft import LoraConfig

        c0 = cfgs[0]
        lora_cfg = lambda: LoraConfig(r=r, lora_alpha=c0["lora_alpha"], target_modules=list(c0["target_modules"]),  # noqa: E731
                                      lora_dropout=0.0, init_lora_weights=False)
    else:
        lora_cfg = lambda: llama_lora_config(r)  # noqa: E731
    pm = get_peft_model(copy.deepcopy(model), lora_cfg(), adapter_name="t0")
    for i in range(1, k):
        pm.add_adapter(f"t{i}", lora_cfg())
    for i, sd in enumerate(sds):
        set_peft_model_state_dict(pm, sd, adapter_name=f"t{i}")
    names = [f"t{i}" for i in range(k)]
    dense = {mod: [v.modules[mod].dense() for v in vecs] for mod in vecs[0].modules}
    n_mod = len(dense)

    counter = [0]

    def peft(combo, **kw):
        def run():
            counter[0] += 1
            pm.base_model.add_weighted_adapter(names, w, f"m{counter[0]}", combination_type=combo, **kw)
            pm.delete_adapter(f"m{counter[0]}")
        return run

    def mergekit(method, **params):
        from mergekit.merge_methods.api import merge_tensors

        def run():
            for X in dense.values():
                merge_tensors([torch.zeros_like(X[0]), *X], method, parameters={"weight": w, **params}, base_index=0)
        return run

    def here(method, rank=None, **params):
        def run():
            out = merge(vecs, method, w, **params)
            if rank is not None:
                to_lora(out.modules, rank)
        return run

    # 2. Rows: (method, implementation, function)
    rows = [
        ("task arithmetic", "here (factors, exact rank k·r)", here("ta")),
        ("task arithmetic", "PEFT cat (exact)", peft("cat")),
        ("task arithmetic", "PEFT svd (rank r)", peft("svd", svd_rank=r)),
        ("task arithmetic", "mergekit", mergekit("task_arithmetic")),
    ]
    for ours, pname, mk in (("ties", "ties", "ties"), ("dare_linear", "dare_linear", "dare_linear"),
                            ("dare_ties", "dare_ties", "dare_ties"), ("magnitude_prune", "magnitude_prune", None)):
        rows.append((ours, "here (dense per module)", here(ours, density=dens)))
        rows.append((ours, f"here + rank {r}", here(ours, rank=r, density=dens)))
        if not args.skip_peft_svd:
            rows.append((ours, f"PEFT {pname}_svd (rank {r})", peft(pname + "_svd", svd_rank=r, density=dens)))
        rows.append((ours, f"PEFT {pname} (factor-wise)", peft(pname, density=dens)))
        if mk:
            rows.append((ours, "mergekit", mergekit(mk, density=dens)))
    rows += [
        ("devec (TA + DeVec)", "here (decompose + merge, factors)", here("devec")),
        ("devec_ties", "here (decompose + merge)", here("devec_ties", density=dens)),
    ]

    # 3. Interleaved rounds
    times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    for _ in range(args.rounds):
        for i, (_, _, fn) in enumerate(rows):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{k} rank-{r} LoRAs on {n_mod} modules (SmolLM2-135M widths, {args.layers} layers), density {dens}, "
          f"{args.threads} threads, median of {args.rounds}, load average {load:.1f}\n")
    print("| method | implementation | seconds | ms / module |")
    print("|---|---|---:|---:|")
    for i, (m, impl, _) in enumerate(rows):
        s = statistics.median(times[i])
        print(f"| {m} | {impl} | {s:.3f} | {1000 * s / n_mod:.1f} |")


if __name__ == "__main__":
    main()
