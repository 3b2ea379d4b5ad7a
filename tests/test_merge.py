"""devec_core.merge: each method against a reference written from its paper, PEFT and mergekit
parity to float tolerance, the DeVec merges of §4.1, the registry and its YAML form."""

import copy
import math
import warnings

import pytest
import torch

from devec_core import LowRank, TaskVector, decompose
from devec_core.merge import METHODS, MethodName, get_method, merge, module_seed
from devec_core.merge.dare import dare_linear, dare_ties, drop_and_rescale
from devec_core.merge.magnitude_prune import magnitude_prune, trim
from devec_core.merge.peft_factors import peft_factorwise
from devec_core.merge.task_arithmetic import task_arithmetic, task_arithmetic_factors
from devec_core.merge.ties import ties
from devec_core.taskvec import Dense
from tests.tiny_models import PEFT_PREFIX, llama_lora_config, lora_to_taskvector, random_llama_lora, tiny_llama


def _stack(seed=0, k=3, n=7, m=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, m, generator=g, dtype=torch.float64)


W3 = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)


# --- references written from the papers, entry by entry ----------------------------------------
def _trim_literal(d, density):
    flat = d.flatten().tolist()
    keep = set(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[: int(density * len(flat))])
    return [x if i in keep else 0.0 for i, x in enumerate(flat)]


def _ties_literal(deltas, weights, density, weighted_election=False, divide="count"):
    """TIES (arXiv 2306.01708, Alg. 1) per entry: trim, elect γ = sgn Σ, mean of the agreeing values."""
    trimmed = [_trim_literal(d, density) for d in deltas]
    out = []
    for j in range(len(trimmed[0])):
        vals = [weights[i] * trimmed[i][j] for i in range(len(deltas))]
        basis = vals if weighted_election else [t[j] for t in trimmed]
        gamma = 1.0 if sum(basis) >= 0 else -1.0
        agree = [i for i, x in enumerate(basis) if x != 0 and math.copysign(1.0, x) == gamma]
        total = sum(vals[i] for i in agree)
        if divide == "count":
            den = len(agree) or 1
        elif divide == "weights":
            den = sum(weights[i] for i in agree) or 1
        else:
            den = 1
        out.append(total / den)
    return torch.tensor(out, dtype=deltas.dtype).reshape(deltas.shape[1:])


def test_task_arithmetic_is_the_weighted_sum():
    X = _stack()
    ref = sum(float(W3[i]) * X[i] for i in range(3))
    torch.testing.assert_close(task_arithmetic(X, W3), ref)


def test_task_arithmetic_on_factors_is_exact_and_concatenates():
    g = torch.Generator().manual_seed(1)
    loras = [LowRank(torch.randn(9, r, generator=g), torch.randn(r, 6, generator=g), s) for r, s in ((2, 0.5), (3, 2.0))]
    out = task_arithmetic_factors(loras, [1.5, -0.25])
    assert isinstance(out, LowRank) and out.rank == 5  # rank Σ r_i, no dense matrix
    ref = 1.5 * 0.5 * loras[0].B @ loras[0].A - 0.25 * 2.0 * loras[1].B @ loras[1].A
    torch.testing.assert_close(out.dense(), ref)
    dense = Dense(torch.randn(9, 6, generator=g))
    mixed = task_arithmetic_factors([loras[0], dense], [1.0, 2.0])
    assert isinstance(mixed, Dense)
    torch.testing.assert_close(mixed.W, 0.5 * loras[0].B @ loras[0].A + 2 * dense.W)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_trim_keeps_the_largest_entries(density):
    d = _stack()[0]
    got = trim(d, density)
    assert got.flatten().tolist() == _trim_literal(d, density)
    assert int((got != 0).sum()) == int(density * d.numel())


def test_trim_keeps_exactly_k_when_magnitudes_tie_at_the_cut():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0])
    assert trim(d, 0.5).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 2.0]  # k = 3: 2.0, then the first two ±1
    assert trim(torch.zeros(4), 0.5).tolist() == [0.0] * 4


@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_the_paper_entry_by_entry(density, sign):
    X = _stack(2)
    if sign == "total":
        torch.testing.assert_close(ties(X, W3, density), _ties_literal(X, W3.tolist(), density))
    ours = {"trimmed": ties(X, W3, density, elect_on="weighted", normalize="weights"),
            "none": ties(X, W3, density, elect_on="weighted", normalize="none")}
    torch.testing.assert_close(ours["trimmed"], _ties_literal(X, W3.tolist(), density, True, "weights"))
    torch.testing.assert_close(ours["none"], _ties_literal(X, W3.tolist(), density, True, "none"))


def test_ties_adversarial_cases():
    X = _stack(3)
    w = torch.ones(3, dtype=torch.float64)
    # all vectors equal: TIES returns that vector's trimmed copy (the mean of identical values)
    same = X[:1].expand(3, -1, -1).clone()
    torch.testing.assert_close(ties(same, w, 0.4), trim(X[0], 0.4))
    # a vector and its negation cancel in the election: the sum is 0, γ = +, only positives kept
    pm = torch.stack([X[0], -X[0]])
    got = ties(pm, torch.ones(2, dtype=torch.float64), 1.0)
    torch.testing.assert_close(got, X[0].abs())
    # density 0: nothing survives
    assert not torch.any(ties(X, W3, 0.0))
    # zeros never count in the disjoint mean
    Z = torch.stack([X[0], torch.zeros_like(X[0])])
    torch.testing.assert_close(ties(Z, torch.ones(2, dtype=torch.float64), 1.0), X[0])
    with pytest.raises(ValueError, match="density"):
        ties(X, W3, 1.5)
    with pytest.raises(ValueError, match="majority sign"):
        ties(X, W3, 0.5, majority_sign="median")
    with pytest.raises(ValueError, match="one weight each"):
        ties(X, W3[:2], 0.5)


def test_magnitude_prune_is_trim_then_sum():
    X = _stack(4)
    ref = sum(float(W3[i]) * torch.tensor(_trim_literal(X[i], 0.3), dtype=X.dtype).reshape(X.shape[1:]) for i in range(3))
    torch.testing.assert_close(magnitude_prune(X, W3, 0.3), ref)


def test_dare_drops_and_rescales_by_the_definition():
    d = torch.randn(200, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = drop_and_rescale(d, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01  # keep probability = density
    torch.testing.assert_close(out[kept], d[kept] / 0.3)  # survivors scaled by 1/density
    again = drop_and_rescale(d, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # same seed, same mask
    assert not torch.equal(out, drop_and_rescale(d, 0.3, torch.Generator().manual_seed(1)))
    # unbiased: the mean over many draws approaches d
    g = torch.Generator().manual_seed(2)
    small = d[:20, :20]
    mean = sum(drop_and_rescale(small, 0.5, g) for _ in range(4000)) / 4000
    assert float((mean - small).abs().max()) < 0.15 * float(small.abs().max())
    l1 = drop_and_rescale(d, 0.3, torch.Generator().manual_seed(0), rescale="l1")
    torch.testing.assert_close(l1.abs().sum(), d.abs().sum())
    assert torch.equal(drop_and_rescale(d, 1.0), d)


def test_dare_linear_and_ties_use_the_masks_in_order():
    X = _stack(6)
    g = torch.Generator().manual_seed(7)
    masks = [drop_and_rescale(x, 0.5, g) for x in X]  # the masks dare draws, in pool order
    torch.testing.assert_close(dare_linear(X, W3, 0.5, torch.Generator().manual_seed(7)), sum(float(W3[i]) * masks[i] for i in range(3)))
    torch.testing.assert_close(dare_ties(X, W3, 0.5, torch.Generator().manual_seed(7)),
                               _ties_literal(torch.stack(masks), W3.tolist(), 1.0))


# --- parity with PEFT's merge_utils and mergekit, tensor level --------------------------------
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_parity_with_peft_merge_utils(sign):
    from peft.utils import merge_utils as P

    X = _stack(8).float()
    w = W3.float()
    torch.testing.assert_close(task_arithmetic(X, w), P.task_arithmetic(list(X), w))
    torch.testing.assert_close(ties(X, w, 0.4, sign), P.ties(list(X), w, 0.4, sign), rtol=0, atol=0)
    torch.testing.assert_close(magnitude_prune(X, w, 0.4), P.magnitude_prune(list(X), w, 0.4), rtol=0, atol=0)
    torch.manual_seed(11)
    ref = P.dare_linear(list(X), w, 0.4)
    torch.testing.assert_close(dare_linear(X, w, 0.4, torch.Generator().manual_seed(11)), ref, rtol=0, atol=0)
    torch.manual_seed(12)
    ref = P.dare_ties(list(X), w, 0.4, sign)
    torch.testing.assert_close(dare_ties(X, w, 0.4, torch.Generator().manual_seed(12), majority_sign=sign), ref, rtol=0, atol=0)


def test_parity_with_mergekit():
    from mergekit.merge_methods.api import merge_tensors

    X = _stack(9).float()
    w = W3.float()
    base = torch.zeros(X.shape[1:])  # deltas as models over a zero base: the output is the merged delta

    def mk(method, **params):
        return merge_tensors([base, *X], method, parameters={"weight": w.tolist(), **params}, base_index=0)

    torch.testing.assert_close(task_arithmetic(X, w), mk("task_arithmetic"))
    torch.testing.assert_close(ties(X, w, 0.4, elect_on="weighted", normalize="weights"), mk("ties", density=0.4))
    torch.testing.assert_close(ties(X, w, 0.4, elect_on="weighted", normalize="none"), mk("ties", density=0.4, normalize=False))
    # mergekit has no plain magnitude pruning; breadcrumbs without outlier removal is exactly that
    torch.testing.assert_close(magnitude_prune(X, w, 0.4), mk("breadcrumbs", density=0.4, gamma=0.0))
    torch.manual_seed(3)
    ref = mk("dare_ties", density=0.4)
    torch.testing.assert_close(dare_ties(X, w, 0.4, torch.Generator().manual_seed(3), rescale="l1", elect_on="weighted", normalize="none"), ref)
    torch.manual_seed(4)
    ref = mk("dare_linear", density=0.4)
    torch.testing.assert_close(dare_linear(X, w, 0.4, torch.Generator().manual_seed(4), rescale="l1"), ref)
    torch.manual_seed(4)
    ref = mk("dare_linear", density=0.4, rescale=False)
    torch.testing.assert_close(dare_linear(X, w, 0.4, torch.Generator().manual_seed(4), rescale="none"), ref)


def test_pool_merge_with_mergekit_convention_equals_mergekit_per_module():
    from mergekit.merge_methods.api import merge_tensors

    vecs = _vectors(rank=3)
    w = [0.7, -0.4, 1.3]
    for method, params in (("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5, "seed": 4})):
        ours = merge(vecs, method, w, convention="mergekit", **params)
        for mod, d in ours.modules.items():
            X = [v.modules[mod].dense() for v in vecs]
            torch.manual_seed(module_seed(4, mod))
            ref = merge_tensors([torch.zeros_like(X[0]), *X], method, parameters={"weight": w, "density": params["density"]}, base_index=0)
            torch.testing.assert_close(d.W, ref)


# --- parity with PEFT's add_weighted_adapter on a tiny Llama ----------------------------------
@pytest.fixture(scope="module")
def peft_pool():
    from peft import get_peft_model, set_peft_model_state_dict

    model, _ = tiny_llama(0)
    sds = [random_llama_lora(model, rank=4, seed=s) for s in (1, 2, 3)]
    vecs = [lora_to_taskvector(sd, f"v{i}", PEFT_PREFIX) for i, sd in enumerate(sds)]
    pm = get_peft_model(copy.deepcopy(model), llama_lora_config(4), adapter_name="v0")
    for i in (1, 2):
        pm.add_adapter(f"v{i}", llama_lora_config(4))
    for i, sd in enumerate(sds):
        assert not set_peft_model_state_dict(pm, sd, adapter_name=f"v{i}").unexpected_keys
    return pm, vecs


def _peft_deltas(pm, adapter):
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and adapter in mod.lora_A:
            out[name] = mod.get_delta_weight(adapter).detach()
    return out


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_parity_with_peft_add_weighted_adapter(peft_pool, method, monkeypatch):
    """PEFT's "<method>_svd" merges the dense deltas, then SVD-truncates; at full rank it is the merge."""
    pm, vecs = peft_pool
    w = [0.7, -0.4, 1.3]
    name = f"m_{method}"
    # DARE: PEFT draws every mask from the global generator, module after module, after the new
    # adapter's random init; seed it right after that init (PEFT calls _freeze_adapter there)
    import peft.tuners.lora.model as lora_model

    freeze = lora_model._freeze_adapter

    def freeze_then_seed(*a, **k):
        freeze(*a, **k)
        torch.manual_seed(5)

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.add_weighted_adapter(["v0", "v1", "v2"], w, name, combination_type=method + "_svd", svd_rank=64,
                                           density=0.3, svd_full_matrices=False)
    ref = _peft_deltas(pm, name)
    if "dare" in method:
        # our engine seeds each module on its own (module_seed); to follow PEFT's single stream, run
        # the per-module function with one generator over the modules in PEFT's order
        g = torch.Generator().manual_seed(5)
        fn = dare_linear if method == "dare_linear" else dare_ties
        X = {mod: torch.stack([v.modules[mod].dense() for v in vecs]) for mod in ref}
        ours = {mod: fn(X[mod], torch.tensor(w), 0.3, g) for mod in ref}
        # and the engine equals that function with each module's own seed
        eng = merge(vecs, method, w, density=0.3, seed=5)
        for mod in ref:
            torch.testing.assert_close(eng.modules[mod].W, fn(X[mod], torch.tensor(w), 0.3, torch.Generator().manual_seed(module_seed(5, mod))))
    else:
        ours = {mod: d.W for mod, d in merge(vecs, method, w, density=0.3).modules.items()}
    assert set(ref) == set(ours) == set(vecs[0].modules)
    for mod in ref:
        torch.testing.assert_close(ours[mod], ref[mod], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune"])
def test_peft_factorwise_equals_peft_plain_combination(peft_pool, method):
    """PEFT's non-SVD combinations merge A's and B's separately; peft_factorwise reproduces them."""
    pm, vecs = peft_pool
    w = [0.7, -0.4, 1.3]
    name = f"f_{method}"
    pm.base_model.add_weighted_adapter(["v0", "v1", "v2"], w, name, combination_type=method, density=0.3)
    for mod, ref in _peft_deltas(pm, name).items():
        got = peft_factorwise([v.modules[mod] for v in vecs], w, method, density=0.3)
        torch.testing.assert_close(got.dense(), ref, atol=1e-6, rtol=1e-5)
    if method == "linear":  # and it is not task arithmetic: the product of merged factors has cross terms
        mod = next(iter(vecs[0].modules))
        ta = task_arithmetic_factors([v.modules[mod] for v in vecs], w).dense()
        assert float((ta - _peft_deltas(pm, name)[mod]).abs().max()) > 1e-3


# --- pool merges and the DeVec merges (paper §4.1) --------------------------------------------
def _vectors(rank=4, planted=True, k=3, seed=0):
    """k LoRAs over three modules; with ``planted`` the first pair shares its first direction per module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.q": (16, 12), "l0.v": (16, 12), "l1.o": (12, 16)}
    vecs = []
    for i in range(k):
        mods = {}
        for mod, (n, m) in shapes.items():
            B, A = torch.randn(n, rank, generator=g) * 0.3, torch.randn(rank, m, generator=g) / m**0.5
            if planted and i == 1:
                B[:, 0] = vecs[0].modules[mod].B[:, 0]
            mods[mod] = LowRank(B, A, 0.5)
        vecs.append(TaskVector(f"t{i}", mods, {"l0.q.bias": torch.full((16,), float(i + 1))}))
    return vecs


def test_pool_merge_streams_per_module_and_merges_extras_linearly():
    vecs = _vectors()
    w = [0.5, 1.0, -0.25]
    out = merge(vecs, "ties", w, density=0.4)
    X = {mod: torch.stack([v.modules[mod].dense() for v in vecs]) for mod in vecs[0].modules}
    for mod, d in out.modules.items():
        torch.testing.assert_close(d.W, ties(X[mod], torch.tensor(w), 0.4))
    torch.testing.assert_close(out.extras["l0.q.bias"], torch.full((16,), 0.5 * 1 + 1.0 * 2 - 0.25 * 3))
    assert out.meta["merge"]["method"] == "ties" and out.meta["merge"]["params"]["density"] == 0.4
    ta = merge(vecs, "ta", w)
    assert all(isinstance(d, LowRank) and d.rank == 12 for d in ta.modules.values())


def test_module_only_in_some_vectors_is_merged_among_those():
    vecs = _vectors()
    del vecs[1].modules["l1.o"]
    out = merge(vecs, "ties", [1, 1, 1], density=0.5)
    X = torch.stack([vecs[0].modules["l1.o"].dense(), vecs[2].modules["l1.o"].dense()])
    torch.testing.assert_close(out.modules["l1.o"].W, ties(X, torch.ones(2), 0.5))


def test_dare_pool_merge_does_not_depend_on_module_order():
    vecs = _vectors()
    a = merge(vecs, "dare_ties", [1, 1, 1], density=0.5, seed=3)
    rev = [TaskVector(v.name, dict(reversed(list(v.modules.items())))) for v in vecs]
    b = merge(rev, "dare_ties", [1, 1, 1], density=0.5, seed=3)
    for mod in a.modules:
        assert torch.equal(a.modules[mod].W, b.modules[mod].W)
    c = merge(vecs, "dare_ties", [1, 1, 1], density=0.5, seed=4)
    assert not torch.equal(a.modules["l0.q"].W, c.modules["l0.q"].W)


def test_devec_merge_is_unique_parts_plus_each_pair_shared_vector():
    vecs = _vectors()
    dec = decompose(vecs, tau=0.85, mode="pairwise")
    assert sum(dec.shared_dims().values()) > 0  # the planted direction is found
    w = {"t0": 0.5, "t1": 1.0, "t2": -0.3}
    pw = {"t0+t1": 2.0, "t0+t2": 0.25}  # t1+t2 falls back to the mean of its two weights
    out = merge(vecs, "devec", w, decomposition=dec, pair_weights=pw)
    pws = {**pw, "t1+t2": (1.0 - 0.3) / 2}
    for mod, d in out.modules.items():
        assert isinstance(d, LowRank)  # exact on the factors
        ref = sum(w[n] * dec.component("unique", n)[mod].dense() for n in w)
        ref = ref + sum(lam * dec.component("pair_shared", p)[mod].dense() for p, lam in pws.items())
        torch.testing.assert_close(d.dense(), ref, atol=1e-5, rtol=1e-5)
    assert out.meta["merge"]["pair_weights"] == pws


def test_devec_with_parts_delta_adds_shared_vectors_to_the_originals():
    vecs = _vectors()
    dec = decompose(vecs, tau=0.85, mode="pairwise")
    out = merge(vecs, "devec", [1.0, 0.5, 2.0], decomposition=dec, pair_weights=0.4, parts="delta")
    for mod, d in out.modules.items():
        ref = sum(w * v.modules[mod].dense() for w, v in zip([1.0, 0.5, 2.0], vecs))
        ref = ref + 0.4 * sum(dec.component("pair_shared", p)[mod].dense() for p in ("t0+t1", "t0+t2", "t1+t2"))
        torch.testing.assert_close(d.dense(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="parts must be one of"):
        merge(vecs, "devec", 1.0, decomposition=dec, parts="shared")


def test_devec_ties_is_ties_over_unique_parts_plus_shared_added_once():
    vecs = _vectors()
    dec = decompose(vecs, tau=0.85, mode="pairwise")
    w = [0.5, 1.0, 0.8]
    out = merge(vecs, "devec_ties", w, decomposition=dec, pair_weights=0.6, density=0.4)
    for mod, d in out.modules.items():
        U = torch.stack([dec.component("unique", n)[mod].dense() for n in dec.names])
        ref = ties(U, torch.tensor(w), 0.4)
        ref = ref + 0.6 * sum(dec.component("pair_shared", p)[mod].dense() for p in ("t0+t1", "t0+t2", "t1+t2"))
        torch.testing.assert_close(d.W, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_devec_methods_reduce_to_their_base_when_nothing_is_shared(base):
    vecs = _vectors(planted=False)
    dec = decompose(vecs, tau=1.0, mode="pairwise")
    assert sum(dec.shared_dims().values()) == 0
    name = "devec" if base == "task_arithmetic" else f"devec_{base}"
    params = {} if base == "task_arithmetic" else {"density": 0.5}
    a = merge(vecs, name, [0.5, 1.0, 0.8], decomposition=dec, **params)
    b = merge(vecs, base, [0.5, 1.0, 0.8], **params)
    for mod in b.modules:
        torch.testing.assert_close(a.modules[mod].dense(), b.modules[mod].dense(), atol=1e-6, rtol=1e-5)


def test_merge_errors_name_the_bad_value():
    vecs = _vectors()
    with pytest.raises(ValueError, match="Unknown merge method 'tie'"):
        merge(vecs, "tie", 1.0)
    with pytest.raises(ValueError, match=r"takes no parameter\(s\) \['density'\]"):
        merge(vecs, "ta", 1.0, density=0.5)
    with pytest.raises(ValueError, match="3 vectors"):
        merge(vecs, "ties", [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown vector"):
        merge(vecs, "ties", {"t0": 1, "t1": 1, "t2": 1, "zz": 1})
    with pytest.raises(ValueError, match="unknown pair"):
        merge(vecs, "devec", 1.0, pair_weights={"t2+t0": 1.0})
    with pytest.raises(ValueError, match="DeVec methods only"):
        merge(vecs, "ties", 1.0, pair_weights=1.0)
    with pytest.raises(ValueError, match="weight of 't1' is nan"):
        merge(vecs, "ta", [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="pairwise decomposition"):
        merge(vecs, "devec", 1.0, decomposition=decompose(vecs, tau=0.85))


# --- registry and YAML --------------------------------------------------------------------------
def test_every_method_has_a_paper_and_round_trips_through_yaml():
    import yaml

    from devec_core.merge.config import MergeConfig

    for name, m in METHODS.items():
        assert m.paper.startswith("https://arxiv.org/abs/")
        cfg = MergeConfig(method=name.value, inputs=["a", "b"], weights=[1.0, 0.5])
        text = cfg.to_yaml()
        assert yaml.safe_load(text)["method"] == name.value  # a plain string in the file
        assert MergeConfig.from_yaml(text) == cfg
    assert get_method("vanilla").name is MethodName.task_arithmetic
    cfg = MergeConfig.from_yaml("method: ta\nparams: {}\n")
    assert cfg.method is MethodName.task_arithmetic
    with pytest.raises(ValueError, match="density"):
        MergeConfig.from_yaml("method: ties\nparams: {density: 2}\n")
    with pytest.raises(ValueError, match="no parameter"):
        MergeConfig.from_yaml("method: ties\nparams: {sede: 2}\n")
    with pytest.raises(ValueError):
        MergeConfig.from_yaml("method: nonsense\n")


def test_merge_config_run_equals_merge():
    from devec_core.merge.config import MergeConfig

    vecs = _vectors()
    cfg = MergeConfig.from_yaml("method: dare_linear\nweights: [0.5, 1, 2]\nparams: {density: 0.6, seed: 9}\n")
    a, b = cfg.run(vecs), merge(vecs, "dare_linear", [0.5, 1, 2], density=0.6, seed=9)
    for mod in a.modules:
        assert torch.equal(a.modules[mod].W, b.modules[mod].W)
