"""Concurrent load: 16 client threads train and query 8 models at once; no
call fails and no step is lost (each model's step count equals the number
of TrainSteps acknowledged for it).

Runs GRADSERVE_LOAD_SECONDS (default 8 s, to keep CI short on 2 cores;
set 20 for the full soak)."""
import os
import threading
import time
from collections import Counter

import numpy as np

from gradserve.client import Client

SECONDS = float(os.environ.get("GRADSERVE_LOAD_SECONDS", "8"))
THREADS = 16
MODELS = 8


def test_sixteen_threads_on_eight_models_lose_no_step(server):
    with Client(server.target, timeout=60, retries=0) as c:
        models = [c.create_model(input_size=8, hidden=[(32, "relu"), (16, "tanh")], output=(4, "softmax"),
                                 optimizer={"name": "adam", "lr": 0.01}, seed=i) for i in range(MODELS)]
        acked = Counter()
        errors = []
        lock = threading.Lock()
        deadline = time.monotonic() + SECONDS

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            model = models[k % MODELS]
            try:
                while time.monotonic() < deadline:
                    X = rng.standard_normal((32, 8)).astype(np.float32)
                    y = rng.integers(0, 4, 32)
                    model.train_step(X, y)
                    with lock:
                        acked[model.model_id] += 1
                    p = models[(k + 1) % MODELS].predict(X)  # another model, read-shared
                    assert p.shape == (32, 4) and np.allclose(p.sum(1), 1, atol=1e-5)
                    if k % 4 == 0:
                        model.gradients(X, y)
            except Exception as exc:  # noqa: BLE001 — reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        for m in models:
            assert m.step == acked[m.model_id] > 0
