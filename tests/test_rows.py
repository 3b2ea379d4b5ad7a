"""Both sides in one pass (devec_core.mix.rows, LLMBackend.side_by_side): each row of a batch
answers as the model with that row's mix fused would, no weight is written, no hook is left, a
row's text does not depend on its neighbours, and the decoding loop is transformers' own
greedy search and sampling distribution."""

import threading

import pytest
import torch

from devec_core import Dense, TaskVector, decompose
from devec_core.backends.llm import LLMBackend, sampling_probs
from devec_core.mix import VectorPool, devec, rows, vanilla
from tests.tiny_models import llama_vectors, tiny_llama

GEN = dict(max_new_tokens=10)
SAMPLED = dict(GEN, do_sample=True, temperature=0.9, top_p=0.9, seed=5)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _mixes(vecs):
    pool, dec = VectorPool(vecs), decompose(vecs, mode="joint")
    return [None, vanilla(pool, {"v1": 1.0, "v2": 0.5}), devec(dec, {"v1": 1.0, "v2": -0.7}, shared=0.4, label="dv"),
            vanilla(pool, {"v3": 1.5}, label="v3")]


@pytest.mark.parametrize("settings", [GEN, SAMPLED], ids=["greedy", "sampled"])
def test_rows_answer_as_the_fused_model(llm, settings):
    """Reference: each mix fused into the weights (WeightEditor.apply), answered alone."""
    b, vecs = llm
    mixes = _mixes(vecs)
    b.apply(vanilla(VectorPool(vecs), {"v2": 2.0}))  # an unrelated mix fused now: rows are differences to it
    before = _state(b.model)
    got = b.side_by_side("tell me a story", mixes, **settings)
    assert all(torch.equal(v, before[k]) for k, v in _state(b.model).items())  # no weight written
    assert _hooks(b.model) == 0
    assert [r.rows for r in got] == [4] * 4 and all(r.switch_s == 0 for r in got)
    want = [b.render("tell me a story", m, **settings) for m in mixes]
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert len({tuple(r.token_ids) for r in want}) > 1  # the mixes do answer differently
    b.restore()


def test_row_logits_match_fused_logits(llm):
    """Forward pass of a batch under the hooks vs the fused model, row by row (float32 rounding)."""
    b, vecs = llm
    mixes = _mixes(vecs)
    ids = b.tokenizer("hello there friend", return_tensors="pt")["input_ids"]
    b.restore()
    deltas = rows.row_deltas(b.editor, mixes)
    with torch.no_grad(), rows.hooked(b.model, deltas):
        batch = b.model(ids.expand(len(mixes), -1)).logits
    for r, m in enumerate(mixes):
        b.apply(m)
        with torch.no_grad():
            alone = b.model(ids).logits[0]
        torch.testing.assert_close(batch[r], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    b.restore()


def test_a_row_does_not_depend_on_its_neighbours(llm):
    b, vecs = llm
    m = _mixes(vecs)
    b.restore()
    a = b.side_by_side("once upon", [m[1], m[2]], **SAMPLED)
    c = b.side_by_side("once upon", [m[1], m[3], m[0]], **SAMPLED)
    alone = b.side_by_side("once upon", [m[1]], **SAMPLED)[0]
    assert a[0].token_ids == c[0].token_ids == alone.token_ids


def test_same_mix_twice_gives_the_same_row(llm):
    b, vecs = llm
    m = _mixes(vecs)[2]
    x, y = b.side_by_side("hi", [m, m], **SAMPLED)
    assert x.token_ids == y.token_ids


def test_hooks_removed_after_an_error(llm):
    b, vecs = llm
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.side_by_side("hi", _mixes(vecs), max_new_tokens=0)
    assert _hooks(b.model) == 0
    deltas = rows.row_deltas(b.editor, _mixes(vecs))
    with pytest.raises(RuntimeError, match="rows"), rows.hooked(b.model, deltas):
        b.model(torch.ones(1, 3, dtype=torch.long))  # a batch of 1 under 4 rows' deltas
    assert _hooks(b.model) == 0


def test_dense_terms_fall_back_to_fusing(llm):
    """A dense delta is not a low-rank row difference: the mixes are fused in turn, same answers."""
    b, vecs = llm
    mod, d = next(iter(vecs[0].modules.items()))
    dense = VectorPool([TaskVector("d", {mod: Dense(d.dense() * 3)})])
    mixes = [vanilla(dense, {"d": 1.0}), None]
    b.restore()
    assert rows.row_deltas(b.editor, mixes) is None
    got = b.side_by_side("tell me", mixes, **GEN)
    assert got[0].rows == 1 and got[0].apply.modules_written == 1
    assert got[0].token_ids == b.render("tell me", mixes[0], **GEN).token_ids
    b.restore()


def test_two_threads_batched_match_sequential(llm):
    b, vecs = llm
    m = _mixes(vecs)
    pairs = [[m[1], m[2]], [m[3], m[0]]]
    b.restore()
    want = [[r.token_ids for r in b.side_by_side("story", p, **SAMPLED)] for p in pairs]
    got, errors = [[], []], []

    def worker(i):
        try:
            for _ in range(4):
                got[i].append([r.token_ids for r in b.side_by_side("story", pairs[i], **SAMPLED)])
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert all(x == want[0] for x in got[0]) and all(x == want[1] for x in got[1])
    assert _hooks(b.model) == 0


def test_greedy_loop_is_transformers_greedy_search(llm):
    b, _ = llm
    b.restore()
    enc = b._encode("what is this", None, True)
    ref = b.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=b.tokenizer.pad_token_id)
    ours = b.generate("what is this", max_new_tokens=10)
    assert ours.token_ids == ref[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 50, 0.95), (1.3, 5, 1.0), (1.0, 0, 0.5), (0.5, 3, 0.3)])
def test_sampling_distribution_is_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=g) * 3
    logits[1, :10] = 5.0  # ties at the k-th value
    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    ref = LogitsProcessorList(procs)(torch.zeros(3, 1, dtype=torch.long), logits.clone()).softmax(-1)
    for r in range(3):
        torch.testing.assert_close(sampling_probs(logits[r], temperature, top_k, top_p), ref[r], rtol=0, atol=1e-7)


@pytest.mark.parametrize("top_k,top_p", [(50, 0.95), (4, 1.0), (3, 0.4)])
def test_sampled_tokens_follow_the_full_distribution(top_k, top_p):
    """``_sample`` works on the top-k tokens only: its draws must follow ``sampling_probs`` over the
    whole vocabulary (chi-square-like check on 4000 draws; ties at the k-th value included)."""
    from devec_core.backends.llm import _sample

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=g)
    logits[[3, 7, 11]] = 2.5  # a tie that straddles small k
    p = sampling_probs(logits, 0.8, top_k, top_p)
    gen = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.tensor([_sample(logits, 0.8, top_k, top_p, gen) for _ in range(4000)]), minlength=200).double()
    assert counts[p == 0].sum() == 0  # nothing outside the support
    expected = 4000 * p.double()
    sup = p > 0
    assert float(((counts[sup] - expected[sup]) ** 2 / expected[sup]).sum()) < 3 * int(sup.sum()) + 30


def test_bfloat16_model_rows_run_in_float32_and_track_the_fused_logits():
    """A bf16 model (the dtype on accelerators): the row differences are added in float32 and cast
    to the layer's output dtype; logits stay within bf16 rounding of the fused model's."""
    model, tok = tiny_llama(seed=0)
    vecs = llama_vectors(model, seeds=(1, 2))
    b = LLMBackend(model.to(torch.bfloat16), tok)
    mixes = [None, vanilla(VectorPool(vecs), {"v1": 1.0, "v2": 1.0})]
    ids = tok("hello there friend", return_tensors="pt")["input_ids"]
    with torch.no_grad(), rows.hooked(b.model, rows.row_deltas(b.editor, mixes)):
        batch = b.model(ids.expand(2, -1)).logits.float()
    b.apply(mixes[1])
    with torch.no_grad():
        fused = b.model(ids).logits[0].float()
    b.restore()
    assert batch.dtype == torch.float32 and torch.isfinite(batch).all()
    err, moved = (batch[1] - fused).abs().max(), (batch[1] - batch[0]).abs().max()
    assert err < 0.1 * moved  # far closer to the fused mix than to the base
    res = b.side_by_side("hi", mixes, max_new_tokens=4)
    assert [r.rows for r in res] == [2, 2] and _hooks(b.model) == 0
