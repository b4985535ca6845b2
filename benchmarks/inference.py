"""Inference against its floors, in one run: Predict at batch 1 against a
bare gRPC echo server, Predict at batch 1024 over gRPC against the same
network in process, dynamic batching on against off with 16 callers at
batch 1 on a large model, and the V2 protocol (ModelInfer) through Triton's
own client at concurrency 1, 4 and 16.

    .venv/bin/python benchmarks/inference.py [--seconds 3] [--rounds 3] [--json out.json]
    # smoke run: --seconds 0.3 --rounds 1 --big-layers 32,64,64,10

Starts the echo server and two gradserve servers (dynamic batching on, as
default, and ``--dynamic-batching off``; fresh temporary stores,
``--durability interval``) as subprocesses on free loopback ports. Every
figure is taken once per round, rounds interleaved; the table shows the
medians. Networks: 784-512-256-10 ReLU softmax float32 for the batch-1 and
batch-1024 figures, ``--big-layers`` (default 1024-4096-4096-10) for the
batching comparison, whose batch-1 forward pass reads every weight (84 MB):
there, 16 rows cost about what one does. Server and load tool share the
machine's cores: compare ratios measured in one run, not absolutes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import SHAPE, SPEC, free_port, in_process_nnkernels, machine, measure, start_echo, stop, wait_ready  # noqa: E402

from gradserve.client import loadtest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_server(store: str, workers: int, log, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--store", store, "--durability", "interval",
                             "--workers", str(workers), "--log-level", "warning", "--max-params", "200000000",
                             # the memory budget counts workspaces for --max-batch-rows rows: the
                             # default (65536) would refuse the 1024-4096-4096-10 model on a 24 GB machine
                             "--max-batch-rows", "4096", *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    wait_ready(target, proc)
    return proc, target


def big_spec(layers: list[int]) -> dict:
    return {"input_size": layers[0],
            "hidden": [{"units": u, "activation": "relu"} for u in layers[1:-1]],
            "output": {"units": layers[-1], "kind": "softmax"}, "dtype": "float32", "seed": 0}


def triton_load(target: str, model_id: str, input_size: int, concurrency: int, seconds: float,
                warmup_s: float = 0.3) -> dict:
    """ModelInfer through tritonclient's asyncio client: ``concurrency``
    closed-loop callers, batch 1, for ``seconds``; calls/s and latency."""
    import tritonclient.grpc as triton
    import tritonclient.grpc.aio as triton_aio

    X = np.random.default_rng(1).standard_normal((1, input_size)).astype(np.float32)

    async def go():
        latencies: list[float] = []
        async with triton_aio.InferenceServerClient(target) as client:
            def request():
                tensor = triton.InferInput("inputs", list(X.shape), "FP32")
                tensor.set_data_from_numpy(X)
                return [tensor]

            async def caller(until: float, record: bool):
                while time.perf_counter() < until:
                    t = time.perf_counter()
                    await client.infer(model_id, request())
                    if record:
                        latencies.append(time.perf_counter() - t)

            await asyncio.gather(*(caller(time.perf_counter() + warmup_s, False) for _ in range(concurrency)))
            start = time.perf_counter()
            await asyncio.gather(*(caller(start + seconds, True) for _ in range(concurrency)))
            return latencies, time.perf_counter() - start

    latencies, elapsed = asyncio.run(go())
    ms = np.array(latencies) * 1e3
    return {"rps": len(latencies) / elapsed, "count": len(latencies),
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}}


def med(runs: list[dict], *keys) -> float:
    def get(r):
        for k in keys:
            r = r[k]
        return r
    return statistics.median(get(r) for r in runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per load run")
    ap.add_argument("--rounds", type=int, default=3, help="measure every figure this many times, interleaved")
    ap.add_argument("--workers", type=int, default=16,
                    help="gRPC worker threads of every server (>= the 16 callers, so none waits for a thread)")
    ap.add_argument("--big-layers", default="1024,4096,4096,10",
                    help="the batching comparison's network (default %(default)s)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    big_layers = [int(x) for x in args.big_layers.split(",")]
    big_shape = loadtest.Shape(big_layers[0], big_layers[-1], "softmax", "float32")
    secs = args.seconds
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg_at_start']}; "
          f"Python {info['python']}, grpcio {info['grpc']}; server workers {args.workers}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="gradserve-inference-bench-")
    log = open(os.path.join(tmp.name, "servers.log"), "w")
    procs = []
    model_sets = []
    runs: dict[str, list[dict]] = {}
    nk_runs = []
    try:
        echo, echo_target = start_echo(args.workers)
        procs.append(echo)
        on, on_target = start_server(os.path.join(tmp.name, "on.db"), args.workers, log)
        procs.append(on)
        off, off_target = start_server(os.path.join(tmp.name, "off.db"), args.workers, log,
                                       "--dynamic-batching", "off")
        procs.append(off)
        on_models, off_models = loadtest.ModelSet(on_target, timeout=300), loadtest.ModelSet(off_target, timeout=300)
        model_sets += [on_models, off_models]
        small_on = on_models.create(SPEC, 1)
        big_on = on_models.create(big_spec(big_layers), 1)[-1:]
        big_off = off_models.create(big_spec(big_layers), 1)

        plan = [  # name, run()
            ("echo_predict_b1_c1", lambda: measure(echo_target, ["echo"], "predict", 1, 1, secs)),
            ("grpc_predict_b1_c1", lambda: measure(on_target, small_on, "predict", 1, 1, secs)),
            ("echo_predict_b1024_c1", lambda: measure(echo_target, ["echo"], "predict", 1024, 1, secs)),
            ("grpc_predict_b1024_c1", lambda: measure(on_target, small_on, "predict", 1024, 1, secs)),
            ("batching_on_b1_c16", lambda: measure(on_target, big_on, "predict", 1, 16, secs, shape=big_shape)),
            ("batching_off_b1_c16", lambda: measure(off_target, big_off, "predict", 1, 16, secs,
                                                    shape=big_shape)),
            ("batching_on_b1_c1", lambda: measure(on_target, big_on, "predict", 1, 1, secs, shape=big_shape)),
            *((f"v2_triton_b1_c{c}", lambda c=c: triton_load(on_target, small_on[0], SHAPE.input_size, c, secs))
              for c in (1, 4, 16)),
        ]
        runs = {name: [] for name, _ in plan}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}:", flush=True)
            for name, run in plan:
                d = run()
                runs[name].append(d)
                lat = d["latency_ms"]
                print(f"  {name:<24} {d['rps']:9.1f} calls/s  p50 {lat['p50']:8.3f} ms  p99 {lat['p99']:8.3f} ms",
                      flush=True)
            nk_runs.append(in_process_nnkernels(secs))
            print(f"  in process: nnkernels predict b1024 {nk_runs[-1]['predict_b1024_s'] * 1e3:.2f} ms", flush=True)
    finally:
        for models in model_sets:
            models.close()
        for p in reversed(procs):
            stop(p)
        log.close()
    tmp.cleanup()

    rows = []

    def row(case, measured, against, floor, ratio, target, ok):
        rows.append((case, measured, against, floor, ratio, target, "-" if ok is None else ("yes" if ok else "NO")))

    e1, g1 = med(runs["echo_predict_b1_c1"], "latency_ms", "p50"), med(runs["grpc_predict_b1_c1"], "latency_ms", "p50")
    row("Predict b1 p50, 1 caller", f"{g1:.3f} ms", "echo", f"{e1:.3f} ms", f"{g1 / e1:.2f}x", "<= 1.3x", g1 / e1 <= 1.3)
    grpc_rows = med(runs["grpc_predict_b1024_c1"], "rows_per_s")
    nk_rows = 1024 / statistics.median(r["predict_b1024_s"] for r in nk_runs)
    echo_rows = med(runs["echo_predict_b1024_c1"], "rows_per_s")
    row("Predict b1024 rows/s, 1 caller", f"{grpc_rows / 1e3:.1f}k", "nnkernels in process", f"{nk_rows / 1e3:.1f}k",
        f"{grpc_rows / nk_rows:.2f}x", ">= 0.8x", grpc_rows / nk_rows >= 0.8)
    row("Predict b1024 rows/s, 1 caller", f"{grpc_rows / 1e3:.1f}k", "echo (no compute)", f"{echo_rows / 1e3:.1f}k",
        f"{grpc_rows / echo_rows:.2f}x", "-", None)
    on_rps, off_rps = med(runs["batching_on_b1_c16"], "rps"), med(runs["batching_off_b1_c16"], "rps")
    on_p99, off_p99 = (med(runs["batching_on_b1_c16"], "latency_ms", "p99"),
                       med(runs["batching_off_b1_c16"], "latency_ms", "p99"))
    big = "-".join(map(str, big_layers))
    row(f"{big} b1, 16 callers, batching on", f"{on_rps:.1f}/s p99 {on_p99:.1f} ms", "batching off",
        f"{off_rps:.1f}/s p99 {off_p99:.1f} ms", f"{on_rps / off_rps:.2f}x", ">= 3x", on_rps / off_rps >= 3)
    lone = med(runs["batching_on_b1_c1"], "rps")
    row(f"{big} b1, 16 callers, batching on", f"{on_rps:.1f}/s", "1 caller", f"{lone:.1f}/s",
        f"{on_rps / lone:.2f}x", "-", None)
    for c in (1, 4, 16):
        name = f"v2_triton_b1_c{c}"
        rps, p50, p99 = med(runs[name], "rps"), med(runs[name], "latency_ms", "p50"), med(runs[name], "latency_ms", "p99")
        row(f"V2 ModelInfer via tritonclient, b1, {c} caller{'s' if c > 1 else ''}",
            f"{rps:.0f}/s p50 {p50:.3f} ms p99 {p99:.3f} ms", "-", "-", "-", "-", None)

    header = ("case", "gradserve", "against", "value", "ratio", "target", "met")
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(7)]
    print()
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    print(f"cores {os.cpu_count()}; load average at start {tuple(round(x, 2) for x in info['load_avg_at_start'])},"
          f" at end {tuple(round(x, 2) for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "seconds_per_run": secs, "rounds": args.rounds, "runs": runs,
                       "in_process_nnkernels": nk_runs,
                       "table": [dict(zip(header, r)) for r in rows]}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
