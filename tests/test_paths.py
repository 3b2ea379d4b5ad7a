"""The one cache-directory rule (devec_core/paths.py) and the content hash of a task vector
(TaskVector.digest): every caller agrees, and the hash sees content, not names or provenance."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devec_core import models
from devec_core.paths import cache_root
from devec_core.taskvec import Dense, LowRank, TaskVector


@pytest.mark.parametrize("devec, xdg, want", [
    ("{tmp}/mine", "{tmp}/xdg", "{tmp}/mine"),  # DEVEC_CACHE_DIR wins
    (None, "{tmp}/xdg", "{tmp}/xdg/devec"),  # else the XDG rule
    ("", "{tmp}/xdg", "{tmp}/xdg/devec"),  # an empty variable counts as unset
    (None, None, "{home}/.cache/devec"),
    (None, "", "{home}/.cache/devec"),
])
def test_cache_root_follows_devec_then_xdg_then_home(monkeypatch, tmp_path, devec, xdg, want):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var, val in (("DEVEC_CACHE_DIR", devec), ("XDG_CACHE_HOME", xdg)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, val.format(tmp=tmp_path))
    expected = Path(want.format(tmp=tmp_path, home=tmp_path / "home"))
    assert cache_root() == expected
    assert models.cache_dir() == expected  # the model cache follows the same rule (it ignored XDG before)
    assert not expected.exists()  # nothing is created by asking


def test_cli_default_cache_dir_is_the_rule(monkeypatch, tmp_path, capsys):
    """decompose refuses an --out inside the default cache: the default it checks is cache_root()."""
    from devec_core.cli import main

    monkeypatch.delenv("DEVEC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lora = tmp_path / "a.safetensors"
    save_file({"m.lora_A.weight": torch.ones(1, 4), "m.lora_B.weight": torch.ones(4, 1)}, str(lora))
    assert main(["decompose", str(lora), "--out", str(tmp_path / "xdg" / "devec" / "out"), "--quiet"]) == 2
    assert "overlaps the cache folder" in capsys.readouterr().err


def _vec(name="a", scale=0.5, dtype=torch.float32, meta=None):
    g = torch.Generator().manual_seed(0)
    return TaskVector(
        name,
        {"m": LowRank(torch.randn(4, 2, generator=g).to(dtype), torch.randn(2, 3, generator=g).to(dtype), scale),
         "d": Dense(torch.randn(3, 3, generator=g).to(dtype))},
        {"m.bias": torch.randn(4, generator=g).to(dtype)},
        meta or {},
    )


def test_digest_is_content_not_name_or_provenance():
    a = _vec()
    assert a.digest() == _vec().digest()  # deterministic
    assert a.digest(include_name=False) == _vec("b").digest(include_name=False)
    assert a.digest() != _vec("b").digest()
    assert a.digest() == _vec(meta={"source": "/somewhere/else"}).digest()  # where it came from is not content


@pytest.mark.parametrize("change", ["scale", "dtype", "factor", "extra", "module_name", "dense_vs_lowrank"])
def test_digest_changes_with_any_content(change):
    a, b = _vec(), _vec()
    if change == "scale":
        b = _vec(scale=0.25)
    elif change == "dtype":
        b = _vec(dtype=torch.float64)
    elif change == "factor":
        b.modules["m"].B[0, 0] += 1e-6
    elif change == "extra":
        b.extras["m.bias"][0] += 1e-6
    elif change == "module_name":
        b.modules["m2"] = b.modules.pop("m")
    elif change == "dense_vs_lowrank":  # the same matrix as factors or dense is stored differently
        b.modules["m"] = Dense(a.modules["m"].dense())
    assert a.digest() != b.digest()


def test_digest_equal_scalar_and_noncontiguous_tensors():
    """Layout in memory does not matter, values and shapes do."""
    W = torch.randn(3, 5)
    a = TaskVector("v", {"d": Dense(W.T.contiguous())}, {"s": torch.tensor(2.0)})
    b = TaskVector("v", {"d": Dense(W.T)}, {"s": torch.tensor(2.0)})  # a transposed view
    assert a.digest() == b.digest()
    assert a.digest() != TaskVector("v", {"d": Dense(W.T.contiguous())}, {"s": torch.tensor([2.0])}).digest()  # shape ()
