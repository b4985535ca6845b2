"""Each gradserve actor's process environment, from its CPU reservation.

- Threads: an actor reserving ``cpus`` CPUs runs its kernels on
  ``threads = max(1, floor(cpus))`` threads: ``NUMBA_NUM_THREADS`` is set
  before the actor's process imports numba (Ray's ``runtime_env``), and
  ``nnkernels.set_thread_budget(threads)`` in the actor. BLAS stays at one
  thread (``nnkernels.runtime`` sets SciPy's OpenBLAS so; the products
  parallelize over fixed row blocks, which keeps results bit-identical
  whatever the thread count), and ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``
  are 1 so no other pool spins beside Numba's.
- Kernels: actors share one Numba cache directory, so they load compiled
  kernels instead of compiling them (about 0.5 s against 21 s cold on two
  cores). It is the front-end's own: ``NUMBA_CACHE_DIR`` when set, else
  Numba's default, the ``__pycache__`` beside the kernels' sources, which
  every process running the same installation on a node shares anyway.
- Code: ``PYTHONPATH`` leads with the source roots of the front-end's
  ``gradserve`` (the namespace package spans client/, server/, nnkernels/),
  so actors on this node run the code the front-end runs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def kernel_threads(cpus: float) -> int:
    """Threads for an actor reserving ``cpus`` CPUs (at least one)."""
    return max(1, math.floor(cpus))


def source_roots() -> list[str]:
    """The directories that hold this process's gradserve packages."""
    import gradserve.nnkernels
    import gradserve.server
    import gradserve.wire
    roots = []
    for mod in (gradserve.wire, gradserve.server, gradserve.nnkernels):
        root = str(Path(mod.__file__).resolve().parents[2])
        if root not in roots:
            roots.append(root)
    return roots


def actor_env(cpus: float) -> dict:
    """The ``runtime_env`` of a gradserve actor reserving ``cpus`` CPUs."""
    threads = kernel_threads(cpus)
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [*source_roots(), os.environ.get("PYTHONPATH", "")]))}
    for name in ("NUMBA_CACHE_DIR", "NUMBA_THREADING_LAYER"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return {"env_vars": env}


def kernel_cache_stats() -> dict:
    """Numba's cache hits and misses of the CPU training kernels in this
    process: a miss is a compile, a hit a load from the shared cache."""
    from gradserve.nnkernels.cpu.kernels import forward_kernel, train_kernel
    from gradserve.nnkernels.cpu.optimizer import optimizer_kernel
    from gradserve.nnkernels.cpu.twins import serial_twin
    hits = misses = 0
    for kernel in (train_kernel, optimizer_kernel, forward_kernel):
        for compiled in (kernel, serial_twin(kernel)):  # a call at one thread runs the twin
            hits += sum(compiled.stats.cache_hits.values())
            misses += sum(compiled.stats.cache_misses.values())
    return {"hits": hits, "misses": misses, "cache_path": train_kernel.stats.cache_path}


def configure_actor(cpus: float) -> dict:
    """In an actor: sets the kernels' thread budget from its reservation;
    returns what it runs with (for logs and tests)."""
    import numba

    from gradserve.nnkernels import set_thread_budget, thread_config
    set_thread_budget(kernel_threads(cpus))
    return {**thread_config(), "cpus": cpus, "numba_cache_dir": numba.config.CACHE_DIR or "(beside the sources)",
            "pid": os.getpid()}
