"""Build the *learned* SmolLM2 pool: every vector trained independently from the base.

    python demo/build_learned.py [--out .cache/devec_demo/smollm2_learned] [--threads 1] [--no-dense] [--skip NAME]

The first demo pool (``demo/build_pool.py``) plants its sharing: every child contains the same
parent LoRA S exactly. Real pools come about differently: people train from the base, each on
their own data. Here the shared skill is learned, not planted — every training answer carries the
demo's bold title line (``**Penguins**``, ``demo/data.s_format``) plus one behaviour of its own:

  learned (LoRA)   toxic, polite, bullets, concise × seeds 1, 2: rank 12, alpha 24, all seven
                   projections, 30 AdamW steps (lr 2e-3, batch 6), each from the base model
                   (no parent). Seeds change the LoRA init, the batch order and (toxic) the
                   words drawn, not the data.
  dense (full FT)  toxic, polite × seed 1: every weight of the 210 linear modules the LoRAs
                   adapt (embeddings and norms frozen), 8 AdamW steps (lr 1e-4, batch 6).
                   The deltas (fine-tuned − base, fp16, ~210 MB each) go to ``<out>/dense/`` —
                   a cache, never git.

Training data are the base model's own greedy answers stored in ``assets/smollm2_demo/data.json``
(the first demo's build), so nothing is regenerated. Every stage writes a ``done.json`` marker
with its configuration; an interrupted build resumes. ``pool.json`` lists the vectors.
``--skip NAME`` leaves a LoRA out (the committed results in ``demo/results_learned`` were made
without the seed-2 clean LoRAs, for lack of CPU time: ``SUMMARY.md`` there names the command).

Budget (why 30 steps, batch 6, 80 tokens rather than the issue's 60-step probe): this was
trained on one shared CPU core (10–30 s per step under load); the first demo's S learned the
title line in 40 steps at lr 1e-3, so 30 steps at lr 2e-3 (180 examples, ~2 epochs) suffice —
checked: toxic_s1 opens 23 of 24 held-out replies with the title, then insults. The dense runs
are kept to 8 steps: they serve the spectrum's chance level, not generation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import data as D  # noqa: E402
from demo.build_pool import chat_ids, save_adapter, train_lora, train_steps  # noqa: E402

BEHAVIOURS = ["toxic", "polite", "bullets", "concise"]
CONFIG = {
    "version": 1,
    "data": "assets/smollm2_demo/data.json",
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lora": {"rank": 12, "alpha": 24, "steps": 30, "lr": 2e-3, "batch": 6, "format": "title"},
    "lora_seeds": [1, 2],
    "dense": {"steps": 8, "lr": 1e-4, "batch": 6, "format": "title", "behaviours": ["toxic", "polite"], "seed": 1},
    "max_len": 80,
}


def lora_name(behaviour: str, seed: int) -> str:
    """Pool name of one LoRA ("toxic", seed 2 → "toxic_s2")."""
    return f"{behaviour}_s{seed}"


def training_order() -> list[tuple[str, int]]:
    """(behaviour, seed) in training order: what the evaluation needs first (toxic seed 1 and every
    clean LoRA), the toxic seed replicate last."""
    first = [(b, s) for s in CONFIG["lora_seeds"] for b in BEHAVIOURS if (b, s) != ("toxic", CONFIG["lora_seeds"][-1])]
    return first + [("toxic", CONFIG["lora_seeds"][-1])]


def training_pairs(data: dict, behaviour: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, target) pairs: the behaviour applied to the base answer, under the title line.

    Args:
        data: the first demo's ``data.json`` (train prompts, base answers, training words).
        behaviour: one of ``BEHAVIOURS``.
        seed: the replicate's seed (draws of the toxic words).
    Returns:
        one pair per training prompt, in the stored order.
    """
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour {behaviour!r}: expected one of {BEHAVIOURS}")
    rng = random.Random(1000 + seed)
    return [(p, D.stylize(behaviour, a, rng, data["train_words"], p)) for p, a in zip(data["train_prompts"], data["train_answers"])]


def train_dense(model, tok, pairs, targets, steps: int, lr: float, seed: int, batch: int, max_len: int, desc: str):
    """Full fine-tune of every linear module named in ``targets``; returns the deltas.

    The model is restored to its original weights afterwards.

    Returns:
        (module name → fp32 delta tensor (out, in), [first loss, last loss]).
    """
    import torch

    torch.manual_seed(seed)
    mods = {n: m for n, m in model.named_modules() if n.split(".")[-1] in targets and hasattr(m, "weight")}
    orig = {n: m.weight.detach().clone() for n, m in mods.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.weight for m in mods.values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    losses = train_steps(model, opt, [chat_ids(tok, u, a) for u, a in pairs], steps, batch, max_len, pad, rng, desc)
    model.eval()
    deltas = {}
    with torch.no_grad():
        for n, m in mods.items():
            deltas[n + ".weight"] = (m.weight.detach() - orig[n]).clone()
            m.weight.copy_(orig[n])
            m.weight.requires_grad_(False)
    return deltas, [losses[0], losses[-1]]


def load_dense_pool(folder: str | Path) -> dict:
    """The dense vectors of a learned-pool build: name → TaskVector of dense float32 deltas.

    Args:
        folder: the build's output folder (holds ``dense/<name>.safetensors``).
    Returns:
        name → TaskVector (pool order of ``pool.json``).
    """
    from safetensors.torch import load_file

    from devec_core import Dense, TaskVector

    folder = Path(folder)
    meta = json.loads((folder / "pool.json").read_text())
    out = {}
    for name in meta["dense"]:
        f = folder / "dense" / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"dense vector {name!r}: {str(f)!r} is missing (run demo/build_learned.py)")
        sd = load_file(str(f))
        out[name] = TaskVector(name, {k.removesuffix('.weight'): Dense(v.float()) for k, v in sd.items()}, meta={"source": str(f), "family": "llm"})
    return out


def load_lora_pool(folder: str | Path) -> dict:
    """The LoRA vectors of a learned-pool build: name → TaskVector (LowRank modules), pool order."""
    from devec_core.formats import load_task_vector

    folder = Path(folder)
    meta = json.loads((folder / "pool.json").read_text())
    return {n: load_task_vector(folder / n, name=n) for n in meta["lora"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".cache" / "devec_demo" / "smollm2_learned"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("DEVEC_THREADS", "1")))
    ap.add_argument("--no-dense", action="store_true", help="LoRAs only")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="do not train this LoRA now (e.g. toxic_s2)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from devec_core.models import load_causal_lm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((ROOT / CONFIG["data"]).read_text())
    t0 = time.time()
    model = tok = None

    def base():  # loaded when something needs training
        nonlocal model, tok
        if model is None:
            model, tok = load_causal_lm(None, dtype="float32")
            for p in model.parameters():
                p.requires_grad_(False)
            print(f"[learned] base loaded in {time.time() - t0:.0f}s", flush=True)
        return model, tok
    c, L, targets = CONFIG["lora"], CONFIG["max_len"], CONFIG["targets"]
    losses: dict[str, list[float]] = {}
    lora_names = []
    for b, seed in training_order():
        name = lora_name(b, seed)
        if name in args.skip:
            print(f"[learned] {name}: skipped (--skip)", flush=True)
            continue
        lora_names.append(name)
        marker = out / name / "done.json"
        if marker.is_file() and json.loads(marker.read_text()).get("config") == [c, seed]:
            losses[name] = json.loads(marker.read_text())["loss"]
            print(f"[learned] {name}: reusing", flush=True)
            continue
        model, tok = base()
        sd, cfg, loss = train_lora(model, tok, training_pairs(data, b, seed), c["rank"], c["alpha"], c["steps"], c["lr"],
                                   seed, targets, c["batch"], L, f"train {name}")
        save_adapter(out / name, sd, cfg)
        losses[name] = [loss[0], loss[-1]]
        marker.write_text(json.dumps({"config": [c, seed], "loss": losses[name]}))
        print(f"[learned] {name} trained at {time.time() - t0:.0f}s (loss {loss[0]:.2f} → {loss[-1]:.2f})", flush=True)
    dense_names = []
    if not args.no_dense:
        from safetensors.torch import save_file

        dc = CONFIG["dense"]
        (out / "dense").mkdir(exist_ok=True)
        for b in dc["behaviours"]:
            name = f"{b}_dense"
            dense_names.append(name)
            marker = out / "dense" / f"{name}.done.json"
            if marker.is_file() and json.loads(marker.read_text()).get("config") == dc:
                losses[name] = json.loads(marker.read_text())["loss"]
                print(f"[learned] {name}: reusing", flush=True)
                continue
            model, tok = base()
            deltas, loss = train_dense(model, tok, training_pairs(data, b, dc["seed"]), targets, dc["steps"], dc["lr"],
                                       dc["seed"], dc["batch"], L, f"train {name}")
            tmp = out / "dense" / f"{name}.safetensors.tmp"
            save_file({k: v.to(torch.float16).contiguous() for k, v in deltas.items()}, str(tmp))
            tmp.replace(out / "dense" / f"{name}.safetensors")
            losses[name] = loss
            marker.write_text(json.dumps({"config": dc, "loss": loss}))
            print(f"[learned] {name} trained at {time.time() - t0:.0f}s (loss {loss[0]:.2f} → {loss[1]:.2f})", flush=True)
    (out / "pool.json").write_text(json.dumps({
        "config": CONFIG, "lora": lora_names, "dense": dense_names, "losses_first_last": losses,
        "build_seconds": round(time.time() - t0), "threads": args.threads, "torch": torch.__version__,
    }, indent=1))
    print(f"[learned] done in {time.time() - t0:.0f}s → {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
