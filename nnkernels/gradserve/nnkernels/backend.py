"""The Backend interface every compute target implements (the choice of
target by device name is ``nnkernels.devices``).

A Backend owns one model's parameters, gradients and optimizer state on one
device, as flat buffers (see ``nnkernels.params``), plus the workspaces its
kernels need. It does no validation: ``nnkernels.model.Model`` normalizes
and checks every batch once, then hands the backend

- ``X``: C-contiguous, writable, of the spec's dtype, shape (n, input_size),
  all finite, n >= 1;
- ``y``: for ``mse`` / ``bce_with_logits`` an array like X of shape
  (n, output units); for ``softmax_cross_entropy`` either int64 labels of
  shape (n,) in [0, units) or float targets (probabilities) of shape
  (n, units).

Training-mode randomness (dropout masks, input noise) is a pure function of
(spec.seed, step, layer, element index) through ``nnkernels.rng``, so every
backend draws the same masks and a model that moves between devices keeps
its trajectory.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .spec import ModelSpec


class Backend(ABC):
    """One model's state and kernels on one device."""

    def __init__(self, spec: ModelSpec, params: np.ndarray):
        """``params``: the flat host parameter buffer (``nnkernels.params``
        layout) to start from; optimizer state starts as torch.optim's does."""
        self.spec = spec

    @abstractmethod
    def forward(self, X: np.ndarray, logits: bool = False) -> np.ndarray:
        """Inference (no dropout, no noise): outputs after the output
        activation (probabilities for classifiers), or the pre-activation
        logits when ``logits``. Returns a new host array (n, output units).
        Safe to call from several threads at once while no training call
        runs."""

    @abstractmethod
    def loss_and_grads(self, X: np.ndarray, y: np.ndarray, step: int) -> tuple[float, int, float]:
        """Training-mode forward and backward pass on one batch, with the
        dropout/noise draws of ``step`` (the number of optimizer steps taken
        so far). Fills the gradient buffer with d(mean loss)/d(params) and
        returns ``(loss, correct, grad_sq_norm)``: the mean loss (accumulated
        in float64), the number of correctly classified rows (0 for
        regression), and the squared global L2 norm of the gradient
        (float64). Parameters and optimizer state are not touched."""

    @abstractmethod
    def step(self, lr: float, t: int, grad_scale: float) -> None:
        """One optimizer update of every parameter from the gradient buffer,
        which is first multiplied by ``grad_scale`` (gradient clipping; 1.0
        when off). ``t`` is the 1-based step number (bias correction);
        ``lr`` the scheduled learning rate for this step."""

    def train_steps(self, X: np.ndarray, y: np.ndarray, order: np.ndarray, first: int, steps: int, batch_size: int,
                    step: int) -> tuple[int, np.ndarray] | None:
        """A run of training steps in one device call: batch b (first ..
        first + steps - 1) is the rows ``order[b·batch_size:(b+1)·batch_size]``
        of X and y, each step exactly ``loss_and_grads`` then ``step`` as
        ``Model.train_step`` drives them from optimizer step ``step`` on,
        stopping before the first step whose loss or gradient norm is not
        finite. X: (rows, inputs) float32 or float64, C-contiguous, maybe
        read-only; y as for ``loss_and_grads`` with all rows; order: int64 in
        [0, rows). Returns (steps applied, table) with ``table[s] = (loss,
        correct, squared gradient norm, rows)`` for every step tried; or
        None, this default, when the backend has no such call (``Model``
        then drives the steps one by one)."""
        return None

    @abstractmethod
    def get_params(self) -> np.ndarray:
        """A host copy of the flat parameter buffer."""

    @abstractmethod
    def set_params(self, params: np.ndarray) -> None:
        """Replace the flat parameter buffer (same size and dtype)."""

    @abstractmethod
    def get_grads(self) -> np.ndarray:
        """A host copy of the flat gradient buffer."""

    @abstractmethod
    def set_grads(self, grads: np.ndarray) -> None:
        """Replace the flat gradient buffer (same size and dtype): the next
        ``step`` applies these gradients (PyTorch: ``param.grad = g``)."""

    def nonfinite_buffers(self) -> list[str]:
        """Names of the buffers holding NaN or ±Inf: ``params`` and
        ``optimizer.<state name>``. This default checks host copies; a
        backend whose buffers live in host memory checks them in place."""
        from .finite import all_finite
        buffers = {"params": self.get_params(), **{f"optimizer.{k}": v for k, v in self.get_state().items()}}
        return [name for name, buf in buffers.items() if not all_finite(buf)]

    @abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Host copies of the optimizer state buffers, by name (flat, like
        the parameters; e.g. ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``)."""

    @abstractmethod
    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the optimizer state buffers (names and sizes as get_state)."""
