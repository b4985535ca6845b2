"""Data-parallel training on Ray (``gradserve.server.cluster.replicas``)
against one process: steps/s and the all-reduce's time for N = 1 and 2
replicas on a local Ray cluster, and the figures the README's scaling
estimate uses (per-step compute, bytes moved per step).

    .venv/bin/python benchmarks/ray_dp.py [--layers 784,512,256,10] [--batch 1024] [--steps 20]

Needs the ``ray`` extra. The replicas reserve one CPU each (--cpus per
replica): on a 2-core machine N = 2 uses both cores, and the single-process
baseline runs on ``--cpus`` threads too so the comparison is per core.
"Compute" is the shard phase (from submitting the shards until every
replica's forward/backward has returned, including Ray's task latency);
"all-reduce" is the rest: reduce-scatter, the norm, all-gather and the
optimizer update on every copy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _root in ("client", "server", "nnkernels"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), _root))

import numpy as np  # noqa: E402

from gradserve import nnkernels  # noqa: E402  (first: picks the threading layer)
from gradserve.nnkernels import Model, ModelSpec  # noqa: E402


def spec_for(layers: list[int], dtype: str, replicas: int) -> ModelSpec:
    return ModelSpec.from_dict({
        "input_size": layers[0], "hidden": [{"units": u, "activation": "relu"} for u in layers[1:-1]],
        "output": {"units": layers[-1], "kind": "softmax"}, "optimizer": {"name": "adam", "lr": 1e-3},
        "dtype": dtype, "seed": 0, "replicas": replicas})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="784,512,256,10")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (and the baseline's threads)")
    ap.add_argument("--replicas", default="1,2")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    counts = [int(x) for x in args.replicas.split(",")]

    import ray

    from gradserve.server.cluster.replicas import DataParallelGroup
    ray.init(num_cpus=int(max(counts) * args.cpus), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.batch, layers[0])).astype(args.dtype)
    y = rng.integers(0, layers[-1], args.batch)
    spec = spec_for(layers, args.dtype, 1)
    itemsize = np.dtype(args.dtype).itemsize
    print(f"network {args.layers} {args.dtype}, {spec.num_params:,} parameters ({spec.num_params * itemsize / 1e6:.2f} MB), "
          f"batch {args.batch}, {args.steps} steps, {args.cpus:g} CPU per replica; threads: {nnkernels.thread_config()}")

    nnkernels.set_thread_budget(max(1, int(args.cpus)))
    single = Model(spec)
    single.train_step(X, y)  # load the kernels
    t0 = time.perf_counter()
    for _ in range(args.steps):
        single.train_step(X, y)
    base = (time.perf_counter() - t0) / args.steps
    print(f"one process: {1 / base:8.1f} steps/s  ({base * 1e3:.2f} ms/step, {args.batch / base:,.0f} samples/s)")

    for n in counts:
        spec_n = spec_for(layers, args.dtype, n)
        local = Model(spec_n)
        group = DataParallelGroup(spec_n, local.state_dict(), cpus=args.cpus, checksum_steps=10 ** 9)
        try:
            Xn, yn = local._inputs(X), local._targets(y, len(X))
            group.step(local, Xn, yn)  # the replicas load their kernels
            group.timing.update(dict.fromkeys(group.timing, 0))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                group.step(local, Xn, yn)
            per = (time.perf_counter() - t0) / args.steps
            compute = group.timing["compute_s"] / group.timing["steps"]
            kernel = group.timing["kernel_s"] / group.timing["steps"]
            reduce = group.timing["allreduce_s"] / group.timing["steps"]
            # per replica and step: its (N-1)/N of the float64 slices in, and of the reduced slices (model dtype) in
            moved = (n - 1) / n * spec.num_params * (8 + itemsize)
            print(f"N={n}: {1 / per:8.1f} steps/s  ({per * 1e3:.2f} ms/step: "
                  f"compute {compute * 1e3:.2f} ms (kernels {kernel * 1e3:.2f}), "
                  f"all-reduce {reduce * 1e3:.2f} ms; {moved / 1e6:.2f} MB moved per replica and step, "
                  f"{args.batch / per:,.0f} samples/s, {base / per:.2f}x one process)")
            assert len(set(group.checksums(local))) == 1
        finally:
            group.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
