"""An upload batch keeps its good files and names the bad ones (issue 15 point 7): each bad file by
the name it was uploaded under, never the server's temp path (Gradio keeps uploads in
``…/gradio/<hash>/<name>``), with why."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from devec_core import studio
from devec_core.studio import StudioError
from tests.tiny_models import random_llama_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_base(tiny_llm):
    """The tiny Llama as the Studio's loaded base "tiny-up" (given back after)."""
    from devec_core.backends.llm import LLMBackend

    be = LLMBackend(*tiny_llm)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(studio._BACKENDS, ("llm", "tiny-up"), be)
        yield be


def _uploaded(tmp_path, name: str) -> str:
    """Where Gradio would put an upload called ``name``: a temp folder named by a hash."""
    d = tmp_path / "gradio" / f"{abs(hash(name)):016x}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d / name)


def _good_zip(tmp_path, tiny_llm, name: str, seed: int) -> str:
    from peft import LoraConfig

    d = tmp_path / "src" / name
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in random_llama_lora(tiny_llm[0], rank=2, seed=seed).items()}, str(d / "adapter_model.safetensors"))
    LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS).save_pretrained(str(d))
    made = shutil.make_archive(str(d), "zip", root_dir=d)
    dest = _uploaded(tmp_path, f"{name}.zip")
    shutil.move(made, dest)
    return dest


def _corrupt(tmp_path, name: str = "broken.safetensors") -> str:
    p = _uploaded(tmp_path, name)
    with open(p, "wb") as f:
        f.write(os.urandom(300))  # not a safetensors header
    return p


def _temp_dirs(tmp_path, files) -> list[str]:
    return [os.path.dirname(f) for f in files] + [str(tmp_path)]


def test_two_good_and_one_corrupt_keeps_the_two_and_names_the_one(tmp_path, tiny_llm):
    files = [_good_zip(tmp_path, tiny_llm, "style-a", 1), _corrupt(tmp_path), _good_zip(tmp_path, tiny_llm, "style-b", 2)]
    rejected: list[str] = []
    vecs = studio.custom_vectors(files, [], rejected=rejected)
    assert [v.meta["input"] for v in vecs] == ["style-a.zip:style-a", "style-b.zip:style-b"]  # the good two, in order
    # the good ones are the files' own LoRAs, not something else: B·A·(alpha/r) of the file
    want = random_llama_lora(tiny_llm[0], rank=2, seed=1)
    mod = next(iter(vecs[0].modules))
    A = want[f"base_model.model.{mod}.lora_A.weight"]
    B = want[f"base_model.model.{mod}.lora_B.weight"]
    assert torch.allclose(vecs[0].modules[mod].dense(), (B @ A) * (4 / 2), atol=1e-6)
    assert len(rejected) == 1
    msg = rejected[0]
    assert msg.startswith("could not read upload 'broken.safetensors': ") and msg.count("broken.safetensors") == 1
    assert len(msg) > len("could not read upload 'broken.safetensors': ")  # and why
    for d in _temp_dirs(tmp_path, files):
        assert d not in msg, msg


def test_the_studio_opens_the_good_ones_and_says_which_was_left_out(tmp_path, tiny_llm, tiny_base):
    files = [_good_zip(tmp_path, tiny_llm, "style-a", 1), _corrupt(tmp_path), _good_zip(tmp_path, tiny_llm, "style-b", 2)]
    s, dec = studio.open_custom("llm", "tiny-up", files, [], tau=0.5)
    assert len(s.names) == 2 and len(dec.names) == 2
    md = studio.session_markdown(s)
    assert "not loaded" in md and "broken.safetensors" in md
    assert str(tmp_path) not in md and "gradio" not in md
    # the session's source still loads the same pool again (a ZeroGPU worker, an evicted pool)
    with studio._LOCK:
        studio._POOLS.pop(s.pool_key, None)
    assert [v.name for v in studio.session_pool(s)] == s.names


def test_every_bad_file_is_named_with_why_and_none_is_a_path(tmp_path, tiny_llm):
    good = _good_zip(tmp_path, tiny_llm, "good", 3)
    pickled = _uploaded(tmp_path, "adapter.bin")
    with open(pickled, "wb") as f:
        f.write(b"\x80\x04not a pickle")
    notzip = _uploaded(tmp_path, "folder.zip")
    with open(notzip, "wb") as f:
        f.write(b"PK not really")
    files = [pickled, good, _corrupt(tmp_path, "a.safetensors"), notzip, _uploaded(tmp_path, "gone.safetensors")]
    rejected: list[str] = []
    vecs = studio.custom_vectors(files, [], rejected=rejected)
    assert len(vecs) == 1
    assert len(rejected) == 4
    joined = "\n".join(rejected)
    for name, why in (("adapter.bin", "pickled"), ("a.safetensors", "could not read"), ("folder.zip", "could not read"), ("gone.safetensors", "did not arrive")):
        line = next(r for r in rejected if f"'{name}'" in r)
        assert why in line, line
    for d in _temp_dirs(tmp_path, files):
        assert d not in joined, joined


def test_a_batch_with_nothing_readable_is_an_error_naming_each_file(tmp_path):
    files = [_corrupt(tmp_path, "one.safetensors"), _corrupt(tmp_path, "two.safetensors")]
    with pytest.raises(StudioError) as err:
        studio.custom_vectors(files, [], rejected=[])
    msg = str(err.value)
    assert err.value.__cause__ is not None  # the reader's own error stays chained
    assert "'one.safetensors'" in msg and "'two.safetensors'" in msg
    for d in _temp_dirs(tmp_path, files):
        assert d not in msg
    with pytest.raises(StudioError, match="one.safetensors"):  # same through the Studio
        studio.open_custom("llm", "tiny-up", files, [])


def test_without_a_list_any_bad_file_still_raises_and_names_all(tmp_path, tiny_llm):
    """Callers that cannot show a note (no ``rejected`` list) are never handed a silently smaller pool."""
    files = [_good_zip(tmp_path, tiny_llm, "good", 4), _corrupt(tmp_path, "x.safetensors"), _corrupt(tmp_path, "y.safetensors")]
    with pytest.raises(StudioError) as err:
        studio.custom_vectors(files, [])
    assert "'x.safetensors'" in str(err.value) and "'y.safetensors'" in str(err.value) and "2 of the uploads / Hub ids could not be read" in str(err.value)


def test_scrub_names_the_upload_not_the_server_copy(tmp_path):
    from pathlib import Path

    from devec_core.studio.uploads import _scrub

    p = Path(_uploaded(tmp_path, "mine.safetensors"))
    msg = f"error while reading {p}: bad header; folder {p.parent} / {p.parent}/other.json"
    out = _scrub(msg, p, "mine.safetensors")
    assert str(tmp_path) not in out and "mine.safetensors" in out and "other.json" in out
