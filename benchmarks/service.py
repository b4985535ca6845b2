"""The service against its floors, in one run: a bare gRPC echo server (same
message shapes, no model) and the same network computed in process
(nnkernels and PyTorch).

    .venv/bin/python benchmarks/service.py [--seconds 3] [--rounds 3] [--json out.json]

Starts the echo server and a gradserve server (fresh temporary store,
``--durability interval``) as subprocesses on free loopback ports, drives
both with gradserve-loadtest's runner, and prints one table with the
measured figures, their ratios and the targets. Every figure is taken once
per round, rounds interleaved, and the table shows the medians: on a shared
machine the load changes by the minute, and interleaving keeps each ratio's
two sides under the same conditions. Network: 784-512-256-10,
ReLU, softmax, Adam, float32. Server and load tool share the machine's
cores: ratios measured in one run are what to compare, not absolutes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradserve.client import loadtest  # noqa: E402
from gradserve.client.loadtest_runner import result_to_dict, run_load, run_load_threads  # noqa: E402

LAYERS = [784, 512, 256, 10]
SPEC = {
    "input_size": 784,
    "hidden": [{"units": 512, "activation": "relu"}, {"units": 256, "activation": "relu"}],
    "output": {"units": 10, "kind": "softmax"},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "dtype": "float32",
    "seed": 0,
}
SHAPE = loadtest.Shape(784, 10, "softmax", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(target: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Polls the standard health service until the server reports SERVING
    (it turns SERVING once its kernels are compiled); bounded in time."""
    from grpc_health.v1 import health_pb2
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
            try:
                if check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not serving after {timeout}s")


def start_echo(workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "echo_server.py"), "--port", str(port),
                             "--workers", str(workers), "--layers", ",".join(map(str, LAYERS))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    wait_ready(target, proc)
    return proc, target


def start_gradserve(store: str, workers: int, durability: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--store", store, "--durability", durability,
                             "--workers", str(workers), "--log-level", "warning"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    wait_ready(target, proc)
    return proc, target


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def measure(target: str, ids: list[str], call: str, batch: int, concurrency: int, seconds: float,
            engine: str = "auto", warmup_s: float = 0.5, shape: loadtest.Shape = SHAPE) -> dict:
    """One load run with the load tool's runner; returns its report dict."""
    payloads = loadtest.make_payloads(ids, shape, batch, [call], seed=1)
    args = SimpleNamespace(concurrency=concurrency, engine=engine, rps=None, batch_size=batch,
                           call_timeout=120.0, connections=1)
    engine = loadtest.engine_for(args)
    bounds = dict(concurrency=concurrency, duration_s=seconds, warmup_s=warmup_s, max_run_s=seconds + 120)
    if engine == "threads":
        channel = grpc.insecure_channel(target, options=loadtest._CHANNEL_OPTIONS)
        try:
            kinds = loadtest.build_calls([channel], payloads, {call: 1}, concurrency, batch, 120.0)
            result = run_load_threads(kinds, **bounds)
        finally:
            channel.close()
    else:
        async def go():
            channel = grpc.aio.insecure_channel(target, options=loadtest._CHANNEL_OPTIONS)
            try:
                kinds = loadtest.build_calls([channel], payloads, {call: 1}, concurrency, batch, 120.0)
                return await run_load(kinds, **bounds)
            finally:
                await channel.close()
        result = asyncio.run(go())
    d = result_to_dict(result, engine=engine)
    if d["errors"]:
        raise RuntimeError(f"{call} b{batch} c{concurrency} on {target}: {d['error_messages'][:3]}")
    return d


def median_run(runs: list[dict]) -> dict:
    """The median over rounds of each figure the table uses."""
    med = statistics.median
    return {
        "rps": med(r["rps"] for r in runs),
        "rows_per_s": med(r["rows_per_s"] for r in runs),
        "latency_ms": {p: med(r["latency_ms"][p] for r in runs) for p in ("p50", "p99")},
        "tool_cpu_us_per_call": med(r["tool_cpu_us_per_call"] for r in runs),
    }


def time_calls(fn, seconds: float, min_calls: int = 5) -> float:
    """Median seconds per call of ``fn`` over about ``seconds`` (after two
    warm-up calls)."""
    fn()
    fn()
    times = []
    end = time.perf_counter() + seconds
    while (time.perf_counter() < end or len(times) < min_calls) and len(times) < 100_000:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process_nnkernels(seconds: float) -> dict:
    from gradserve.nnkernels import ModelSpec
    from gradserve.nnkernels.model import Model
    rng = np.random.default_rng(1)
    X1024 = rng.standard_normal((1024, 784)).astype(np.float32)
    X256 = rng.standard_normal((256, 784)).astype(np.float32)
    y256 = rng.integers(0, 10, 256, dtype=np.int64)
    model = Model(ModelSpec.from_dict(SPEC))
    return {
        "predict_b1024_s": time_calls(lambda: model.predict(X1024), seconds),
        "train_b256_s": time_calls(lambda: model.train_step(X256, y256), seconds),
    }


def in_process_torch(seconds: float) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    X = torch.randn(1024, 784)

    def predict():
        with torch.inference_mode():
            return torch.softmax(net(X), dim=1).numpy()

    return {"predict_b1024_s": time_calls(predict, seconds), "threads": torch.get_num_threads(),
            "version": torch.__version__}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(), "grpc": grpc.__version__,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("NUMBA_", "OMP_", "MKL_", "OPENBLAS_", "GRADSERVE_"))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per load run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every figure this many times, interleaved; the table shows medians")
    ap.add_argument("--workers", type=int, default=8, help="gRPC worker threads of both servers")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    secs = args.seconds
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg_at_start']}; "
          f"Python {info['python']}, grpcio {info['grpc']}; server workers {args.workers}", flush=True)
    figures: dict = {"machine": info, "seconds_per_run": secs, "rounds": args.rounds}
    tmp = tempfile.TemporaryDirectory(prefix="gradserve-bench-")
    log = open(os.path.join(tmp.name, "server.log"), "w")
    echo = gs = None
    models = None
    try:
        echo, echo_target = start_echo(args.workers)
        gs, gs_target = start_gradserve(os.path.join(tmp.name, "store.db"), args.workers, "interval", log)
        models = loadtest.ModelSet(gs_target, timeout=120)
        ids = models.create(SPEC, 16)
        echo_ids = ["echo"]

        plan = [  # name, target, model ids, call, batch, callers
            ("echo_predict_b1_c1", echo_target, echo_ids, "predict", 1, 1),
            ("grpc_predict_b1_c1", gs_target, ids[:1], "predict", 1, 1),
            ("echo_predict_b1_c16", echo_target, echo_ids, "predict", 1, 16),
            ("grpc_predict_b1_c16", gs_target, ids[:1], "predict", 1, 16),
            ("echo_predict_b1024_c1", echo_target, echo_ids, "predict", 1024, 1),
            ("grpc_predict_b1024_c1", gs_target, ids[:1], "predict", 1024, 1),
            ("grpc_predict_b1024_c2", gs_target, ids[:1], "predict", 1024, 2),
            ("echo_train_b256_c1", echo_target, echo_ids, "train-step", 256, 1),
            ("grpc_train_b256_c1", gs_target, ids[:1], "train-step", 256, 1),
            ("grpc_train_b256_c16_16models", gs_target, ids, "train-step", 256, 16),
        ]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in plan}
        nk_runs, th_runs = [], []
        for rnd in range(args.rounds):
            # Every figure once per round, in-process ones included, so that
            # each ratio compares figures taken minutes apart at most.
            print(f"round {rnd + 1}/{args.rounds}:", flush=True)
            for name, target, mids, call, batch, callers in plan:
                d = measure(target, mids, call, batch, callers, seconds=secs)
                runs[name].append(d)
                lat = d["latency_ms"]
                print(f"  {name:<30} {d['rps']:9.1f} req/s  p50 {lat['p50']:8.3f} ms  p99 {lat['p99']:8.3f} ms"
                      f"  ({d['engine']}, {d['count']} calls, tool {d['tool_cpu_us_per_call']:.0f} us CPU/call)",
                      flush=True)
            nk_runs.append(in_process_nnkernels(secs))
            th_runs.append(in_process_torch(secs))
            print(f"  in process: nnkernels predict b1024 {nk_runs[-1]['predict_b1024_s'] * 1e3:.2f} ms, "
                  f"train b256 {nk_runs[-1]['train_b256_s'] * 1e3:.2f} ms"
                  + (f"; torch predict b1024 {th_runs[-1]['predict_b1024_s'] * 1e3:.2f} ms" if th_runs[-1] else ""),
                  flush=True)
        failed = models.close()
        models = None
        if failed:
            print(f"could not delete {failed}", file=sys.stderr)
    finally:
        if models is not None:
            models.close()
        for p in (gs, echo):
            if p is not None:
                stop(p)
        log.close()
    tmp.cleanup()

    figures["runs"] = runs
    e1, g1, e16, g16, e1024, g1024, g1024c2, e256, t1, t16 = (median_run(runs[name]) for name, *_ in plan)
    nk = {k: statistics.median(r[k] for r in nk_runs) for k in ("predict_b1024_s", "train_b256_s")}
    th = None if th_runs[0] is None else {
        "predict_b1024_s": statistics.median(r["predict_b1024_s"] for r in th_runs),
        "threads": th_runs[0]["threads"], "version": th_runs[0]["version"]}
    from gradserve import nnkernels
    nk["thread_config"] = nnkernels.thread_config()
    figures["in_process_nnkernels"] = nk
    figures["in_process_torch"] = th

    rows = []

    def row(name, measured, floor_name, floor, ratio, target, ok):
        rows.append((name, measured, floor_name, floor, ratio, target, "yes" if ok else "NO"))

    r = g1["latency_ms"]["p50"] / e1["latency_ms"]["p50"]
    row("Predict b1 p50 (c=1)", f"{g1['latency_ms']['p50']:.3f} ms", "echo",
        f"{e1['latency_ms']['p50']:.3f} ms", f"{r:.2f}x", "<= 1.3x echo", r <= 1.3)
    r = g1["latency_ms"]["p99"] / e1["latency_ms"]["p99"]
    row("Predict b1 p99 (c=1)", f"{g1['latency_ms']['p99']:.3f} ms", "echo",
        f"{e1['latency_ms']['p99']:.3f} ms", f"{r:.2f}x", "-", True)
    for g, e, c in ((g1, e1, 1), (g16, e16, 16)):
        r = g["rps"] / e["rps"]
        row(f"Predict b1 RPS (c={c})", f"{g['rps']:.0f}/s", "echo", f"{e['rps']:.0f}/s", f"{r:.2f}x", "-", True)
    grpc_rows = max(g1024["rows_per_s"], g1024c2["rows_per_s"])
    figures["predict_b1024_best_concurrency"] = 1 if g1024["rows_per_s"] >= g1024c2["rows_per_s"] else 2
    if th:
        torch_rows = 1024 / th["predict_b1024_s"]
        r = grpc_rows / torch_rows
        row("Predict b1024 rows/s", f"{grpc_rows / 1e3:.1f}k", f"torch in-proc ({th['threads']} thr)",
            f"{torch_rows / 1e3:.1f}k", f"{r:.2f}x", ">= 0.8x torch", r >= 0.8)
    nk_rows = 1024 / nk["predict_b1024_s"]
    row("Predict b1024 rows/s", f"{grpc_rows / 1e3:.1f}k", "nnkernels in-proc", f"{nk_rows / 1e3:.1f}k",
        f"{grpc_rows / nk_rows:.2f}x", "-", True)
    row("Predict b1024 rows/s", f"{grpc_rows / 1e3:.1f}k", "echo (no compute)",
        f"{e1024['rows_per_s'] / 1e3:.1f}k", f"{grpc_rows / e1024['rows_per_s']:.2f}x", "-", True)
    nk_steps = 1 / nk["train_b256_s"]
    r = t1["rps"] / nk_steps
    row("TrainStep b256 steps/s", f"{t1['rps']:.1f}/s", "nnkernels in-proc", f"{nk_steps:.1f}/s",
        f"{r:.2f}x", ">= 0.9x", r >= 0.9)
    row("TrainStep b256 steps/s", f"{t1['rps']:.1f}/s", "echo (no compute)", f"{e256['rps']:.1f}/s",
        f"{t1['rps'] / e256['rps']:.2f}x", "-", True)
    r = t16["rps"] / t1["rps"]
    row("TrainStep b256, 16 callers/16 models", f"{t16['rps']:.1f}/s", "1 caller", f"{t1['rps']:.1f}/s",
        f"{r:.2f}x", ">= 1.6x", r >= 1.6)
    figures["table"] = [dict(zip(("case", "measured", "against", "floor", "ratio", "target", "met"), x))
                        for x in rows]

    widths = [max(len(str(x[i])) for x in rows + [("case", "gradserve", "against", "value", "ratio",
                                                     "target", "met")]) for i in range(7)]
    header = ("case", "gradserve", "against", "value", "ratio", "target", "met")
    print()
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    print(f"\nPredict b1024 over gRPC: best of 1 and 2 callers ({figures['predict_b1024_best_concurrency']});"
          f" 1 caller {g1024['rows_per_s'] / 1e3:.1f}k rows/s, 2 callers {g1024c2['rows_per_s'] / 1e3:.1f}k")
    print(f"threads: server gRPC workers {args.workers}; torch {th and th['threads']} threads; "
          f"nnkernels {nk['thread_config']}; env {info['env'] or '-'}")
    print(f"cores {os.cpu_count()}; load average at start {tuple(round(x, 2) for x in info['load_avg_at_start'])},"
          f" at end {tuple(round(x, 2) for x in os.getloadavg())} (above the core count: other work shared "
          f"the machine, figures are noisy)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
