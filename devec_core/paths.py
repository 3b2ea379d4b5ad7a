"""Where DeVec keeps files on disk: the one cache-directory rule.

Every cache (decompositions, unpacked model files) lives under ``cache_root()``:
``$DEVEC_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/devec``, else ``~/.cache/devec``
(the XDG Base Directory rule). Nothing is created here; callers create what they use.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root: ``$DEVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/devec``, else ``~/.cache/devec``.

    Returns:
        The directory path (not created here). Empty variables count as unset.
    """
    if os.environ.get("DEVEC_CACHE_DIR"):
        return Path(os.environ["DEVEC_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "devec"
