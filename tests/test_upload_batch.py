"""Upload batches (issue 15 item 7): a batch with nothing readable is refused with every reason
(the good-files-kept case is in tests/test_uploads.py)."""

import shutil

import pytest
from safetensors.torch import save_file

from devec_core import studio
from devec_core.studio import StudioError
from tests.tiny_models import LLAMA_TARGETS, random_llama_lora, tiny_llama


def _zipped_adapter(tmp_path, name, seed):
    from peft import LoraConfig

    model, _ = tiny_llama()
    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in random_llama_lora(model, rank=2, seed=seed).items()}, str(d / "adapter_model.safetensors"))
    LoraConfig(r=2, lora_alpha=2, target_modules=list(LLAMA_TARGETS)).save_pretrained(str(d))
    return shutil.make_archive(str(d), "zip", root_dir=d)


def test_nothing_readable_is_refused_with_every_reason(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    a.write_bytes(b"garbage")
    b.write_bytes(b"garbage")
    with pytest.raises(StudioError, match=r"a\.safetensors.*b\.pt|b\.pt.*a\.safetensors"):
        studio.custom_vectors([str(a), str(b)], [], base="tiny-base")
    with pytest.raises(StudioError, match="b.pt"):  # one bad file alone: its own message
        studio.custom_vectors([str(b)], [], base="tiny-base")
