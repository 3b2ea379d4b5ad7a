"""Merging evidence on SmolLM2-135M-Instruct (CPU, offline): task LoRAs trained here, merged with
every method, coefficients chosen on a validation split the same way for every method.

    python demo/merge/evidence.py --out /tmp/merge-evidence [--tasks add,reverse,json,sentiment]
        [--steps 60] [--n-val 16] [--n-test 40] [--grid 0.5,1.0] [--threads 1]
    python demo/merge/evidence.py --smoke --out /tmp/smoke     # tiny random Llama, minutes → seconds

Stages (each cached in --out, so an interrupted run resumes):
  1. data     templated tasks with automatic metrics, no downloads (``TASKS``); train/val/test
              split by seed; the held-out items never appear in training.
  2. train    one LoRA per task from the base (r 8, alpha 16, all 7 projections, AdamW).
  3. spectrum the pool's pairwise spectrum first: per pair, the mean over modules of the largest
              cos² between column spaces, and the shared dimensions at τ.
  4. merge    every method of ``devec_core.merge`` with defaults for density/seed; the common
              coefficient λ (DeVec: unique parts and pair shared vectors alike) picked from
              ``--grid`` by the mean normalised validation accuracy; then scored on test.
  5. report   normalised accuracy (merged / the task's own fine-tune) per task and on average,
              95 % bootstrap intervals over test items (paired with the fine-tune's items), the
              the base model's factual QA kept (of the items the base answers right), the merge's wall time. ``results.json`` + ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# --- 1. tasks: (prompt, answer) generators and metrics ------------------------------------------
NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Leo"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Seoul"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "window", "pencil", "ocean", "bread",
         "mountain", "candle", "violin", "forest", "rocket"]
ITEMS = ["movie", "meal", "hotel", "book", "concert", "phone", "service", "game"]
POS = ["wonderful", "excellent", "delightful", "fantastic", "great", "lovely"]
NEG = ["terrible", "awful", "boring", "disappointing", "horrible", "dreadful"]
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60)]


def gen_item(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}? Reply with the number only.", str(a + b)
    if task == "reverse":
        ws = rng.sample(WORDS, rng.choice((3, 4)))
        return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))
    if task == "json":
        n, a, c = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
        return (f"Extract the name and age as JSON: {n} is {a} years old and lives in {c}.",
                json.dumps({"name": n, "age": a}))
    if task == "sentiment":
        pos = rng.random() < 0.5
        return (f"Is this review positive or negative? {rng.choice(NAMES)} said the {rng.choice(ITEMS)} in "
                f"{rng.choice(CITIES)} was {rng.choice(POS if pos else NEG)}.", "positive" if pos else "negative")
    if task == "units":
        x = rng.randint(2, 199)
        src, dst, f = rng.choice(UNITS)
        return f"Convert {x} {src} to {dst}. Reply with the number only.", str(x * f)
    if task == "sort":
        ws = rng.sample(WORDS, 4)
        return f"Sort these words alphabetically: {' '.join(ws)}", " ".join(sorted(ws))
    raise ValueError(f"Unknown task {task!r}")


TASKS = ("add", "reverse", "json", "sentiment", "units", "sort")
NEW_TOKENS = {"add": 8, "reverse": 16, "json": 24, "sentiment": 4, "units": 8, "sort": 16}


def correct(task: str, output: str, answer: str) -> bool:
    out = output.strip()
    if task in ("add", "units"):
        m = re.search(r"-?\d[\d,]*", out)
        return bool(m) and m.group(0).replace(",", "") == answer
    if task in ("reverse", "sort"):
        words = re.findall(r"[a-z]+", out.lower())
        return words[: len(answer.split())] == answer.split()
    if task == "json":
        m = re.search(r"\{.*?\}", out, re.S)
        try:
            return bool(m) and json.loads(m.group(0)) == json.loads(answer)
        except ValueError:
            return False
    if task == "sentiment":
        w = re.findall(r"[a-z]+", out.lower())
        return bool(w) and w[0] == answer
    raise ValueError(task)


def make_data(tasks: list[str], n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict:
    data = {}
    for i, t in enumerate(tasks):
        rng = random.Random(seed * 1000 + i)
        seen, items, need = set(), [], n_train + n_val + n_test
        misses = 0
        while len(items) < need:
            p, a = gen_item(t, rng)
            if p not in seen:
                seen.add(p)
                items.append((p, a))
                misses = 0
            else:
                misses += 1
                if misses > 10_000:  # the task's template space is smaller than the splits asked for
                    raise ValueError(f"task {t!r} has only ~{len(items)} distinct items; asked for {need} "
                                     f"(n_train {n_train} + n_val {n_val} + n_test {n_test})")
        data[t] = {"val": items[:n_val], "test": items[n_val : n_val + n_test], "train": items[n_val + n_test :]}
    return data


# --- 2.-5. -------------------------------------------------------------------------------------
def evaluate(model, tok, data: dict, split: str, tasks: list[str]) -> dict[str, list[int]]:
    from demo.build_pool import greedy_answers

    out = {}
    for t in tasks:
        items = data[t][split]
        ans = greedy_answers(model, tok, [p for p, _ in items], NEW_TOKENS[t], batch=16, desc=f"{t}/{split}")
        out[t] = [int(correct(t, o, a)) for o, (_, a) in zip(ans, items)]
    return out


def qa_items(model, tok) -> tuple[list, list[int]]:
    from demo.build_pool import greedy_answers
    from demo.data import QA

    ans = greedy_answers(model, tok, [q for q, _ in QA], 24, desc="qa")
    return QA, [int(any(k in a.lower() for k in keys)) for a, (_, keys) in zip(ans, QA)]


def bootstrap(merged: list[int], own: list[int], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Normalised accuracy Σmerged/Σown and its 95 % percentile interval over resampled items."""
    import torch

    m, o = torch.tensor(merged, dtype=torch.float64), torch.tensor(own, dtype=torch.float64)
    point = float(m.sum() / o.sum()) if o.sum() > 0 else float("nan")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(m), (n, len(m)), generator=g)
    ratios = m[idx].sum(1) / o[idx].sum(1).clamp(min=1e-9)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, lo, hi


METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "devec", "devec:parts=delta", "devec_ties",
           "devec_dare_ties"]


def parse_method(spec: str) -> tuple[str, dict]:
    """"devec:parts=delta" -> ("devec", {"parts": "delta"}); numbers become floats."""
    name, _, rest = spec.partition(":")
    params = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            params[k] = float(v)
        except ValueError:
            params[k] = v
    return name, params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default="add,reverse,json,sentiment")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--grid", default="0.5,0.75,1.0")
    ap.add_argument("--tau", type=float, default=0.85)
    ap.add_argument("--methods", default=";".join(METHODS), help="';'-separated registry names, optionally name:key=value,...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 steps, 4 items: checks the pipeline only")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from devec_core.formats import load_pool
    from devec_core.merge import merge
    from devec_core.mix import VectorPool, WeightEditor, vanilla
    from devec_core.pool import decompose
    from demo.build_pool import save_adapter, train_lora

    tasks = args.tasks.split(",")
    grid = [float(x) for x in args.grid.split(",")]
    if args.smoke:
        args.steps, args.n_val, args.n_test, args.n_train = 2, 4, 4, 16
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state_f = out / "state.json"
    state = json.loads(state_f.read_text()) if state_f.exists() else {}

    def save_state():
        state_f.write_text(json.dumps(state, indent=1))

    # 1. data, model
    data = make_data(tasks, args.n_train, args.n_val, args.n_test)
    if args.smoke:
        from tests.tiny_models import tiny_llama

        model, tok = tiny_llama(0)
    else:
        from devec_core.models import load_causal_lm

        model, tok = load_causal_lm("smollm2", dtype="float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t0 = time.time()

    # 2. train one LoRA per task from the base
    for t in tasks:
        folder = out / "adapters" / t
        if (folder / "adapter_model.safetensors").exists():
            continue
        pairs = data[t]["train"]
        sd, cfg, losses = train_lora(model, tok, pairs, 8, 16, args.steps, args.lr, tasks.index(t), targets, args.batch, 96, f"train {t}")
        save_adapter(folder, sd, cfg)
        state.setdefault("train", {})[t] = {"steps": args.steps, "loss_first": losses[0], "loss_last": losses[-1]}
        save_state()
        print(f"trained {t}: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    vecs = load_pool([out / "adapters" / t for t in tasks], tasks)

    # 3. the pool's spectrum first
    if "spectrum" not in state:
        dec = decompose(vecs, tau=args.tau, mode="pairwise")
        rows = dec.summary()
        pairs = {}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1 :]:
                sub = decompose([vecs[i], vecs[tasks.index(b)]], tau=args.tau)
                mx = [max((e[0] for e in r["eigenvalues"]), default=0.0) for r in sub.summary()]
                pairs[f"{a}+{b}"] = {"mean_max_cos2": sum(mx) / len(mx), "max_cos2": max(mx),
                                     "shared_dims": sum(sub.shared_dims().values()), "modules": len(mx)}
        state["spectrum"] = {"tau": args.tau, "pairs": pairs, "shared_dims_pairwise": sum(dec.shared_dims().values()),
                             "modules": len(rows)}
        save_state()
    print(json.dumps(state["spectrum"]["pairs"], indent=1), flush=True)
    dec = decompose(vecs, tau=args.tau, mode="pairwise")

    ed = WeightEditor(model)

    def scored(key: str, mixsrc, split: str, only: list[str] | None = None, qa: bool = True) -> dict:
        if key not in state.setdefault("scores", {}):
            ed.apply(mixsrc)
            res = evaluate(model, tok, data, split, only or tasks)
            if split == "test" and qa:
                res["qa"] = qa_items(model, tok)[1]
            ed.restore()
            state["scores"][key] = res
            save_state()
        return state["scores"][key]

    # individual fine-tunes (each at λ = 1) and the base
    pool = VectorPool(vecs)
    base = scored("base/test", None, "test")
    own = {t: scored(f"own:{t}/test", vanilla(pool, {t: 1.0}), "test", [t], qa=False)[t] for t in tasks}
    own_val = {t: scored(f"own:{t}/val", vanilla(pool, {t: 1.0}), "val", [t])[t] for t in tasks}

    # 4. every method, λ from the grid on validation
    results = {}
    for method in args.methods.split(";"):
        best, best_score = None, -1.0
        for lam in grid:
            key = f"{method}@{lam}"
            t1 = time.perf_counter()
            name, params = parse_method(method)
            merged = merge(vecs, name, lam, decomposition=dec if name.startswith("devec") else None, **params)
            state.setdefault("merge_seconds", {}).setdefault(key, time.perf_counter() - t1)
            val = scored(key + "/val", vanilla(VectorPool([merged]), {"merged": 1.0}), "val")
            norm = [sum(val[t]) / max(1, sum(own_val[t])) for t in tasks]
            s = sum(norm) / len(norm)
            if s > best_score:
                best, best_score = lam, s
        name, params = parse_method(method)
        merged = merge(vecs, name, best, decomposition=dec if name.startswith("devec") else None, **params)
        test = scored(f"{method}@{best}/test", vanilla(VectorPool([merged]), {"merged": 1.0}), "test")
        per = {t: bootstrap(test[t], own[t]) for t in tasks}
        allm = [x for t in tasks for x in test[t]]
        allo = [x for t in tasks for x in own[t]]
        results[method] = {"lambda": best, "val_norm": best_score, "per_task": per, "average": bootstrap(allm, allo),
                           "qa_kept": sum(q and b for q, b in zip(test["qa"], base["qa"])) / max(1, sum(base["qa"])),
                           "merge_seconds": state.get("merge_seconds", {}).get(f"{method}@{best}")}
        print(method, results[method], flush=True)

    # 5. report
    report = {"config": vars(args) | {"out": str(out)}, "spectrum": state["spectrum"], "train": state.get("train"),
              "own_accuracy": {t: sum(own[t]) / len(own[t]) for t in tasks},
              "base_accuracy": {t: sum(base[t]) / len(base[t]) for t in tasks},
              "base_qa": sum(base["qa"]), "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"| method | λ | " + " | ".join(tasks) + " | average | QA kept | merge s |",
             "|---|---:|" + "---:|" * (len(tasks) + 3)]
    for m, r in results.items():
        cells = [f"{r['per_task'][t][0]:.2f} [{r['per_task'][t][1]:.2f}, {r['per_task'][t][2]:.2f}]" for t in tasks]
        a = r["average"]
        ms = f"{r['merge_seconds']:.2f}" if r["merge_seconds"] is not None else "–"
        lines.append(f"| {m} | {r['lambda']:g} | " + " | ".join(cells) + f" | {a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}] | {r['qa_kept']:.2f} | {ms} |")
    own_line = "own fine-tune accuracy: " + ", ".join(f"{t} {report['own_accuracy'][t]:.2f}" for t in tasks)
    base_line = "base accuracy: " + ", ".join(f"{t} {report['base_accuracy'][t]:.2f}" for t in tasks)
    (out / "results.md").write_text("\n".join([own_line, base_line, "", *lines]) + "\n")
    print("\n".join([own_line, base_line, "", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
