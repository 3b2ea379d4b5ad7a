"""Shared test setup: offline environment and session-scoped tiny models (see tests/tiny_models.py).

Fixtures (session scope, shared by every test — restore any weights you change):
    tiny_flux      -> diffusers FluxPipeline (tiny, CPU, float32, eval)
    tiny_llm       -> (LlamaForCausalLM tiny, tokenizer with chat template)
    tiny_flux_loras -> list of 3 random diffusers-format FLUX LoRA state dicts (rank 4, seeds 1..3)
    tiny_llm_loras  -> list of 3 random PEFT-format Llama LoRA state dicts (rank 4, seeds 1..3)
Module scope:
    llm            -> (LLMBackend over a private tiny Llama, task vectors v1..v3): restored at the end
    llm_backend    -> LLMBackend over the shared tiny_llm, registered in the Studio as base "tiny"
Need a private copy to mutate freely? Call tiny_flux_pipeline() / tiny_llama() yourself.
"""

import contextlib
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tests.tiny_models import llama_vectors, random_flux_lora, random_llama_lora, tiny_flux_pipeline, tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run where CUDA is present and are skipped elsewhere (``pytest -m gpu`` on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_flux():
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_llm():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_flux_loras(tiny_flux):
    return [random_flux_lora(tiny_flux.transformer, rank=4, seed=s) for s in (1, 2, 3)]


@pytest.fixture(scope="session")
def tiny_llm_loras(tiny_llm):
    return [random_llama_lora(tiny_llm[0], rank=4, seed=s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def llm():
    """A private tiny Llama in an LLMBackend, and three random rank-4 LoRA task vectors on it."""
    from devec_core.backends.llm import LLMBackend

    model, tok = tiny_llama(seed=0)
    backend = LLMBackend(model, tok)
    yield backend, llama_vectors(model)
    backend.restore()


@pytest.fixture(scope="module")
def llm_backend(tiny_llm):
    """The shared tiny LLM registered under base "tiny" (the Studio loads bases by name); the
    Studio's backend cache is given back as it was, and the weights restored."""
    from devec_core import studio
    from devec_core.backends.llm import LLMBackend

    model, tok = tiny_llm
    be = LLMBackend(model, tok)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(studio._BACKENDS, ("llm", "tiny"), be)
        yield be
        be.restore()


@contextlib.contextmanager
def launched_app(cache_dir: Path):
    """``app.build_demo()`` served on a free localhost port with its own DEVEC_CACHE_DIR (restored
    afterwards); yields the URL. Used by the API and browser tests."""
    with pytest.MonkeyPatch.context() as mp:  # the variable is restored however this ends
        mp.setenv("DEVEC_CACHE_DIR", str(cache_dir))
        import app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo = app.build_demo()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.LAUNCH_KWARGS)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
