"""Run app.py as a ZeroGPU Space runs it, on the CPU (used by tests/test_space.py, in a subprocess).

``spaces`` has no CPU or mock mode: with SPACES_ZERO_GPU set it needs the platform's device API
(SPACES_ZERO_DEVICE_API_URL) to schedule a GPU, and its worker initialises CUDA. So this script
keeps the real ZeroGPU machinery — ``import spaces`` patching torch in the main process (emulated
CUDA), module-scope ``.to("cuda")`` recorded, the weights packed to disk at startup
(``spaces.zero.startup``), the forked worker (reused while warm), arguments and results pickled
through its queues, torch un-patched in the worker — and replaces only the three things that need
the platform: the scheduler client (schedule / allow / release / startup report), CUDA init in the
worker, and the disk → GPU copy (disk → CPU here, read back from the real pack file).

Usage (environment set by the test): python tests/zerogpu_rehearsal.py WORKDIR
WORKDIR holds tiny-flux/ and tiny-llama/ (save_pretrained folders) and loras.pt; the report is
written to WORKDIR/report.json, images to WORKDIR/flux_*.npy.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
work = Path(sys.argv[1])

import torch  # noqa: E402

# Stub 0: spaces reads torch.version.cuda and saves torch._C._cuda_init, which only a CUDA build of
# torch has (the Space's torch is one; ours is the CPU build)
if torch.version.cuda is None:
    torch.version.cuda = "12.8"


def _no_cuda_here():
    raise RuntimeError("CUDA init reached in the rehearsal (CPU torch)")


def _not_in_bad_fork():  # the CPU build's torch.cuda._is_in_bad_fork is a lambda: not picklable
    return False


if not hasattr(torch._C, "_cuda_init"):
    torch._C._cuda_init = _no_cuda_here
    torch.cuda._is_in_bad_fork = _not_in_bad_fork

import spaces  # noqa: E402,F401  (as on the Space: before any model is built)
import spaces.zero  # noqa: E402
from spaces.zero import client as zclient  # noqa: E402
from spaces.zero import torch as ztorch  # noqa: E402
from spaces.zero.api import ScheduleResponse  # noqa: E402
from spaces.zero.torch import patching  # noqa: E402
import spaces.utils  # noqa: E402

assert torch.cuda.is_available(), "spaces did not patch torch: is SPACES_ZERO_GPU set?"

# --- the platform stubs ----------------------------------------------------------------------
scheduled: list[float] = []


def _schedule(task_id, request=None, duration=None, gpu_size=None, **_):
    scheduled.append(duration.total_seconds() if isinstance(duration, timedelta) else float(duration or 60))
    return ScheduleResponse(idle=True, nvidiaIndex=0, nvidiaUUID="rehearsal-cpu", allowToken="rehearsal")


zclient.schedule = _schedule
zclient.allow = lambda *a, **k: None
zclient.release = lambda *a, **k: None
zclient.startup_report = lambda *a, **k: None


def _pack_to_cpu(pack) -> None:
    """Like spaces' pack_to_cuda, onto the CPU: read the pack file, point each fake at its data."""
    raw = bytearray(Path(pack.path()).read_bytes())
    buf = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    off = 0
    for tensor, size, asize in [t for batch in pack.batches for t in batch] + list(pack.big_tensors):
        data = buf[off : off + size].clone().view(tensor.dtype).view(tensor.shape) if size else torch.empty(tensor.shape, dtype=tensor.dtype)
        for fake in pack.fakes[tensor]:
            fake.data = data
        off += asize


def _move_to_cpu(callback=None) -> None:
    for fake, original in patching.cuda_aliases.items():
        if original is not None:  # registered after the startup pack
            fake.data = original
    for pack in patching.tensor_packs:
        _pack_to_cpu(pack)


ztorch.init = lambda nvidia_uuid: None  # the real one sets CUDA_VISIBLE_DEVICES and touches CUDA
ztorch.move = _move_to_cpu

# what crosses into the worker: count tensors, and any on CUDA or emulated by ZeroGPU
crossed: list[dict] = []
_put = spaces.utils.SimpleQueue.put


def _is_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or t in patching.cuda_aliases


def _tensors(obj, seen=None):
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from _tensors(v, seen)


def _recording_put(self, obj):
    if os.getpid() == MAIN_PID and isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], tuple):
        (args, kwargs), _ctx = obj
        ts = list(_tensors((args, kwargs)))
        crossed.append({
            "types": [type(a).__name__ for a in args],
            "tensors": len(ts),
            "gpu_tensors": sum(_is_gpu(t) for t in ts),
            "pickle_bytes": len(pickle.dumps((args, kwargs))),
        })
    return _put(self, obj)


MAIN_PID = os.getpid()
spaces.utils.SimpleQueue.put = _recording_put

# --- the app, as the Space imports it ---------------------------------------------------------
t0 = time.perf_counter()
import app  # noqa: E402  (module scope: preload builds the bases, "cuda" ones emulated)
from devec_core import hosting, studio  # noqa: E402

import_s = time.perf_counter() - t0
# which process renders: run_job is called by the GPU function in the worker, or in this process
_run_job = studio.run_job


def _run_job_noting_pid(job):
    with open(work / "pids.txt", "a") as f:
        f.write(f"{job.kind} {job.base} {os.getpid()}\n")
    return _run_job(job)


studio.run_job = _run_job_noting_pid
spaces.zero.startup()  # what the platform runs at launch: pack the emulated-CUDA weights to disk
packed_bytes = sum(p.total_size for p in patching.tensor_packs)
offloaded_in_main = all(v is None for v in patching.cuda_aliases.values())

loras = torch.load(work / "loras.pt")
from tests.tiny_models import lora_to_taskvector  # noqa: E402

report: dict = {"import_s": import_s, "preloaded": app.PRELOADED, "packed_bytes": packed_bytes,
                "main_weights_offloaded": offloaded_in_main, "main_pid": MAIN_PID}
results: dict = {}


def generate(session, prompt, seed, *settings):
    """What the app's Generate handler does on a Space (app.py ``on_generate``): the job is made in
    the main process, ``app.run_generation`` runs it where the model lives (the GPU function for
    FLUX and the tiny Llama, this process for SmolLM2), the texts are scored here. Returns
    [left output, DeVec output]."""
    c = studio.default_coefficients(session)
    make = studio.flux_job if session.backend == "flux" else studio.llm_job
    r = studio.score_job(session, app.run_generation(make(session, c, prompt, seed, *settings)))
    return [r.vanilla, r.devec]


def requests():
    """What Gradio does: handlers in a worker thread (torch modes are per thread)."""
    flux_vecs = [lora_to_taskvector(sd, f"style{i}", "transformer.") for i, sd in enumerate(loras["flux"])]
    for v in flux_vecs:
        v.meta["family"] = "flux"
    s, _ = studio.open_vectors(flux_vecs, "flux", str(work / "tiny-flux"))
    n0 = len(scheduled)
    r = generate(s, "a fox", 1, 2, 64, 64)
    results["flux"] = {"scheduled": scheduled[n0:], "out": r}

    llm_vecs = [lora_to_taskvector(sd, f"skill{i}", "base_model.model.") for i, sd in enumerate(loras["llm"])]
    s, _ = studio.open_vectors(llm_vecs, "llm", str(work / "tiny-llama"))
    n0 = len(scheduled)
    r = generate(s, "hello", 0, 8)
    results["tiny_llm"] = {"scheduled": scheduled[n0:], "out": r}
    n0 = len(scheduled)
    r = generate(s, "hello", 0, 8)  # a warm worker this time
    results["tiny_llm_again"] = {"scheduled": scheduled[n0:], "out": r}

    s, _ = studio.open_preset("smollm2-offline")
    n0 = len(scheduled)
    r = generate(s, s.prompts[0] if s.prompts else "Tell me about penguins.", 0, 12)
    results["smollm2"] = {"scheduled": scheduled[n0:], "out": r}


errors: list[str] = []


def _guarded():
    try:
        requests()
    except Exception as e:  # noqa: BLE001
        import traceback

        errors.append("".join(traceback.format_exception(e)))


th = threading.Thread(target=_guarded)
th.start()
th.join()
report["errors"] = errors
import numpy as np  # noqa: E402

for k, v in results.items():
    out = v["out"]
    report[k] = {"scheduled": v["scheduled"], "types": [type(o).__name__ for o in out],
                 "gpu_tensors_back": len(hosting.cuda_tensors(out)),
                 "texts": [o for o in out[:2] if isinstance(o, str)]}
    if k == "flux":
        for name, img in zip(("vanilla", "devec"), out[:2]):
            np.save(work / f"flux_{name}.npy", np.asarray(img))
report["crossed"] = crossed
report["decomposition_gpu_tensors"] = sum(_is_gpu(t) for t in _tensors(list(studio._DECOMPS.values())))
report["pids"] = (work / "pids.txt").read_text().splitlines() if (work / "pids.txt").exists() else []
report["expected"] = {"flux": hosting.flux_duration(2, 64, 64), "llm": hosting.llm_duration(8)}
(work / "report.json").write_text(json.dumps(report, default=str, indent=1))
print("rehearsal done", flush=True)
import multiprocessing  # noqa: E402

for child in multiprocessing.active_children():  # the warm GPU workers wait for the next call
    child.terminate()
    child.join(10)
os._exit(0)  # skip interpreter teardown of the patched torch
