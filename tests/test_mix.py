"""Mixes and the WeightEditor on small torch models (no diffusers/transformers needed)."""

import pytest
import torch

from devec_core import Dense, LowRank, TaskVector, decompose
from devec_core.mix import Component, Mix, VectorPool, WeightEditor, devec, vanilla


class Net(torch.nn.Module):
    """Three Linear layers under dotted paths, like a transformer's blocks."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.ModuleDict({"q": torch.nn.Linear(8, 6), "o": torch.nn.Linear(6, 8)}) for _ in range(2)]
        )
        self.head = torch.nn.Linear(8, 4)
        self.to(dtype)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["o"](torch.tanh(b["q"](x)))
        return self.head(x)


MODS = {"blocks.0.q": (6, 8), "blocks.0.o": (8, 6), "blocks.1.q": (6, 8), "blocks.1.o": (8, 6), "head": (4, 8)}


def lora_vec(name, seed, modules=MODS, rank=2, scale=0.3, extras=None):
    g = torch.Generator().manual_seed(seed)
    mods = {m: LowRank(torch.randn(n, rank, generator=g) * scale, torch.randn(rank, k, generator=g), 1.0) for m, (n, k) in modules.items()}
    return TaskVector(name, mods, extras or {})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hand_set(model, parts):
    """Weights set by hand: W0 + Σ λ·dense(part), float32 — the reference for a fused mix."""
    with torch.no_grad():
        for lam, comp in parts:
            for mod, d in comp.items():
                w = model.get_submodule(mod).weight
                w.add_(lam * d.dense(torch.float32).to(w.dtype))
    return model


# --- the mix value -----------------------------------------------------------------------------
def test_component_parse_and_errors():
    assert Component.parse("unique:a") == Component("unique", "a")
    assert str(Component("merged_shared")) == "merged_shared"
    with pytest.raises(ValueError, match="Unknown component kind 'bogus'"):
        Component("bogus", "a")
    with pytest.raises(ValueError, match="needs a name"):
        Component("unique")


def test_mix_terms_normalise_and_sum():
    pool = VectorPool([lora_vec("a", 1), lora_vec("b", 2)])
    m = Mix(pool, [("delta", "a", 1), (("delta", "b"), 0.5), ("delta:a", -1), (Component("delta", "b"), 0.25)])
    assert m.active() == {Component("delta", "b"): 0.75}  # a cancels out and is dropped
    with pytest.raises(ValueError, match="coefficient is nan"):
        Mix(pool, [("delta", "a", float("nan"))])
    assert "0.5·delta:b" in vanilla(pool, {"b": 0.5}).describe()
    spec = m.to_spec()
    assert spec["terms"][0] == ["delta:a", 1.0]
    assert Mix.from_spec(pool, spec) == m


# --- fusing ------------------------------------------------------------------------------------
def test_apply_restore_identity_and_change_only():
    net, pool = Net(), VectorPool([lora_vec("a", 1), lora_vec("b", 2, modules={"head": (4, 8)})])
    base = snapshot(net)
    ed = WeightEditor(net)
    s = ed.apply(vanilla(pool, {"a": 1.0, "b": 0.5}))
    assert s.modules_written == 5 and not same(snapshot(net), base)
    assert ed.apply(vanilla(pool, {"a": 1.0, "b": 0.5})).modules_written == 0  # nothing changed
    assert ed.apply(vanilla(pool, {"a": 1.0, "b": 0.7})).modules_written == 1  # only "head"
    assert ed.apply(vanilla(pool, {"a": 1.0, "b": 0.0})).modules_written == 1
    ed.restore()
    assert same(snapshot(net), base)
    ed.apply(vanilla(pool, {"a": 2.0}))
    ed.apply(None)  # the base mix also restores exactly
    assert same(snapshot(net), base)


def test_switch_cost_does_not_grow_with_unchanged_components():
    """30 loaded components, 1 changed: the same modules are rewritten as with 3 loaded."""
    vecs = [lora_vec(f"v{i}", i, modules={m: MODS[m]}) for i, m in enumerate(list(MODS) * 6)]
    pool = VectorPool(vecs)
    counts = []
    for n in (3, 30):
        net = Net()
        ed = WeightEditor(net)
        w = {f"v{i}": 0.5 for i in range(n)}
        ed.apply(vanilla(pool, w))
        w["v0"] = 0.9
        counts.append(ed.apply(vanilla(pool, w)).modules_written)
    assert counts == [1, 1]


def test_fused_mix_equals_weights_set_by_hand():
    vecs = [lora_vec("a", 1), lora_vec("b", 2), lora_vec("c", 3)]
    for v in vecs[1:]:  # plant one shared output direction per module
        for m, d in v.modules.items():
            d.B[:, 0] = vecs[0].modules[m].B[:, 0] * 2
    dec = decompose(vecs, mode="joint")
    assert min(dec.shared_dims().values()) >= 1
    mix = devec(dec, {"a": 1.0, "b": -0.5, "c": 0.75}, shared=0.3)
    net, ref = Net(), Net()
    WeightEditor(net).apply(mix)
    hand_set(ref, [(1.0, dec.component("unique", "a")), (-0.5, dec.component("unique", "b")),
                   (0.75, dec.component("unique", "c")), (0.3, dec.component("merged_shared"))])
    for k, v in snapshot(ref).items():
        torch.testing.assert_close(snapshot(net)[k], v, rtol=0, atol=1e-6)
    x = torch.randn(3, 8)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-5)


def test_coefficient_zero_is_base_and_history_does_not_matter():
    pool = VectorPool([lora_vec("a", 1), lora_vec("b", 2)])
    net = Net()
    base = snapshot(net)
    ed = WeightEditor(net)
    ed.apply(vanilla(pool, {"a": 0.0, "b": 0.0}))
    assert same(snapshot(net), base)
    ed.apply(vanilla(pool, {"a": 1.0, "b": 1.0}))
    after_ab = snapshot(net)
    ed.apply(vanilla(pool, {"a": -3.0}))
    ed.apply(vanilla(pool, {"b": 1.0, "a": 1.0}))  # other order, after a detour
    assert same(snapshot(net), after_ab)


def test_dense_components_and_extras_follow_their_vector():
    g = torch.Generator().manual_seed(5)
    dense = TaskVector("d", {"head": Dense(torch.randn(4, 8, generator=g))}, {"head.bias": torch.ones(4)})
    pool = VectorPool([dense])
    net = Net()
    base = snapshot(net)
    ed = WeightEditor(net)
    ed.apply(vanilla(pool, {"d": 0.5}))
    torch.testing.assert_close(net.head.weight, base["head.weight"] + 0.5 * dense.modules["head"].W, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.head.bias, base["head.bias"] + 0.5, rtol=0, atol=1e-6)
    ed.apply(vanilla(pool, {"d": 0.0}))
    assert same(snapshot(net), base)


def test_low_precision_accumulates_in_float32():
    vec = lora_vec("a", 1)
    net = Net(torch.bfloat16)
    w0 = net.head.weight.detach().clone()
    WeightEditor(net).apply(vanilla(VectorPool([vec]), {"a": 0.37}))
    want = (w0.float() + 0.37 * vec.modules["head"].dense(torch.float32)).to(torch.bfloat16)
    assert torch.equal(net.head.weight, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float32: the one-pass path's bound
def test_non_finite_results_are_refused_and_rolled_back(dtype):
    big = TaskVector("big", {"blocks.0.q": LowRank(torch.ones(6, 1), torch.ones(1, 8)),
                             "head": LowRank(torch.full((4, 1), 1e30), torch.full((1, 8), 1e30))})
    ok = lora_vec("ok", 1)
    net = Net(dtype)
    ed = WeightEditor(net)
    ed.apply(vanilla(VectorPool([ok]), {"ok": 1.0}))
    before = snapshot(net)
    pool = VectorPool([ok, big])
    with pytest.raises(ValueError, match="'head.weight'.*(NaN/Inf|overflows)"):
        ed.apply(vanilla(pool, {"ok": 1.0, "big": 1.0}))
    assert same(snapshot(net), before)  # blocks.0.q was written, then rolled back
    nan = TaskVector("nan", {"head": Dense(torch.full((4, 8), float("nan")))})
    with pytest.raises(ValueError, match="contains NaN/Inf; refusing"):
        ed.apply(vanilla(VectorPool([nan]), {"nan": 1.0}))
    assert same(snapshot(net), before)
    ed.restore()


def test_unknown_module_and_shape_mismatch_are_named():
    net = Net()
    ed = WeightEditor(net)
    bad = VectorPool([TaskVector("x", {"blocks.7.q": LowRank(torch.ones(6, 1), torch.ones(1, 8))})])
    with pytest.raises(ValueError, match=r"module 'blocks.7.q' does not exist"):
        ed.apply(vanilla(bad, {"x": 1.0}))
    wrong = VectorPool([TaskVector("y", {"head": LowRank(torch.ones(5, 1), torch.ones(1, 8))})])
    with pytest.raises(ValueError, match=r"module 'head': delta shape \(5, 8\) does not match the model's weight \(4, 8\)"):
        ed.apply(vanilla(wrong, {"y": 1.0}))
    with pytest.raises(ValueError, match="only 'delta' components"):
        ed.apply(devec(wrong, {"y": 1.0}))


# --- the three parts of the editor: pure sum, part cache, writer ------------------------------
def test_fused_weight_is_the_definition_in_float32_and_leaves_w0_alone():
    from devec_core.mix import fused_weight

    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(5, 7, generator=g)
    B1, A1, B2, A2 = (torch.randn(*s, generator=g) for s in ((5, 2), (2, 7), (5, 3), (3, 7)))
    D = torch.randn(5, 7, generator=g)
    keep = W0.clone()
    B, A = torch.cat([B1, B2], 1), torch.cat([A1, A2], 0)
    scale = torch.tensor([0.5, 0.5, -1.25, -1.25, -1.25])
    got = fused_weight(W0, B, A, scale, [(0.3, D)], name="m.weight")
    # W = W0 + Σ λ_i B_i A_i + Σ λ_j D_j, written out term by term in float64
    want = W0.double() + 0.5 * B1.double() @ A1.double() - 1.25 * B2.double() @ A2.double() + 0.3 * D.double()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert got.dtype == torch.float32 and torch.equal(W0, keep)
    assert torch.equal(fused_weight(W0), W0) and fused_weight(W0) is not W0  # no terms: a copy of W0
    half = fused_weight(W0.half(), dense=[(1.0, D)], dtype=torch.float16)
    assert torch.equal(half, (W0.half().float() + D).half())  # summed in float32, then cast


def test_fused_weight_refuses_overflow_nan_and_wrong_shapes_by_name():
    from devec_core.mix import fused_weight

    W0 = torch.full((2, 3), 6e4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"'x.weight'.*NaN/Inf in torch.float16"):
        fused_weight(W0, dense=[(1.0, torch.full((2, 3), 1e4))], name="x.weight")  # 7e4 > fp16's 65504
    with pytest.raises(ValueError, match="NaN/Inf"):
        fused_weight(torch.zeros(2, 3), dense=[(1.0, torch.full((2, 3), float("nan")))])
    with pytest.raises(ValueError, match=r"'b': extra shape \(3,\) does not match \(2,\)"):
        fused_weight(torch.zeros(2), dense=[(1.0, torch.zeros(3))], name="b")


def test_one_pass_form_equals_the_general_form_and_declines_when_it_cannot_prove_finite():
    from devec_core.mix import fused_weight, fused_weight_into

    g = torch.Generator().manual_seed(4)
    W0, B, A = torch.randn(6, 8, generator=g), torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g)
    s = torch.tensor([0.7, 0.7, -2.0])
    out = torch.empty(6, 8)
    assert fused_weight_into(out, W0, B, A, s, float(W0.abs().max()))
    torch.testing.assert_close(out, fused_weight(W0, B, A, s), rtol=0, atol=1e-6)
    before = out.clone()
    huge = torch.full((6, 3), 1e20)
    assert not fused_weight_into(out, W0, huge, torch.full((3, 8), 1e20), s, float(W0.abs().max()))
    assert torch.equal(out, before)  # declined: nothing written


def test_part_cache_reuses_stacks_across_coefficients_and_forgets_old_sources():
    from devec_core.mix import PartCache

    net = Net()
    cache = PartCache(lambda m: net.get_submodule(m).weight, max_sources=1)
    pool = VectorPool([lora_vec("a", 1), lora_vec("b", 2)])
    _, pa, _ = cache.resolve(pool, Component("delta", "a"))
    _, pb, _ = cache.resolve(pool, Component("delta", "b"))
    B1, A1, s1 = cache.stacked("head.weight", [(1.0, pa["head"]), (0.5, pb["head"])])
    B2, A2, s2 = cache.stacked("head.weight", [(1.0, pa["head"]), (0.7, pb["head"])])
    assert B2 is B1 and A2 is A1  # only a coefficient changed: the same stack
    assert s1.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5]) and s2.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.7])
    B3, _, _ = cache.stacked("head.weight", [(1.0, pa["head"])])
    assert B3 is not B1 and B3.shape == (4, 2)
    assert cache.resolve(pool, Component("delta", "a"))[1]["head"] is pa["head"]  # resolved once per source
    cache.resolve(VectorPool([lora_vec("a", 1)]), Component("delta", "a"))  # a second source; max_sources=1
    assert cache.resolve(pool, Component("delta", "a"))[1]["head"] is not pa["head"]  # the first was forgotten
    with pytest.raises(ValueError, match="Unknown task vector 'zz'"):
        cache.resolve(pool, Component("delta", "zz"))


def test_editor_original_is_the_unedited_tensor_while_a_mix_is_fused():
    net, pool = Net(), VectorPool([lora_vec("a", 1)])
    w0 = net.head.weight.detach().clone()
    ed = WeightEditor(net)
    assert ed.original("head.weight") is None
    ed.apply(vanilla(pool, {"a": 1.0}))
    assert not torch.equal(net.head.weight, w0) and torch.equal(ed.original("head.weight"), w0)
    ed.restore()
    assert ed.original("head.weight") is None and torch.equal(net.head.weight, w0)
