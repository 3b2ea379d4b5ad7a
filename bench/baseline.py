"""``devec_core`` as it was at an earlier git commit, for same-run comparisons in the benches
(``--baseline-ref``): ``python bench/bench_decompose.py --baseline-ref REF`` and bench_cache.py."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path


def load_baseline(ref: str):
    """Import ``devec_core`` as it was at git commit ``ref``, under the name ``devec_baseline``."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="devec-baseline-"))
    tar = subprocess.run(["git", "-C", str(root), "archive", ref, "devec_core"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    (tmp / "devec_core").rename(tmp / "devec_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("devec_baseline")
