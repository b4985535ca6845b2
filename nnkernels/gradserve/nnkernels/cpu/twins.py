"""serial_twin: a ``parallel=False`` compile of a parallel kernel from its own
Python source, for work too small to pay for parallel launches.

Every ``prange`` loop of a parallel kernel is a parallel region: a launch
through the threading layer even at one thread (a batch-32 train step of a
64-128-64-10 net launches about 18: ~97 us a step at one thread against
~70 us for its twin, measured). Compiled without ``parallel``, ``prange``
is a plain ``range``: the twin runs the same iterations, over the same
fixed partition (the products' tiles, row blocks, NORM_BLOCK partial sums
summed in order), in order, so it gives the same bits as the parallel kernel at any
thread count (``tests/test_epochs.py`` shows it). Numba compiles prange
bodies with ``error_model="numpy"`` (a float division by zero gives Inf or
NaN, checked by nothing); the twin is compiled so throughout, which also
spares it Python's zero-division checks.

The twin is the original function's code object with new globals: each
parallel Numba function it calls (and each function calling one, down the
call graph) is swapped for its own twin. Twins are named
``<qualname>__serial`` so Numba's on-disk cache keeps them apart from the
parallel compiles of the same source (its cache files are named by
qualname; the key does not include the ``parallel`` flag), and like them
they are invalidated by edits of their source file.
"""
from __future__ import annotations

import types

from numba import njit
from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher

_TWINS: dict[int, CPUDispatcher] = {}


def _needs_twin(dispatcher, seen=None) -> bool:
    """True when ``dispatcher`` is parallel or calls (through globals) one that is."""
    if dispatcher.targetoptions.get("parallel"):
        return True
    seen = set() if seen is None else seen
    if id(dispatcher) in seen:
        return False
    seen.add(id(dispatcher))
    fn = dispatcher.py_func
    return any(isinstance(g, CPUDispatcher) and _needs_twin(g, seen)
               for g in (fn.__globals__.get(name) for name in fn.__code__.co_names))


def serial_twin(dispatcher: CPUDispatcher) -> CPUDispatcher:
    """The serial twin of a ``numba.njit`` function (itself when it neither
    is parallel nor calls a parallel function). Compiled lazily, as any njit
    function; one twin per function per process."""
    if not _needs_twin(dispatcher):
        return dispatcher
    twin = _TWINS.get(id(dispatcher))
    if twin is not None:
        return twin
    fn = dispatcher.py_func
    scope = dict(fn.__globals__)
    for name in fn.__code__.co_names:
        g = scope.get(name)
        if isinstance(g, CPUDispatcher):
            scope[name] = serial_twin(g)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + "__serial"
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("parallel", "nopython")}
    options["cache"] = isinstance(dispatcher._cache, FunctionCache)  # not a target option: kept apart by Numba
    options["error_model"] = "numpy"  # as prange bodies are compiled: x/0 is inf or NaN, not ZeroDivisionError
    twin = _TWINS[id(dispatcher)] = njit(**options)(copy)
    return twin


def for_threads(dispatcher: CPUDispatcher, threads: int) -> CPUDispatcher:
    """The kernel to call with ``threads`` threads: its serial twin at one
    thread (no parallel launches), else itself. Same bits either way."""
    return serial_twin(dispatcher) if threads == 1 else dispatcher
