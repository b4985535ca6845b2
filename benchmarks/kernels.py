"""CPU kernels against PyTorch CPU: train-step and predict times, (1) in the
same process, the two alternating so machine noise hits both alike, and (2)
each library alone in its own process (a fresh subprocess per library and
round, rounds alternating), with the same thread count: in one process
PyTorch's spinning OpenMP pool and Numba's pool slow each other down.

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--reps 7] [--rounds 3] [--mode both|same|separate]

Prints, per case, ms per call of gradserve (nnkernels CpuBackend) and
PyTorch and their ratio (PyTorch time / ours: > 1 means gradserve is
faster) in both set-ups side by side; for training, the GFLOP/s of the
step's matrix products alone (the kernels' tiled BLAS calls, timed in their
own process) against the sgemm peak at the same thread count measured in
this run (2048², PyTorch's MKL/oneDNN and NumPy's OpenBLAS, the better of
the two); and the thread configuration. Thread set-up per process:
gradserve NUMBA_NUM_THREADS and set_thread_budget = N, SciPy's OpenBLAS 1
thread (the kernels run one BLAS call per tile in their own parallel
loop); PyTorch torch.set_num_threads(N) and OMP_NUM_THREADS=N. Targets
(issue 12, separate processes, 2 threads): train step ≥ 2.5× PyTorch at
batch 32, ≥ 1.4× at 256, ≥ 1.0× at 1024; predict ≥ 2× at batch 1, ≥ 1.2×
at 256, ≥ 1.0× at 1024; products ≥ 85% of the sgemm peak at batch ≥ 256.
Every figure is the best (least disturbed) of its repetitions and rounds:
on a shared machine noise only adds time. Compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

NETS = {
    # name: (sizes, hidden activation, output kind, optimizer)
    "784-512-256-10 relu xent adam": ((784, 512, 256, 10), "relu", "softmax", "adam"),
    "256-256-256-10 relu xent adam": ((256, 256, 256, 10), "relu", "softmax", "adam"),
    "64-32-1 tanh mse sgd": ((64, 32, 1), "tanh", "identity", "sgd"),
    "2-16-1 tanh mse sgd": ((2, 16, 1), "tanh", "identity", "sgd"),
}
CASES = [  # (net, what, batch)
    ("784-512-256-10 relu xent adam", "train", 32),
    ("784-512-256-10 relu xent adam", "train", 256),
    ("784-512-256-10 relu xent adam", "train", 1024),
    ("784-512-256-10 relu xent adam", "predict", 1),
    ("784-512-256-10 relu xent adam", "predict", 8),
    ("784-512-256-10 relu xent adam", "predict", 256),
    ("784-512-256-10 relu xent adam", "predict", 1024),
    ("256-256-256-10 relu xent adam", "train", 32),
    ("256-256-256-10 relu xent adam", "train", 256),
    ("256-256-256-10 relu xent adam", "predict", 1),
    ("256-256-256-10 relu xent adam", "predict", 8),
    ("256-256-256-10 relu xent adam", "predict", 256),
    ("64-32-1 tanh mse sgd", "train", 32),
    ("64-32-1 tanh mse sgd", "predict", 1),
    ("64-32-1 tanh mse sgd", "predict", 8),
    ("2-16-1 tanh mse sgd", "train", 32),
]


def macs(sizes) -> int:
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def calls_for(what: str, sizes, n: int) -> int:
    """Calls per timed repetition: about 20 ms of work, at least one."""
    flop = (6 if what == "train" else 2) * n * macs(sizes)
    return max(1, int(0.02 / (flop / 1e11 + 3e-5)))


def timed(fn, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


# --- the two libraries ---------------------------------------------------------
def data(sizes, kind, n, seed=0):
    import numpy as np
    rs = np.random.default_rng(seed)
    X = rs.standard_normal((n, sizes[0]), dtype=np.float32)
    y = rs.integers(0, sizes[-1], n) if kind == "softmax" else rs.standard_normal((n, sizes[-1]), dtype=np.float32)
    return X, y


def ours_model(net):
    from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec
    sizes, act, kind, opt = NETS[net]
    spec = ModelSpec(input_size=sizes[0], hidden=tuple(LayerSpec(u, act) for u in sizes[1:-1]),
                     output=OutputSpec(sizes[-1], kind), optimizer=OptimizerSpec(opt, lr=1e-3))
    return Model(spec)


def ours_call(model, net, what, n):
    sizes, _, kind, _ = NETS[net]
    X, y = data(sizes, kind, n)
    return (lambda: model.train_step(X, y)) if what == "train" else (lambda: model.predict(X))


def torch_model(net):
    import torch
    sizes, act, kind, opt = NETS[net]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU() if act == "relu" else torch.nn.Tanh())
    m = torch.nn.Sequential(*layers)
    topt = torch.optim.Adam(m.parameters(), lr=1e-3) if opt == "adam" else torch.optim.SGD(m.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss() if kind == "softmax" else torch.nn.MSELoss()
    return m, topt, lossf


def torch_call(model, net, what, n):
    import torch
    sizes, _, kind, _ = NETS[net]
    X, y = data(sizes, kind, n)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)
    m, topt, lossf = model
    if what == "train":
        def step():
            topt.zero_grad(set_to_none=True)
            loss = lossf(m(tX), ty)
            loss.backward()
            topt.step()
        return step

    def predict():
        with torch.inference_mode():
            out = m(tX)
            return torch.softmax(out, 1) if kind == "softmax" else out
    return predict


def products_seconds(net, n, reps):
    """Seconds of one training step's matrix products alone, as the train
    kernel runs them (forward Z = H·Wᵀ, then per layer gW = Dᵀ·H and, above
    the first layer, dH = D·W, in the training tiles), and their FLOPs."""
    import numpy as np

    from gradserve.nnkernels import runtime
    from gradserve.nnkernels.cpu.kernels import COL_TILE, ROW_TILE, _dtx, _xw, _xwt
    sizes = NETS[net][0]
    rs = np.random.default_rng(0)
    Ws = [rs.standard_normal((b, a), dtype=np.float32) for a, b in zip(sizes[:-1], sizes[1:])]
    Hs = [rs.standard_normal((n, a), dtype=np.float32) for a in sizes[:-1]]
    Zs = [np.empty((n, b), np.float32) for b in sizes[1:]]
    Gs = [np.empty_like(W) for W in Ws]
    empty = np.empty(0, np.float32)

    def step():
        for W, H, Z in zip(Ws, Hs, Zs):
            _xwt(H, W, Z, n, ROW_TILE, COL_TILE, empty)
        for i in range(len(Ws) - 1, -1, -1):
            _dtx(Zs[i], Hs[i], Gs[i], ROW_TILE, COL_TILE)
            if i > 0:
                _xw(Zs[i], Ws[i], Hs[i], ROW_TILE, COL_TILE)

    flop = 2 * n * (3 * macs(sizes) - sizes[0] * sizes[1])
    with runtime.kernel_threads(n, 3 * n * macs(sizes)):
        step()
        k = calls_for("train", sizes, n)
        t = min(timed(step, k) for _ in range(reps))
    return t, flop


def sgemm_peak(threads: int) -> dict:
    """GFLOP/s of a 2048² float32 product at ``threads`` threads: PyTorch
    (MKL/oneDNN) and NumPy's OpenBLAS (the better of 3 tries each)."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    torch.mm(ta, ta)
    flops = 2 * n ** 3
    out = {"torch": flops / min(timed(lambda: torch.mm(ta, ta), 3) for _ in range(3)) / 1e9}
    with threadpool_limits(threads, user_api="blas"):
        a @ a
        out["openblas"] = flops / min(timed(lambda: a @ a, 3) for _ in range(3)) / 1e9
    return out


# --- worker processes (one library each) ---------------------------------------
def worker(lib: str, threads: int, reps: int, products: bool) -> dict:
    """Time every case with one library, alone in this process."""
    results = {}
    if lib == "ours":
        from gradserve import nnkernels
        nnkernels.set_thread_budget(threads)
        nnkernels.warm_up(("float32",))
        models = {}
        for net, what, n in CASES:
            model = models.setdefault(net, ours_model(net))
            fn = ours_call(model, net, what, n)
            results[f"{net}|{what}|{n}"] = measure(fn, NETS[net][0], what, n, reps)
        try:  # an older checkout has no tiled products to time
            from gradserve.nnkernels.cpu.kernels import _xwt  # noqa: F401
        except ImportError:
            products = False
        if products:
            for net, what, n in CASES:
                if what == "train" and n >= 32:
                    t, flop = products_seconds(net, n, reps)
                    results[f"{net}|products|{n}"] = {"s": t, "gflops": flop / t / 1e9}
    elif lib == "torch":
        import torch
        torch.set_num_threads(threads)
        models = {}
        for net, what, n in CASES:
            model = models.setdefault(net, torch_model(net))
            results[f"{net}|{what}|{n}"] = measure(torch_call(model, net, what, n), NETS[net][0], what, n, reps)
    elif lib == "peak":
        results["peak"] = sgemm_peak(threads)
    return results


def measure(fn, sizes, what, n, reps):
    k = calls_for(what, sizes, n)
    for _ in range(3):
        fn()
    return {"s": min(timed(fn, k) for _ in range(reps))}


def spawn(lib: str, threads: int, reps: int, products: bool) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--threads", str(threads), "--reps", str(reps)]
    if products:
        cmd.append("--products")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{lib} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_process(threads: int, reps: int) -> dict:
    """Both libraries in this process, alternating per repetition."""
    import torch

    from gradserve import nnkernels
    nnkernels.set_thread_budget(threads)
    torch.set_num_threads(threads)
    nnkernels.warm_up(("float32",))
    results = {}
    models = {}
    for net, what, n in CASES:
        ours, theirs = models.setdefault(net, (ours_model(net), torch_model(net)))
        a = ours_call(ours, net, what, n)
        b = torch_call(theirs, net, what, n)
        k = calls_for(what, NETS[net][0], n)
        for _ in range(3):
            a()
            b()
        ta, tb = [], []
        for _ in range(reps):
            ta.append(timed(a, k))
            tb.append(timed(b, k))
        results[f"{net}|{what}|{n}"] = (min(ta), min(tb))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per case and process (the best counts)")
    ap.add_argument("--rounds", type=int, default=3, help="separate-process rounds, libraries alternating (the best counts)")
    ap.add_argument("--mode", choices=("both", "same", "separate"), default="both")
    ap.add_argument("--worker", choices=("ours", "torch", "peak"), help=argparse.SUPPRESS)
    ap.add_argument("--products", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.reps, args.products)))
        return

    from gradserve.nnkernels import runtime
    cfg = runtime.thread_config()
    print(f"# {args.threads} threads each: gradserve NUMBA_NUM_THREADS/budget {args.threads}, parallel from "
          f"{cfg['parallel_min_rows']} rows or {cfg['parallel_min_work']:,} multiply-adds, SciPy OpenBLAS threads "
          f"{cfg['blas_threads']}; PyTorch set_num_threads {args.threads}; cpu_count {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    same = same_process(args.threads, args.reps) if args.mode in ("both", "same") else {}
    sep_ours, sep_torch, peaks = [], [], []
    if args.mode in ("both", "separate"):
        for r in range(args.rounds):
            sep_ours.append(spawn("ours", args.threads, args.reps, products=True))
            sep_torch.append(spawn("torch", args.threads, args.reps, products=False))
            peaks.append(spawn("peak", args.threads, 1, products=False)["peak"])
    peak = max(max(p["torch"] for p in peaks), max(p["openblas"] for p in peaks)) if peaks else None
    if peaks:
        print(f"# sgemm 2048² at {args.threads} threads (best of rounds): PyTorch "
              f"{max(p['torch'] for p in peaks):.0f} GFLOP/s, NumPy OpenBLAS "
              f"{max(p['openblas'] for p in peaks):.0f} GFLOP/s; peak used: {peak:.0f}")
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    print("| network | what | batch | same: ours ms | same: torch ms | same: ratio | separate: ours ms "
          "| separate: torch ms | separate: ratio | products GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for net, what, n in CASES:
        key = f"{net}|{what}|{n}"
        cells = [net, what, str(n)]
        if key in same:
            a, b = same[key]
            cells += [f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{b / a:.2f}x"]
        else:
            cells += ["-"] * 3
        if sep_ours:
            a = min(r[key]["s"] for r in sep_ours)
            b = min(r[key]["s"] for r in sep_torch)
            cells += [f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{b / a:.2f}x"]
            pkey = f"{net}|products|{n}"
            if what == "train" and all(pkey in r for r in sep_ours):
                g = max(r[pkey]["gflops"] for r in sep_ours)
                cells.append(f"{g:.0f} ({100 * g / peak:.0f}%)")
            else:
                cells.append("-")
        else:
            cells += ["-"] * 4
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
