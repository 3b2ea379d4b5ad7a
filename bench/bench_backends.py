"""Benchmark the backends: mix switch time and generation speed, against named baselines.

    python bench/bench_backends.py                   # all sections (SmolLM2 CPU, tiny FLUX, wide FLUX)
    python bench/bench_backends.py --only llm        # llm | flux | flux-wide
    python bench/bench_backends.py --rounds 5 --threads 1
    python bench/bench_backends.py --only editor --baseline-ref REF   # WeightEditor vs REF's, same run
    python bench/bench_backends.py --only pair --threads 2 --rounds 5  # the Studio's LLM pair, batched vs fused

Sections (each prints a markdown table; medians over interleaved rounds, so a busy machine
slows every variant alike):
  llm        SmolLM2-135M-Instruct (offline GGUF), float32 CPU, random rank-8 LoRAs on all 210
             projections: switch time (fused, this project) and greedy tokens/s of the base model,
             the fused mix, and the same adapters active unfused in PEFT (the baseline).
  flux       tiny FluxPipeline: switch time vs diffusers ``set_adapters`` with the same LoRAs, and
             both with 3 vs 30 LoRAs loaded and 1 coefficient changed; denoising steps/s base,
             fused, diffusers unfused.
  flux-wide  a FluxTransformer2DModel with FLUX.1's real widths (hidden 3072, 24 heads, T5 dim
             4096) but 1 double + 1 single block, random weights, rank-16 LoRAs on every block
             Linear: per-module switch cost at real shapes, and transformer forward s/step base vs
             fused vs diffusers unfused. Extrapolation to 19 + 38 blocks is printed as such.
  editor     (only when asked) the WeightEditor alone on SmolLM2's 210 projections, float32 (the
             one-pass path) and bfloat16 (the general path), 30 random rank-8 LoRAs: apply from
             base, switches, restore; with ``--baseline-ref REF`` also ``devec_core`` at commit REF
             (bench/baseline.py), the two alternating in every round on the same model, and a
             check that both fuse bit-identical weights.
  pair       (only when asked) the Studio's LLM pair on the offline preset: both sides as rows of one
             batch (``LLMBackend.side_by_side``, devec_core/mix/rows.py) vs each mix fused in turn.

No wall-clock assertion anywhere; numbers are for the README.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from devec_core.mix import VectorPool, WeightEditor, vanilla  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    FLUX_PREFIX,
    PEFT_PREFIX,
    flux_linear_modules,
    llama_lora_config,
    lora_to_taskvector,
    random_flux_lora,
    random_llama_lora,
    tiny_flux_pipeline,
)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n### {title}\n")
    print("| measure | value | note |")
    print("|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sys.stdout.flush()


# --- SmolLM2 -----------------------------------------------------------------------------------
def bench_llm(rounds: int, new_tokens: int) -> None:
    from peft import get_peft_model, set_peft_model_state_dict

    from devec_core.backends.llm import LLMBackend
    from devec_core.models import load_causal_lm

    t_load = time.perf_counter()
    model, tok = load_causal_lm("smollm2")
    t_load = time.perf_counter() - t_load
    sds = [random_llama_lora(model, rank=8, seed=s, scale=0.02) for s in range(30)]
    vecs = [lora_to_taskvector(sd, f"v{i}", PEFT_PREFIX) for i, sd in enumerate(sds)]
    pool = VectorPool(vecs)
    b = LLMBackend(model, tok)
    mix = vanilla(pool, {"v0": 1.0, "v1": 0.5})

    # PEFT baseline on a copy: the same two adapters active, unfused (scaling = λ via alpha)
    peft_model = None
    base_copy = copy.deepcopy(model)
    for name, lam in (("v0", 1.0), ("v1", 0.5)):
        cfg = llama_lora_config(rank=8)
        cfg.lora_alpha = 8 * lam
        if peft_model is None:
            peft_model = get_peft_model(base_copy, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        set_peft_model_state_dict(peft_model, sds[int(name[1:])], adapter_name=name)
    peft_model.base_model.set_adapter(["v0", "v1"])
    peft_model.eval()

    enc = b._encode("Write a short poem about the sea.", None, True)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)

    def tps(m) -> float:
        with torch.inference_mode():
            dt = timed(lambda: m.generate(**enc, **gen))
        return new_tokens / dt

    tps(model)  # warm-up
    base_t, fused_t, peft_t, first, switch, restore, attn_only = [], [], [], [], [], [], []
    qv = {m: d for m, d in vecs[2].modules.items() if m.endswith(("q_proj", "v_proj"))}
    pool_qv = VectorPool([vecs[0], vecs[1], type(vecs[2])("qv", qv)])
    for r in range(rounds):
        b.restore()
        base_t.append(tps(model))
        first.append(b.apply(mix).seconds)
        fused_t.append(tps(model))
        peft_t.append(tps(peft_model))
        switch.append(b.apply(vanilla(pool, {"v0": 1.0, "v1": 0.5 + 0.1 * (r + 1)})).seconds)
        b.apply(vanilla(pool_qv, {"v0": 1.0, "v1": 0.5}))
        attn_only.append(b.apply(vanilla(pool_qv, {"v0": 1.0, "v1": 0.5, "qv": 0.3 + 0.1 * r})).seconds)
        restore.append(timed(b.restore))
    loaded = {}
    for n, active in ((3, 3), (30, 3), (30, 30)):  # pool size (loaded), terms with λ ≠ 0 (active)
        w = {f"v{i}": 0.3 if i < active else 0.0 for i in range(n)}
        b.restore()
        b.apply(vanilla(pool, w))
        ts = []
        for r in range(rounds):
            w["v0"] = 0.4 + 0.1 * r
            ts.append(b.apply(vanilla(pool, w)).seconds)
        loaded[(n, active)] = med(ts)
    b.restore()
    nmod = len(vecs[0].modules)
    table(
        f"SmolLM2-135M-Instruct, CPU float32, {torch.get_num_threads()} threads, greedy {new_tokens} new tokens, median of {rounds}",
        [
            ("load (cached safetensors form)", f"{t_load:.2f} s", "devec_core.models.load_causal_lm"),
            ("tokens/s base", f"{med(base_t):.1f}", "no mix"),
            ("tokens/s fused mix (this project)", f"{med(fused_t):.1f}", f"{med(fused_t) / med(base_t):.1%} of base"),
            ("tokens/s PEFT, 2 adapters active, unfused", f"{med(peft_t):.1f}", f"{med(peft_t) / med(base_t):.1%} of base (baseline)"),
            ("apply 2 LoRAs from base", f"{1000 * med(first):.0f} ms", f"{nmod} modules written"),
            ("switch: 1 coefficient of 2 changed", f"{1000 * med(switch):.0f} ms", f"{nmod} modules (every LoRA covers all)"),
            ("switch: 1 q/v-only LoRA changed", f"{1000 * med(attn_only):.0f} ms", f"{len(qv)} modules written, the others untouched"),
            ("switch: 3 loaded, 3 active, 1 changed", f"{1000 * loaded[(3, 3)]:.0f} ms", f"{nmod} modules"),
            ("switch: 30 loaded, 3 active, 1 changed", f"{1000 * loaded[(30, 3)]:.0f} ms",
             f"{loaded[(30, 3)] / loaded[(3, 3)]:.2f}× the 3-loaded switch"),
            ("switch: 30 loaded, 30 active, 1 changed", f"{1000 * loaded[(30, 30)]:.0f} ms",
             f"{loaded[(30, 30)] / loaded[(3, 3)]:.2f}×: W0 + Σλ·BA recomputed, one GEMM of rank Σr (exact, history-free)"),
            ("restore", f"{1000 * med(restore):.0f} ms", "bit-identical base"),
        ],
    )


# --- tiny FLUX ---------------------------------------------------------------------------------
def bench_flux(rounds: int) -> None:
    from devec_core.backends.flux import FluxBackend

    gen = dict(steps=4, width=64, height=64, max_sequence_length=64, output_type="pt", seed=0)
    ours = FluxBackend(tiny_flux_pipeline(seed=0))
    sds = [random_flux_lora(ours.pipe.transformer, rank=4, seed=s, scale=0.2) for s in range(30)]
    vecs = [lora_to_taskvector(sd, f"s{i}", FLUX_PREFIX) for i, sd in enumerate(sds)]
    pool = VectorPool(vecs)
    theirs_pipe = {}
    for n in (3, 30):
        p = tiny_flux_pipeline(seed=0)
        for i in range(n):
            p.load_lora_weights(dict(sds[i]), adapter_name=f"s{i}")
        theirs_pipe[n] = p
    theirs = FluxBackend(theirs_pipe[3])

    def steps_per_s(backend) -> float:
        return backend.generate("a cat in pixel art", **gen).steps_per_s

    steps_per_s(ours)
    base_s, fused_s, unfused_s, sw = [], [], [], {3: ([], []), 30: ([], [])}
    for r in range(rounds):
        ours.restore()
        base_s.append(steps_per_s(ours))
        ours.apply(vanilla(pool, {"s0": 1.0, "s1": 0.5}))
        fused_s.append(steps_per_s(ours))
        theirs.pipe.set_adapters(["s0", "s1"], [1.0, 0.5])
        unfused_s.append(steps_per_s(theirs))
        for n in (3, 30):
            w = {f"s{i}": 0.3 for i in range(n)}
            ours.apply(vanilla(pool, w))
            theirs_pipe[n].set_adapters(list(w), list(w.values()))
            w["s0"] = 0.4 + 0.1 * r
            sw[n][0].append(ours.apply(vanilla(pool, w)).seconds)
            sw[n][1].append(timed(lambda: theirs_pipe[n].set_adapters(list(w), list(w.values()))))
    ours.restore()
    nmod = len(flux_linear_modules(ours.pipe.transformer))
    o3, o30, d3, d30 = med(sw[3][0]), med(sw[30][0]), med(sw[3][1]), med(sw[30][1])
    table(
        f"tiny FLUX pipeline (CPU, {nmod} block Linear layers, 64×64, 4 steps), median of {rounds}",
        [
            ("steps/s base", f"{med(base_s):.1f}", "whole pipeline call / steps"),
            ("steps/s fused mix (this project)", f"{med(fused_s):.1f}", f"{med(fused_s) / med(base_s):.1%} of base"),
            ("steps/s diffusers set_adapters, unfused", f"{med(unfused_s):.1f}", f"{med(unfused_s) / med(base_s):.1%} of base (baseline)"),
            ("switch, 3 loaded, 1 changed: this project", f"{1000 * o3:.1f} ms", f"{nmod} modules written"),
            ("switch, 3 loaded, 1 changed: diffusers set_adapters", f"{1000 * d3:.1f} ms", "baseline"),
            ("switch, 30 loaded, 1 changed: this project", f"{1000 * o30:.1f} ms", f"{o30 / o3:.2f}× its 3-loaded switch"),
            ("switch, 30 loaded, 1 changed: diffusers set_adapters", f"{1000 * d30:.1f} ms", f"{d30 / d3:.2f}× its 3-loaded switch"),
        ],
    )


# --- FLUX at real widths -----------------------------------------------------------------------
def bench_flux_wide(rounds: int) -> None:
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=[16, 56, 56],
    ).eval()
    shapes = flux_linear_modules(tr)
    nparams = sum(p.numel() for p in tr.parameters())
    sds = [random_flux_lora(tr, rank=16, seed=s, scale=0.01) for s in range(3)]
    vecs = [lora_to_taskvector(sd, f"w{i}", FLUX_PREFIX) for i, sd in enumerate(sds)]
    pool = VectorPool(vecs)
    img_tokens, txt_tokens = 64, 32  # a 128×128 image (8×8 latent patches), 32 T5 tokens: keeps CPU steps short
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, img_tokens, 64, generator=g),
        encoder_hidden_states=torch.randn(1, txt_tokens, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(img_tokens, 3),
        txt_ids=torch.zeros(txt_tokens, 3),
        return_dict=False,
    )

    def step(m) -> float:
        with torch.inference_mode():
            return timed(lambda: m(**inputs))

    ed = WeightEditor(tr)
    step(tr)
    base, fused, unfused, first, switch, restore = [], [], [], [], [], []
    mix = vanilla(pool, {"w0": 1.0, "w1": 0.5})
    for r in range(rounds):
        ed.restore()
        base.append(step(tr))
        first.append(ed.apply(mix).seconds)
        fused.append(step(tr))
        switch.append(ed.apply(vanilla(pool, {"w0": 1.0, "w1": 0.6 + 0.1 * r})).seconds)
        restore.append(timed(ed.restore))
    # diffusers/PEFT baseline: the same LoRAs as adapters, unfused
    for i, sd in enumerate(sds[:2]):
        tr.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(shapes), init_lora_weights=False), adapter_name=f"w{i}")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(tr, {k[len(FLUX_PREFIX):]: v for k, v in sd.items()}, adapter_name=f"w{i}")
    tr.set_adapters(["w0", "w1"], [1.0, 0.5])
    set_t = []
    for r in range(rounds):
        unfused.append(step(tr))
        set_t.append(timed(lambda: tr.set_adapters(["w0", "w1"], [1.0, 0.6 + 0.1 * r])))
    n = len(shapes)
    per_mod = med(switch) / n
    touched = sum(a * b for a, b in shapes.values())
    with torch.device("meta"):  # the real FLUX.1-schnell transformer, shapes only
        real = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                      guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    real_shapes = flux_linear_modules(real)
    real_touched = sum(a * b for a, b in real_shapes.values())
    table(
        f"FLUX transformer at real widths, 1 double + 1 single block ({nparams / 1e6:.0f}M params, {n} Linear), "
        f"CPU float32, {img_tokens}+{txt_tokens} tokens, rank-16 LoRAs, median of {rounds}",
        [
            ("s/step base", f"{med(base):.2f}", "transformer forward"),
            ("s/step fused mix (this project)", f"{med(fused):.2f}", f"{med(base) / med(fused):.1%} of base speed"),
            ("s/step diffusers adapters, unfused", f"{med(unfused):.2f}", f"{med(base) / med(unfused):.1%} of base speed (baseline)"),
            ("apply 2 LoRAs from base", f"{1000 * med(first):.0f} ms", f"{n} modules"),
            ("switch 1 coefficient", f"{1000 * med(switch):.0f} ms", f"{1000 * per_mod:.1f} ms per module"),
            ("diffusers set_adapters (2 loaded)", f"{1000 * med(set_t):.1f} ms", "baseline (does not touch weights)"),
            ("restore", f"{1000 * med(restore):.0f} ms", "bit-identical"),
            ("extrapolated switch, all 19+38 blocks", f"~{med(switch) / touched * real_touched:.0f} s on this CPU",
             f"EXTRAPOLATION by weight size ({len(real_shapes)} modules, {real_touched / 1e9:.1f}G weights), fp32 CPU; no GPU here"),
        ],
    )


# --- the WeightEditor alone, this tree vs a baseline commit ----------------------------------------
def bench_editor(rounds: int, baseline_ref: str | None) -> None:
    from devec_core import mix as ours
    from devec_core.models import load_causal_lm

    libs = {"this tree": (ours, lambda v: v)}
    if baseline_ref:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baseline import load_baseline

        BL = load_baseline(baseline_ref)
        importlib.import_module("devec_baseline.mix")
        T = importlib.import_module("devec_baseline.taskvec")

        def convert(v):  # the baseline's own classes (its editor checks isinstance)
            return T.TaskVector(v.name, {m: T.LowRank(d.B, d.A, d.scale) for m, d in v.modules.items()}, dict(v.extras))

        libs[f"baseline {baseline_ref}"] = (BL.mix, convert)
    model, _ = load_causal_lm("smollm2")
    sds = [random_llama_lora(model, rank=8, seed=s, scale=0.02) for s in range(30)]
    vecs = [lora_to_taskvector(sd, f"v{i}", PEFT_PREFIX) for i, sd in enumerate(sds)]
    pools = {name: lib.VectorPool([conv(v) for v in vecs]) for name, (lib, conv) in libs.items()}
    measures = ("apply 2 LoRAs from base", "switch: 1 coefficient of 2 changed", "switch: 30 active, 1 changed", "restore")
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        base = {k: v.detach().clone() for k, v in m.state_dict().items()}
        got = {name: {k: [] for k in measures} for name in libs}  # (wall s, process CPU s) per round
        fused: dict[str, dict] = {}
        order = list(libs)

        def clock(fn):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - w0, time.process_time() - c0

        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                lib, pool = libs[name][0], pools[name]
                ed = lib.WeightEditor(m)
                g = got[name]
                g[measures[0]].append(clock(lambda: ed.apply(lib.vanilla(pool, {"v0": 1.0, "v1": 0.5}))))
                g[measures[1]].append(clock(lambda: ed.apply(lib.vanilla(pool, {"v0": 1.0, "v1": 0.6 + 0.1 * r}))))
                w = {f"v{i}": 0.3 for i in range(30)}
                ed.apply(lib.vanilla(pool, w))
                w["v0"] = 0.4 + 0.1 * r
                g[measures[2]].append(clock(lambda: ed.apply(lib.vanilla(pool, w))))
                if r == 0:
                    fused[name] = {k: v.detach().clone() for k, v in m.state_dict().items()}
                g[measures[3]].append(clock(ed.restore))
                assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items()), f"{name}: restore is not bit-identical"
        names = list(libs)
        print(f"\n### WeightEditor on SmolLM2-135M ({len(vecs[0].modules)} projections), {str(dtype)[6:]}, CPU, "
              f"{torch.get_num_threads()} threads, median of {rounds} alternating rounds, wall / process CPU time "
              f"(load average {os.getloadavg()[0]:.1f}: on a busy machine the CPU time is the steadier number)\n")
        print("| measure | " + " | ".join(names) + (" | this tree / baseline (CPU) |" if len(names) > 1 else " |"))
        print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
        for k in measures:
            wall = [med([x[0] for x in got[n][k]]) for n in names]
            cpu = [med([x[1] for x in got[n][k]]) for n in names]
            cells = [f"{1000 * a:.0f} / {1000 * b:.0f} ms" for a, b in zip(wall, cpu)]
            cells += [f"{cpu[0] / cpu[1]:.2f}×"] if len(names) > 1 else []
            print(f"| {k} | " + " | ".join(cells) + " |")
        if len(names) > 1:
            same = all(torch.equal(fused[names[0]][k], fused[names[1]][k]) for k in base)
            print(f"| fused weights (30 active) bit-identical to the baseline's | {'yes' if same else 'NO'} |" + " |" * len(names))
        sys.stdout.flush()


# --- the Studio's LLM pair: both rows in one pass vs each mix fused in turn ------------------------
def bench_pair(rounds: int, new_tokens: int) -> None:
    """The offline LLM preset's default pair (vanilla vs DeVec), sampled as the tab does, timed with
    ``LLMBackend.side_by_side`` batched (``batch_rows`` on: two rows of one batch, no weight written)
    and fused in turn (off: the baseline), interleaved per round; checks that both give the same texts."""
    from devec_core import studio

    s, _ = studio.open_preset("smollm2-offline")
    job = studio.llm_job(s, studio.default_coefficients(s), s.prompts[0], 0, new_tokens)
    job.settings.update(do_sample=True, temperature=0.7, top_p=0.95)
    be = studio.job_backend(job)
    runs = {True: [], False: []}
    texts = {}
    for batch in (True, False):  # warm-up: first forward, parts resolved
        be.batch_rows = batch
        be.side_by_side(job.prompt, list(job.mixes), **dict(job.settings, max_new_tokens=2))
    for _ in range(rounds):
        for batch in (True, False):
            be.batch_rows = batch
            t0 = time.perf_counter()
            res = be.side_by_side(job.prompt, list(job.mixes), **job.settings)
            runs[batch].append(time.perf_counter() - t0)
            texts[batch] = [r.token_ids for r in res]
    be.batch_rows = True
    be.restore()
    table(f"SmolLM2 pair, default preset, {new_tokens} sampled tokens per side ({rounds} interleaved rounds)", [
        ("both rows in one pass (batch_rows on), median", f"{med(runs[True]):.2f} s", ", ".join(f"{t:.2f}" for t in runs[True])),
        ("each mix fused in turn (baseline), median", f"{med(runs[False]):.2f} s", ", ".join(f"{t:.2f}" for t in runs[False])),
        ("speed-up", f"{med(runs[False]) / med(runs[True]):.2f}×", ""),
        ("same tokens on both paths", str(texts[True] == texts[False]), "sampled with the same seed per row"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["llm", "flux", "flux-wide", "editor", "pair"], action="append")
    ap.add_argument("--baseline-ref", default=None, help="editor section: git commit whose WeightEditor is timed beside this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default). On a "
                    "shared, oversubscribed CPU use 1: tiny ops otherwise wait ~10 ms on OpenMP barriers")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    only = a.only or ["llm", "flux", "flux-wide"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    if "flux" in only:
        bench_flux(a.rounds)
    if "llm" in only:
        bench_llm(a.rounds, a.new_tokens)
    if "flux-wide" in only:
        bench_flux_wide(a.rounds)
    if "editor" in only:
        bench_editor(a.rounds, a.baseline_ref)
    if "pair" in only:
        bench_pair(a.rounds, a.new_tokens)


if __name__ == "__main__":
    main()
