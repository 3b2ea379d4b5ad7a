"""python -m devec_core decompose|inspect: outputs that diffusers/PEFT load, cache hits, clean failures."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from devec_core import METHOD_VERSION
from devec_core.cli import main
from devec_core.export import read_devec_metadata
from tests.test_formats import _kohya_real_shapes, _tiny_llama_dir
from tests.tiny_models import peft_folder as _peft_folder
from tests.tiny_models import random_flux_lora, random_llama_lora


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(d))
    return d


@pytest.fixture
def flux_pair(tmp_path, tiny_flux):
    a = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    b = random_flux_lora(tiny_flux.transformer, rank=4, seed=2)
    for k in a:  # plant one shared direction per module
        if k.endswith("lora_B.weight"):
            b[k][:, 0] = a[k][:, 0]
    save_file(a, str(tmp_path / "pixel.safetensors"))
    save_file(b, str(tmp_path / "ink.safetensors"))
    return [str(tmp_path / "pixel.safetensors"), str(tmp_path / "ink.safetensors")]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_decompose_flux_then_cache_hit_at_other_tau(tmp_path, flux_pair, cache_dir, capsys, tiny_flux):
    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o1"), "--quiet"], capsys)
    assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert files == ["report.json", "shared.safetensors", "unique-ink.safetensors", "unique-pixel.safetensors"]
    rep = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert rep["chance"]["modules"] == len(rep["modules"]) and rep["chance"]["regime"] in ("shared", "weak", "chance", "saturated")
    assert all(0 < m["p"] <= 1 and m["null_median"] <= m["null_q95"] for m in rep["chance"]["per_module"])
    assert rep["cache"] == "miss" and rep["tau"] == 0.85 and rep["method_version"] == METHOD_VERSION
    row = rep["modules"][0]
    assert {"module", "ranks", "eigenvalues", "shared_dim", "norms"} <= set(row)
    assert sum(r["shared_dim"] for r in rep["modules"]) > 0

    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o2"), "--tau", "0.3", "--quiet"], capsys)
    assert code == 0 and "cache hit" in out
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["cache"] == "hit"
    code, _, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--tau", "0.3", "--no-cache", "--quiet"], capsys)
    assert code == 0
    for f in ("unique-pixel.safetensors", "shared.safetensors"):
        a, b = load_file(str(tmp_path / "o2" / f)), load_file(str(tmp_path / "o3" / f))
        assert a.keys() == b.keys()
        for k in a:  # same numbers up to float rounding (stored vs recomputed operand layouts)
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "o2" / "unique-ink.safetensors")))
    from tests.tiny_models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)  # private: loading wraps modules
    pipe.load_lora_weights(str(tmp_path / "o2" / "unique-ink.safetensors"), adapter_name="cli_u")
    assert "cli_u" in pipe.get_list_adapters()["transformer"]


def test_decompose_peft_pair_writes_adapter_folders(tmp_path, tiny_llm, cache_dir, capsys):
    from peft import PeftModel

    from tests.tiny_models import tiny_llama

    srcs = [str(_peft_folder(tmp_path / n, random_llama_lora(tiny_llm[0], rank=4, seed=s), r=4, lora_alpha=8, task_type="CAUSAL_LM"))
            for n, s in (("polite", 1), ("rude", 2))]
    code, out, _ = _run(["decompose", *srcs, "--out", str(tmp_path / "o"), "--mode", "isolate", "--target", "rude", "--quiet"], capsys)
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.json", "shared-rude", "unique-rude"]
    model, _ = tiny_llama(seed=0)
    PeftModel.from_pretrained(model, str(tmp_path / "o" / "unique-rude"))


def test_kohya_real_shapes_decompose_and_load(tmp_path, cache_dir, capsys):
    """Two kohya FLUX LoRAs at real shapes → decompose → diffusers-format files diffusers accepts."""
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from devec_core import decompose
    from devec_core.formats import load_pool

    _kohya_real_shapes(tmp_path / "k1.safetensors", seed=1)
    _kohya_real_shapes(tmp_path / "k2.safetensors", seed=2, alpha=4.0)
    srcs = [str(tmp_path / "k1.safetensors"), str(tmp_path / "k2.safetensors")]
    code, out, err = _run(["decompose", *srcs, "--out", str(tmp_path / "o"), "--tau", "0.05", "--quiet"], capsys)
    assert code == 0, err
    exported = tmp_path / "o" / "unique-k1.safetensors"
    sd = FluxPipeline.lora_state_dict(str(exported))  # diffusers' own parser: plain diffusers layout
    dec = decompose(load_pool(srcs), tau=0.05)
    for mod, part in dec.component("unique", "k1").items():
        torch.testing.assert_close(sd[f"transformer.{mod}.lora_B.weight"] @ sd[f"transformer.{mod}.lora_A.weight"], part.dense(),
                                   atol=1e-7, rtol=1e-4)
    with init_empty_weights():  # the real FLUX.1 transformer, no memory: checks every key and shape
        tr = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                    guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    tr.load_lora_adapter(load_file(str(exported)), prefix="transformer", adapter_name="u", low_cpu_mem_usage=True)
    q = tr.transformer_blocks[0].attn.to_q
    assert q.lora_B["u"].weight.shape == (3072, 4) and q.scaling["u"] == 1.0
    assert "single_transformer_blocks.0.proj_out" in {m for m, _ in tr.named_modules()}


def test_full_checkpoints_with_base(tmp_path, cache_dir, capsys):
    _tiny_llama_dir(tmp_path / "base")
    _tiny_llama_dir(tmp_path / "ft1", perturb=1)
    _tiny_llama_dir(tmp_path / "ft2", perturb=2)
    args = ["decompose", str(tmp_path / "ft1"), str(tmp_path / "ft2"), "--out", str(tmp_path / "o"), "--quiet", "--rank", "4"]
    code, _, err = _run(args + ["--base", str(tmp_path / "base")], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "unique-ft1" / "adapter_config.json").exists()
    code, _, err = _run(args[:4] + [str(tmp_path / "oc"), "--quiet", "--rank", "4", "--compress", "--base", str(tmp_path / "base")],
                        capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "oc" / "report.json").read_text())
    assert max(max(r["ranks"]) for r in rep["modules"]) <= 4  # factors, cut as read
    code, _, err = _run(["decompose", str(tmp_path / "ft1"), "--out", str(tmp_path / "o2"), "--quiet"], capsys)
    # a lone checkpoint without --base is refused, naming the input
    assert code == 1 and "--base" in err and not (tmp_path / "o2").exists()


def test_failures_leave_no_partial_output(tmp_path, flux_pair, cache_dir, capsys):
    out = tmp_path / "out"
    assert _run(["decompose", *flux_pair, "--out", str(out), "--quiet"], capsys)[0] == 0  # an earlier output
    before = _snapshot(out)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(open(flux_pair[0], "rb").read()[:200])
    code, _, err = _run(["decompose", flux_pair[0], str(bad), "--out", str(out), "--quiet"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.safetensors" in lines[0] and "corrupt" in lines[0]
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    code, _, err = _run(["decompose", flux_pair[0], str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o2")], capsys)
    assert code == 1 and "missing.safetensors" in err and "no such file" in err and not (tmp_path / "o2").exists()
    code, _, err = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--mode", "isolate"], capsys)
    assert code == 2 and "--target" in err
    code, _, err = _run(["decompose", flux_pair[0], flux_pair[0], "--out", str(tmp_path / "o4")], capsys)
    assert code == 1 and "duplicate input" in err
    with pytest.raises(SystemExit) as e:  # usage errors: argparse, exit 2
        main(["decompose", *flux_pair, "--out", str(tmp_path / "o5"), "--rank", "2", "--energy", "0.5"])
    assert e.value.code == 2


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rc(argv, capsys):
    """(exit code, stderr) of main, argparse's SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


BAD_ARGS = {
    "tau-zero": ["--tau", "0"], "tau-big": ["--tau", "1.5"], "tau-nan": ["--tau", "nan"], "tau-text": ["--tau", "abc"],
    "mode": ["--mode", "bogus"], "isolate-no-target": ["--mode", "isolate"],
    "target-unknown": ["--mode", "isolate", "--target", "nobody"], "target-in-joint": ["--target", "pixel"],
    "names-count": ["--names", "a"], "names-dup": ["--names", "a,a"], "names-empty": ["--names", "a,"],
    "rank": ["--rank", "0"], "energy": ["--energy", "1.5"], "export-energy": ["--export-energy", "0"],
    "device": ["--device", "nonsense"], "out-file": "OUT_FILE", "out-holds-input": "OUT_INPUT", "out-foreign": "OUT_FOREIGN",
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_exit_2_in_one_line_before_any_tensor_is_read(tmp_path, flux_pair, cache_dir, capsys, monkeypatch, case):
    import devec_core.cache
    import devec_core.cli.decompose
    import devec_core.cli.inspect

    def no_read(*a, **k):
        raise AssertionError("a tensor was read before the arguments were checked")

    # patched where the CLI looks them up
    for mod, fn in ((devec_core.cli.decompose, "load_pool"), (devec_core.cli.inspect, "load_task_vector"), (devec_core.cache, "load_file")):
        monkeypatch.setattr(mod, fn, no_read, raising=False)
    monkeypatch.setattr("safetensors.torch.load_file", no_read)
    extra, out = BAD_ARGS[case], tmp_path / "out"
    if extra == "OUT_FILE":
        out.write_text("a file")
    elif extra == "OUT_INPUT":
        out = tmp_path
    elif extra == "OUT_FOREIGN":
        out.mkdir()
        (out / "thesis.pdf").write_text("mine")
    extra = extra if isinstance(extra, list) else []
    code, err = _rc(["decompose", *flux_pair, "--out", str(out), "--quiet", *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    if case == "out-foreign":
        assert (out / "thesis.pdf").read_text() == "mine" and "thesis.pdf" in err
    assert not (tmp_path / "out").is_dir() or case == "out-foreign"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_invalid_tau_on_a_warm_cache_keeps_the_entry(tmp_path, flux_pair, cache_dir, capsys):
    assert _run(["decompose", *flux_pair, "--out", str(tmp_path / "o1"), "--quiet"], capsys)[0] == 0
    entries = sorted(p.name for p in cache_dir.iterdir() if p.is_dir())
    code, err = _rc(["decompose", *flux_pair, "--out", str(tmp_path / "o2"), "--tau", "0", "--quiet"], capsys)
    assert code == 2 and "--tau" in err
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == entries
    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--tau", "0.5", "--quiet"], capsys)
    assert code == 0 and "cache hit" in out


def test_corrupt_cache_entry_is_recomputed_by_the_cli(tmp_path, flux_pair, cache_dir, capsys):
    """A dtype byte flipped in the entry's header (F32→I32 made every later run exit 3): the next run
    recomputes (rc 0, the right parts), the one after hits."""
    assert _run(["decompose", *flux_pair, "--out", str(tmp_path / "o1"), "--quiet"], capsys)[0] == 0
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    tf = entry / "tensors.safetensors"
    data = tf.read_bytes()
    flip = next(f for f in ((b'"F32"', b'"I32"'), (b'"F64"', b'"I64"')) if f[0] in data[:4096])
    tf.write_bytes(data.replace(flip[0], flip[1], 1))
    code, out, err = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o2"), "--tau", "0.5", "--quiet"], capsys)
    assert code == 0 and "computed" in out and "unusable" in err
    code, _, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "ref"), "--tau", "0.5", "--no-cache", "--quiet"], capsys)
    assert code == 0
    got, ref = _snapshot(tmp_path / "o2"), _snapshot(tmp_path / "ref")
    assert sorted(got) == sorted(ref)
    for f in got:
        if f.endswith(".safetensors"):
            a, b = load_file(str(tmp_path / "o2" / f)), load_file(str(tmp_path / "ref" / f))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--tau", "0.3", "--quiet"], capsys)
    assert code == 0 and "cache hit" in out


def _parts_of(folder):
    """report.json's files → {file: record}; each file's product B·A per module."""
    rep = json.loads((folder / "report.json").read_text())
    return {r["file"]: r for r in rep["files"]}


def _dense_of(path):
    sd = load_file(str(path))
    return {k[len("transformer."):-len(".lora_A.weight")]: sd[k[: -len("lora_A.weight")] + "lora_B.weight"] @ sd[k]
            for k in sd if k.endswith("lora_A.weight")}


def _assert_file_holds(path, part):
    got = _dense_of(path)
    for mod, d in part.items():
        if torch.any(d.dense()):
            torch.testing.assert_close(got[mod], d.dense(torch.float32), atol=1e-6, rtol=1e-5)


def test_colliding_names_get_unique_files_recorded_in_the_report(tmp_path, tiny_flux, cache_dir, capsys):
    from devec_core import decompose
    from devec_core.formats import load_pool

    srcs = []
    for i in range(3):
        p = tmp_path / f"in{i}.safetensors"
        save_file(random_flux_lora(tiny_flux.transformer, rank=4, seed=10 + i), str(p))
        srcs.append(str(p))
    for names in (["x y", "x_y", "X_Y"], [".", "..", "vector"]):
        out = tmp_path / f"o-{len(names[0])}"
        code, _, err = _run(["decompose", *srcs, "--names", ",".join(names), "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
        files = _parts_of(out)
        uniques = {r["vector"]: f for f, r in files.items() if r["component"] == "unique"}
        assert sorted(uniques) == sorted(names) and len(set(uniques.values())) == 3
        assert len({f.lower() for f in files}) == len(files) == 4  # also distinct on case-insensitive disks
        assert sorted(p.name for p in out.iterdir()) == sorted(list(files) + ["report.json"])
        if "x_y" in names:
            assert uniques["x_y"] == "unique-x_y.safetensors"  # an exact name keeps its file
        dec = decompose(load_pool([__import__("pathlib").Path(s) for s in srcs], names), tau=0.85)
        for n, f in uniques.items():
            _assert_file_holds(out / f, dec.component("unique", n))
            assert read_devec_metadata(out / f)["vector"] == n


def test_pairwise_names_with_plus_are_unambiguous(tmp_path, tiny_flux, cache_dir, capsys):
    """'a'+'b+c' and 'a+b'+'c' both read 'a+b+c': two files, each holding its own pair's part."""
    from pathlib import Path

    from devec_core import decompose
    from devec_core.formats import load_pool

    a = random_flux_lora(tiny_flux.transformer, rank=4, seed=21)
    srcs = []
    for i in range(4):
        sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=30 + i)
        for k in sd:  # pairs share different directions, so every pair part differs
            if k.endswith("lora_B.weight"):
                sd[k][:, i % 2] = a[k][:, i // 2]
        p = tmp_path / f"in{i}.safetensors"
        save_file(sd, str(p))
        srcs.append(str(p))
    names = ["a", "b+c", "a+b", "c"]
    out = tmp_path / "o"
    code, _, err = _run(["decompose", *srcs, "--names", ",".join(names), "--mode", "pairwise", "--out", str(out), "--quiet"],
                        capsys)
    assert code == 0, err
    pairs = {tuple(r["pair"]): f for f, r in _parts_of(out).items() if r["component"] == "pair_shared"}
    assert len(pairs) == 6 and len(set(pairs.values())) == 6
    dec = decompose(load_pool([Path(s) for s in srcs], names), tau=0.85, mode="pairwise")
    for (x, y), f in pairs.items():
        assert read_devec_metadata(out / f)["pair"] == [x, y]
        _assert_file_holds(out / f, dec.component("pair_shared", (x, y)))
    with pytest.raises(ValueError, match="ambiguous"):
        dec.component("pair_shared", "a+b+c")


KILL = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import devec_core.cli as cli, devec_core.cli.outdir as outdir, devec_core.export as ex
where, out = sys.argv[1], Path(sys.argv[2]).resolve()
if where == "export":  # killed while writing the second part
    real, n = ex.save_part, [0]
    def save_part(*a, **k):
        n[0] += 1
        if n[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    ex.save_part = save_part
else:  # killed right after the first rename that touches --out
    outdir._exchange = lambda a, b: False  # no atomic exchange: the two-rename path
    real = os.replace
    def replace(a, b):
        r = real(a, b)
        if any(p == out or out in p.parents for p in (Path(a).resolve(), Path(b).resolve())):
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    os.replace = replace
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["export", "publish"])
def test_killed_run_never_mixes_outputs_and_its_temp_is_cleaned(tmp_path, flux_pair, where):
    """--out holds the old run or the new one, never both; the next run removes the killed run's temp folder."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    out = tmp_path / "o"
    run = lambda *a: subprocess.run([sys.executable, "-c", KILL.format(root=root), *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    args = ["decompose", *flux_pair, "--out", str(out), "--quiet", "--no-cache"]
    r = subprocess.run([sys.executable, "-m", "devec_core", *args, "--tau", "0.85"], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    old = _snapshot(out)
    r = run(where, str(out), *args, "--tau", "0.5")
    assert r.returncode == -9, r.stderr
    assert not out.exists() or _snapshot(out) == old  # never a mix of τ = 0.85 and τ = 0.5 files
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # the killed run's temp folder
    r = subprocess.run([sys.executable, "-m", "devec_core", *args, "--tau", "0.5"], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []
    assert json.loads((out / "report.json").read_text())["tau"] == 0.5
    assert {read_devec_metadata(p)["tau"] for p in out.glob("*.safetensors")} == {0.5}


def test_replacing_an_earlier_output_is_a_swap(tmp_path, flux_pair, cache_dir, capsys):
    out = tmp_path / "o"
    assert _run(["decompose", *flux_pair, "--out", str(out), "--quiet"], capsys)[0] == 0
    assert _run(["decompose", flux_pair[0], "--out", str(out), "--quiet"], capsys)[0] == 0  # fewer files now
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "shared.safetensors", "unique-pixel.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["decompose", *flux_pair, "--out", str(empty), "--quiet"], capsys)[0] == 0


def test_inspect(tmp_path, flux_pair, capsys):
    code, out, _ = _run(["inspect", *flux_pair], capsys)
    assert code == 0
    assert "format diffusers" in out and "base model: FLUX-like" in out and "modules 20 (r4×20)" in out
    assert "overlap pixel ~ ink: 20 common modules" in out and "mean max cos²" in out
    # every spectrum carries its chance level: the pair's line and the whole pool's regime
    assert "chance level: top eigenvalue median" in out and "modules above chance" in out
    assert "pool (joint, in the order given): chance level" in out and "regime " in out
    code, js, _ = _run(["inspect", "--json", *flux_pair], capsys)
    pair = json.loads(js)["pairs"][0]["chance"]
    assert pair["regime"] in ("shared", "weak", "chance", "saturated") and pair["modules"] == 20
    assert 0.0 <= pair["chance_median"] <= pair["chance_q95_median"] <= 1.0
    assert _rc(["inspect", *flux_pair, "--tau", "2"], capsys)[0] == 2
    code, out, _ = _run(["inspect", "--json", flux_pair[0]], capsys)
    info = json.loads(out)
    assert info["inputs"][0]["name"] == "pixel" and info["inputs"][0]["modules"] == 20


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "devec_core", "inspect", str(tmp_path / "nope.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.safetensors" in r.stderr


def _engine_has_budget():
    import devec_core.pool

    return hasattr(devec_core.pool, "WorkBudgetError")


@pytest.mark.skipif(not _engine_has_budget(), reason="needs the engine's rank and budget checks (issue 11, engine side)")
def test_hostile_files_fail_in_one_line_naming_file_and_module(tmp_path, flux_pair, cache_dir, capsys):
    """A LoRA declaring rank 64 on a 1×1 module, and a pool over the work budget: one line, exit 1, nothing in --out."""
    mod = "single_transformer_blocks.0.proj_out"
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        save_file({f"transformer.{mod}.lora_A.weight": torch.randn(64, 1, generator=g),
                   f"transformer.{mod}.lora_B.weight": torch.randn(1, 64, generator=g)}, str(tmp_path / f"h{i}.safetensors"))
    out = tmp_path / "o"
    code, err = _rc(["decompose", str(tmp_path / "h0.safetensors"), str(tmp_path / "h1.safetensors"), "--out", str(out), "--quiet"],
                    capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "h0.safetensors" in lines[0] and mod in lines[0] and "rank 64" in lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    code, err = _rc(["decompose", *flux_pair, "--out", str(out), "--quiet", "--max-work", "1000"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "max_work" in lines[0] and "module" in lines[0], err
    assert "pixel.safetensors" in lines[0] and not out.exists()
    code, _, err = _run(["decompose", *flux_pair, "--out", str(out), "--quiet", "--max-work", "1e15", "--max-memory-gb", "4"], capsys)
    assert code == 0, err
    assert _rc(["decompose", *flux_pair, "--out", str(tmp_path / "o2"), "--max-work", "-1"], capsys)[0] == 2
