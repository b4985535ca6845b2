"""What durability costs, in one run: a user's remote fit() with
``--durability step``, ``interval`` and ``none`` against a local PyTorch
epoch of the same data (in its own process), unary TrainStep latency, and
the time a killed server takes to serve again with many logged steps.

    .venv/bin/python benchmarks/durability.py [--rounds 3] [--json out.json]
    # smoke run at tiny sizes:
    .venv/bin/python benchmarks/durability.py --rows 512 --features 16 --hidden 32 --batches 32,128 \\
        --rounds 1 --p50-calls 20 --restart-models 2 --restart-steps 50

Network (default): 784-512-256-10, ReLU, softmax cross-entropy, Adam,
float32, ``--rows`` rows. Each gradserve server is a subprocess with a fresh
store in a temporary directory and the default snapshot policy; the three
run side by side and are measured in interleaved rounds (medians shown), so
each ratio's sides see the same machine load. Targets: ``step`` >= 0.9x
``none`` at every batch size; remote fit with ``step`` >= 0.9x local
PyTorch at batch >= 128; restart to SERVING <= 5 s with ``--restart-models``
models that each logged ``--restart-steps`` steps (SIGKILL, so nothing is
snapshotted at shutdown; the default policy bounds what is replayed).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from service import free_port, machine, wait_ready  # noqa: E402

from gradserve.client import Client  # noqa: E402

MODES = ("step", "interval", "none")


def spec(features: int, hidden: list[int], classes: int, seed: int = 0) -> dict:
    return {"input_size": features, "hidden": [{"units": h, "activation": "relu"} for h in hidden],
            "output": (classes, "softmax"), "optimizer": {"name": "adam", "lr": 1e-3}, "seed": seed}


def data(rows: int, features: int, classes: int):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, features)).astype(np.float32), rng.integers(0, classes, rows)


class Server:
    def __init__(self, directory: str, mode: str, *flags: str):
        self.store = str(Path(directory) / f"{mode}.db")
        self.mode, self.flags = mode, flags
        self.log_path = Path(directory) / f"{mode}.log"
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self) -> float:
        """Starts the server; returns seconds from spawn to SERVING."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server.cli", "serve", "--port", str(self.port), "--store", self.store,
             "--durability", self.mode, "--max-batch-rows", "65536", "--max-message-mb", "256", *self.flags],
            cwd=ROOT, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        wait_ready(self.target, self.proc)
        return time.perf_counter() - t0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def remote_fit(server: Server, X, y, batch: int, model_spec: dict) -> float:
    """Samples per second of one fit() epoch (after a warm-up of a few batches)."""
    with Client(server.target, timeout=600, max_message_mb=256) as c:
        model = c.create_model(**model_spec)
        model.fit(X[:batch * 4], y[:batch * 4], epochs=1, batch_size=batch, progress=False)
        t0 = time.perf_counter()
        model.fit(X, y, epochs=1, batch_size=batch, seed=1, progress=False)
        seconds = time.perf_counter() - t0
        model.delete()
    return len(X) / seconds


def unary_p50(server: Server, X, y, batch: int, calls: int, model_spec: dict) -> float:
    with Client(server.target, timeout=600, max_message_mb=256) as c:
        model = c.create_model(**model_spec)
        times = []
        for k in range(calls + 5):
            i = (k * batch) % (len(X) - batch + 1)
            t0 = time.perf_counter()
            model.train_step(X[i:i + batch], y[i:i + batch])
            times.append(time.perf_counter() - t0)
        model.delete()
    return statistics.median(times[5:]) * 1e3


TORCH_EPOCH = textwrap.dedent("""
    import sys, time, numpy as np, torch
    rows, features, classes, batch = map(int, sys.argv[1:5]); hidden = [int(h) for h in sys.argv[5].split(",")]
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((rows, features)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, classes, rows))
    sizes = [features, *hidden]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    def epoch(n):
        order = torch.randperm(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            opt.zero_grad(); loss = loss_fn(net(X[idx]), y[idx]); loss.backward(); opt.step()
    epoch(batch * 4)
    t0 = time.perf_counter(); epoch(rows); print(rows / (time.perf_counter() - t0), torch.get_num_threads())
""")


def torch_epoch(rows: int, features: int, hidden: list[int], classes: int, batch: int) -> float | None:
    out = subprocess.run([sys.executable, "-c", TORCH_EPOCH, str(rows), str(features), str(classes), str(batch),
                          ",".join(map(str, hidden))], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"(no PyTorch figure: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})")
        return None
    return float(out.stdout.split()[0])


def restart_time(directory: str, models: int, steps: int, batch: int, model_spec: dict, features: int,
                 classes: int) -> dict:
    """Trains ``models`` models ``steps`` steps each (one TrainStream each,
    concurrently) under step durability and the default snapshot policy,
    SIGKILLs the server and times the restart to SERVING."""
    server = Server(directory, "step", "--log-level", "info")
    rng = np.random.default_rng(5)
    X = rng.standard_normal((batch * 64, features)).astype(np.float32)
    y = rng.integers(0, classes, batch * 64)
    t0 = time.perf_counter()

    def train(k: int) -> None:
        with Client(server.target, timeout=None, max_message_mb=256) as c:
            model = c.create_model(**{**model_spec, "seed": k}, model_id=f"restart{k}")
            batches = ((X[(j % 64) * batch:(j % 64 + 1) * batch], y[(j % 64) * batch:(j % 64 + 1) * batch])
                       for j in range(steps))
            for _ in model.train_stream(batches):
                pass

    threads = [threading.Thread(target=train, args=(k,)) for k in range(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = time.perf_counter() - t0
    server.kill()
    log_mb = sum(p.stat().st_size for p in Path(server.store + ".mutations").glob("*.wal")) / 2**20
    seconds = server.start()
    recovered = re.findall(r"event=recovered .*replayed_records=(\d+).* seconds=([\d.]+)",
                           server.log_path.read_text())[-1]
    server.stop()
    return {"models": models, "steps_each": steps, "batch": batch, "train_seconds": trained,
            "log_mb_at_kill": log_mb, "restart_to_serving_s": seconds, "replayed_records": int(recovered[0]),
            "recovery_s": float(recovered[1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--features", type=int, default=784)
    ap.add_argument("--hidden", default="512,256")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batches", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are shown")
    ap.add_argument("--p50-batch", type=int, default=32)
    ap.add_argument("--p50-calls", type=int, default=300)
    ap.add_argument("--restart-models", type=int, default=8)
    ap.add_argument("--restart-steps", type=int, default=10_000)
    ap.add_argument("--restart-batch", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    hidden = [int(h) for h in args.hidden.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    model_spec = spec(args.features, hidden, args.classes)
    X, y = data(args.rows, args.features, args.classes)
    figures: dict = {"machine": machine(), "args": vars(args)}
    fit = {m: {b: [] for b in batches} for m in (*MODES, "torch")}
    p50 = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="gradserve-durability-") as directory:
        servers = {m: Server(directory, m, "--log-level", "warning") for m in MODES}
        try:
            for r in range(args.rounds):
                for b in batches:
                    for m in MODES:
                        fit[m][b].append(remote_fit(servers[m], X, y, b, model_spec))
                    fit["torch"][b].append(torch_epoch(args.rows, args.features, hidden, args.classes, b))
                for m in MODES:
                    p50[m].append(unary_p50(servers[m], X, y, args.p50_batch, args.p50_calls, model_spec))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for s in servers.values():
                s.stop()
        restart = restart_time(directory, args.restart_models, args.restart_steps, args.restart_batch, model_spec,
                               args.features, args.classes)

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    net = "-".join(map(str, [args.features, *hidden, args.classes]))
    print(f"\nremote fit, one epoch of {args.rows} rows, {net} Adam float32 (samples/s, median of {args.rounds})")
    print(f"{'batch':>6} {'step':>9} {'interval':>9} {'none':>9} {'torch':>9} {'step/none':>10} {'step/torch':>11}")
    ok = True
    for b in batches:
        row = {m: med(fit[m][b]) for m in (*MODES, "torch")}
        vs_none = row["step"] / row["none"]
        vs_torch = row["step"] / row["torch"] if row["torch"] else None
        ok &= vs_none >= 0.9 and (b < 128 or vs_torch is None or vs_torch >= 0.9)
        print(f"{b:>6} {row['step']:>9.0f} {row['interval']:>9.0f} {row['none']:>9.0f} "
              f"{row['torch'] or float('nan'):>9.0f} {vs_none:>10.2f} {vs_torch or float('nan'):>11.2f}")
        figures.setdefault("fit_samples_per_s", {})[b] = row
    print(f"\nunary TrainStep p50 at batch {args.p50_batch} (ms): " +
          "  ".join(f"{m} {med(p50[m]):.3f}" for m in MODES))
    figures["train_step_p50_ms"] = {m: med(p50[m]) for m in MODES}
    print(f"\nrestart after SIGKILL: {restart['models']} models x {restart['steps_each']} logged steps "
          f"(batch {restart['batch']}, trained in {restart['train_seconds']:.0f} s, log {restart['log_mb_at_kill']:.0f}"
          f" MiB at the kill): SERVING after {restart['restart_to_serving_s']:.2f} s "
          f"(recovery {restart['recovery_s']:.2f} s, {restart['replayed_records']} records replayed)")
    ok &= restart["restart_to_serving_s"] <= 5.0
    figures["restart"] = restart
    print(f"\ntargets (step >= 0.9x none; step >= 0.9x torch at batch >= 128; restart <= 5 s): "
          f"{'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
