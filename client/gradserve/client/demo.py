"""One-command demo: ``python -m gradserve.client.demo [--target HOST:PORT]``.

Without --target it starts a server (``python -m gradserve.server.cli serve``, a
subprocess on a free port with a temporary store) and stops it at the end.
Trains XOR and a 10-class blobs problem with fit() (progress bar), prints
accuracy, predicts, and fetches gradients."""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

from gradserve.client import Client


@contextlib.contextmanager
def local_server():
    """A gradserve server in a subprocess on a free loopback port; yields its target."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:  # needs the server distribution (gradserve) installed
        proc = subprocess.Popen([sys.executable, "-m", "gradserve.server.cli", "serve", "--port", str(port),
                                 "--store", os.path.join(tmp, "demo.db"), "--log-level", "warning"])
        try:
            target = f"127.0.0.1:{port}"
            wait_serving(target, proc)
            yield target
        finally:
            proc.terminate()
            proc.wait(60)


def wait_serving(target: str, proc=None, timeout: float = 300) -> None:
    """Polls the standard health service until the server says SERVING (kernels warm)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"no SERVING server at {target} after {timeout} s")


def blobs(n: int, classes: int, features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 0.7, (classes, features))
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32), y


def run(target: str) -> None:
    with Client(target, timeout=120) as c:
        print(f"gradserve at {target}")
        X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
        y = np.array([[0], [1], [1], [0]], np.float32)
        xor = c.create_model(2, hidden=[(8, "tanh")], output=(1, "sigmoid"),
                             optimizer={"name": "adam", "lr": 0.05}, seed=0)
        history = xor.fit(X, y, epochs=300, batch_size=4)
        print(f"XOR: loss {history['loss'][-1]:.4f}, accuracy {history['accuracy'][-1]:.2f}, "
              f"predict {np.round(xor.predict(X).ravel().astype(float), 3).tolist()}")

        X, y = blobs(3000, 10, 20)
        Xt, yt = X[2500:], y[2500:]
        model = c.create_model(20, hidden=[(64, "relu"), (32, "relu")], output=(10, "softmax"),
                               optimizer={"name": "adam", "lr": 0.01}, seed=0)
        history = model.fit(X[:2500], y[:2500], epochs=5, batch_size=64, validation_data=(Xt, yt), seed=0)
        print(f"blobs: train accuracy {history['accuracy'][-1]:.3f}, validation accuracy "
              f"{history['val_accuracy'][-1]:.3f} after {model.step} steps")
        probs = model.predict(Xt[:3])
        print("predict:", probs.argmax(1).tolist(), "true:", yt[:3].tolist())
        loss, grads = model.gradients(Xt[:64], yt[:64])
        print(f"gradients at loss {loss:.4f}:",
              ", ".join(f"{name} {g.shape} |g|={np.linalg.norm(g):.3g}" for name, g in grads.items()))
        for m in (xor, model):
            m.delete()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="gradserve demo: XOR and 10-class blobs through the client")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    args = parser.parse_args(argv)
    if args.target:
        run(args.target)
    else:
        with local_server() as target:
            run(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
