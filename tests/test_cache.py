"""devec_core.cache: content keys without τ, exact round trip, corrupt entries, atomic writes, LRU."""

import json
import os
import struct
import time

import pytest
import torch

from devec_core import TaskVector, decompose
from devec_core.algorithm import PAPER_TAU
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
    d1, hit1 = cached_decompose(vecs, PAPER_TAU, cache=cache, **opts)
    d2, hit2 = cached_decompose(vecs, 0.5, cache=cache, **opts)
    assert (hit1, hit2) == (False, True)
    assert d2.tau == 0.5 and d2.vectors[0].extras.keys() == vecs[0].extras.keys()
    _same(d2, decompose(vecs, 0.5, **opts))
    _same(d2.with_tau(PAPER_TAU), d1)
    if mode == "joint":
        a, b = d2.component("merged_shared"), decompose(vecs, 0.5).component("merged_shared")
        for m in a:
            torch.testing.assert_close(a[m].dense(), b[m].dense(), atol=0, rtol=0)


def test_key_ignores_tau_but_not_content_or_config(tmp_path):
    cache = DecompositionCache(tmp_path)
    vecs = _pool()
    cached_decompose(vecs, PAPER_TAU, cache=cache)
    assert cached_decompose(vecs, 0.3, cache=cache)[1]
    assert not cached_decompose(vecs, PAPER_TAU, cache=cache, mode="pairwise")[1]
    assert not cached_decompose(vecs, PAPER_TAU, cache=cache, dtype="float64")[1]
    other = _pool()
    other[1].modules["layers.0.proj"].B[0, 0] += 1e-3
    assert hash_task_vector(other[1]) != hash_task_vector(vecs[1])
    assert not cached_decompose(other, PAPER_TAU, cache=cache)[1]


def test_corrupt_and_partial_entries_are_reported_and_recomputed(tmp_path):
    msgs = []
    cache = DecompositionCache(tmp_path, report=msgs.append)
    vecs = _pool()
    ref, _ = cached_decompose(vecs, PAPER_TAU, cache=cache)
    (entry,) = [e for e, _, _ in cache.entries()]
    tf = entry / "tensors.safetensors"
    data = bytearray(tf.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of tensor data
    tf.write_bytes(bytes(data))
    dec, hit = cached_decompose(vecs, PAPER_TAU, cache=cache)
    assert not hit and "unusable" in msgs[-1] and entry.name[:12] in msgs[-1]
    _same(dec, ref)
    assert cached_decompose(vecs, PAPER_TAU, cache=cache)[1]  # rewritten
    tf.write_bytes(tf.read_bytes()[:100])  # truncated
    assert not cached_decompose(vecs, PAPER_TAU, cache=cache)[1]
    (entry / "manifest.json").unlink()  # partial: no manifest
    assert not cached_decompose(vecs, PAPER_TAU, cache=cache)[1]
    assert len(msgs) == 3


# --- integrity: corruptions of the files on disk (each one was served with rc 0 before) -----------


def _header(tf):
    data = tf.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8 : 8 + n])


def _flip_dtype(old, new):
    def corrupt(entry):
        tf = entry / "tensors.safetensors"
        data, n, _ = _header(tf)
        if f'"dtype":"{old}"'.encode() not in data[8 : 8 + n]:
            pytest.skip(f"this entry holds no {old} tensor")
        i = data.index(f'"dtype":"{old}"'.encode(), 8, 8 + n)
        tf.write_bytes(data[:i] + f'"dtype":"{new}"'.encode() + data[i + len(old) + 10 :])
    return corrupt


def _swap_two_values(entry):
    """Swap the first two different values of the largest float tensor (byte sums unchanged)."""
    tf = entry / "tensors.safetensors"
    data, n, head = _header(tf)
    name, info = max(((k, v) for k, v in head.items() if k != "__metadata__" and v["dtype"] in ("F32", "F64")),
                     key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    w = 4 if info["dtype"] == "F32" else 8
    start = 8 + n + info["data_offsets"][0]
    count = (info["data_offsets"][1] - info["data_offsets"][0]) // w
    words = [data[start + w * i : start + w * i + w] for i in range(count)]
    j = next(i for i in range(1, count) if words[i] != words[0])
    buf = bytearray(data)
    buf[start : start + w], buf[start + w * j : start + w * j + w] = words[j], words[0]
    tf.write_bytes(bytes(buf))


def _flip_manifest_bit(entry):
    """One bit of manifest.json: a block's module "layers.0.proj" → "layers.1.proj" (still valid JSON)."""
    mf = entry / "manifest.json"
    data = bytearray(mf.read_bytes())
    i = data.index(b'"layers.', data.index(b'"modules"')) + len(b'"layers.')
    assert chr(data[i]).isdigit()
    data[i] ^= 0x01
    mf.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_flip_dtype("F64", "I64"), _flip_dtype("F32", "I32"), _swap_two_values, _flip_manifest_bit],
                         ids=["F64->I64", "F32->I32", "swap-values", "manifest-bit"])
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_corrupt_entry_is_recomputed_exactly(tmp_path, corrupt, mode):
    """Any change to an entry's files → unusable, recomputed, replaced: the exact fresh answer, never an error."""
    msgs = []
    cache = DecompositionCache(tmp_path, report=msgs.append)
    vecs = _pool(dense=True)
    cached_decompose(vecs, PAPER_TAU, cache=cache, mode=mode)
    (entry,) = [e for e, _, _ in cache.entries()]
    corrupt(entry)
    dec, hit = cached_decompose(vecs, 0.5, cache=cache, mode=mode)
    assert not hit and len(msgs) == 1 and "unusable" in msgs[0]
    fresh = decompose(vecs, 0.5, mode=mode)
    _same(dec, fresh)
    dec2, hit2 = cached_decompose(vecs, 0.5, cache=cache, mode=mode)  # replaced by a good entry
    assert hit2 and len(msgs) == 1
    _same(dec2, fresh)


def test_entry_under_another_key_is_not_served(tmp_path):
    """A complete, intact entry copied (or renamed) to another key's folder is unusable there."""
    cache = DecompositionCache(tmp_path)
    a, b = _pool(seed=0), _pool(seed=1)
    cached_decompose(a, PAPER_TAU, cache=cache)
    (entry_a,) = [e for e, _, _ in cache.entries()]
    key_b = cache.key_for_vectors(b, __import__("devec_core.pool", fromlist=["Config"]).Config())
    os.rename(entry_a, tmp_path / key_b)
    dec, hit = cached_decompose(b, PAPER_TAU, cache=cache)
    assert not hit
    _same(dec, decompose(b, PAPER_TAU))


def test_unreadable_entry_and_unwritable_root_never_raise(tmp_path):
    msgs = []
    vecs = _pool()
    cache = DecompositionCache(tmp_path / "c", report=msgs.append)
    key = cache.key_for_vectors(vecs, __import__("devec_core.pool", fromlist=["Config"]).Config())
    (tmp_path / "c" / key / "manifest.json").mkdir(parents=True)  # a folder where a file should be
    dec, hit = cached_decompose(vecs, PAPER_TAU, cache=cache)
    assert not hit and "unusable" in msgs[0]
    (tmp_path / "f").write_text("a file, not a folder")
    blocked = DecompositionCache(tmp_path / "f", report=msgs.append)
    dec, hit = cached_decompose(vecs, PAPER_TAU, cache=blocked)  # cannot write: reported, result still right
    assert not hit and "continuing without cache" in msgs[-1]
    _same(dec, decompose(vecs, PAPER_TAU))


def test_invalid_tau_never_touches_the_cache(tmp_path):
    cache = DecompositionCache(tmp_path)
    vecs = _pool()
    cached_decompose(vecs, PAPER_TAU, cache=cache)
    (entry,) = [e for e, _, _ in cache.entries()]
    key = entry.name
    for bad in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            cache.get(key, bad)
        with pytest.raises(ValueError, match="tau"):
            cached_decompose(vecs, bad, cache=cache)
        assert entry.exists()
    assert cached_decompose(vecs, 0.5, cache=cache)[1]


def test_file_hash_memo_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path):
    from devec_core.cache import hash_file

    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    memo = {}
    h1 = hash_file(f, memo)
    f.write_bytes(b"b" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    assert hash_file(f, memo) != h1
    assert hash_file(f, {str(f.resolve()): "garbage"}) == hash_file(f)


def test_write_is_atomic_no_temp_left(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".tmp-{dead}-0123456789ab-x").mkdir()  # left by a killed writer
    (tmp_path / f".tmp-{os.getpid()}-0123456789ab-y").mkdir()  # a live writer's (this process)
    cache = DecompositionCache(tmp_path)
    cached_decompose(_pool(), PAPER_TAU, cache=cache)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == [f".tmp-{os.getpid()}-0123456789ab-y"]


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


# --- the CLI's hit skips the input content checks only when an entry vouches for the exact bytes --


def _lora_files(folder, nan=False):
    from safetensors.torch import save_file

    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for mod in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
            B = torch.randn(32, 4, generator=g)
            B[:, 0] = 1.0  # one shared direction
            sd[f"transformer.{mod}.lora_A.weight"] = torch.randn(4, 24, generator=g)
            sd[f"transformer.{mod}.lora_B.weight"] = B
        if nan and i == 1:
            sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"][3, 2] = float("nan")
        paths.append(folder / f"style{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return [str(p) for p in paths]


def test_cli_hit_skips_content_checks_only_for_vouched_inputs(tmp_path, monkeypatch, capsys):
    """Cold run: checked. Hit: not re-checked (an entry exists for these files' SHA-256 + options).
    An entry that turns out unusable: checked before computing. Changed bytes (a NaN): a new key,
    checked, refused — a warm cache never lets an unchecked input through."""
    from devec_core.cli import decompose as cli_decompose
    from devec_core.cli import main
    from devec_core.formats import load as formats_load

    calls = []
    real = formats_load.check_pool_contents
    counted = lambda vecs: (calls.append(len(vecs)), real(vecs))[1]  # noqa: E731
    # the two callers: load_pool (a checked load) and the CLI's before_compute (an entry proved unusable)
    monkeypatch.setattr(formats_load, "check_pool_contents", counted)
    monkeypatch.setattr(cli_decompose, "check_pool_contents", counted)
    cache = tmp_path / "cache"
    files = _lora_files(tmp_path)
    run = lambda out, *extra: main(["decompose", *files, "--out", str(tmp_path / out), "--cache-dir", str(cache), "--quiet", *extra])  # noqa: E731
    assert run("o1") == 0 and calls == [2]
    assert run("o2", "--tau", "0.5") == 0 and calls == [2] and "cache hit" in capsys.readouterr().out
    (entry,) = [e for e, _, _ in DecompositionCache(cache).entries()]
    tf = entry / "tensors.safetensors"
    data = bytearray(tf.read_bytes())
    data[-3] ^= 0x10
    tf.write_bytes(bytes(data))
    assert run("o3", "--tau", "0.5") == 0 and calls == [2, 2]
    captured = capsys.readouterr()
    assert "computed" in captured.out and "unusable" in captured.err
    assert run("ref", "--tau", "0.5", "--no-cache") == 0
    for f in (tmp_path / "ref").glob("*.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(str(f)), load_file(str(tmp_path / "o3" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files[:] = _lora_files(tmp_path, nan=True)  # same paths, new bytes
    assert run("o4") == 1 and calls[-1] == 2 and "NaN" in capsys.readouterr().err
