"""Process-wide set-up for the CPU kernels: the Numba threading layer, and the
thread budget shared by Numba's parallel loops and SciPy's OpenBLAS.

Imported by ``nnkernels/__init__.py`` before anything imports numba:

- ``libtbb.so.12`` from the ``tbb`` wheel lives in ``sys.prefix/lib``, which
  the loader does not search; it is preloaded with RTLD_GLOBAL so Numba can
  use the TBB layer. ``NUMBA_THREADING_LAYER`` is set to ``tbb`` unless the
  user set it. The default ``workqueue`` layer aborts the process when two
  threads run parallel kernels at once, so ``check_threading_layer`` refuses
  it after the first parallel call.
- Thread budget: Numba's pool and OpenBLAS's pool spinning against each
  other made a step 11× slower (seen: a 784-512-256-10 Adam step at batch
  256 on 2 cores took 72 ms instead of 6.4 ms), and OpenBLAS's sgemm gives
  different bits with different thread counts (seen: a concurrent run
  diverged from a sequential one). So SciPy's OpenBLAS (the one Numba's
  ``np.dot`` calls; NumPy's own copy is untouched) is set to ONE thread, and
  the kernels parallelize the products themselves: a fixed grid of tiles
  (batch rows × output features), one single-threaded BLAS call per tile
  inside a prange (``cpu.kernels``). Results are then bit-identical
  whatever the thread count or concurrency. Each call sets the calling
  thread's Numba thread count (``numba.set_num_threads``): one thread below
  ``PARALLEL_MIN_ROWS`` rows and ``PARALLEL_MIN_WORK`` multiply-adds
  (measured faster there; the backend then runs the serial twins), else the
  budget divided by the kernel calls in flight, so concurrent requests
  never oversubscribe the cores. ``set_thread_budget(n)`` changes the
  budget (default: all of Numba's threads).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from contextlib import contextmanager

_USER_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "")
_TBB_PATH = os.path.join(sys.prefix, "lib", "libtbb.so.12")
_tbb_loaded = False
if os.path.exists(_TBB_PATH):
    try:
        ctypes.CDLL(_TBB_PATH, mode=ctypes.RTLD_GLOBAL)
        _tbb_loaded = True
    except OSError:
        pass
if not _USER_LAYER:
    os.environ["NUMBA_THREADING_LAYER"] = "tbb"
if "numba" in sys.modules:  # imported before us: its config is already read
    import numba
    if not _USER_LAYER:
        numba.config.THREADING_LAYER = "tbb"

import numba  # noqa: E402

# batches with fewer rows run every pass on one thread, unless their products
# do at least PARALLEL_MIN_WORK multiply-adds. A parallel call pays for waking
# the pool's parked threads (40-60 us on 2 cores when calls are not
# back to back, as a server's are): measured that way, predict on
# 784-512-256-10 at 16 rows (8.6M) took 136 us serial and 159 us parallel,
# at 32 rows (17M) 290 and 221; 256-256-256-10 crosses over at 64 rows (8.6M).
PARALLEL_MIN_ROWS = 128
PARALLEL_MIN_WORK = 10_000_000

_budget = numba.config.NUMBA_NUM_THREADS
_budget_lock = threading.Lock()


def _single_threaded_blas() -> bool:
    """Set SciPy's OpenBLAS to one thread, globally; True when done."""
    import scipy  # noqa: F401  (loads the OpenBLAS that numba's np.dot uses)
    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs",
                                  "libscipy_openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                fn(1)
                return True
    return False


_blas_single = _single_threaded_blas()


def set_thread_budget(n: int) -> None:
    """Threads one kernel call may use (its prange loops, which also run the
    tiled products), at most
    ``NUMBA_NUM_THREADS``. Applies to calls made after it, from any thread."""
    global _budget
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread budget must be a positive integer, got {n!r}")
    with _budget_lock:
        _budget = min(n, numba.config.NUMBA_NUM_THREADS)


def thread_budget() -> int:
    return _budget


_in_flight = 0  # kernel calls running now, from any thread
_in_flight_lock = threading.Lock()
_thread_setting = threading.local()  # the count last given to numba on this thread


def threads_for(rows: int, in_flight: int = 1, work: int = 0) -> int:
    """Threads a call on a batch of ``rows`` rows whose products do ``work``
    multiply-adds uses while ``in_flight`` calls (itself included) run: one
    below ``PARALLEL_MIN_ROWS`` rows and ``PARALLEL_MIN_WORK``, else the
    budget shared evenly. Parallel kernels whose threads outnumber the
    cores collapse (measured on 2 cores, TrainStep b256 with 16 concurrent
    callers: 0.3-0.9 steps/s at 2 threads each, 68-71 at 1), and the tiled
    products give the same bits at any thread count, so sharing is free."""
    if rows < PARALLEL_MIN_ROWS and work < PARALLEL_MIN_WORK:
        return 1
    return max(1, _budget // max(1, in_flight))


@contextmanager
def kernel_threads(rows: int, work: int = 0):
    """Around one kernel call on ``rows`` rows doing ``work`` multiply-adds
    in its products: counts it in flight and sets the calling thread's Numba
    thread count to its share; yields the count."""
    global _in_flight
    with _in_flight_lock:
        _in_flight += 1
        k = threads_for(rows, _in_flight, work)
    try:
        if getattr(_thread_setting, "k", None) != k:  # set_num_threads costs ~6 us
            numba.set_num_threads(k)
            _thread_setting.k = k
        yield k
    finally:
        with _in_flight_lock:
            _in_flight -= 1


def thread_config() -> dict:
    """What the kernels run with, for logs and benchmark headers."""
    return {
        "threading_layer": _layer_name(),
        "numba_num_threads": numba.config.NUMBA_NUM_THREADS,
        "budget": _budget,
        "parallel_min_rows": PARALLEL_MIN_ROWS,
        "parallel_min_work": PARALLEL_MIN_WORK,
        "blas_threads": 1 if _blas_single else "unknown (SciPy OpenBLAS not found)",
        "tbb_preloaded": _tbb_loaded,
    }


def _layer_name() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return "(not started)"


def check_threading_layer() -> str:
    """After at least one parallel kernel ran: the layer in use, or a
    RuntimeError when it is not thread-safe for concurrent callers (tbb, or
    omp when the user asked for it)."""
    layer = numba.threading_layer()
    allowed = {"tbb"}
    if _USER_LAYER in ("omp", "safe", "threadsafe"):
        allowed.add("omp")
    if layer not in allowed:
        raise RuntimeError(
            f"numba threading layer is {layer!r}, which is not safe for concurrent model calls "
            f"(NUMBA_THREADING_LAYER={os.environ.get('NUMBA_THREADING_LAYER')!r}); install the 'tbb' "
            f"wheel (libtbb.so.12 expected at {_TBB_PATH}) or set NUMBA_THREADING_LAYER=omp")
    return layer
