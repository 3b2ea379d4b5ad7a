"""The output folder of ``decompose``: new, empty or an earlier output, replaced atomically.

The outputs are written in a sibling temp folder that is then swapped in (``renameat2`` exchange
on Linux, else two renames), so ``--out`` holds the old run's files or the new run's, never a mix;
temp folders left by killed runs are removed by the next run.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..cache import stale_temp
from .common import UsageError


def _listed_files(report: dict) -> set[str]:
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, list):
        raise ValueError("no file list")
    return {f["file"] if isinstance(f, dict) else str(f) for f in files}


def _check_out(out: Path, paths: list[Path], cache_dir: Path | None) -> None:
    """--out must be new, empty, or an earlier output (everything in it listed by its report.json),
    and must neither hold nor sit inside an input or the cache: it is replaced as a whole."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r}: exists and is not a folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(out.parent)!r} is not a folder")
    ro = out.resolve()
    for p in paths:
        rp = p.resolve()
        if rp == ro or ro in rp.parents:
            raise UsageError(f"--out {str(out)!r}: holds the input {str(p)!r}, and would be replaced")
        if rp in ro.parents:
            raise UsageError(f"--out {str(out)!r}: lies inside the input {str(p)!r}")
    if cache_dir is not None:
        rc = cache_dir.resolve()
        if rc == ro or ro in rc.parents or rc in ro.parents:
            raise UsageError(f"--out {str(out)!r}: overlaps the cache folder {str(cache_dir)!r}")
    if not out.is_dir():
        return
    items = sorted(p.name for p in out.iterdir())
    if not items:
        return
    try:
        listed = _listed_files(json.loads((out / "report.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--out {str(out)!r}: holds {items[0]!r} and is not an earlier DeVec output (no readable "
                         "report.json); it would be replaced: choose a new folder") from e
    extra = [n for n in items if n not in listed | {"report.json"}]
    if extra:
        raise UsageError(f"--out {str(out)!r}: holds {extra[0]!r}, which no earlier DeVec run wrote; "
                         "it would be replaced: move it or choose a new folder")


def _clean_stale_temps(out: Path) -> None:
    """Remove ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>-*`` folders whose process is gone."""
    if not out.parent.is_dir():
        return
    for pat in (f".{glob.escape(out.name)}.tmp-*", f".{glob.escape(out.name)}.old-*"):
        for d in out.parent.glob(pat):
            if d.is_dir() and stale_temp(d):
                shutil.rmtree(d, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` (a sibling: renames on one filesystem).

    out new: one rename. out existing: an atomic exchange, then the old folder is removed; where
    the exchange is missing, two renames (out is briefly absent, never a mix of two runs).
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # tmp now holds the old outputs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.replace(out, old / "out")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
