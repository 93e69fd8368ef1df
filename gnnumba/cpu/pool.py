"""Memory for the CPU kernels' large outputs: freed buffers are kept and handed out again.

Why: glibc gives large blocks back to the kernel when they are freed (above its mmap
threshold, or by trimming the top of the heap), and the next output of the same size then
takes a page fault per 4 KiB on first write. A training loop through ``gnnumba.torch`` at
2x320x64x64 (forward + backward, two 10 MiB outputs per step) measured 8.5 ms per step that
way against 1.6 ms with the memory kept (glibc's ``mallopt`` set to keep it; the NumPy API's
allocation pattern happened not to trigger the trimming: 1.0 ms). torch's own allocator has
the same problem, which is part of why a fresh output costs torch so much at large sizes.

How a buffer is known to be free: every output is a view of a pool-owned byte buffer, and a
view keeps its base alive (so does any tensor made from it by DLPack, through the capsule).
A buffer whose reference count shows only the pool's own reference has no view left: it is
free, and the next request of the same byte size gets it, its pages already mapped and
often still in cache. Free buffers beyond ``config.CPU_POOL_MAX_FREE_BYTES`` are let go,
least recently used first; ``release()`` lets them all go (as ``torch.cuda.empty_cache()``).

Requests under ``config.CPU_POOL_MIN_BYTES`` are plain ``np.empty``: glibc serves small
blocks from memory it keeps, and the lookup would cost more than it saves.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading

import numpy as np

from .. import config

_lock = threading.Lock()
_buffers: dict[int, list[list]] = {}  # nbytes -> [buffer, last use] entries, in use or free
_clock = itertools.count()

_probe = [np.empty(1, np.uint8), 0]
_FREE_REFS = sys.getrefcount(_probe[0])  # the count of a buffer only an entry refers to
del _probe


def _reinit_after_fork():  # a lock held by another thread at fork would never be released
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _is_free(entry: list) -> bool:
    return sys.getrefcount(entry[0]) <= _FREE_REFS


def empty(nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` whose contents are undefined (pages mapped when it is a
    reused one)."""
    if nbytes < config.CPU_POOL_MIN_BYTES or nbytes > config.CPU_POOL_MAX_FREE_BYTES:
        return _new(nbytes)
    with _lock:
        entries = _buffers.setdefault(nbytes, [])
        for entry in entries:
            if _is_free(entry):
                entry[1] = next(_clock)
                return entry[0]
        _trim(config.CPU_POOL_MAX_FREE_BYTES - nbytes)
        buf = _new(nbytes)
        entries.append([buf, next(_clock)])
        return buf


def _new(nbytes: int) -> np.ndarray:
    """A fresh buffer; large ones have their pages touched first, on this thread: when the
    threads of a parallel kernel take those page faults together they sometimes collapse on
    this kind of VM (at 8x256x64x64 backward: 4.5 ms median, 24-56 ms at the 75th-90th
    percentile; touched first: +-4%)."""
    buf = np.empty(nbytes, np.uint8)
    if nbytes >= config.CPU_PREFAULT_MIN_BYTES:
        buf[::4096] = 0
    return buf


def _trim(keep: int) -> None:
    """Let go of free buffers, least recently used first, until at most ``keep`` bytes of
    free buffers remain (called with the lock held)."""
    free = [(entry[1], n, entry) for n, entries in _buffers.items() for entry in entries
            if _is_free(entry)]
    total = sum(n for _, n, _ in free)
    for _, n, entry in sorted(free, key=lambda f: f[0]):
        if total <= max(keep, 0):
            break
        entries = _buffers[n]
        del entries[next(i for i, e in enumerate(entries) if e is entry)]
        total -= n


def release() -> None:
    """Let every free buffer go (their memory returns to the allocator)."""
    with _lock:
        _trim(0)
        for n in [n for n, entries in _buffers.items() if not entries]:
            del _buffers[n]


def free_bytes() -> int:
    """Bytes held in free buffers."""
    with _lock:
        return sum(n for n, entries in _buffers.items() for e in entries if _is_free(e))
