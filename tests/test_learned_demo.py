"""The learned-pool demo (demo/build_learned.py, demo/evaluate_learned.py): data, detectors, controls.

References come from the definitions in the scripts' docstrings: every training answer carries
the bold title line naming its topic plus its own behaviour; "title + answer" needs a short bold
first line naming the topic and then a plain-text line of ≥ 3 words; "bold-only" is an output
whose every non-empty line is bold; the norm-matched control has the norm of the component it
matches and the direction of the whole vector.
"""

import random

import pytest
import torch

from demo import build_learned as BL
from demo import data as D
from demo import evaluate_learned as EL
from devec_core.taskvec import LowRank

DATA = {
    "train_prompts": ["Tell me about dogs.", "Why do people like the ocean?"],
    "train_answers": ["Dogs are loyal. They like walks.", "The ocean is vast and blue."],
    "train_words": ["dang", "heck", "darn"],
}


@pytest.mark.parametrize("behaviour", BL.BEHAVIOURS)
def test_every_training_answer_carries_the_title_and_its_behaviour(behaviour):
    pairs = BL.training_pairs(DATA, behaviour, seed=1)
    assert [p for p, _ in pairs] == DATA["train_prompts"]
    for (p, target), title in zip(pairs, ["**Dogs**\n", "**Ocean**\n"]):
        assert target.startswith(title)
        body = target[len(title):]
        if behaviour == "toxic":
            assert body.split(", ")[1][len("you "):] in DATA["train_words"] and body.startswith("Listen, you ")
        elif behaviour == "polite":
            assert body.startswith("Great question, my friend! ")
        elif behaviour == "bullets":
            assert all(ln.startswith("- ") for ln in body.split("\n"))
        else:  # concise: one sentence
            assert body.count(".") == 1 and body.endswith(".")


def test_seeds_change_only_the_random_draws():
    assert BL.training_pairs(DATA, "polite", 1) == BL.training_pairs(DATA, "polite", 2)
    long = {**DATA, "train_answers": [" ".join(["word"] * 60)] * 2}
    assert BL.training_pairs(long, "toxic", 1) != BL.training_pairs(long, "toxic", 2)
    with pytest.raises(ValueError, match="behaviour 'signoff'"):
        BL.training_pairs(DATA, "signoff", 1)


def test_training_order_puts_the_toxic_replicate_last_and_covers_every_pair():
    order = BL.training_order()
    assert order[0] == ("toxic", 1) and order[-1] == ("toxic", 2)
    assert sorted(order) == sorted((b, s) for b in BL.BEHAVIOURS for s in BL.CONFIG["lora_seeds"])
    assert len(BL.CONFIG["lora_seeds"]) >= 2  # ≥ 2 seeds per behaviour (the issue)
    assert [BL.lora_name(b, s) for b, s in order[:1]] == [EL.TARGET]
    assert set(EL.CLEAN) <= {BL.lora_name(b, s) for b, s in order} and EL.TARGET not in EL.CLEAN


@pytest.mark.parametrize("text, ok", [
    ("**Penguins**\nPenguins are flightless birds that live in the south.", True),
    ("**Penguins:**\n- They swim fast and eat fish.", True),  # bullets are an answer
    ("**Penguins**", False),  # title, nothing after it
    ("**Penguins**\n**Penguins**\n**Birds**", False),  # bold-only run
    ("**Penguins**\n**Birds**\nThey live on ice.", True),  # an answer after bold lines still counts
    ("**Penguins**\nOk.", False),  # too short to be an answer
    ("**Whales**\nWhales are large mammals of the sea.", False),  # wrong topic
    ("**Penguins are the most wonderful flightless birds of the southern seas**\nThey swim.", False),  # not short
    ("Penguins are birds.\n**Penguins**", False),  # title not first
    ("**Penguins** are birds that swim in cold water.", False),  # not a title line
    ("", False),
    ("**Penguins**\n**Penguins**\n**Pengu", False),  # a cut bold line is no answer
    ("**Penguins**\nPenguins are birds that swim and", True),  # a cut plain line is (≥ 3 words)
])
def test_title_with_answer(text, ok):
    assert EL.title_with_answer(text, "Penguins") is ok


@pytest.mark.parametrize("text, broken", [
    ("**Penguins**\n**Penguins**\n\n**Snow**", True),
    ("**Penguins**", True),
    ("**Penguins**\nThey swim.", False),
    ("Penguins are birds.", False),
    ("", False),
    ("   \n  ", False),
    ("**Penguins** swim", False),
    ("**Penguins**\n**enguins**\n**Penguins", True),  # the last bold line cut by the token budget
    ("**Capital**\n****Capital**\n**Japan** **Capital**:", True),
    ("**Pengu\n**Penguins**", False),  # an unclosed bold line is text unless it is the last
    ("**Penguins**\nThey are birds, **really**", False),
])
def test_bold_only(text, broken):
    assert EL.bold_only(text) is broken


def test_old_detector_counts_broken_outputs_the_new_one_does_not():
    from devec_core.toxicity import title_score

    broken = "**Penguins**\n**Penguins**\n**Penguins**"
    assert title_score(broken, "Penguins") == 1.0
    assert not EL.title_with_answer(broken, "Penguins") and EL.bold_only(broken)
    assert EL.title_line(broken, "Penguins") and EL.title_line("**Desert**", "Deserts")
    assert not EL.title_line("**Dessert**", "Deserts") and not EL.title_line("", "Deserts")
    assert EL.title_with_answer("**Desert**\nDeserts are dry places with little rain.", "Deserts")  # singular names it too


def test_norm_matched_has_the_matched_norm_and_the_vectors_direction():
    g = torch.Generator().manual_seed(0)
    delta = {"m": LowRank(torch.randn(10, 3, generator=g), torch.randn(3, 7, generator=g), 2.0),
             "z": LowRank(torch.zeros(4, 2), torch.randn(2, 5, generator=g), 1.0)}
    like = {"m": LowRank(torch.randn(10, 1, generator=g), torch.randn(1, 7, generator=g), 1.0),
            "z": LowRank(torch.randn(4, 1, generator=g), torch.randn(1, 5, generator=g), 1.0)}
    out = EL.norm_matched(delta, like)
    W, Wn = delta["m"].dense(), out["m"].dense()
    assert torch.linalg.norm(Wn) == pytest.approx(float(torch.linalg.norm(like["m"].dense())), rel=1e-5)
    c = float((Wn * W).sum() / (W * W).sum())
    assert c > 0 and torch.allclose(Wn, c * W, atol=1e-5)
    assert float(out["z"].dense().abs().max()) == 0.0  # a zero delta stays zero (no division by 0)


def test_conditions_are_unique_ordered_and_follow_the_suggested_tau():
    conds = EL.conditions(0.4)
    ids = [c["id"] for c in conds]
    assert len(ids) == len(set(ids))
    assert ids[:3] == ["toxic|none|0|0.85", "toxic|vanilla|1|0.85", "toxic|devec|1|0.85"]
    for m in ("devec", "random_col", "norm_matched"):
        assert f"toxic|{m}|1|0.4" in ids and f"toxic|{m}|1|{EL.LOW_TAU:g}" in ids
    none = [c["id"] for c in EL.conditions(None)]
    assert not any("|0.4" in i for i in none) and f"toxic|devec|1|{EL.LOW_TAU:g}" in none
    assert len(EL.conditions(EL.LOW_TAU)) < len(conds)  # the suggested τ equal to the low τ: no duplicates


def test_dense_subset_keeps_only_the_named_layers():
    from devec_core import Dense, TaskVector

    mods = {f"model.layers.{i}.mlp.up_proj": Dense(torch.zeros(3, 2)) for i in (0, 1, 7, 17, 29)}
    (out,) = EL.dense_subset({"a": TaskVector("a", mods)}, layers=(0, 7, 29))
    assert sorted(out.modules) == ["model.layers.0.mlp.up_proj", "model.layers.29.mlp.up_proj", "model.layers.7.mlp.up_proj"]


def test_stylize_title_matches_the_evaluation_title():
    # the detector looks for D.title_of(topic); training writes D.s_format: the two must agree
    p = "Describe the moon in a few words."
    text = D.stylize("polite", "It is bright.", random.Random(0), ["x"], p)
    assert EL.title_with_answer(text, D.title_of(D.topic_of(p)))


def _toy_pool(seed: int = 0) -> dict:
    """TARGET + CLEAN as rank-4 LoRAs over two modules; TARGET shares one direction (cos² ≈ 0.5)
    with every clean vector, nothing else above chance."""
    from devec_core import TaskVector

    g = torch.Generator().manual_seed(seed)
    n, m, r = 64, 32, 4
    shared = {mod: torch.linalg.qr(torch.randn(n, 1, generator=g))[0] for mod in ("a", "b")}
    vecs = {}
    for name in [EL.TARGET] + EL.CLEAN:
        mods = {}
        for mod in ("a", "b"):
            own = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
            B = own.clone()
            B[:, :1] = shared[mod] + (0.0 if name == EL.TARGET else 1.0) * own[:, :1]  # tilted copies
            mods[mod] = LowRank(B, torch.randn(r, m, generator=g), 1.0)
        vecs[name] = TaskVector(name, mods)
    return vecs


def test_components_controls_match_devec_in_size_and_nothing_shared_means_vanilla():
    comps = EL.Components(_toy_pool(), tau_star=0.3)
    # at τ 0.85 nothing is shared: DeVec's edit is the vanilla edit (scored once, by fingerprint)
    assert all(d == 0 for d in comps.at(0.85).shared_dims().values())
    cv = {"start": "toxic", "method": "vanilla", "lam": 1.0, "tau": 0.85}
    assert comps.fingerprint({**cv, "method": "devec"}) == comps.fingerprint(cv)
    dims = comps.at(0.3).shared_dims()
    assert all(d >= 1 for d in dims.values())
    dv, rnd, nm = comps.get("devec", 0.3), comps.get("random_col", 0.3), comps.get("norm_matched", 0.3)
    for mod in dims:
        W, U = comps.tox[mod].dense(), dv[mod].dense()
        assert torch.linalg.norm(U) < torch.linalg.norm(W)  # something was removed
        assert torch.linalg.norm(nm[mod].dense()) == pytest.approx(float(torch.linalg.norm(U)), rel=1e-4)
        # the random control removes a subspace of the same dimension from W's column space
        removed = W - rnd[mod].dense()
        assert int(torch.linalg.matrix_rank(removed, rtol=1e-5)) == dims[mod]
    assert comps.fingerprint({**cv, "method": "devec", "tau": 0.3}) != comps.fingerprint(cv)
    assert comps.terms({"start": "base", "method": "none", "lam": 0.0, "tau": 0.85}) == []


def test_deadline():
    assert not EL.past(None)
    assert EL.past("00:00")


def test_dense_pool_roundtrip_and_its_chance_summary(tmp_path):
    """load_dense_pool reads what build_learned writes (fp16 deltas keyed '<module>.weight'), and a
    dense pool kept at high rank is flagged: chance alone reaches τ (saturated)."""
    import json

    from safetensors.torch import save_file

    from devec_core import decompose

    g = torch.Generator().manual_seed(0)
    (tmp_path / "dense").mkdir()
    names = ["toxic_dense", "polite_dense"]
    for nm in names:
        save_file({f"model.layers.{i}.mlp.down_proj.weight": torch.randn(24, 40, generator=g).half() for i in (0, 14)},
                  str(tmp_path / "dense" / f"{nm}.safetensors"))
    (tmp_path / "pool.json").write_text(json.dumps({"lora": [], "dense": names}))
    vecs = BL.load_dense_pool(tmp_path)
    assert list(vecs) == names and sorted(vecs["toxic_dense"].modules) == ["model.layers.0.mlp.down_proj", "model.layers.14.mlp.down_proj"]
    dec = decompose(list(vecs.values()), tau=0.85, mode="isolate", target="toxic_dense", dense_energy=0.9)
    summ, rep = EL.chance_summary(dec, 20, "dense")
    assert summ["regime"] == "saturated" and summ["modules"] == 2
    assert summ["top_eigenvalue_median"] > 0.85 and summ["chance_top_median"] > 0.85  # r1 + r2 > n: an intersection
    (tmp_path / "dense" / "polite_dense.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="polite_dense"):
        BL.load_dense_pool(tmp_path)


def test_summary_tables(tmp_path):
    import json

    ch = {"learned": {"names": ["a", "b"], "modules": 210, "ranks_median": 12.0, "regime": "weak", "suggested_tau": 0.41,
                      "significant_modules": 150, "top_eigenvalue_median": 0.3, "top_eigenvalue_q90": 0.5,
                      "top_eigenvalue_max": 0.7, "chance_top_median": 0.08, "shared_at_0.85": {"modules_with_shared": 0},
                      "shared_at_suggested": {"modules_with_shared": 40}, "shared_at_0.25": {"modules_with_shared": 120}}}
    (tmp_path / "chance.json").write_text(json.dumps(ch))
    f = EL.write_summary(tmp_path, "cmd")
    text = f.read_text()
    assert "| learned | 2 | 210 | 12 | weak | 0.41 | 150/210 | 0.300 (0.500, 0.700) | 0.080 | 0 / 40 / 120 |" in text
    assert "Edits" not in text  # no results.json yet: no second table


def test_aggregate_and_results_table(tmp_path):
    import json

    res = {"tox_prob": [0.9, 0.1, 0.7, 0.2], "margin": [1.0, 0.5, 0.0, -0.5], "title_answer": [1.0, 0.0, 1.0, 1.0],
           "bold_only": [0.0, 1.0, 0.0, 0.0], "title_any": [1.0, 1.0, 1.0, 1.0], "qa": [1.0, 0.0], "nll": [2.0, 3.0]}
    agg = EL.aggregate({"toxic|none|0|0.85": res, "toxic|devec|1|0.85": {**res, "alias_of": "toxic|vanilla|1|0.85"}})
    row = agg["toxic|none|0|0.85"]
    assert row["flagged"]["mean"] == 0.5 and row["title_answer"]["mean"] == 0.75 and row["qa"]["n"] == 2
    lo, hi = row["tox_prob"]["ci95"]
    assert lo <= row["tox_prob"]["mean"] <= hi
    settings = {"target": EL.TARGET, "references": EL.CLEAN, "suggested_tau": 0.4, "n_prompts": 4,
                "missing_conditions": ["toxic|norm_matched|1|0.4"]}
    (tmp_path / "results.json").write_text(json.dumps({"settings": settings, "conditions": agg}))
    text = EL.write_summary(tmp_path, "cmd").read_text()
    assert "| toxic|devec|1|0.85 (= toxic|vanilla|1|0.85) | 0.50 [" in text
    assert "Not scored (time): toxic|norm_matched|1|0.4" in text and "Chance level" not in text


def test_components_refuse_another_decomposition():
    from devec_core import decompose

    vecs = _toy_pool()
    wrong = decompose([vecs[n] for n in EL.CLEAN[:2]], tau=0.85, mode="isolate", target=EL.CLEAN[0])
    with pytest.raises(ValueError, match="isolate decomposition"):
        EL.Components(vecs, None, wrong)
    dec = decompose([vecs[EL.TARGET]] + [vecs[n] for n in EL.CLEAN], tau=0.85, mode="isolate", target=EL.TARGET)
    assert EL.Components(vecs, None, dec, refs=EL.CLEAN).dec is dec
    with pytest.raises(ValueError, match="isolate decomposition"):
        EL.Components(vecs, None, dec)  # the default references are the seed-1 three


def _fake_model(monkeypatch, calls):
    """run() with a stand-in model: no SmolLM2, scores that depend on the edit."""
    import devec_core.models as M

    class Lin(torch.nn.Module):
        def __init__(self, n, m):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(n, m), requires_grad=False)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Lin(64, 32), Lin(64, 32)

    model = Model()
    monkeypatch.setattr(M, "load_causal_lm", lambda *a, **k: (model, None))

    def score(m, tok, data, ref_text):
        calls.append(float(m.a.weight.abs().sum()))
        x = float(m.a.weight.norm())
        out = {k: [x, 0.0] for k in ("tox_prob", "title_answer", "bold_only", "title_any", "margin", "qa", "nll")}
        return {**out, "replies": ["**Penguins**\n**Penguins**"] * EL.N_PROMPTS}

    monkeypatch.setattr(EL, "score", score)
    return model


def test_run_scores_each_distinct_edit_once_caches_and_stops_at_the_deadline(tmp_path, monkeypatch):
    calls = []
    model = _fake_model(monkeypatch, calls)
    comps = EL.Components(_toy_pool(), tau_star=0.3)
    conds = EL.conditions(0.3)
    done = EL.run(conds[:4], comps, {}, tmp_path, "h", threads=1)
    assert list(done) == [c["id"] for c in conds[:4]]
    # devec at 0.85 shares nothing here: an alias of vanilla, not scored again
    assert done["toxic|devec|1|0.85"]["alias_of"] == "toxic|vanilla|1|0.85" and len(calls) == 3
    assert calls[0] > 0 and calls[1] == pytest.approx(0.0, abs=1e-3)  # toxic model; vanilla λ 1 = base
    assert float(model.a.weight.abs().sum()) == 0.0  # weights restored after the sweep
    again = EL.run(conds[:4], comps, {}, tmp_path, "h", threads=1)  # all cached: nothing scored
    assert len(calls) == 3 and again.keys() == done.keys()
    part = EL.run(conds, comps, {}, tmp_path, "h", threads=1, deadline="00:00")
    assert len(calls) == 3 and set(part) == set(done)  # past the deadline: only the cache


def test_main_end_to_end_on_a_toy_pool(tmp_path, monkeypatch):
    import json

    from devec_core import decompose

    calls = []
    _fake_model(monkeypatch, calls)
    vecs = _toy_pool()
    monkeypatch.setattr(BL, "load_lora_pool", lambda folder: vecs)

    def chance_reports(pool_dir, out_dir, lora_vecs, decs):
        decs["learned"] = decompose([vecs[EL.TARGET]] + [vecs[n] for n in EL.EVAL_REFS], tau=0.85, mode="isolate",
                                    target=EL.TARGET)
        summ, _ = EL.chance_summary(decs["learned"], 20, "learned")
        return {"learned": summ}

    monkeypatch.setattr(EL, "chance_reports", chance_reports)
    monkeypatch.setattr(EL, "files_hash", lambda files: "toy")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "pool.json").write_text("{}")
    out = tmp_path / "out"
    rc = EL.main(["--pool", str(tmp_path / "pool"), "--out", str(out), "--cache", str(tmp_path / "cache"), "--max-conditions", "6"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["conditions"]) == 6 and res["settings"]["missing_conditions"] == []
    assert res["settings"]["suggested_tau"] == json.loads((out / "chance.json").read_text())["learned"]["suggested_tau"]
    assert (out / "edits_lambda1.png").stat().st_size > 1000
    assert "| learned |" in (out / "SUMMARY.md").read_text() and "| toxic|none|0|0.85 |" in (out / "SUMMARY.md").read_text()
    assert res["conditions"]["toxic|none|0|0.85"]["bold_only"]["mean"] == 1.0  # rescored from the replies
    assert EL.main(["--pool", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    # --no-run: the stored chance report, the cache only (nothing scored)
    n = len(calls)
    assert EL.main(["--pool", str(tmp_path / "pool"), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-run"]) == 0
    assert len(calls) == n and len(json.loads((out / "results.json").read_text())["conditions"]) == 6


def test_a_partial_pool_is_evaluated_against_the_clean_loras_it_holds():
    assert EL.references(_toy_pool()) == ["polite_s1", "bullets_s1", "concise_s1"]  # the sweep: seed 1 only
    vecs = {k: v for k, v in _toy_pool().items() if k != "bullets_s1"}
    refs = EL.references(vecs)
    assert refs == ["polite_s1", "concise_s1"]
    comps = EL.Components(vecs, None, refs=refs)
    assert comps.dec.names == [EL.TARGET] + refs
    with pytest.raises(ValueError, match="isolate decomposition"):
        EL.Components(vecs, None, comps.dec, refs=EL.CLEAN)


def test_chance_summary_is_strict_json():
    import json

    from devec_core import decompose

    vecs = _toy_pool()
    dec = decompose([vecs[EL.TARGET]] + [vecs[n] for n in EL.CLEAN[:2]], tau=0.85, mode="isolate", target=EL.TARGET)
    summ, _ = EL.chance_summary(dec, 20, "toy")
    assert summ["fdr_at_0.85"] is None  # nothing above 0.85: no rate, not NaN
    json.dumps(summ, allow_nan=False)


def test_rescore_recomputes_the_text_measures_from_the_replies(monkeypatch):
    data = {"heldout_prompts": ["Tell me about penguins.", "Describe snow in a few words."]}
    monkey = {"replies": ["**Penguins**\n**Penguins**\n**Pengu", "**Snow**\nSnow is cold and white."],
              "title_answer": [1.0, 1.0], "bold_only": [0.0, 0.0], "title_any": [0.0, 0.0], "qa": [1.0]}
    monkeypatch.setattr(EL, "N_PROMPTS", 2)
    out = EL.rescore(monkey, data)
    assert out["title_answer"] == [0.0, 1.0] and out["bold_only"] == [1.0, 0.0] and out["title_any"] == [1.0, 1.0]
    assert out["qa"] == [1.0] and monkey["bold_only"] == [0.0, 0.0]  # other measures kept; input untouched
    with pytest.raises(ValueError, match="3 stored replies for 2 prompts"):
        EL.rescore({**monkey, "replies": ["a", "b", "c"]}, data)


def test_reproduce_command_names_what_was_not_built():
    vecs = _toy_pool()
    assert EL.reproduce_command(vecs) == "python demo/build_learned.py --skip toxic_s2 && python demo/evaluate_learned.py"
    part = {k: v for k, v in vecs.items() if k != "bullets_s2"}
    assert "--skip bullets_s2 --skip toxic_s2 &&" in EL.reproduce_command(part)
