"""End-to-end learning on small problems: the CPU backend actually trains."""
import math

import numpy as np

from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec


def test_xor_reaches_full_accuracy():
    m = Model(ModelSpec(input_size=2, hidden=(LayerSpec(8, "tanh"),), output=OutputSpec(1, "sigmoid"),
                        optimizer=OptimizerSpec("adam", lr=0.05), seed=1))
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.float32)
    for _ in range(400):
        r = m.train_step(X, y)
    assert r.accuracy == 1.0
    np.testing.assert_array_equal(m.predict(X)[:, 0] > 0.5, y > 0.5)


def test_sine_regression_reaches_small_mse():
    m = Model(ModelSpec(input_size=1, hidden=(LayerSpec(32, "tanh"), LayerSpec(32, "tanh")), output=OutputSpec(1),
                        optimizer=OptimizerSpec("adam", lr=0.01), seed=0))
    X = np.linspace(-math.pi, math.pi, 256).reshape(-1, 1)
    y = np.sin(X)
    for _ in range(3000):
        m.train_step(X, y)
    mse = float(np.mean((m.predict(X) - y) ** 2))
    assert mse < 1e-3


def blobs(n, rs, centers):
    labels = rs.integers(0, len(centers), n)
    return centers[labels] + rs.normal(size=(n, centers.shape[1])), labels


def test_ten_class_blobs_reach_95_percent_held_out_accuracy():
    rs = np.random.default_rng(0)
    centers = rs.normal(size=(10, 20)) * 2.0
    X, y = blobs(3000, rs, centers)
    Xt, yt = blobs(1000, rs, centers)
    m = Model(ModelSpec(input_size=20, hidden=(LayerSpec(64, "relu", dropout=0.1),), output=OutputSpec(10, "softmax"),
                        optimizer=OptimizerSpec("adamw", lr=3e-3), seed=3))
    for epoch in range(8):
        order = rs.permutation(len(X))
        for k in range(0, len(X), 64):
            idx = order[k:k + 64]
            m.train_step(X[idx], y[idx])
    accuracy = np.mean(m.predict(Xt).argmax(axis=1) == yt)
    assert accuracy > 0.95
