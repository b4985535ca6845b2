"""The CUDA reductions: float64, deterministic (fixed tree order, no
atomics), over ``device.block_sum``: the batch's loss and correct count, and
the squared gradient norm in two stages."""
from __future__ import annotations

from numba import types

from . import numba_cuda as cuda


def kernels(target, dev) -> dict:
    """``{name: (pyfunc, argument types)}`` for ``target``."""
    threads = target.threads
    f64 = types.float64
    i64 = types.int64
    block_sum = dev.block_sum

    def reduce_rows(rowloss, rowcorrect, n, out):
        """One block: out[0] = Σ rowloss, out[1] = Σ rowcorrect."""
        sl = cuda.shared.array(threads, f64)
        sc = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        a = 0.0
        b = 0.0
        for i in range(tid, n, threads):
            a += rowloss[i]
            b += rowcorrect[i]
        sl[tid] = a
        sc[tid] = b
        loss = block_sum(sl, tid)
        correct = block_sum(sc, tid)
        if tid == 0:
            out[0] = loss
            out[1] = correct

    def sq_norm_partial(g, size, partial):
        """Stage 1 of Σ g²: each block writes its float64 partial sum."""
        sh = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        acc = 0.0
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            v = f64(g[i])
            acc += v * v
        sh[tid] = acc
        total = block_sum(sh, tid)
        if tid == 0:
            partial[cuda.blockIdx.x] = total

    def sum_to_slot(partial, count, out, slot):
        """Stage 2, one block: out[slot] = Σ partial[:count]."""
        sh = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        acc = 0.0
        for i in range(tid, count, threads):
            acc += partial[i]
        sh[tid] = acc
        total = block_sum(sh, tid)
        if tid == 0:
            out[slot] = total

    F1 = f64[::1]
    return {
        "reduce_rows": (reduce_rows, (F1, F1, i64, F1)),
        "sq_norm_partial": (sq_norm_partial, (target.vector, i64, F1)),
        "sum_to_slot": (sum_to_slot, (F1, i64, F1, i64)),
    }
