"""What the Studio's users share: loaded pools, decompositions and base models, process-wide,
keyed by content, guarded by one lock.

Nothing here holds a user's choice (those live in ``Session``): a pool is keyed by the content
hash of its vectors, a decomposition by ``Session.key()`` (pool, mode, target, references), a
base model by (kind, base id). Each backend has its own lock for apply + generate.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from ..pool import Decomposition
from ..taskvec import TaskVector
from .session import StudioError

LOCK = threading.RLock()
POOLS: "OrderedDict[str, list[TaskVector]]" = OrderedDict()  # pool_key -> vectors
DECOMPS: "OrderedDict[tuple, Decomposition]" = OrderedDict()  # Session.key() -> decomposition
PRESET_POOLS: dict[str, str] = {}  # preset id -> pool key (presets are loaded once)
BACKENDS: dict[tuple[str, str], object] = {}  # (kind, base) -> backend; each has its own lock
MAX_POOLS, MAX_DECOMPS = 4, 8


def lru_put(cache: OrderedDict, key, value, cap: int) -> None:
    """Insert ``key`` as the most recent entry; drop the oldest beyond ``cap``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > cap:
        cache.popitem(last=False)


def pool_key(vectors: list[TaskVector]) -> str:
    """Content hash of a pool in order (names included): the key of every cache."""
    h = hashlib.sha256()
    for v in vectors:
        h.update(v.digest(include_name=True).encode())
    return h.hexdigest()[:20]


def remember_pool(vectors: list[TaskVector]) -> str:
    """Keep a pool in the process cache and return its key."""
    key = pool_key(vectors)
    with LOCK:
        lru_put(POOLS, key, vectors, MAX_POOLS)
    return key


def get_pool(key: str) -> list[TaskVector]:
    """The pool cached under ``key``; a StudioError when it was dropped (LRU, restart)."""
    with LOCK:
        if key not in POOLS:
            raise StudioError("this pool is no longer in memory (the server restarted or many pools were opened): load it again")
        POOLS.move_to_end(key)
        return POOLS[key]
