"""validation_metrics: the validation loss and accuracy that fit() reports,
computed the same way by the server (server-side Fit) and the client
(per-batch fit)."""
from __future__ import annotations

import numpy as np


def validation_metrics(kind: str, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """val_loss: the training loss of the output kind, mean over rows, from
    the predicted probabilities in float64 (MSE for identity; binary cross
    entropy for sigmoid; cross entropy for softmax, probabilities clipped to
    [1e-12, 1]); val_accuracy for classifiers. Server-side Fit and the
    client's per-batch fit both report these, so their histories agree."""
    out = outputs.astype(np.float64)
    tiny = 1e-12
    if kind == "identity":
        return {"val_loss": float(np.mean((out - y.reshape(out.shape)) ** 2))}
    if kind == "sigmoid":
        t = y.reshape(out.shape).astype(np.float64)
        loss = -np.mean(t * np.log(np.clip(out, tiny, 1)) + (1 - t) * np.log(np.clip(1 - out, tiny, 1)))
        return {"val_loss": float(loss), "val_accuracy": float(np.mean((out > 0.5) == (t > 0.5)))}
    logp = np.log(np.clip(out, tiny, 1))
    if y.ndim == 1:
        labels = y.astype(np.int64)
        loss = -np.mean(logp[np.arange(len(labels)), labels])
    else:
        labels = np.argmax(y, axis=1)
        loss = -np.mean(np.sum(y * logp, axis=1))
    return {"val_loss": float(loss), "val_accuracy": float(np.mean(np.argmax(out, axis=1) == labels))}
