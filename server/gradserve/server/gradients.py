"""Optimizer steps on gradients from outside a TrainStep: ApplyGradients
(the caller's gradients: federated averaging, a privacy mechanism's noise)
and AccumulateGradients + OptimizerStep (one step over more rows than one
message holds or one caller has; Tinker's forward_backward / optim_step).

Semantics are PyTorch's ``param.grad = g; optimizer.step()`` with the
model's own protocol around it, as ``Model.train_step`` after its backward
pass: the global L2 norm of g (float64) is reported and must be finite;
clipping scales g by ``min(1, clip_grad_norm / (norm + 1e-6))``
(``clip_grad_norm_``); the rate is ``schedule(optimizer.lr, t)`` at t =
steps taken; then one optimizer update and the step count goes up by one.

Accumulation: each AccumulateGradients(X_i, y_i) computes the gradient
g_i of the mean loss over its n_i rows (with the dropout/noise draws of the
next step, as GetGradients) and adds n_i · g_i to a float64 buffer;
OptimizerStep applies g = Σ n_i g_i / Σ n_i, the gradient of the mean loss
over all the rows (exactly the full batch's when there is no dropout and
no input, hidden-input or target noise, whose draws depend on a row's place
in its own call; weight noise draws the same W̃ for every call of a step), and
reports the row-weighted mean loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradserve.nnkernels import InputError, Model, NonFiniteError, NotTrainableError, StepResult
from gradserve.nnkernels.registry import clip_coefficient, scheduled_lr


def flat_gradients(model: Model, grads: dict) -> np.ndarray:
    """The named gradients as one flat buffer of the model's dtype (the
    parameter layout); InputError naming a missing, unknown, misshapen or
    non-finite one."""
    if not isinstance(grads, dict) or not grads:
        raise InputError("gradients", "must name a gradient for every parameter")
    expected = dict(model.param_shapes())
    unknown = [k for k in grads if k not in expected]
    if unknown:
        raise InputError(str(unknown[0]), f"is not a parameter of this model (expected {list(expected)})")
    missing = [k for k in expected if k not in grads]
    if missing:
        raise InputError(missing[0], "is missing: a step needs the gradient of every parameter")
    flat = np.empty(model.num_params, model.dtype)
    views = model.layout.named_views(flat)
    for name, shape in expected.items():
        g = np.asarray(grads[name])
        if g.dtype.kind not in "biuf":
            raise InputError(name, f"must hold real numbers, got dtype {g.dtype}")
        if g.shape != tuple(shape):
            raise InputError(name, f"has shape {g.shape}, expected {tuple(shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            views[name][...] = g
        if not np.isfinite(views[name]).all():
            raise InputError(name, f"contains NaN or Inf (or values beyond {model.dtype.name})")
    return flat


def apply_gradients(model: Model, flat: np.ndarray, loss: float = math.nan, norm: float | None = None) -> StepResult:
    """One optimizer step on ``flat`` (validated by ``flat_gradients``),
    clipped by ``norm``: its L2 norm, computed here when not given (a
    data-parallel step gives the one its reduction summed). The caller
    serializes training calls on the model (the registry's write lock)."""
    if not model.spec.trainable:
        raise NotTrainableError("every hidden layer is a 'step' unit (zero derivative): nothing can be trained")
    if norm is None:
        wide = flat.astype(np.float64)
        norm = math.sqrt(float(np.dot(wide, wide)))
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {model.step + 1} not applied: gradient norm={norm!r}")
    scale = clip_coefficient(norm, model.spec.regularization.clip_grad_norm)
    lr = scheduled_lr(model.spec.schedule, model.spec.optimizer.lr, model.step)
    model.backend.set_grads(flat)
    model.backend.step(lr, model.step + 1, scale)
    model.step += 1
    return StepResult(model.step, loss, None, norm, lr)


@dataclass
class GradientAccumulator:
    """AccumulateGradients' buffer for one model, begun at ``step`` (in
    memory only: an unfinished accumulation is lost on restart)."""

    step: int
    total: np.ndarray  # Σ n_i · g_i, float64
    rows: int = 0
    loss_sum: float = 0.0  # Σ n_i · loss_i

    def add(self, model: Model, X, y) -> None:
        loss, grads = model.gradients(X, y)
        n = len(X)
        views = model.layout.named_views(self.total)
        for name, g in grads.items():
            views[name] += n * g.astype(np.float64)
        self.rows += n
        self.loss_sum += n * loss

    def mean(self, dtype) -> tuple[np.ndarray, float]:
        """(Σ n_i g_i / Σ n_i in ``dtype``, the row-weighted mean loss)."""
        return (self.total / self.rows).astype(dtype), self.loss_sum / self.rows
