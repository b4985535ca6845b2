"""The CUDA backend against PyTorch CUDA on the same GPU.

    python benchmarks/cuda.py [--iters 20] [--warmup 3] [--dtype float32]

For 784-512-256-10 and 4096-4096-4096-10 (relu hidden layers, softmax
output, cross entropy, Adam) at batch 256 and 4096: a train step
(``Model.train_step``: batch in, forward, loss, backward, gradient norm,
Adam update, loss/accuracy/norm out) and a predict (batch in, probabilities
out), each timed per call after a warm-up; the median is reported as
samples/s, with the ratio gradserve / PyTorch (> 1: gradserve is faster).

Both sides do the same work per call: the batch starts as a host NumPy array
and the results end on the host (PyTorch: ``.cuda()`` the batch, ``.item()``
the loss, ``.cpu()`` the predictions), so both include one upload and one
synchronizing download. PyTorch runs with its defaults (cuBLAS, TF32 off
for fp32 matmuls unless the environment enables it; printed below). Every
timed call starts after ``synchronize()`` and ends with its result on the
host, so nothing queued leaks from one sample into the next.

Needs a CUDA GPU, numba-cuda (``gradserve[cuda]``) and a CUDA build of
PyTorch; exits with status 2 and a message when any is missing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# This file is named cuda.py, and NVIDIA's cuda-python (which numba-cuda
# imports as the ``cuda`` namespace package) would find it first through the
# script's own directory on sys.path: take that directory off, put the
# repository root on.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

NETWORKS = [(784, 512, 256, 10), (4096, 4096, 4096, 10)]
BATCHES = [256, 4096]


def die(msg: str) -> None:
    print(f"benchmarks/cuda.py: {msg}", file=sys.stderr)
    sys.exit(2)


def check_environment(smoke: bool):
    if not smoke and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        die("NUMBA_ENABLE_CUDASIM is set: the simulator is for correctness tests, not timings; unset it")
    try:
        from gradserve.nnkernels.cuda import is_available, numba_cuda
    except ImportError as exc:
        die(f"cannot import nnkernels ({exc}); run from the repository with its virtual environment")
    if numba_cuda is None:
        die("numba-cuda is not installed: pip install 'gradserve[cuda]'")
    if not is_available():
        die("no CUDA GPU is usable in this process (numba.cuda.is_available() is False); "
            "run this on a machine with an NVIDIA GPU and driver")
    try:
        import torch
    except ImportError:
        die("PyTorch is not installed: pip install 'gradserve[bench]' (a CUDA build)")
    if not smoke and not torch.cuda.is_available():
        die(f"this PyTorch ({torch.__version__}) cannot use the GPU (a CPU-only build?); "
            "install a CUDA build of torch to compare against")
    return numba_cuda, torch


def timed(fn, warmup: int, iters: int, sync) -> float:
    """Median seconds of one call of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()  # returns with its result on the host: the work is done
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20, help="timed calls per case (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation, allocation)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--smoke", action="store_true",
                    help="check this script itself: tiny networks, PyTorch on the CPU, allowed under the "
                         "CUDA simulator (NUMBA_ENABLE_CUDASIM=1); the numbers mean nothing")
    args = ap.parse_args(argv)

    numba_cuda, torch = check_environment(args.smoke)
    networks, batches, tdev = NETWORKS, BATCHES, "cuda"
    if args.smoke:
        networks, batches, tdev = [(5, 4, 3)], [3], "cpu"
        args.iters, args.warmup = 2, 1
    tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    import numpy as np

    from gradserve.nnkernels.cuda import warm_up
    t0 = time.perf_counter()
    warm_up((args.dtype,))  # compile every kernel before any timing
    print(f"compiled the CUDA kernels in {time.perf_counter() - t0:.1f} s")

    import numba

    from gradserve.nnkernels import LayerSpec, ModelSpec, OptimizerSpec, OutputSpec
    from gradserve.nnkernels.model import Model

    dev = numba_cuda.get_current_device()
    cc = getattr(dev, "compute_capability", ("?", "?"))
    gpu = getattr(dev, "name", "CUDA simulator")
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    tdtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    print(f"GPU: {gpu} "
          f"(compute capability {cc[0]}.{cc[1]})")
    try:
        from importlib.metadata import version
        nc_version = version("numba-cuda")
    except Exception:
        nc_version = "?"
    print(f"numba {numba.__version__}, numba-cuda {nc_version}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"torch fp32 matmul TF32={torch.backends.cuda.matmul.allow_tf32}")
    print(f"dtype {args.dtype}, Adam, relu hidden layers, softmax + cross entropy; "
          f"median of {args.iters} calls after {args.warmup} warm-up calls")
    print()
    header = f"{'network':<20} {'batch':>6} {'what':<8} {'gradserve/s':>13} {'torch/s':>13} {'ratio':>7}"
    print(header)
    print("-" * len(header))

    rng = np.random.default_rng(0)
    for sizes in networks:
        spec = ModelSpec(input_size=sizes[0],
                         hidden=tuple(LayerSpec(u, "relu") for u in sizes[1:-1]),
                         output=OutputSpec(sizes[-1], "softmax"),
                         optimizer=OptimizerSpec("adam", lr=1e-3),
                         dtype=args.dtype, device="cuda", seed=0)
        model = Model(spec)
        assert type(model.backend).__name__ == "CudaBackend"

        # the same network in PyTorch, starting from the same weights
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*layers).to(device=tdev, dtype=tdtype)
        weights = model.get_weights()
        with torch.no_grad():
            for i, lin in enumerate(l for l in net if isinstance(l, torch.nn.Linear)):
                lin.weight.copy_(torch.from_numpy(weights[f"layers.{i}.weight"]))
                lin.bias.copy_(torch.from_numpy(weights[f"layers.{i}.bias"]))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()

        for batch in batches:
            X = rng.standard_normal((batch, sizes[0])).astype(args.dtype)
            y = rng.integers(0, sizes[-1], batch).astype(np.int64)

            def ours_train():
                model.train_step(X, y)

            def ours_predict():
                model.predict(X)

            def torch_train():
                xb = torch.from_numpy(X).to(tdev)
                yb = torch.from_numpy(y).to(tdev)
                opt.zero_grad(set_to_none=True)
                logits = net(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                loss.item()

            def torch_predict():
                with torch.no_grad():
                    xb = torch.from_numpy(X).to(tdev)
                    torch.softmax(net(xb), dim=1).cpu().numpy()

            name = "-".join(map(str, sizes))
            for what, ours, theirs in (("train", ours_train, torch_train), ("predict", ours_predict, torch_predict)):
                t_ours = timed(ours, args.warmup, args.iters, numba_cuda.synchronize)
                t_torch = timed(theirs, args.warmup, args.iters, tsync)
                print(f"{name:<20} {batch:>6} {what:<8} {batch / t_ours:>13,.0f} {batch / t_torch:>13,.0f} "
                      f"{t_torch / t_ours:>6.2f}x", flush=True)
        model = net = opt = None  # free the GPU memory before the next network
        if tdev == "cuda":
            torch.cuda.empty_cache()
    print()
    print("ratio = gradserve samples/s ÷ PyTorch samples/s (> 1: gradserve is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
