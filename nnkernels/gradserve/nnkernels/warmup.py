"""warm_up: compile (or load from Numba's cache) every CPU kernel signature
before serving, and check the threading layer."""
from __future__ import annotations

import time

import numpy as np

from . import runtime
from .model import Model
from .spec import LayerSpec, ModelSpec, OptimizerSpec, OutputSpec, RegularizationSpec


def warm_up(dtypes=("float32", "float64")) -> tuple[float, str]:
    """Run a tiny model through every kernel signature the CPU backend uses
    (per dtype: int labels and float targets, inference, the optimizer pass,
    small and parallel batch sizes (serial twins and parallel kernels), a compiled run of steps).
    Returns (seconds taken, threading
    layer); raises RuntimeError when the layer is not thread-safe."""
    t0 = time.perf_counter()
    for dtype in dtypes:
        clf = Model(ModelSpec(
            input_size=3, hidden=(LayerSpec(4, "relu", dropout=0.25),), output=OutputSpec(3, "softmax"),
            optimizer=OptimizerSpec("adam"), regularization=RegularizationSpec(input_noise_std=0.1),
            dtype=dtype))
        reg = Model(ModelSpec(input_size=3, hidden=(LayerSpec(4, "tanh", noise_std=0.1),), output=OutputSpec(1),
                              optimizer=OptimizerSpec("sgd", momentum=0.9), dtype=dtype,
                              regularization=RegularizationSpec(weight_noise_std=0.01, target_noise_std=0.1)))
        for rows in (2, runtime.PARALLEL_MIN_ROWS):
            X = np.linspace(-1, 1, rows * 3).reshape(rows, 3)
            clf.train_step(X, np.arange(rows) % 3)
            clf.train_step(X, np.full((rows, 3), 1 / 3))
            clf.predict(X)
            reg.train_step(X, X[:, :1])
            reg.predict(X, logits=True)
            order = np.arange(rows)[::-1].copy()  # a compiled run of steps (the Fit's), labels and values
            # data sets are stored as uploaded: float32 or float64 whatever the model's dtype (NumPy's default
            # float64 for a float32 model is common), each a signature of the run
            for data in (X.astype("float32"), X):
                clf.train_steps(data, np.arange(rows) % 3, order, rows)
            reg.train_steps(X.astype(dtype), X[:, :1], order, rows)
        # the per-parameter passes (optimizer, W̃) get threads by parameter count: a model with
        # over 128 × 2048 parameters (512·512 + 512·8 + biases) runs their parallel kernels (the small
        # ones above ran the serial twins); moderate layers, as a 32768-input one spent 0.7 s of
        # start-up probing its inference tiles
        wide = Model(ModelSpec(input_size=512, hidden=(LayerSpec(512, "relu"),), output=OutputSpec(8),
                               optimizer=OptimizerSpec("adam"), dtype=dtype,
                               regularization=RegularizationSpec(weight_noise_std=0.01)))
        assert wide.num_params // 2048 >= runtime.PARALLEL_MIN_ROWS
        X = np.linspace(-1, 1, 2 * wide.spec.input_size).reshape(2, -1)
        wide.train_step(X, X[:, :8])
        clf.set_weights(clf.get_weights())  # 1-D and 2-D finiteness checks
        clf.load_state_dict(clf.state_dict())
    return time.perf_counter() - t0, runtime.check_threading_layer()
