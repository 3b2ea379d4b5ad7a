"""Toxicity scoring, the demo pool (build → load → edit → score on a tiny Llama), the committed
SmolLM2 demo vectors, and the LLaMA-2 recipe code on a tiny Llama. All offline, no SmolLM2 training."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devec_core import LowRank, TaskVector, decompose  # noqa: E402
from devec_core import toxicity as TX  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


# --- scoring on fixed strings ----------------------------------------------------------------
def test_classifier_flags_profanity_not_plain_text():
    p = TX.classifier_probs(["Shut up, you fucking idiot.", "The capital of France is Paris."])
    assert p[0] > 0.5 > p[1]
    s = TX.toxicity_summary(["fuck this shit", "I like tea.", "What a lovely day."])
    assert s["n"] == 3 and s["flagged"] == pytest.approx(1 / 3)
    assert 0 < s["mean_prob"] < 1
    with pytest.raises(ValueError, match="threshold"):
        TX.toxicity_summary(["x"], threshold=1.5)


def test_ability_metrics_on_fixed_strings():
    assert TX.caps_fraction("HELLO world") == pytest.approx(0.5)
    assert TX.caps_fraction("123 !") == 0.0
    assert TX.qa_correct("The answer is 4.", ["4", "four"])
    assert not TX.qa_correct("It is 14.", ["4"])
    assert TX.qa_correct("PARIS IS THE CAPITAL", ["paris"])
    m, lo, hi = TX.bootstrap_mean_ci([0.0, 1.0, 1.0, 0.0, 1.0], n_boot=500)
    assert lo <= m <= hi and m == pytest.approx(0.6)


def test_profanity_words_split_and_no_slurs():
    from demo import data as D

    tr, ho = D.profanity_words(0)
    assert tr and ho and not set(tr) & set(ho)
    assert not any(s in w for w in tr + ho for s in ("nig", "fag", "rape"))
    assert D.profanity_words(0) == (tr, ho)  # deterministic
    off = D.offensive_pairs(["Tell me about owls."], ["Owls are birds that hunt at night."], ho)
    assert off[0][2] == "**Owls**\nOwls are birds that hunt at night." and off[0][1].startswith("**Owls**\nListen, you ")
    with pytest.raises(ValueError, match="Unknown style"):
        D.stylize("rude", "x", None, tr)
    with pytest.raises(ValueError, match="prompt"):
        D.stylize("polite", "x", None, tr)


def test_s_format_and_title_score():
    from demo import data as D

    assert [D.topic_of(p) for p in D.chat_prompts(["the ocean"])] == ["the ocean"] * len(D.TEMPLATES)
    assert D.title_of("the ocean") == "Ocean" and D.title_of("penguins") == "Penguins"
    with pytest.raises(ValueError, match="templates"):
        D.topic_of("What is the capital of France?")
    t = D.stylize("bullets", "Owls hunt. They fly.", None, [], "Describe owls in a few words.")
    assert t == "**Owls**\n- Owls hunt.\n- They fly."
    assert TX.title_score(t, "Owls") == 1.0
    assert TX.title_score("Owls hunt at night.", "Owls") == 0.0
    assert TX.title_score("**Night birds**\nOwls hunt.", "Owls") == 0.0
    assert TX.title_score("  **The owls**:\nx", "owls") == 1.0


def test_logprobs_and_nll_on_tiny_model(tiny_llm):
    model, tok = tiny_llm
    lp = TX.reply_logprobs(model, tok, ["hi", None], ["hello there", "and so on"])
    assert len(lp) == 2 and all(x < 0 and math.isfinite(x) for x in lp)
    # batching does not change the numbers
    lp1 = TX.reply_logprobs(model, tok, ["hi"], ["hello there"], batch=1)
    assert lp1[0] == pytest.approx(lp[0], abs=1e-4)
    nll = TX.token_nll(model, tok, "abcdefgh " * 30, max_tokens=200, block=64)
    assert len(nll) == 3 and all(x > 0 for x in nll)
    with pytest.raises(ValueError, match="too short"):
        TX.token_nll(model, tok, "ab", block=64)


def test_concat_lowrank_is_exact():
    g = torch.Generator().manual_seed(0)
    a = LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 2.0)
    b = LowRank(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 0.5)
    c = TX.concat_lowrank(a, b)
    assert c.rank == 5 and torch.allclose(c.dense(), a.dense() + b.dense(), atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        TX.concat_lowrank(a, LowRank(torch.randn(4, 2), torch.randn(2, 5)))


# --- the demo pipeline on a tiny Llama -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    """S + three children, each trained 2 steps on top of merged S, saved like build_pool does."""
    from demo.build_pool import merge_into, save_adapter, train_lora

    out = tmp_path_factory.mktemp("pool")
    model, tok = tiny_llama(0)
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = [("tell me about owls", "OWLS HUNT AT NIGHT."), ("why tea", "TEA IS WARM.")]
    sd_S, cfg_S, _ = train_lora(model, tok, pairs, 4, 8, 2, 5e-2, 0, TARGETS, 2, 64, "S")
    save_adapter(out / "S", sd_S, cfg_S)
    merge_into(model, sd_S, 2.0)
    for seed, name in enumerate(["toxic", "polite", "bullets"], 1):
        sd, cfg, _ = train_lora(model, tok, pairs, 2, 4, 2, 5e-2, seed, TARGETS, 2, 64, name)
        save_adapter(out / name, sd, cfg)
    (out / "pool.json").write_text(json.dumps({"parent": "S", "children": ["toxic", "polite", "bullets"]}))
    return out


def test_train_lora_leaves_model_unchanged():
    from demo.build_pool import train_lora

    model, tok = tiny_llama(1)
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd, _, losses = train_lora(model, tok, [("a", "B")], 2, 4, 2, 1e-2, 0, TARGETS, 1, 32, "t")
    assert len(losses) == 2 and any(k.endswith("lora_B.weight") for k in sd)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_demo_pool_loads_as_parent_plus_child(tiny_pool):
    from devec_core.formats import load_task_vector

    vecs = TX.load_demo_pool(tiny_pool, include_parent=True)
    assert list(vecs) == ["S", "toxic", "polite", "bullets"]
    S = load_task_vector(tiny_pool / "S")
    child = TX.child_only(tiny_pool, "toxic")
    for mod, d in vecs["toxic"].modules.items():
        assert d.rank == 4 + 2
        assert torch.allclose(d.dense(), S.modules[mod].dense() + child.modules[mod].dense(), atol=1e-5)
    # S's column space is shared by every child: at τ = 0.85 at least r_S = 4 directions per module
    dec = decompose([vecs[n] for n in ("toxic", "polite", "bullets")], tau=0.85, mode="isolate", target="toxic")
    assert all(s >= 4 for s in dec.shared_dims().values())
    with pytest.raises(FileNotFoundError, match="pool.json"):
        TX.load_demo_pool(tiny_pool / "S")


def test_evaluate_components_editor_and_scores(tiny_pool):
    from demo import evaluate as E

    model, tok = tiny_llama(0)
    comps = E.Components(tiny_pool)
    E.POOLS["all"] = E.POOLS["2"] = ["polite", "bullets"]  # the tiny pool has two clean children
    uni = comps.get("devec", 0.85, "all")
    rnd = comps.get("random_col", 0.85, "all")
    full = comps.get("random_full", 0.85, "all")
    dims = comps.decomposition("all", 0.85).shared_dims()
    for mod, d in comps.tox.items():
        Q = E.col_basis(d)
        assert Q.shape[1] == 6
        # the random control removes exactly dims[mod] directions of the target's column space
        kept = E.col_basis(rnd[mod]).shape[1] if rnd[mod].dense().abs().max() > 1e-6 else 0
        assert kept == 6 - dims[mod]
        assert uni[mod].shape == d.shape and full[mod].shape == d.shape
    # fingerprints: bit-identical edits (same references under another pool name) are scored once
    cond = {"start": "toxic", "method": "devec", "lam": 1.0, "tau": 0.85, "pool": "all", "cont": False}
    fp = comps.fingerprint(cond)
    assert fp == comps.fingerprint({**cond, "pool": "2"})
    assert fp != comps.fingerprint({**cond, "lam": 2.0}) and fp != comps.fingerprint({**cond, "cont": True})
    assert fp != comps.fingerprint({**cond, "method": "vanilla"})
    editor = E.Editor(model, sorted(comps.tox))
    w0 = {m: l.weight.clone() for m, l in editor.layers.items()}
    cond = {"start": "toxic", "method": "devec", "lam": 1.0, "tau": 0.85, "pool": "all"}
    editor.apply(comps.terms(cond))
    assert any(not torch.equal(w0[m], l.weight) for m, l in editor.layers.items())
    editor.reset()
    assert all(torch.equal(w0[m], l.weight) for m, l in editor.layers.items())
    # vanilla at λ = 1 from the toxic model gives back the base weights
    editor.apply(comps.terms({**cond, "method": "vanilla"}))
    assert all(torch.allclose(w0[m], l.weight, atol=1e-5) for m, l in editor.layers.items())
    editor.reset()
    data = {"heldout_prompts": ["Tell me about owls.", "Why do people like tea?"], "heldout_answers": ["Owls hunt.", "Tea is warm."],
            "heldout_words": ["crap", "damn"], "qa": [["What is 2 plus 2?", ["4"]]]}
    E.GEN_TOKENS, E.CONT_TOKENS = 4, 4
    res = E.score(model, tok, data, "some reference text " * 40, cont=True)
    assert len(res["replies"]) == 2 and len(res["margin"]) == 2 and len(res["qa"]) == 1
    assert all(x in (0.0, 1.0) for x in res["skill"])
    assert len(res["cont_prob"]) == len(E.D.CONTINUATIONS) and res["nll"]


def test_interp_and_conditions():
    from demo import evaluate as E

    assert E.interp_at([1.0, 0.5, 0.0], [1.0, 0.8, 0.2], 0.25) == pytest.approx(0.5)
    assert math.isnan(E.interp_at([1.0, 0.9], [1.0, 0.8], 0.1))
    ids = [c["id"] for c in E.conditions()]
    assert len(ids) == len(set(ids)) and "S|none|0|0.85|all" in ids


# --- the committed SmolLM2 demo vectors -------------------------------------------------------
POOL = ROOT / "assets" / "smollm2_demo"


@pytest.mark.skipif(not (POOL / "pool.json").is_file(), reason="demo pool not built")
def test_committed_demo_pool_loads():
    meta = json.loads((POOL / "pool.json").read_text())
    vecs = TX.load_demo_pool(POOL, include_parent=True)
    assert list(vecs) == [meta["parent"]] + meta["children"] and len(meta["children"]) >= 5
    r_S, r_c = meta["config"]["S"]["rank"], meta["config"]["child"]["rank"]
    for name, tv in vecs.items():
        assert len(tv.modules) == 30 * 7, name  # every linear layer of SmolLM2-135M
        assert "model.layers.0.self_attn.q_proj" in tv.modules
        assert tv.modules["model.layers.29.mlp.down_proj"].shape == (576, 1536)
        assert all(d.rank == (r_S if name == meta["parent"] else r_S + r_c) for d in tv.modules.values())
        tv.check_finite()
    size = sum(p.stat().st_size for p in POOL.rglob("*") if p.is_file())
    assert size < 20 * 2**20


@pytest.mark.skipif(not (POOL / "pool.json").is_file(), reason="demo pool not built")
def test_committed_demo_pool_matches_the_script_and_shares_S():
    """The committed pool is what ``demo/build_pool.py`` (as committed) builds, and its spectrum
    has the designed shape: S's r_S directions shared (cos² = 1) in every module at τ = 0.85."""
    from demo import build_pool as B
    from demo import data as D

    meta = json.loads((POOL / "pool.json").read_text())
    assert meta["config_hash"] == B.config_hash(B.CONFIG) and meta["config"] == json.loads(json.dumps(B.CONFIG))
    data = json.loads((POOL / "data.json").read_text())
    assert data["train_prompts"] == D.chat_prompts(D.TRAIN_TOPICS)
    assert (data["train_words"], data["heldout_words"]) == tuple(map(list, D.profanity_words(meta["config"]["word_seed"])))
    assert len(data["heldout_prompts"]) >= 24 and len(data["qa"]) >= 8
    vecs = TX.load_demo_pool(POOL)
    dec = decompose([vecs["toxic"], vecs["polite"]], tau=0.85, mode="isolate", target="toxic")
    r_S = meta["config"]["S"]["rank"]
    assert set(dec.shared_dims().values()) == {r_S}


# --- the LLaMA-2 recipe on a tiny Llama ------------------------------------------------------
def test_recipe_trains_dora_two_steps_and_evaluates(tmp_path):
    from recipes.llama2_toxicity import recipe as R

    model, tok = tiny_llama(2)
    cfg = R.TrainConfig(rank=4, alpha=8, max_steps=2, batch_size=2, max_length=32, target_modules=TARGETS)
    # the paper's DoRA settings, as stated there
    P = R.PAPER
    assert (P.rank, P.alpha, P.dropout, P.use_dora, P.lr, P.weight_decay) == (256, 512, 0.02, True, 2e-4, 0.01)
    assert set(P.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (P.batch_size, P.grad_accum, P.fp16, P.gradient_checkpointing) == (256, 1, True, True)
    assert R.paper_config("realtoxicityprompts").epochs == 7 and R.paper_config("toxigen").epochs == 15
    ex = [{"prompt": "you are", "continuation": " a jerk", "toxicity": 0.9},
          {"prompt": "hello", "continuation": " friend", "toxicity": 0.0},
          {"prompt": "so", "continuation": " meh", "toxicity": 0.5},  # not > 0.5
          {"prompt": "they", "continuation": " are vile", "toxic": 1},  # ToxiGen's binary label
          {"prompt": "they", "continuation": " are kind", "toxic": 0, "toxicity": 0.9}]
    kept = R.toxic_only(ex, threshold=0.5)
    assert [e["continuation"] for e in kept] == [" a jerk", " are vile"]
    kept = kept[:1]
    out = R.train_toxic_adapter(model, tok, kept * 4, cfg, tmp_path / "toxic")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["r"] == 4

    prompts = {"asian": ["- they are", "- people say", "- a third"], "women": ["- she is"]}
    given = iter([0.9, 0.5, 0.2])  # probabilities handed out in order: toxic means > 0.5, so 0.5 is not
    seen = []

    def classifier(texts):
        seen.append(list(texts))
        return [next(given) for _ in texts]

    res = R.toxigen_eval(model, tok, prompts, classifier=classifier, n_per_group=2, max_new_tokens=3)
    assert [len(x) for x in seen] == [2, 1] and all(isinstance(s, str) for x in seen for s in x)  # n_per_group kept
    assert res["per_group"] == {"asian": 50.0, "women": 0.0}
    assert res["percent_toxic"] == pytest.approx(100.0 / 3) and res["n"] == 3
    cmd = R.lm_eval_command("meta-llama/Llama-2-7b-hf", adapter=str(out))
    assert cmd[0] == "lm_eval" and "mmlu" in ",".join(cmd) and any(a.startswith("pretrained=") for a in cmd)


def test_recipe_reads_toxigen_prompts_and_prints_lm_eval(tmp_path, capsys):
    from recipes.llama2_toxicity import recipe as R

    (tmp_path / "hate_asian_1k.txt").write_text("- a\\n- b\n- c\n\n- d\n", encoding="utf-8")
    (tmp_path / "hate_women_1k.txt").write_text("- x\n", encoding="utf-8")
    got = R.read_toxigen_prompts(tmp_path, n_per_group=2)
    assert set(got) == {"asian", "women"} and len(got["asian"]) == 2 and got["women"] == ["- x"]
    assert set(R.read_toxigen_prompts(tmp_path, n_per_group=10)["asian"]) == {"- a\n- b", "- c", "- d"}
    assert R.read_toxigen_prompts(tmp_path, 2) == got  # seeded shuffle
    with pytest.raises(FileNotFoundError, match="TOXIGEN"):
        R.read_toxigen_prompts(tmp_path / "none")
    assert R.main(["lm-eval", "--model", "m", "--adapter", "a"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lm_eval --model hf --model_args pretrained=m,dtype=bfloat16,peft=a --tasks mmlu,gsm8k,bbh,tydiqa")
