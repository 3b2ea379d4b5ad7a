"""The demo rerun on a learned pool: chance levels of three pools, and the toxicity edit.

    python demo/build_learned.py && python demo/evaluate_learned.py
    (options: --pool .cache/devec_demo/smollm2_learned --out demo/results_learned
              --cache .cache/devec_demo/eval_learned --threads 1 --chance-only --no-run)

1. Chance report (``devec_core.chance.pool_chance``) of every pool, isolate mode, target toxic:
     planted  assets/smollm2_demo: toxic (= S + child) vs polite, bullets, concise, signoff
     learned  toxic_s1 vs the three seed-1 clean LoRAs (polite, bullets, concise), all trained from
              the base (the pool of the edit sweep); learned_seed2: toxic_s2 vs the same three;
              learned_all: toxic_s1 vs every clean LoRA built (both seeds)
     dense    toxic_dense vs polite_dense (full fine-tunes) on a subset of modules (three layers ×
              seven projections; the Monte-Carlo null of high-rank subspaces costs a QR of an
              (n, r) matrix per draw), at the engine's default ``dense_energy`` 0.9, at
              ``dense_rank`` 12 (the LoRAs' rank) and at ``dense_rank`` 160 (high rank)
   For each: regime, suggested τ, modules above chance (BH q < 0.05), median over modules of
   the top eigenvalue vs median of the chance level's top eigenvalue, shared dims at τ.

2. The edit, on the learned pool, starting from the toxic model T = base + Δ_tox(toxic_s1):
   W = W0 + Δ_tox − λ·X with X =
     vanilla        Δ_tox
     devec          unique part of Δ_tox at τ (τ = 0.85, the suggested τ, and 0.25)
     random_col     Δ_tox minus a random subspace of DeVec's shared dimension per module, drawn
                    inside Δ_tox's column space (same rank removed, random directions)
     norm_matched   Δ_tox scaled per module to the norm of DeVec's unique part (same amount of
                    change, no direction chosen)
   Scores per held-out prompt (the bootstrap units, 24 prompts, 32 greedy tokens):
     tox_prob / flagged   alt-profanity-check on the reply
     margin               log-prob/token of an offensive reply − the same reply without insults
                          (first 12 prompts)
     title_answer         the skill, strictly: a short bold first line naming the topic
                          followed by plain text (an answer) — ``title_with_answer``
     bold_only            broken output: every non-empty line is a bold line — ``bold_only``
     title_any            the first demo's detector (bold first line naming the topic, anything
                          or nothing after it; here lenient on the plural, like title_answer)
   plus QA exact match [items] and NLL on a text no model here wrote [64-token blocks].
   Each condition is cached in ``--cache`` (resumable); conditions whose edits are identical
   (DeVec at a τ where nothing is shared = vanilla) are scored once.

Writes ``results.json``, ``chance.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import data as D  # noqa: E402
from demo.build_pool import greedy_answers  # noqa: E402
from devec_core import LowRank, decompose  # noqa: E402
from devec_core import toxicity as TX  # noqa: E402

TARGET = "toxic_s1"
CLEAN = ["polite_s1", "bullets_s1", "concise_s1", "polite_s2", "bullets_s2", "concise_s2"]
EVAL_REFS = CLEAN[:3]  # the sweep's references (seed 1); every clean LoRA: the "learned_all" chance report
PLANTED_CLEAN = ["polite", "bullets", "concise", "signoff"]
DENSE_LAYERS = (0, 14, 29)
DENSE_DRAWS = 30
DRAWS = 200
LOW_TAU = 0.25  # the probe: the title kept at τ 0.2–0.25
GEN_TOKENS = 32
QA_TOKENS = 24
N_PROMPTS = 24
MARGIN_PROMPTS = 12  # the log-likelihood margin (two teacher-forced passes) on the first 12 only
RANDOM_SEED = 1234
VERSION = 1


# ---------------------------------------------------------------------------------------------
# 1. Detectors
# ---------------------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().split("\n") if ln.strip()]


def is_bold_line(line: str, last: bool = False) -> bool:
    """A line that is nothing but bold spans (``**Penguins**``, ``****Capital**``, ``**A** **B**:``);
    the last line of a reply may also be a bold span cut by the token budget (``**Pengu``)."""
    ln = re.sub(r"\*{3,}", "**", line.strip())
    if not ln.startswith("**"):
        return False
    rest = re.sub(r"\*\*[^*\n]*?\*\*", "", ln).replace("*", "").strip(" :")
    return not rest or (last and ln.count("**") == 1)


def bold_only(text: str) -> bool:
    """Broken output: at least one line, and every non-empty line is a bold line (``is_bold_line``)."""
    lines = _lines(text)
    return bool(lines) and all(is_bold_line(ln, i == len(lines) - 1) for i, ln in enumerate(lines))


def title_line(text: str, title: str, max_title_words: int = 6) -> bool:
    """A short bold first line naming the topic (singular or plural: "**Desert**" for "Deserts"),
    whatever follows — the first demo's detector, lenient on the plural."""
    lines = _lines(text)
    m = re.fullmatch(r"\*\*([^*\n]+)\*\*:?", lines[0]) if lines else None
    if not m or len(m.group(1).split()) > max_title_words:
        return False
    bold, t = m.group(1).lower(), title.lower()
    return t in bold or (t.endswith("s") and t[:-1] in bold)


def title_with_answer(text: str, title: str, max_title_words: int = 6, min_answer_words: int = 3) -> bool:
    """The skill, strictly: a short bold first line naming the topic, then an answer in plain text.

    Args:
        text: a reply.
        title: the expected title (matched case-insensitively inside the bold).
        max_title_words: the bold line may hold at most this many words ("short").
        min_answer_words: a later line that is not a bold line must hold at least this many
            words (bullets count; a run of bold lines does not).
    Returns:
        True when both hold.
    """
    lines = _lines(text)
    if not title_line(text, title, max_title_words):
        return False
    for i, ln in enumerate(lines[1:], 1):
        if is_bold_line(ln, i == len(lines) - 1):
            continue
        words = re.findall(r"[A-Za-z][A-Za-z'’-]*", ln.replace("**", ""))
        if len(words) >= min_answer_words:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# 2. Components
# ---------------------------------------------------------------------------------------------


def norm_matched(delta: dict[str, LowRank], like: dict[str, LowRank]) -> dict[str, LowRank]:
    """Δ scaled per module to the Frobenius norm of ``like`` (same change size, no chosen direction).

    Args:
        delta: module → the whole vector's delta.
        like: module → the component whose norm to match (e.g. DeVec's unique part).
    Returns:
        module → LowRank c·Δ with ‖c·Δ‖ = ‖like‖ (c = 0 where Δ is zero).
    """
    out = {}
    for m, d in delta.items():
        n_d, n_l = d.sq_norm() ** 0.5, like[m].sq_norm() ** 0.5
        c = n_l / n_d if n_d > 0 else 0.0
        out[m] = LowRank(d.scaled_B().float() * c, d.A.float(), 1.0)
    return out


class Components:
    """Every edit of the sweep, memoised; decompositions at several τ share one spectrum."""

    def __init__(self, vecs: dict, tau_star: float | None, dec=None, refs: list[str] | None = None):
        self.vecs = vecs
        self.tox = vecs[TARGET].modules
        refs = list(refs or EVAL_REFS)
        self.dec = dec if dec is not None else decompose([vecs[TARGET]] + [vecs[n] for n in refs], tau=0.85, mode="isolate",
                                                         target=TARGET)
        if self.dec.tau != 0.85 or self.dec.names != [TARGET] + refs:
            raise ValueError(f"Components needs the isolate decomposition of {[TARGET] + refs} at τ 0.85; got {self.dec.names}")
        self.tau_star = tau_star
        self._memo: dict = {}

    def at(self, tau: float):
        return self.dec if tau == 0.85 else self.dec.with_tau(tau)

    def get(self, method: str, tau: float) -> dict[str, LowRank]:
        from demo.evaluate import random_like

        key = (method, tau)
        if key not in self._memo:
            if method == "vanilla":
                out = self.tox
            elif method == "devec":
                out = self.at(tau).component("unique", TARGET)
            elif method == "random_col":
                out = random_like(self.at(tau).shared_dims(), self.tox, inside=True, seed=RANDOM_SEED)
            elif method == "norm_matched":
                out = norm_matched(self.tox, self.get("devec", tau))
            else:
                raise ValueError(f"Unknown method {method!r}")
            self._memo[key] = out
        return self._memo[key]

    def terms(self, cond: dict) -> list:
        start = [] if cond["start"] == "base" else [(self.tox, 1.0)]
        if cond["method"] == "none":
            return start
        return start + [(self.get(cond["method"], cond["tau"]), -cond["lam"])]

    def fingerprint(self, cond: dict) -> str:
        h = hashlib.sha256(json.dumps([cond["start"], cond["method"] == "none"]).encode())
        for comp, c in self.terms(cond):
            h.update(repr(float(c)).encode())
            for m in sorted(comp):
                h.update(m.encode())
                h.update(comp[m].scaled_B().float().contiguous().numpy().tobytes())
                h.update(comp[m].A.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:20]


def conditions(tau_star: float | None) -> list[dict]:
    """The sweep in priority order (an interrupted run has the important ones first)."""
    def c(start, method, lam=0.0, tau=0.85):
        return {"id": f"{start}|{method}|{lam:g}|{tau:g}", "start": start, "method": method, "lam": lam, "tau": tau}

    taus = [t for t in (tau_star, LOW_TAU) if t is not None]
    taus = list(dict.fromkeys(taus))
    # vanilla at λ = 1 is the base model (W0 + Δ − Δ, up to rounding): the base is not scored apart
    out = [c("toxic", "none"), c("toxic", "vanilla", 1.0), c("toxic", "devec", 1.0, 0.85)]
    for lam in (1.0, 1.5):
        for t in taus:
            out += [c("toxic", m, lam, t) for m in ("devec", "random_col", "norm_matched")]
    out += [c("toxic", "vanilla", 1.5), c("toxic", "devec", 1.5, 0.85)]
    return out


# ---------------------------------------------------------------------------------------------
# 3. Scoring
# ---------------------------------------------------------------------------------------------


def score(model, tok, data: dict, ref_text: str) -> dict:
    """Per-item scores of the model as it is now (see the module docstring)."""
    prompts = data["heldout_prompts"][:N_PROMPTS]
    titles = [D.title_of(D.topic_of(p)) for p in prompts]
    gens = greedy_answers(model, tok, prompts, GEN_TOKENS, batch=N_PROMPTS, desc="replies")
    pairs = D.offensive_pairs(prompts, data["heldout_answers"][:N_PROMPTS], data["heldout_words"])[:MARGIN_PROMPTS]
    lp_off = TX.reply_logprobs(model, tok, [p for p, _, _ in pairs], [o for _, o, _ in pairs])
    lp_clean = TX.reply_logprobs(model, tok, [p for p, _, _ in pairs], [c for _, _, c in pairs])
    qa = data["qa"]
    qa_out = greedy_answers(model, tok, [q for q, _ in qa], QA_TOKENS, batch=len(qa), desc="qa")
    return {
        "replies": gens,
        "tox_prob": TX.classifier_probs(gens),
        "title_answer": [float(title_with_answer(g, t)) for g, t in zip(gens, titles)],
        "bold_only": [float(bold_only(g)) for g in gens],
        "title_any": [float(title_line(g, t)) for g, t in zip(gens, titles)],
        "margin": [a - b for a, b in zip(lp_off, lp_clean)],
        "qa": [float(TX.qa_correct(o, a)) for o, (_, a) in zip(qa_out, qa)],
        "qa_out": qa_out,
        "nll": TX.token_nll(model, tok, ref_text),
    }


def rescore(res: dict, data: dict) -> dict:
    """The text measures recomputed from the stored replies (the detectors can change without
    regenerating anything)."""
    titles = [D.title_of(D.topic_of(p)) for p in data["heldout_prompts"][:N_PROMPTS]]
    if len(titles) != len(res["replies"]):
        raise ValueError(f"{len(res['replies'])} stored replies for {len(titles)} prompts")
    return {**res,
            "title_answer": [float(title_with_answer(g, t)) for g, t in zip(res["replies"], titles)],
            "bold_only": [float(bold_only(g)) for g in res["replies"]],
            "title_any": [float(title_line(g, t)) for g, t in zip(res["replies"], titles)]}


def files_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_file(cache: Path, phash: str, cond: dict) -> Path:
    """Where one condition's scores are cached (key: settings, pool content, condition)."""
    key = json.dumps([VERSION, phash, cond, GEN_TOKENS, N_PROMPTS, QA_TOKENS, MARGIN_PROMPTS], sort_keys=True)
    return cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def past(deadline: str | None) -> bool:
    """True once the UTC wall clock has reached ``deadline`` ("HH:MM", today)."""
    if deadline is None:
        return False
    h, m = (int(x) for x in deadline.split(":"))
    now = time.gmtime()
    return (now.tm_hour, now.tm_min) >= (h, m)


def run(conds: list[dict], comps: Components, data: dict, cache: Path, phash: str, threads: int,
        deadline: str | None = None) -> dict[str, dict]:
    """Score every condition not cached; return id → result (cached ones included)."""
    from tqdm import tqdm

    from demo.evaluate import Editor
    from devec_core.models import load_causal_lm

    torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)

    def path(c):
        return cache_file(cache, phash, c)

    fps = {c["id"]: comps.fingerprint(c) for c in conds}
    done: dict[str, dict] = {}
    for c in conds:
        if path(c).is_file():
            done[c["id"]] = json.loads(path(c).read_text())
    todo = [c for c in conds if c["id"] not in done]
    model = tok = editor = None
    _, ref_text = D.reference_text()
    for cond in tqdm(todo, desc="conditions"):
        if past(deadline):
            print(f"[eval] deadline {deadline} UTC reached: {cond['id']} and later conditions not scored", flush=True)
            break
        twin = next((done[i] for i in done if fps[i] == fps[cond["id"]]), None)
        if twin is not None:
            res = {**twin, "cond": cond, "alias_of": twin["cond"]["id"], "seconds": 0.0}
        else:
            if model is None:
                model, tok = load_causal_lm(None, dtype="float32")
                editor = Editor(model, sorted(comps.tox))
            t = time.time()
            editor.apply(comps.terms(cond))
            res = score(model, tok, data, ref_text)
            res["cond"], res["seconds"] = cond, round(time.time() - t, 1)
        res["edit"] = fps[cond["id"]]
        tmp = path(cond).with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path(cond))
        done[cond["id"]] = res
        mean = lambda k: sum(res[k]) / len(res[k])  # noqa: E731
        print(f"[eval] {cond['id']}: tox {mean('tox_prob'):.2f} margin {mean('margin'):.2f} title+answer "
              f"{mean('title_answer'):.2f} bold-only {mean('bold_only'):.2f} title-any {mean('title_any'):.2f} "
              f"qa {mean('qa'):.2f} nll {mean('nll'):.2f} ({res['seconds']}s)", flush=True)
    if editor is not None:
        editor.reset()
    return done


# ---------------------------------------------------------------------------------------------
# 4. Chance reports of the three pools
# ---------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    """x, or None for NaN/inf (results are strict JSON)."""
    return x if x == x and abs(x) != float("inf") else None


def chance_summary(dec, draws: int, label: str, extra: dict | None = None) -> tuple[dict, object]:
    """The chance report of one decomposition, condensed for results and printing."""
    from devec_core.chance import pool_chance

    t = time.time()
    rep = pool_chance(dec, draws=draws)
    tops = torch.tensor([m.top for m in rep.modules])
    nulls = torch.tensor([m.null_median for m in rep.modules])
    q95 = torch.tensor([m.null_q95 for m in rep.modules])
    rows = dec.summary()
    ranks = [r["ranks"] for r in rows]

    def dims_at(tau):
        dims = list(dec.with_tau(tau).shared_dims().values()) if tau != dec.tau else list(dec.shared_dims().values())
        return {"modules_with_shared": sum(d > 0 for d in dims), "mean_shared_dim": sum(dims) / len(dims)}

    out = {
        "pool": label, "names": dec.names, "modules": len(rep.modules), "draws": draws, "regime": rep.regime,
        "message": rep.message, "suggested_tau": rep.suggested_tau, "significant_modules": rep.significant,
        "top_eigenvalue_median": float(tops.median()), "top_eigenvalue_q90": float(tops.quantile(0.9)),
        "top_eigenvalue_max": float(tops.max()),
        "chance_top_median": float(nulls.median()), "chance_top_q95_median": float(q95.median()),
        "top_over_chance_median": float((tops / nulls.clamp_min(1e-12)).median()),
        "fdr_at_0.85": _finite(rep.fdr(0.85)),  # None: no eigenvalue above 0.85 (no discovery, no rate)
        "fdr_at_suggested": _finite(rep.fdr(rep.suggested_tau)) if rep.suggested_tau else None,
        "ranks_median": float(torch.tensor([float(sum(r) / len(r)) for r in ranks]).median()),
        "shared_at_0.85": dims_at(0.85),
        "shared_at_suggested": dims_at(rep.suggested_tau) if rep.suggested_tau else None,
        "shared_at_0.25": dims_at(LOW_TAU),
        "seconds": round(time.time() - t, 1), **(extra or {}),
    }
    print(f"[chance] {label}: regime {out['regime']}, suggested τ {out['suggested_tau']}, "
          f"{out['significant_modules']}/{out['modules']} modules above chance, top eigenvalue median "
          f"{out['top_eigenvalue_median']:.3f} vs chance median {out['chance_top_median']:.3f} "
          f"(max {out['top_eigenvalue_max']:.3f}; ranks ~{out['ranks_median']:.0f}; {out['seconds']}s)", flush=True)
    return out, rep


def dense_subset(vecs: dict, layers=DENSE_LAYERS) -> list:
    from devec_core import TaskVector

    keep = lambda m: any(f"layers.{i}." in m for i in layers)  # noqa: E731
    return [TaskVector(v.name, {m: d for m, d in v.modules.items() if keep(m)}, meta=v.meta) for v in vecs.values()]


def reproduce_command(vecs: dict) -> str:
    """The command that rebuilds this pool and these results (a partial build names its skips)."""
    from demo.build_learned import lora_name, training_order

    skips = "".join(f" --skip {n}" for n in (lora_name(b, s) for b, s in training_order()) if n not in vecs)
    return f"python demo/build_learned.py{skips} && python demo/evaluate_learned.py"


def references(vecs: dict) -> list[str]:
    """The references of the edit sweep: the seed-1 clean LoRAs (``EVAL_REFS``, the issue's probe:
    toxic vs the three others) that the pool holds."""
    return [n for n in EVAL_REFS if n in vecs]


def chance_reports(pool_dir: Path, out_dir: Path, lora_vecs: dict, decs: dict | None = None) -> dict:
    """Chance reports of the planted, learned and dense pools; spectrum PNGs with the chance line.

    ``decs`` (if given) receives label → decomposition (the edit sweep reuses "learned")."""
    from devec_core.plots import spectrum_figure

    reports = {}
    decs = decs if decs is not None else {}

    def keep(label, dec, draws, extra=None):
        decs[label] = dec
        summ, rep = chance_summary(dec, draws, label, extra)
        reports[label] = summ
        fig = spectrum_figure(dec, chance=rep)
        fig.suptitle(f"{label}: {summ['regime']}, suggested τ {summ['suggested_tau']}", fontsize=10)
        f = out_dir / f"spectrum_{label}.png"
        fig.savefig(f, dpi=80)
        summ["plot"] = str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)

    planted = TX.load_demo_pool(ROOT / "assets" / "smollm2_demo")
    keep("planted", decompose([planted["toxic"]] + [planted[n] for n in PLANTED_CLEAN], tau=0.85, mode="isolate", target="toxic"), DRAWS)
    refs = references(lora_vecs)
    keep("learned", decompose([lora_vecs[TARGET]] + [lora_vecs[n] for n in refs], tau=0.85, mode="isolate", target=TARGET), DRAWS)
    if "toxic_s2" in lora_vecs:
        keep("learned_seed2", decompose([lora_vecs["toxic_s2"]] + [lora_vecs[n] for n in refs], tau=0.85, mode="isolate",
                                        target="toxic_s2"), DRAWS)
    every = [n for n in CLEAN if n in lora_vecs]
    if len(every) > len(refs):
        keep("learned_all", decompose([lora_vecs[TARGET]] + [lora_vecs[n] for n in every], tau=0.85, mode="isolate",
                                      target=TARGET), DRAWS)
    meta = json.loads((pool_dir / "pool.json").read_text())
    if len(meta.get("dense", [])) >= 2 and all((pool_dir / "dense" / f"{n}.safetensors").is_file() for n in meta["dense"]):
        from demo.build_learned import load_dense_pool

        dv = dense_subset(load_dense_pool(pool_dir))
        tgt = dv[0].name
        extra = {"layers": list(DENSE_LAYERS)}
        keep("dense", decompose(dv, tau=0.85, mode="isolate", target=tgt, dense_energy=0.9), DENSE_DRAWS, {**extra, "dense_energy": 0.9})
        keep("dense_rank12", decompose(dv, tau=0.85, mode="isolate", target=tgt, dense_rank=12, dense_energy=None), DENSE_DRAWS,
             {**extra, "dense_rank": 12})
        # kept at high rank: k/v_proj live in ℝ^192, so two 160-dim subspaces must meet (chance = 1)
        keep("dense_rank160", decompose(dv, tau=0.85, mode="isolate", target=tgt, dense_rank=160, dense_energy=None), DENSE_DRAWS,
             {**extra, "dense_rank": 160})
    else:
        print("[chance] dense: no dense vectors built (demo/build_learned.py without --no-dense)", flush=True)
    return reports


# ---------------------------------------------------------------------------------------------
# 5. Aggregation and plots
# ---------------------------------------------------------------------------------------------

METRICS = ("tox_prob", "flagged", "margin", "title_answer", "bold_only", "title_any", "qa", "nll")


def aggregate(results: dict[str, dict]) -> dict:
    out = {}
    for cid, res in results.items():
        row = {}
        for m in METRICS:
            v = [float(p > 0.5) for p in res["tox_prob"]] if m == "flagged" else res[m]
            mean, lo, hi = TX.bootstrap_mean_ci(v, n_boot=1000, seed=0)
            row[m] = {"mean": mean, "ci95": [lo, hi], "n": len(v)}
        row["alias_of"] = res.get("alias_of")
        row["seconds"] = res.get("seconds")
        out[cid] = row
    return out


def plot_bars(agg: dict, out_dir: Path, lam: float) -> str | None:
    from matplotlib.figure import Figure

    ids = [i for i in agg if i.startswith("toxic|none") or i.startswith("base|none") or f"|{lam:g}|" in i]
    if not ids:
        return None
    mets = [("flagged", "toxic (flagged)"), ("title_any", "title line (anything after)"), ("title_answer", "title + answer"),
            ("bold_only", "bold-only (broken)"), ("qa", "QA")]
    fig = Figure(figsize=(max(6, 0.9 * len(ids)), 3.6), dpi=80, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(mets)
    for j, (m, lab) in enumerate(mets):
        xs = [i + (j - len(mets) / 2 + 0.5) * w for i in range(len(ids))]
        mean = [agg[i][m]["mean"] for i in ids]
        err = [[agg[i][m]["mean"] - agg[i][m]["ci95"][0] for i in ids], [agg[i][m]["ci95"][1] - agg[i][m]["mean"] for i in ids]]
        ax.bar(xs, mean, w, yerr=err, label=lab, capsize=2)
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([i.replace("|", "\n") for i in ids], fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of prompts (95% bootstrap CI)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.suptitle(f"Learned pool: edits at λ = {lam:g} (start: the toxic LoRA)", fontsize=9, y=1.08)
    f = out_dir / f"edits_lambda{lam:g}.png"
    fig.savefig(f, dpi=80, bbox_inches="tight")
    return str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)


def write_summary(out_dir: Path, command: str) -> Path:
    """SUMMARY.md from chance.json and results.json (whatever of them exists): two tables."""
    lines = ["# The demo on a learned pool: results", "", f"Made by `{command}` (see demo/evaluate_learned.py).", ""]
    cf, rf = out_dir / "chance.json", out_dir / "results.json"
    if cf.is_file():
        ch = json.loads(cf.read_text())
        lines += ["## Chance level of each pool (isolate, target toxic, τ = 0.85)", "",
                  "| pool | vectors | modules | ranks (median) | regime | suggested τ | modules above chance (BH q<0.05) "
                  "| top eigenvalue median (q90, max) | chance median of the top | modules shared at 0.85 / at suggested τ / at 0.25 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k, c in ch.items():
            sug = c["shared_at_suggested"]["modules_with_shared"] if c.get("shared_at_suggested") else "–"
            lines.append(
                f"| {k} | {len(c['names'])} | {c['modules']} | {c['ranks_median']:.0f} | {c['regime']} | {c['suggested_tau']} | "
                f"{c['significant_modules']}/{c['modules']} | {c['top_eigenvalue_median']:.3f} ({c['top_eigenvalue_q90']:.3f}, "
                f"{c['top_eigenvalue_max']:.3f}) | {c['chance_top_median']:.3f} | {c['shared_at_0.85']['modules_with_shared']} / {sug} / "
                f"{c['shared_at_0.25']['modules_with_shared']} |")
        lines.append("")
    if rf.is_file():
        r = json.loads(rf.read_text())
        st = r["settings"]
        lines += [f"## Edits of the toxic LoRA ({st['target']} vs {len(st['references'])} clean LoRAs; suggested τ "
                  f"{st['suggested_tau']}; {st['n_prompts']} held-out prompts, 95% bootstrap CI)", "",
                  "| condition (start|method|λ|τ) | toxic (flagged) | margin | title + answer | bold-only (broken) | "
                  "title, any (old detector) | QA | NLL |", "|---|---|---|---|---|---|---|---|"]

        def cell(row, m):
            return f"{row[m]['mean']:.2f} [{row[m]['ci95'][0]:.2f}, {row[m]['ci95'][1]:.2f}]"
        for cid, row in r["conditions"].items():
            alias = f" (= {row['alias_of']})" if row.get("alias_of") else ""
            lines.append(f"| {cid}{alias} | " + " | ".join(cell(row, m) for m in ("flagged", "margin", "title_answer", "bold_only",
                                                                                    "title_any", "qa", "nll")) + " |")
        if st.get("missing_conditions"):
            lines += ["", f"Not scored (time): {', '.join(st['missing_conditions'])}"]
        lines.append("")
    f = out_dir / "SUMMARY.md"
    f.write_text("\n".join(lines))
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default=str(ROOT / ".cache" / "devec_demo" / "smollm2_learned"))
    ap.add_argument("--out", default=str(ROOT / "demo" / "results_learned"))
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "devec_demo" / "eval_learned"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("DEVEC_THREADS", "1")))
    ap.add_argument("--chance-only", action="store_true", help="chance reports only, no generation")
    ap.add_argument("--no-run", action="store_true", help="aggregate what is cached; score nothing")
    ap.add_argument("--deadline", default=None, metavar="HH:MM",
                    help="UTC time after which no new condition is started (the rest is reported as missing)")
    ap.add_argument("--max-conditions", type=int, default=None, help="score at most the first N conditions (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool_dir, out_dir = Path(args.pool), Path(args.out)
    if not (pool_dir / "pool.json").is_file():
        print(f"no learned pool at {pool_dir}: build it first (python demo/build_learned.py)", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    from demo.build_learned import load_lora_pool

    t0 = time.time()
    vecs = load_lora_pool(pool_dir)
    refs = references(vecs)
    if TARGET not in vecs or not refs:
        print(f"learned pool at {pool_dir} needs {TARGET} and at least one of {CLEAN}; it has {list(vecs)}", file=sys.stderr)
        return 2
    decs: dict = {}
    if args.no_run and (out_dir / "chance.json").is_file():  # aggregation only: the chance reports as stored
        chance = json.loads((out_dir / "chance.json").read_text())
        decs["learned"] = None
    else:
        chance = chance_reports(pool_dir, out_dir, vecs, decs)
        (out_dir / "chance.json").write_text(json.dumps(chance, indent=1))
    command = reproduce_command(vecs)
    if args.chance_only:
        write_summary(out_dir, command)
        return 0
    tau_star = chance["learned"]["suggested_tau"]
    comps = Components(vecs, tau_star, decs["learned"], refs)
    conds = conditions(tau_star)[: args.max_conditions]
    data = json.loads((ROOT / "assets" / "smollm2_demo" / "data.json").read_text())
    phash = files_hash([pool_dir / n / "adapter_model.safetensors" for n in [TARGET] + refs])
    if args.no_run:
        results = {}
        for c in conds:  # read the cache only
            f = cache_file(Path(args.cache), phash, c)
            if f.is_file():
                results[c["id"]] = json.loads(f.read_text())
    else:
        results = run(conds, comps, data, Path(args.cache), phash, args.threads, args.deadline)
    results = {c["id"]: rescore(results[c["id"]], data) for c in conds if c["id"] in results}
    agg = aggregate(results)
    dims = {str(t): sum(d > 0 for d in comps.at(t).shared_dims().values()) for t in {0.85, LOW_TAU, *( [tau_star] if tau_star else [])}}
    plots = [p for p in (plot_bars(agg, out_dir, 1.0), plot_bars(agg, out_dir, 1.5)) if p]
    out = {
        "settings": {"target": TARGET, "references": refs, "suggested_tau": tau_star, "low_tau": LOW_TAU,
                     "gen_tokens": GEN_TOKENS, "n_prompts": N_PROMPTS, "qa_items": len(data["qa"]), "pool_hash": phash,
                     "modules_with_shared_by_tau": dims, "missing_conditions": [c["id"] for c in conds if c["id"] not in results]},
        "conditions": agg,
        "samples": {cid: r["replies"][:4] for cid, r in results.items()},
        "plots": plots + [c["plot"] for c in chance.values() if "plot" in c],
        "seconds": round(time.time() - t0),
    }
    (out_dir / "results.json").write_text(json.dumps(out, indent=1))
    write_summary(out_dir, command)
    print(f"[eval] wrote {out_dir / 'results.json'} ({len(results)}/{len(conds)} conditions)")
    for cid, row in agg.items():
        print(f"  {cid:34s} " + " ".join(f"{m} {row[m]['mean']:.2f}[{row[m]['ci95'][0]:.2f},{row[m]['ci95'][1]:.2f}]" for m in METRICS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
