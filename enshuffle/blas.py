"""How many threads the BLAS under numpy uses: set before numpy loads, or changed while running.

Owns three things:

* `thread_env(n)` and `idle_env()`: the environment variables OpenBLAS, OpenMP and MKL read once,
  when numpy's BLAS is loaded. They must be in `os.environ` before the first `import numpy`,
  which is why `enshuffle node` sets them at the top of its handler.
* `set_blas_threads(n)`: a best-effort runtime change through ctypes on the OpenBLAS numpy has
  already loaded (numpy 2.x wheels ship `scipy_openblas64_`, whose setter is
  `scipy_openblas_set_num_threads64_`). The library is found through /proc/self/maps (what is
  really mapped into this process), else numpy's `.libs` directory. No threadpoolctl. Finding
  it costs a millisecond or two (it reads /proc/self/maps), so it is for rare changes.
* `BlasThreads`: the same setter looked up once, for a change before every product (under a
  microsecond): the node runs small products on one thread (see its docstring).

Nothing here imports numpy at module level, so importing it does not load the BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Mapping
from pathlib import Path

THREAD_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Setter symbols, most specific first: numpy 2.x wheels (64-bit ints, renamed symbols), then
# scipy-openblas 32-bit builds, then a system OpenBLAS.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


# OpenBLAS worker threads spin (busy-wait) for 2^THREAD_TIMEOUT CPU cycles after each parallel
# call before they sleep: 2^28 cycles, about 0.1 s, by default. Between a node's batches that is a
# core burnt for nothing, taken from the coordinator or the volunteer. 4 is OpenBLAS's minimum:
# idle workers sleep at once, and waking them costs tens of microseconds, which only products
# large enough to run in parallel (BlasThreads) pay.
IDLE_SPIN_ENV = "OPENBLAS_THREAD_TIMEOUT"
IDLE_SPIN_EXPONENT = 4


class BlasThreadsUnavailable(Exception):
    """No OpenBLAS thread setter was found; the message says where we looked."""


def thread_env(threads: int) -> dict[str, str]:
    """The variables to put in os.environ (before numpy loads) for `threads` BLAS threads."""
    return {name: str(int(threads)) for name in THREAD_ENV_VARS}


def idle_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variable that makes idle OpenBLAS workers sleep instead of spinning (before numpy
    loads); empty when the user has set it already (theirs wins)."""
    env = os.environ if environ is None else environ
    return {} if IDLE_SPIN_ENV in env else {IDLE_SPIN_ENV: str(IDLE_SPIN_EXPONENT)}


def _mapped_libraries() -> list[str]:
    """Paths of shared objects mapped into this process whose name mentions openblas."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "openblas" in parts[5].lower() and parts[5] not in paths:
            paths.append(parts[5].strip())
    return paths


def _numpy_libs() -> list[str]:
    """OpenBLAS copies shipped next to numpy in a wheel (numpy.libs/ or numpy/.libs)."""
    # Not at module level: `enshuffle node` imports this module to set the BLAS environment
    # before numpy (and its BLAS) loads. Callers have loaded numpy by now: cheap here.
    import numpy

    base = Path(numpy.__file__).parent
    found = []
    for folder in (base.parent / "numpy.libs", base / ".libs"):
        found += sorted(glob.glob(str(folder / "*openblas*")))
    return found


def _find_function(names: tuple[str, ...]):
    """The first of `names` exported by a loaded OpenBLAS, or raise BlasThreadsUnavailable."""
    candidates = _mapped_libraries() or _numpy_libs()
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)  # already mapped: dlopen just returns the same handle
        except OSError:
            continue
        for name in names:
            func = getattr(lib, name, None)
            if func is not None:
                return func
    where = ", ".join(candidates) or "no OpenBLAS library in /proc/self/maps or numpy's .libs"
    raise BlasThreadsUnavailable(f"no OpenBLAS thread setter ({', '.join(names)}) found in: {where}")


def set_blas_threads(threads: int) -> int:
    """Ask the loaded OpenBLAS to use `threads` threads; return what it reports afterwards.

    Raises BlasThreadsUnavailable when there is no OpenBLAS to talk to (e.g. an MKL build).
    """
    setter = _find_function(_SETTERS)
    setter.argtypes = [ctypes.c_int]
    setter.restype = None
    setter(int(threads))
    return get_blas_threads()


def get_blas_threads() -> int:
    """The loaded OpenBLAS's current thread count (raises BlasThreadsUnavailable)."""
    getter = _find_function(_GETTERS)
    getter.argtypes = []
    getter.restype = ctypes.c_int
    return int(getter())


def default_threads() -> int:
    """The CPUs this process may run on (what BLAS uses when nobody says otherwise)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class BlasThreads:
    """How many threads the next BLAS call may use, changed cheaply before every product.

    A product split over threads ends only when its slowest thread does: on a machine where
    another process holds a core (the coordinator on the same box, the volunteer's own work),
    a worker thread waits for a scheduler slice, milliseconds, and a 0.2 ms product takes 10 ms.
    So products under `parallel_min_work` multiply-adds run on one thread, and only larger ones
    (where a few milliseconds are a small share) on up to `limit` threads. The setter is looked
    up once; `use` calls it only when the count changes. Without an OpenBLAS (`available` false)
    every call is a no-op.
    """

    def __init__(self, limit: int, parallel_min_work: int) -> None:
        self.limit = max(1, int(limit))
        self.parallel_min_work = int(parallel_min_work)
        self.current: int | None = None  # unknown until the first use()
        try:
            self._setter = _find_function(_SETTERS)
            self._setter.argtypes = [ctypes.c_int]
            self._setter.restype = None
        except (BlasThreadsUnavailable, OSError, AttributeError):
            self._setter = None

    @property
    def available(self) -> bool:
        return self._setter is not None

    def threads_for(self, work: int) -> int:
        """Threads for a product of `work` multiply-adds."""
        return 1 if work < self.parallel_min_work else self.limit

    def use(self, threads: int) -> None:
        if self._setter is not None and threads != self.current:
            self._setter(int(threads))
            self.current = int(threads)

    def for_product(self, work: int) -> None:
        """Set the thread count for a product of `work` multiply-adds (m * n * k)."""
        self.use(self.threads_for(work))
