"""Zipped folders, unpacked safely (``extract_zip``) into private temp folders removed at exit."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import stat
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

from .common import _CKPT_FILE_NAMES, _CKPT_INDEX_NAMES, _LORA_FILE_NAMES, PICKLE_SUFFIXES, FormatError, _default_name


ZIP_MAX_MEMBERS = 2000
ZIP_KEEP_SUFFIXES = (".safetensors", ".json")  # everything else (README.md, .txt, ...) is left in the zip
_ZIP_DIRS: dict[tuple, Path] = {}  # (zip path, size, mtime) -> unpacked folder, removed at exit
_ZIP_LOCK = threading.Lock()


def zip_max_bytes() -> int:
    """Cap on the unpacked size of a zip: ``$DEVEC_MAX_UNZIP_MB`` (default 4096 MB)."""
    return int(float(os.environ.get("DEVEC_MAX_UNZIP_MB", "4096")) * 2**20)


def extract_zip(path: Path, dest: Path, *, max_bytes: int | None = None, max_members: int = ZIP_MAX_MEMBERS) -> Path:
    """Unpack the weights and configs of a zip into ``dest`` (which must be empty or absent).

    Safe by construction: every member name is checked (no absolute path, drive, ``..`` or
    backslash; no symlink or other special file; not encrypted) before anything is written; the
    declared sizes must sum to at most ``max_bytes`` and the bytes actually written are counted
    against the same cap (a lying header cannot grow a file); at most ``max_members`` entries.
    Only ``.safetensors`` and ``.json`` members are written; pickled weights are refused.

    Returns:
        ``dest``.
    Raises:
        FormatError naming the zip and the offending member.
    """
    max_bytes = zip_max_bytes() if max_bytes is None else max_bytes
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{where!r}: not a readable zip file ({type(e).__name__}: {e})") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise FormatError(f"{where!r}: {len(infos)} entries, more than the limit of {max_members}")
        keep, total = [], 0
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise FormatError(f"{where!r}: unsafe member name {name!r} (absolute path or '..'); refused")
            mode = (info.external_attr >> 16) & 0o170000
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FormatError(f"{where!r}: member {name!r} is a link or special file; refused")
            if info.flag_bits & 0x1:
                raise FormatError(f"{where!r}: member {name!r} is encrypted; refused")
            if info.is_dir():
                continue
            low = name.lower()
            if low.endswith(PICKLE_SUFFIXES):
                raise FormatError(
                    f"{where!r}: member {name!r} is a pickled file ({Path(name).suffix}); unpickling can run code. "
                    f"Zip .safetensors weights instead"
                )
            if parts[0] == "__MACOSX" or parts[-1].startswith(".") or not low.endswith(ZIP_KEEP_SUFFIXES):
                continue
            total += info.file_size
            keep.append(info)
        if total > max_bytes:
            raise FormatError(f"{where!r}: {total / 2**20:.0f} MB unpacked, over the limit of {max_bytes / 2**20:.0f} MB")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        for info in keep:
            out = (dest / info.filename).resolve()
            if root not in out.parents:
                raise FormatError(f"{where!r}: member {info.filename!r} would be written outside the folder; refused")
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise FormatError(f"{where!r}: unpacks to more than {max_bytes / 2**20:.0f} MB; refused")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                raise FormatError(f"{where!r}: member {info.filename!r} is corrupt ({type(e).__name__}: {e})") from e
    return dest


def _cleanup_zip_dirs() -> None:
    for d in list(_ZIP_DIRS.values()):
        shutil.rmtree(d, ignore_errors=True)
    _ZIP_DIRS.clear()


atexit.register(_cleanup_zip_dirs)


def unpacked_zip(path: Path) -> Path:
    """The folder a zip unpacks to (unpacked once per process and file version; removed at exit)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _ZIP_LOCK:
        d = _ZIP_DIRS.get(key)
        if d is not None and d.is_dir():
            return d
        tmp = Path(tempfile.mkdtemp(prefix="devec_zip_"))
        try:
            extract_zip(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _ZIP_DIRS[key] = tmp
        return tmp


def forget_zip(path: Path) -> None:
    """Remove the unpacked folder of a zip now (the Studio calls this once its vectors are read)."""
    with _ZIP_LOCK:
        for key in [k for k in _ZIP_DIRS if k[0] == str(Path(path).resolve())]:
            shutil.rmtree(_ZIP_DIRS.pop(key), ignore_errors=True)


def _is_vector_folder(d: Path) -> bool:
    names = {p.name for p in d.iterdir() if p.is_file()}
    return bool(names & ({"adapter_config.json"} | set(_LORA_FILE_NAMES) | set(_CKPT_INDEX_NAMES) | set(_CKPT_FILE_NAMES)))


def zip_vectors(path: Path) -> list[tuple[str, Path]]:
    """The task vectors inside a zip: (name, folder or file) for each adapter folder, checkpoint
    folder or lone LoRA file, named by its folder (the Studio's own export zip gives
    ``unique-<name>``, ``shared`` ...). A zip of one folder gives that folder.

    Raises:
        FormatError when the zip holds nothing loadable.
    """
    top = root = unpacked_zip(path)
    while True:  # descend through single wrapping folders (a zip of "my_adapter/")
        entries = [p for p in root.iterdir()]
        if len(entries) == 1 and entries[0].is_dir() and not _is_vector_folder(root):
            root = entries[0]
        else:
            break
    if _is_vector_folder(root):
        return [(root.name if root != top else _default_name(path), root)]
    out = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        if _is_vector_folder(d) and not any(_is_vector_folder(a) for a in d.parents if root in a.parents):
            out.append((d.name, d))
    for f in sorted(root.glob("*.safetensors")):
        out.append((_default_name(f), f))
    if not out:
        raise FormatError(f"{str(path)!r}: the zip holds no adapter folder, LoRA file or checkpoint (.safetensors)")
    return out
