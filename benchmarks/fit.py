"""Training where the data lives, in one run: gradserve's server-side
``fit()`` (the Fit RPC over an uploaded data set) against its per-batch
remote fit (every batch through TrainStream), scikit-learn's
``MLPClassifier`` and a local PyTorch loop, each in its own process, with
equal epochs, batch size and optimizer (Adam, lr 1e-3, no weight decay),
on two data sets, with held-out accuracy.

    .venv/bin/python benchmarks/fit.py [--json out.json]
    # smoke run at tiny sizes:
    .venv/bin/python benchmarks/fit.py --digits-epochs 2 --synthetic-rows 2000 --synthetic-epochs 1

Data sets: scikit-learn's digits (1,257 training rows x 64 after a 70/30
split, features / 16; 64-128-64-10, ReLU, batch 32, 40 epochs) and a
synthetic 10-class Gaussian set (``--synthetic-rows`` training rows x 784,
10,000 held out; 784-512-256-10, ReLU, batch 128). The gradserve server is
a subprocess with ``--durability step`` (every Fit run logged and fsynced)
and a fresh store; the server-side time includes the upload. Targets:
server-side >= 3x scikit-learn on digits, >= 1.2x local PyTorch on both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RUNNERS = ("gradserve-server-side", "gradserve-per-batch", "sklearn", "torch")
LR = 1e-3


def load(name: str, synthetic_rows: int):
    """(X_train, y_train, X_test, y_test, hidden), float32 features, int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split((X / 16).astype(np.float32), y.astype(np.int64), test_size=0.3,
                                              random_state=0)
        return Xtr, ytr, Xte, yte, [128, 64]
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 784)).astype(np.float32) * 0.15
    n = synthetic_rows + 10_000
    y = rng.integers(0, 10, n)
    X = (centers[y] + rng.standard_normal((n, 784), dtype=np.float32)).astype(np.float32)
    return X[:synthetic_rows], y[:synthetic_rows], X[synthetic_rows:], y[synthetic_rows:], [512, 256]


# -- runners (each in its own process) ------------------------------------------------
def run_gradserve(args, X, y, Xte, yte, hidden, server_side: bool) -> dict:
    from gradserve.client import Client
    spec = {"input_size": X.shape[1], "hidden": [{"units": h, "activation": "relu"} for h in hidden],
            "output": (10, "softmax"), "optimizer": {"name": "adam", "lr": LR}, "seed": 0}
    with Client(args.target, timeout=600, max_message_mb=64) as c:
        model = c.create_model(**spec)
        # warm the client's and server's paths once (not timed)
        warm = c.create_model(**spec)
        warm.fit(X[:args.batch_size * 2], y[:args.batch_size * 2], epochs=1, batch_size=args.batch_size,
                 progress=False, server_side=server_side)
        warm.delete()
        t0 = time.perf_counter()
        model.fit(X, y, epochs=args.epochs, batch_size=args.batch_size, seed=1, progress=False,
                  server_side=server_side)  # server-side: includes the upload (first time this data is sent)
        seconds = time.perf_counter() - t0
        accuracy = float(np.mean(model.predict(Xte).argmax(1) == yte))
        model.delete()
    return {"seconds": seconds, "accuracy": accuracy}


def run_sklearn(args, X, y, Xte, yte, hidden) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), activation="relu", solver="adam", alpha=0.0,
                        batch_size=args.batch_size, learning_rate_init=LR, max_iter=args.epochs, shuffle=True,
                        tol=0.0, n_iter_no_change=args.epochs + 1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        clf.fit(X, y)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "accuracy": float(clf.score(Xte, yte)), "epochs_run": int(clf.n_iter_)}


def run_torch(args, X, y, Xte, yte, hidden) -> dict:
    import torch

    from gradserve.wire.shuffle import epoch_order
    torch.manual_seed(0)
    layers, width = [], X.shape[1]
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    warm = torch.nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                                 else torch.nn.ReLU() for m in net])
    warm_opt = torch.optim.Adam(warm.parameters(), lr=LR)
    for i in range(3):  # warm torch's kernels once (not timed), as the gradserve runners warm theirs
        warm_opt.zero_grad(set_to_none=True)
        loss_fn(warm(Xt[:args.batch_size]), yt[:args.batch_size]).backward()
        warm_opt.step()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):  # the same batches as gradserve's Fit
        order = torch.from_numpy(epoch_order(1, epoch, len(X)))
        for i in range(0, len(X), args.batch_size):
            index = order[i:i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(Xt[index]), yt[index]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    return {"seconds": seconds, "accuracy": accuracy, "threads": torch.get_num_threads()}


def worker(args) -> None:
    X, y, Xte, yte, hidden = load(args.dataset, args.synthetic_rows)
    if args.runner.startswith("gradserve"):
        out = run_gradserve(args, X, y, Xte, yte, hidden, args.runner == "gradserve-server-side")
    elif args.runner == "sklearn":
        out = run_sklearn(args, X, y, Xte, yte, hidden)
    else:
        out = run_torch(args, X, y, Xte, yte, hidden)
    print(json.dumps(out))


# -- the orchestrator -------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits-epochs", type=int, default=40)
    parser.add_argument("--digits-batch", type=int, default=32)
    parser.add_argument("--synthetic-rows", type=int, default=60_000)
    parser.add_argument("--synthetic-epochs", type=int, default=5)
    parser.add_argument("--synthetic-batch", type=int, default=128)
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--json", help="also write the results here")
    # worker mode (internal)
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        return worker(args)

    from service import free_port, machine, wait_ready
    runners = [r for r in args.runners.split(",") if r]
    results = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server.cli", "serve", "--port", str(port), "--store",
             str(Path(tmp) / "fit.db"), "--durability", "step", "--max-batch-rows", "65536", "--max-message-mb", "64"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"127.0.0.1:{port}", server)
            for dataset, epochs, batch in (("digits", args.digits_epochs, args.digits_batch),
                                           ("synthetic", args.synthetic_epochs, args.synthetic_batch)):
                rows = {}
                for runner in runners:
                    out = subprocess.run(
                        [sys.executable, __file__, "--runner", runner, "--dataset", dataset, "--epochs", str(epochs),
                         "--batch-size", str(batch), "--target", f"127.0.0.1:{port}",
                         "--synthetic-rows", str(args.synthetic_rows)],
                        cwd=ROOT, capture_output=True, text=True, check=False)
                    if out.returncode:
                        raise RuntimeError(f"{runner} on {dataset} failed:\n{out.stderr[-3000:]}")
                    rows[runner] = json.loads(out.stdout.strip().splitlines()[-1])
                    results["runs"].append({"dataset": dataset, "epochs": epochs, "batch_size": batch,
                                            "runner": runner, **rows[runner]})
                print(f"\n{dataset}: {epochs} epochs, batch {batch}, Adam lr {LR}")
                print(f"  {'runner':<24}{'seconds':>10}{'held-out acc':>14}")
                for runner, r in rows.items():
                    print(f"  {runner:<24}{r['seconds']:>10.3f}{r['accuracy']:>14.4f}")
                fast = rows.get("gradserve-server-side")
                if fast:
                    for other in ("sklearn", "torch", "gradserve-per-batch"):
                        if other in rows:
                            print(f"  server-side speed-up vs {other}: {rows[other]['seconds'] / fast['seconds']:.2f}x")
        finally:
            server.terminate()
            server.wait(60)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
