"""devec_core.cache: content keys without τ, exact round trip, corrupt entries, atomic writes, LRU."""

import os
import time

import pytest
import torch

from devec_core import TaskVector, decompose
from devec_core.cache import DecompositionCache, cached_decompose, default_cache_dir, hash_task_vector
from devec_core.taskvec import Dense, LowRank


def _pool(seed=0, k=3, dense=False):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(24, 2, generator=g)
    vecs = []
    for i in range(k):
        mods = {}
        for j, (n, m) in enumerate(((24, 16), (24, 16), (24, 8))):
            B = torch.cat([shared, torch.randn(n, 2, generator=g)], 1)
            A = torch.randn(4, m, generator=g)
            mods[f"layers.{j}.proj"] = LowRank(B, A, 0.5)
        if dense:
            mods["dense.w"] = Dense(torch.randn(24, 3, generator=g) @ torch.randn(3, 12, generator=g))
        vecs.append(TaskVector(f"v{i}", mods, {"layers.0.proj.bias": torch.randn(24, generator=g)}, {"source": f"v{i}"}))
    return vecs


def _same(d1, d2):
    for kind, name in [("unique", n) for n in d1.names] + [("shared", n) for n in d1.names]:
        a, b = d1.component(kind, name), d2.component(kind, name)
        assert a.keys() == b.keys()
        for m in a:
            torch.testing.assert_close(a[m].dense(), b[m].dense(), atol=0, rtol=0)
    assert d1.shared_dims() == d2.shared_dims()


@pytest.mark.parametrize("mode", ["joint", "pairwise", "isolate"])
def test_hit_at_another_tau_equals_fresh(tmp_path, mode):
    cache = DecompositionCache(tmp_path)
    vecs = _pool(dense=True)
    opts = {"mode": mode, "target": "v0" if mode == "isolate" else None}
    d1, hit1 = cached_decompose(vecs, 0.85, cache=cache, **opts)
    d2, hit2 = cached_decompose(vecs, 0.5, cache=cache, **opts)
    assert (hit1, hit2) == (False, True)
    assert d2.tau == 0.5 and d2.vectors[0].extras.keys() == vecs[0].extras.keys()
    _same(d2, decompose(vecs, 0.5, **opts))
    _same(d2.with_tau(0.85), d1)
    if mode == "joint":
        a, b = d2.component("merged_shared"), decompose(vecs, 0.5).component("merged_shared")
        for m in a:
            torch.testing.assert_close(a[m].dense(), b[m].dense(), atol=0, rtol=0)


def test_key_ignores_tau_but_not_content_or_config(tmp_path):
    cache = DecompositionCache(tmp_path)
    vecs = _pool()
    cached_decompose(vecs, 0.85, cache=cache)
    assert cached_decompose(vecs, 0.3, cache=cache)[1]
    assert not cached_decompose(vecs, 0.85, cache=cache, mode="pairwise")[1]
    assert not cached_decompose(vecs, 0.85, cache=cache, dtype="float64")[1]
    other = _pool()
    other[1].modules["layers.0.proj"].B[0, 0] += 1e-3
    assert hash_task_vector(other[1]) != hash_task_vector(vecs[1])
    assert not cached_decompose(other, 0.85, cache=cache)[1]


def test_corrupt_and_partial_entries_are_reported_and_recomputed(tmp_path):
    msgs = []
    cache = DecompositionCache(tmp_path, report=msgs.append)
    vecs = _pool()
    ref, _ = cached_decompose(vecs, 0.85, cache=cache)
    (entry,) = [e for e, _, _ in cache.entries()]
    tf = entry / "tensors.safetensors"
    data = bytearray(tf.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of tensor data
    tf.write_bytes(bytes(data))
    dec, hit = cached_decompose(vecs, 0.85, cache=cache)
    assert not hit and "unusable" in msgs[-1] and entry.name[:12] in msgs[-1]
    _same(dec, ref)
    assert cached_decompose(vecs, 0.85, cache=cache)[1]  # rewritten
    tf.write_bytes(tf.read_bytes()[:100])  # truncated
    assert not cached_decompose(vecs, 0.85, cache=cache)[1]
    (entry / "manifest.json").unlink()  # partial: no manifest
    assert not cached_decompose(vecs, 0.85, cache=cache)[1]
    assert len(msgs) == 3


def test_write_is_atomic_no_temp_left(tmp_path):
    cache = DecompositionCache(tmp_path)
    cached_decompose(_pool(), 0.85, cache=cache)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_lru_eviction_keeps_recently_used(tmp_path):
    msgs = []
    cache = DecompositionCache(tmp_path, report=msgs.append)
    pools = [_pool(seed=s) for s in range(3)]
    cached_decompose(pools[0], cache=cache)
    size = cache.entries()[0][1]
    cache.max_bytes = int(size * 2.5)
    cached_decompose(pools[1], cache=cache)
    e0 = [e for e, _, _ in cache.entries()]
    os.utime(e0[0], (time.time() - 100, time.time() - 100))
    os.utime(e0[1], (time.time() - 200, time.time() - 200))
    assert cached_decompose(pools[0], cache=cache)[1]  # touch: pool 0 is now most recent
    cached_decompose(pools[2], cache=cache)  # over the cap: evict the LRU (pool 1)
    assert len(cache.entries()) == 2 and "evicted" in msgs[-1]
    assert cached_decompose(pools[0], cache=cache)[1]
    assert not cached_decompose(pools[1], cache=cache)[1]


def test_default_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DEVEC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "devec"
