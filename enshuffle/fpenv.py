"""Flush-to-zero for the node process: subnormal ("denormal") floats read and produced as zero.

On many CPUs an arithmetic instruction whose input or result is subnormal (float32 below
1.18e-38, float64 below 2.2e-308) takes a slow microcode path, tens to hundreds of times the
normal cost: float32 products of saturated-sigmoid deltas can crawl. The cure is the CPU's own
modes, FTZ (results below the smallest normal become 0) and DAZ (subnormal inputs count as 0),
which are what `torch.set_flush_denormal` and compilers' -ffast-math set. numpy has no switch for
them, so this module sets them through the C library's `fegetenv`/`fesetenv` (ctypes, no
compiled code, no dependency):

* x86-64 Linux: MXCSR bits FTZ (15) and DAZ (6), the last 4 bytes of glibc's and musl's 32-byte
  `fenv_t`;
* aarch64 Linux: FPCR bit FZ (24), the first 4 bytes of `fenv_t` (FZ covers inputs and results).

The modes belong to a thread and are copied to threads it creates later, so `enshuffle node`
calls `flush_denormals()` first thing, in its main thread, before numpy loads (OpenBLAS starts its
worker threads when numpy is imported): every BLAS worker, the daemon thread and the main thread
then flush. (numpy's own OpenBLAS is built with CONSISTENT_FPCSR and also hands the caller's mode
to its workers with every call; other builds do not, hence the order.) Anything else (a platform
whose layout we do not know, a C library without fesetenv) is left alone and reported.

What it changes in results: only values in the subnormal range. Each product term or partial sum
below the smallest normal number becomes 0, so an entry of C = A @ B moves by at most
K x (smallest normal) in absolute terms, 1.2e-38 x K for float32: below the rounding of any entry
that is not itself within a factor K of underflow. Entries that small were already inexact
(gradual underflow keeps only the bits above 2^-149). Nothing here imports numpy.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys

_FENV_BYTES = 64  # larger than any fenv_t we handle (32 on x86-64, 8 on aarch64)
_X86_MXCSR_OFFSET = 28
_X86_FTZ_DAZ = (1 << 15) | (1 << 6)
_X86_MASKS = 0x1F80  # the six exception-mask bits, all set unless someone enabled traps
_ARM_FZ = 1 << 24


@functools.lru_cache(maxsize=1)
def _libm():
    """The C library's fenv functions: libm.so.6 (glibc, also musl's libc), else whatever this
    process has loaded. Not ctypes.util.find_library, which runs ldconfig (10 ms at start)."""
    try:
        return ctypes.CDLL("libm.so.6")
    except OSError:
        return ctypes.CDLL(None)


def _layout() -> tuple[int, int] | None:
    """(offset of the control word in fenv_t, bits to set), or None where we do not know fenv_t."""
    if not sys.platform.startswith("linux"):
        return None
    machine = os.uname().machine.lower()
    if machine in ("x86_64", "amd64"):
        return _X86_MXCSR_OFFSET, _X86_FTZ_DAZ
    if machine in ("aarch64", "arm64"):
        return 0, _ARM_FZ
    return None


def _smallest_normal_halved() -> float:
    """2^-1023, a subnormal double, computed at run time (a literal would be folded at compile time)."""
    tiny = struct.unpack("<d", struct.pack("<Q", 0x0010000000000000))[0]  # 2^-1022, the smallest normal
    return tiny * 0.5


def flushing() -> bool:
    """Does this thread flush subnormals now? Tested, not read: half the smallest normal double
    comes out 0 only under FTZ."""
    return _smallest_normal_halved() == 0.0


def flush_denormals() -> str:
    """Set FTZ/DAZ for this thread (and threads it starts later); return one line saying what
    happened. Never raises: an unknown platform keeps IEEE gradual underflow."""
    if flushing():
        return "denormals: flushed to zero (already set)"
    layout = _layout()
    if layout is None:
        machine = os.uname().machine if hasattr(os, "uname") else "?"
        return f"denormals: not flushed (no known flush-to-zero control on {sys.platform} {machine})"
    offset, bits = layout
    try:
        libm = _libm()
        env = ctypes.create_string_buffer(_FENV_BYTES)
        if libm.fegetenv(env) != 0:
            return "denormals: not flushed (fegetenv failed)"
        saved = env.raw
        (word,) = struct.unpack_from("<I", saved, offset)
        if offset == _X86_MXCSR_OFFSET and word & _X86_MASKS != _X86_MASKS:
            return f"denormals: not flushed (unexpected MXCSR 0x{word:04x}; left alone)"
        struct.pack_into("<I", env, offset, word | bits)
        if libm.fesetenv(env) != 0:
            return "denormals: not flushed (fesetenv failed)"
        if not flushing():  # the layout was not what we thought: put everything back
            libm.fesetenv(ctypes.create_string_buffer(saved, _FENV_BYTES))
            return "denormals: not flushed (the C library's fenv_t is laid out differently)"
    except (OSError, AttributeError, struct.error) as exc:
        return f"denormals: not flushed ({exc})"
    return "denormals: flushed to zero (FTZ/DAZ)"


class flushed_denormals:
    """`with flushed_denormals():` this thread flushes subnormals inside the block and gets its
    previous mode back after it (the coordinator's float32 steps: `Trainer.run_step`). Costs two
    fegetenv/fesetenv calls, a few microseconds; a no-op where flush_denormals() cannot set it."""

    def __enter__(self) -> "flushed_denormals":
        self._saved = None
        if flushing() or _layout() is None:
            return self
        try:
            env = ctypes.create_string_buffer(_FENV_BYTES)
            if _libm().fegetenv(env) == 0:
                self._saved = env.raw
        except (OSError, AttributeError):
            return self
        flush_denormals()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            _libm().fesetenv(ctypes.create_string_buffer(self._saved, _FENV_BYTES))
