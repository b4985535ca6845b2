"""The batch schedule of a server-side Fit, shared by server and client so a
client can reproduce, bit for bit, the batches a Fit trains on."""
from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, rows: int, shuffle: bool = True) -> np.ndarray:
    """The row order of ``epoch`` (0-based): a permutation drawn from numpy's
    PCG64 seeded with the entropy ``[seed, epoch]`` (so any epoch is
    computed without the ones before it), or ``0..rows-1`` unshuffled."""
    if not shuffle:
        return np.arange(rows, dtype=np.int64)
    return np.random.Generator(np.random.PCG64([int(seed), int(epoch)])).permutation(rows).astype(np.int64)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Batches per epoch; the last one holds the remaining rows (as a
    torch DataLoader with drop_last=False)."""
    return -(-rows // batch_size)


def batch_index(order: np.ndarray, batch: int, batch_size: int) -> np.ndarray:
    """Row indices of batch ``batch`` (0-based) of an epoch in ``order``."""
    return order[batch * batch_size:(batch + 1) * batch_size]


def fit_batches(X, y, *, epochs: int, batch_size: int, seed: int, shuffle: bool = True, first_epoch: int = 0):
    """Yields (epoch, X batch, y batch) in the order a Fit with these
    parameters trains on them."""
    for epoch in range(first_epoch, first_epoch + epochs):
        order = epoch_order(seed, epoch, len(X), shuffle)
        for b in range(steps_per_epoch(len(X), batch_size)):
            i = batch_index(order, b, batch_size)
            yield epoch, X[i], y[i]
