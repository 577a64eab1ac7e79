"""Keep freed large blocks in the process instead of giving them back to the kernel.

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as
blocks are freed) with a fresh mmap, and unmaps it on free. A training step allocates arrays of
tens of megabytes (results, gathers, decrypted frames) and frees them a moment later, so every
step page-faults its whole working set in again: a loop that allocates and frees two 61 MB
arrays 50 times spends 2.1 s of CPU with 69,000 minor faults, and 0.65 s with 900 once the
blocks are kept (measured on this 2-core box). `keep_freed_memory` raises the mmap threshold
to 1 GiB, turns off trimming and keeps one arena for every thread: the heap keeps its peak
size and reuses it.

The bottom of the package (imports nothing of enshuffle); called once at the start of every
command. A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep large freed blocks; True if it took effect (idempotent)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        # One arena for every thread: a thread's own arena is made of heaps of at most 64 MB,
        # so ZeroMQ's I/O thread would get every 61 MB frame it receives as a fresh mmap anyway
        # (15,000 faults per seed epoch, measured).
        ok = (
            bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
            and bool(libc.mallopt(M_ARENA_MAX, 1))
        )
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
