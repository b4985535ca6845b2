"""CPU kernels against PyTorch CPU in the same process: train-step and predict
throughput, alternating the two so machine noise hits both alike.

    .venv/bin/python benchmarks/kernels.py [--threads N] [--reps 15]

Prints samples/s for gradserve (nnkernels CpuBackend) and PyTorch, their
ratio, achieved GFLOP/s of the matrix products against an sgemm peak
measured in this run, and the thread configuration. Targets (issue 2): ≥1.0×
PyTorch at batch ≥256, ≥1.5× at batch ≤32. On a shared 2-core machine the
numbers are noisy: compare the ratios, not the absolutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradserve import nnkernels  # noqa: E402  (first: picks the threading layer)
from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec, runtime  # noqa: E402

CASES = [
    # (name, sizes, activation, output kind, optimizer, batch)
    ("784-512-256-10 relu xent adam", (784, 512, 256, 10), "relu", "softmax", "adam", 32),
    ("784-512-256-10 relu xent adam", (784, 512, 256, 10), "relu", "softmax", "adam", 256),
    ("784-512-256-10 relu xent adam", (784, 512, 256, 10), "relu", "softmax", "adam", 1024),
    ("2-16-1 tanh mse sgd", (2, 16, 1), "tanh", "identity", "sgd", 32),
]


def build(sizes, act, kind, opt):
    spec = ModelSpec(input_size=sizes[0], hidden=tuple(LayerSpec(u, act) for u in sizes[1:-1]),
                     output=OutputSpec(sizes[-1], kind), optimizer=OptimizerSpec(opt, lr=1e-3))
    ours = Model(spec)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU() if act == "relu" else torch.nn.Tanh())
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():  # same starting weights
        for (name, w), lin in zip(ours.get_weights().items(), [m for m in net for _ in (0, 1) if isinstance(m, torch.nn.Linear)]):
            (lin.weight if name.endswith("weight") else lin.bias).copy_(torch.from_numpy(w))
    topt = torch.optim.Adam(net.parameters(), lr=1e-3) if opt == "adam" else torch.optim.SGD(net.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss() if kind == "softmax" else torch.nn.MSELoss()
    return ours, net, topt, lossf


def torch_step(net, opt, lossf, X, y):
    opt.zero_grad(set_to_none=True)
    loss = lossf(net(X), y)
    loss.backward()
    opt.step()
    return loss


def timed(fn, k):
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def alternate(ours, theirs, reps, k):
    """Median seconds per call of each, measured in alternating rounds."""
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours, k))
        b.append(timed(theirs, k))
    return statistics.median(a), statistics.median(b)


def sgemm_peak(threads):
    """GFLOP/s of a 2048² float32 product: torch (MKL/oneDNN) at ``threads``
    and SciPy's OpenBLAS through numba's np.dot at 1 thread (what our blocked
    products use per block)."""
    from numba import njit

    @njit(nogil=True)
    def mm(a, b, c):
        np.dot(a, b, c)

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    mm(a, a, c)
    ta = torch.from_numpy(a)
    torch.mm(ta, ta)
    t_torch = min(timed(lambda: torch.mm(ta, ta), 3) for _ in range(3))
    t_blas1 = min(timed(lambda: mm(a, a, c), 2) for _ in range(2))
    flops = 2 * n ** 3
    return flops / t_torch / 1e9, flops / t_blas1 / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    nnkernels.set_thread_budget(args.threads)
    torch.set_num_threads(args.threads)
    secs, layer = nnkernels.warm_up(("float32",))
    cfg = runtime.thread_config()
    print(f"# threads: torch {torch.get_num_threads()}, numba budget {cfg['budget']} "
          f"(1 below {cfg['parallel_min_rows']} rows), layer {layer}, SciPy OpenBLAS threads {cfg['blas_threads']}, "
          f"warm_up {secs:.2f}s, cpu_count {os.cpu_count()}")
    peak_torch, peak_blas1 = sgemm_peak(args.threads)
    print(f"# sgemm 2048² peak: torch {args.threads} thr {peak_torch:.0f} GFLOP/s; "
          f"OpenBLAS 1 thr {peak_blas1:.0f} GFLOP/s")
    print("| case | batch | what | gradserve samples/s | torch samples/s | ratio | gradserve GFLOP/s | % of torch sgemm peak |")
    print("|---|---|---|---|---|---|---|---|")
    rs = np.random.default_rng(0)
    for name, sizes, act, kind, opt, n in CASES:
        ours, net, topt, lossf = build(sizes, act, kind, opt)
        X = rs.standard_normal((n, sizes[0]), dtype=np.float32)
        if kind == "softmax":
            y = rs.integers(0, sizes[-1], n)
            ty = torch.from_numpy(y)
        else:
            y = rs.standard_normal((n, sizes[-1]), dtype=np.float32)
            ty = torch.from_numpy(y)
        tX = torch.from_numpy(X)
        macs = sum(sizes[i] * sizes[i + 1] for i in range(len(sizes) - 1))
        k = max(1, int(2e8 / (6 * n * macs + 1e6)))
        for _ in range(3):
            ours.train_step(X, y)
            torch_step(net, topt, lossf, tX, ty)
        t_ours, t_torch = alternate(lambda: ours.train_step(X, y), lambda: torch_step(net, topt, lossf, tX, ty),
                                    args.reps, k)
        gf = 6 * n * macs / t_ours / 1e9
        print(f"| {name} | {n} | train step | {n / t_ours:,.0f} | {n / t_torch:,.0f} | {t_torch / t_ours:.2f}x "
              f"| {gf:.1f} | {100 * gf / peak_torch:.0f}% |")
        with torch.inference_mode():
            t_ours, t_torch = alternate(lambda: ours.predict(X), lambda: torch.softmax(net(tX), 1) if kind == "softmax"
                                        else net(tX), args.reps, 3 * k)
        gf = 2 * n * macs / t_ours / 1e9
        print(f"| {name} | {n} | predict | {n / t_ours:,.0f} | {n / t_torch:,.0f} | {t_torch / t_ours:.2f}x "
              f"| {gf:.1f} | {100 * gf / peak_torch:.0f}% |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
