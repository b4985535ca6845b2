"""Plain-NumPy forward, backward, losses and optimizers: the oracle every
backend is tested against, and the place to read what the fast kernels must
compute. Slow on purpose; every formula is written out once, by its
``nnkernels.registry`` name. What is policy rather than formula (schedules,
clipping, which state buffers exist) it reads from the registry, as the
backends do.

Backprop in one paragraph: the forward pass keeps each layer's
pre-activation ``z``, activation ``a`` and (after dropout) output ``h``. The
loss gives ``delta = dL/dz`` of the output layer. For each dense layer, from
the top: ``dW = delta.T @ h_prev``, ``db = delta.sum(0)``, and the delta of
the layer below is ``(delta @ W) * dropout_scale * act'(z)``.

Conventions shared with every backend (see ``nnkernels.rng``):

- Dropout on hidden layer i (training only, probability p): element
  (r, c) of the layer's activation is kept when ``uniform01(key, r·u + c) >=
  p`` with ``key = stream_key(seed, step, dropout_stream(i))``, and a kept
  element is multiplied by ``1/(1-p)`` (inverted dropout, torch.nn.Dropout).
- Input noise (training only): ``x + std·N`` with ``N`` the normal draw
  number ``r·input_size + c`` of ``stream_key(seed, step, NOISE_STREAM)``.
- Hidden-input noise (training only, ``LayerSpec.noise_std``): hidden layer
  i's (dropped-out) activation, the next layer's input, becomes
  ``h + std·N`` with N the normal draw ``r·units + c`` of
  ``hidden_noise_stream(i)`` (Keras ``GaussianNoise``). Additive noise has
  derivative 1: the backward pass is unchanged, but the next layer's dW
  reads the noisy h.
- Weight noise (training only, ``RegularizationSpec.weight_noise_std``):
  dense layer l runs with ``W̃ = W + std·N`` (N: draw ``o·fan_in + i`` of
  ``weight_noise_stream(l)``) in the forward pass and in the backward
  ``delta @ W̃``; ``dW = delta.T @ h_prev`` is dL/dW̃ and updates W.
- Target noise (training only, identity output): the loss is taken against
  ``y + std·N`` (N: draw ``r·units + c`` of ``TARGET_NOISE_STREAM``).
- Each noise is computed in float64 (std·N), cast to the parameter dtype,
  then added.
- ``step`` is the number of optimizer steps already taken.
"""
from __future__ import annotations

import math

import numpy as np

from . import rng
from .params import ParamLayout
from .registry import clip_coefficient, scheduled_lr
from .spec import ModelSpec, OptimizerSpec

# --------------------------------------------------------------------------
# Activations: f(z) and f'(z), as torch.nn.functional defines them.
# ``p`` is the layer's parameter (LayerSpec.activation_param), else unused.
# --------------------------------------------------------------------------
GELU_C = math.sqrt(2.0 / math.pi)
SOFTPLUS_THRESHOLD = 20.0


def identity(z, p=0.0):
    return z.copy()


def identity_grad(z, a, p=0.0):
    return np.ones_like(z)


def relu(z, p=0.0):
    """max(z, 0)."""
    return np.where(z > 0, z, 0).astype(z.dtype)


def relu_grad(z, a, p=0.0):
    """1 where z > 0, else 0 (torch's threshold_backward)."""
    return (z > 0).astype(z.dtype)


def leaky_relu(z, p=0.01):
    """z if z > 0 else negative_slope·z."""
    return np.where(z > 0, z, z * z.dtype.type(p))


def leaky_relu_grad(z, a, p=0.01):
    return np.where(z > 0, 1, p).astype(z.dtype)


def elu(z, p=1.0):
    """z if z > 0 else alpha·(exp(z) - 1)."""
    return np.where(z > 0, z, z.dtype.type(p) * np.expm1(np.minimum(z, 0)))


def elu_grad(z, a, p=1.0):
    """1 if z > 0 else alpha·exp(z) (= a + alpha)."""
    return np.where(z > 0, 1, z.dtype.type(p) * np.exp(np.minimum(z, 0))).astype(z.dtype)


def softplus(z, p=0.0):
    """log(1 + exp(z)), and z itself where z > 20 (torch: beta=1, threshold=20)."""
    return np.where(z > SOFTPLUS_THRESHOLD, z, np.log1p(np.exp(np.minimum(z, SOFTPLUS_THRESHOLD))))


def softplus_grad(z, a, p=0.0):
    """sigmoid(z), and 1 where z > 20."""
    return np.where(z > SOFTPLUS_THRESHOLD, 1, sigmoid(z)).astype(z.dtype)


def sigmoid(z, p=0.0):
    """1 / (1 + exp(-z)), evaluated without overflow."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


def sigmoid_grad(z, a, p=0.0):
    return a * (1 - a)


def tanh(z, p=0.0):
    return np.tanh(z)


def tanh_grad(z, a, p=0.0):
    return 1 - a * a


def hardswish(z, p=0.0):
    """0 if z <= -3; z if z >= 3; z·(z + 3)/6 between."""
    return np.where(z <= -3, 0, np.where(z >= 3, z, z * (z + 3) / 6)).astype(z.dtype)


def hardswish_grad(z, a, p=0.0):
    """0 if z <= -3; z/3 + 1/2 if -3 < z < 3; 1 if z >= 3 (torch 2.x's
    hardswish_backward, which also picks these values at the kinks)."""
    return np.where(z <= -3, 0, np.where(z < 3, z / 3 + 0.5, 1)).astype(z.dtype)


def gelu(z, p=0.0):
    """0.5·z·(1 + tanh(sqrt(2/π)·(z + 0.044715·z³))) (torch approximate='tanh')."""
    return 0.5 * z * (1 + np.tanh(GELU_C * (z + 0.044715 * z ** 3)))


def gelu_grad(z, a, p=0.0):
    t = np.tanh(GELU_C * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * z * z)


def step(z, p=0.0):
    """Threshold unit: 1 where z > 0, else 0."""
    return (z > 0).astype(z.dtype)


def step_grad(z, a, p=0.0):
    """Zero everywhere (the jump at 0 has no usable derivative): no gradient
    flows through a step layer."""
    return np.zeros_like(z)


def silu(z, p=0.0):
    """z·σ(z) (torch.nn.SiLU)."""
    return z * sigmoid(z)


def silu_grad(z, a, p=0.0):
    """σ(z)·(1 + z·(1 - σ(z))), as torch's silu_backward."""
    s = sigmoid(z)
    return s * (1 + z * (1 - s))


def mish(z, p=0.0):
    """z·tanh(softplus(z)) (torch.nn.Mish), softplus with threshold 20."""
    return z * np.tanh(softplus(z))


def mish_grad(z, a, p=0.0):
    """t + z·σ(z)·(1 - t²) with t = tanh(softplus(z)), as torch's mish_backward."""
    t = np.tanh(softplus(z))
    return t + z * sigmoid(z) * (1 - t * t)


# registry name -> (f, f')
ACTIVATIONS = {
    "identity": (identity, identity_grad), "relu": (relu, relu_grad),
    "leaky_relu": (leaky_relu, leaky_relu_grad), "elu": (elu, elu_grad),
    "softplus": (softplus, softplus_grad), "sigmoid": (sigmoid, sigmoid_grad), "tanh": (tanh, tanh_grad),
    "hardswish": (hardswish, hardswish_grad), "gelu": (gelu, gelu_grad), "step": (step, step_grad),
    "silu": (silu, silu_grad), "mish": (mish, mish_grad),
}


# --------------------------------------------------------------------------
# Output activations and losses (mean reduction), as torch.nn.
# Each ``*_loss_and_delta`` returns (loss as float, dL/dlogits).
# --------------------------------------------------------------------------
def log_softmax(z):
    """z - logsumexp(z) per row, with the row max subtracted first."""
    m = z.max(axis=1, keepdims=True)
    s = z - m
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def mse_loss_and_delta(out, y):
    """torch.nn.MSELoss(): mean((out - y)²) over all n·k elements;
    dL/dout = 2·(out - y)/(n·k)."""
    d = out - y
    loss = float(np.mean(d.astype(np.float64) ** 2))
    return loss, 2 * d / d.size


def bce_with_logits_loss_and_delta(z, y):
    """torch.nn.BCEWithLogitsLoss(): mean over all elements of
    max(z, 0) - z·y + log(1 + exp(-|z|)) (the stable form of
    -[y·log σ(z) + (1-y)·log(1-σ(z))]); dL/dz = (σ(z) - y)/(n·k)."""
    z64 = z.astype(np.float64)
    per = np.maximum(z64, 0) - z64 * y + np.log1p(np.exp(-np.abs(z64)))
    return float(per.mean()), (sigmoid(z) - y) / z.size


def smoothed_targets(y, units: int, label_smoothing: float):
    """The per-row target distribution torch.nn.CrossEntropyLoss uses:
    one-hot labels (or the given probabilities) t, then
    t·(1 - ε) + ε/C with ε = label_smoothing, C = units. float64."""
    if y.ndim == 1:
        t = np.zeros((y.shape[0], units))
        t[np.arange(y.shape[0]), y] = 1.0
    else:
        t = y.astype(np.float64)
    return t * (1 - label_smoothing) + label_smoothing / units


def softmax_cross_entropy_loss_and_delta(z, y, label_smoothing=0.0):
    """torch.nn.CrossEntropyLoss(label_smoothing=ε), mean over the n rows:
    loss_r = -Σ_c t_rc · log_softmax(z)_rc with t from ``smoothed_targets``.
    dL/dz_r = (p_r·Σ_c t_rc - t_r)/n, which is (p - t)/n when each target row
    sums to 1 (labels, or probability targets)."""
    n, units = z.shape
    t = smoothed_targets(y, units, label_smoothing)
    logp = log_softmax(z.astype(np.float64))
    loss = float(-(t * logp).sum(axis=1).mean())
    delta = (np.exp(logp) * t.sum(axis=1, keepdims=True) - t) / n
    return loss, delta.astype(z.dtype)


# registry name -> (output activation, loss and delta)
OUTPUTS = {
    "identity": (identity, mse_loss_and_delta),
    "sigmoid": (sigmoid, bce_with_logits_loss_and_delta),
    "softmax": (softmax, softmax_cross_entropy_loss_and_delta),
}


def loss_and_delta(spec: ModelSpec, logits, y):
    """(loss, dL/dlogits) of the spec's output kind and loss."""
    loss = OUTPUTS[spec.output.kind][1]
    if spec.output.kind == "softmax":
        return loss(logits, y, spec.loss.label_smoothing)
    return loss(logits, y)


def count_correct(spec: ModelSpec, logits, y) -> int:
    """softmax: rows whose argmax equals the label (or the target's argmax);
    sigmoid: elements where (p > 0.5) == (y > 0.5), i.e. (z > 0) == (y > 0.5);
    regression: 0."""
    kind = spec.output.kind
    if kind == "softmax":
        labels = y if y.ndim == 1 else y.argmax(axis=1)
        return int((logits.argmax(axis=1) == labels).sum())
    if kind == "sigmoid":
        return int(((logits > 0) == (y > 0.5)).sum())
    return 0


# --------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------
def dropout_keep_scale(spec: ModelSpec, layer: int, step: int, shape):
    """Multiplier per element of hidden layer ``layer``'s activation:
    1/(1-p) where kept, 0 where dropped (see module docstring)."""
    p = spec.hidden[layer].dropout
    key = rng.stream_key(spec.seed, step, rng.dropout_stream(layer))
    u = rng.uniform01_array(key, shape[0] * shape[1]).reshape(shape)
    return np.where(u >= p, 1.0 / (1.0 - p), 0.0)


def gaussian_noise(spec: ModelSpec, step: int, stream: int, std: float, shape):
    """std·N with N the first prod(shape) normal draws of ``stream`` at
    ``step``, row-major (float64)."""
    key = rng.stream_key(spec.seed, step, stream)
    return std * rng.normal_array(key, int(np.prod(shape))).reshape(shape)


def layer_weights(spec: ModelSpec, params, *, training=False, step=0):
    """Each dense layer's W as the pass uses it: W itself, or while training
    with weight noise W̃ = W + (std·N).astype(dtype) (a new array)."""
    std = spec.regularization.weight_noise_std
    ws = [W for W, _ in ParamLayout(spec).views(params)]
    if training and std > 0:
        ws = [W + gaussian_noise(spec, step, rng.weight_noise_stream(l), std, W.shape).astype(W.dtype)
              for l, W in enumerate(ws)]
    return ws


def noisy_targets(spec: ModelSpec, y, step: int, dtype):
    """y + (std·N).astype(dtype), in ``dtype`` (the parameters'), with target
    noise on; else y as given (training)."""
    std = spec.regularization.target_noise_std
    if std == 0:
        return y
    y = np.asarray(y, dtype)
    return y + gaussian_noise(spec, step, rng.TARGET_NOISE_STREAM, std, y.shape).astype(dtype)


def forward(spec: ModelSpec, params, X, *, training=False, step=0):
    """Returns a cache: ``hs`` (the input to each dense layer, X first),
    ``zs`` and ``as_`` of every hidden layer, ``masks`` (dropout scales or
    None), ``ws`` (each layer's W as used: W̃ under weight noise) and
    ``logits`` (the output layer's pre-activation)."""
    layout = ParamLayout(spec)
    views = layout.views(params)
    dtype = params.dtype
    ws = layer_weights(spec, params, training=training, step=step)
    h = X.astype(dtype)
    if training and spec.regularization.input_noise_std > 0:
        h = h + gaussian_noise(spec, step, rng.NOISE_STREAM, spec.regularization.input_noise_std, h.shape).astype(dtype)
    cache = {"hs": [h], "zs": [], "as_": [], "masks": [], "ws": ws}
    for i, layer in enumerate(spec.hidden):
        W, b = ws[i], views[i][1]
        z = h @ W.T + b
        a = ACTIVATIONS[layer.activation][0](z, layer.activation_param).astype(dtype)
        mask = None
        if training and layer.dropout > 0:
            mask = dropout_keep_scale(spec, i, step, a.shape).astype(dtype)
            h = a * mask
        else:
            h = a
        if training and layer.noise_std > 0:
            h = h + gaussian_noise(spec, step, rng.hidden_noise_stream(i), layer.noise_std, h.shape).astype(dtype)
        cache["zs"].append(z)
        cache["as_"].append(a)
        cache["masks"].append(mask)
        cache["hs"].append(h)
    cache["logits"] = h @ ws[-1].T + views[-1][1]
    return cache


def predict(spec: ModelSpec, params, X, logits=False):
    """Inference outputs: probabilities (classifiers) / values, or logits."""
    z = forward(spec, params, X)["logits"]
    return z if logits else OUTPUTS[spec.output.kind][0](z).astype(params.dtype)


def loss_and_grads(spec: ModelSpec, params, X, y, step=0):
    """Training-mode loss and gradient of the mean loss with respect to the
    flat parameters: returns (loss, correct, grads) with grads in the flat
    layout."""
    layout = ParamLayout(spec)
    cache = forward(spec, params, X, training=True, step=step)
    y = noisy_targets(spec, y, step, params.dtype)  # y itself without target noise (regression only: validated)
    loss, delta = loss_and_delta(spec, cache["logits"], y)
    delta = delta.astype(params.dtype)
    grads = np.zeros_like(params)
    gviews = layout.views(grads)
    for i in range(layout.num_layers - 1, -1, -1):
        gW, gb = gviews[i]
        gW[...] = delta.T @ cache["hs"][i]
        gb[...] = delta.astype(np.float64).sum(axis=0)
        if i > 0:
            W = cache["ws"][i]  # W̃ under weight noise
            layer = spec.hidden[i - 1]
            dh = delta @ W
            if cache["masks"][i - 1] is not None:
                dh = dh * cache["masks"][i - 1]
            deriv = ACTIVATIONS[layer.activation][1](cache["zs"][i - 1], cache["as_"][i - 1],
                                                     layer.activation_param)
            delta = (dh * deriv).astype(params.dtype)
    return loss, count_correct(spec, cache["logits"], y), grads


# --------------------------------------------------------------------------
# Optimizers: torch.optim's single-tensor (foreach=False, fused=False) math
# on the flat buffers. ``t`` is the 1-based step number. Products are written
# in torch's evaluation order (addcmul: s + (c·a)·b; addcdiv: s + (c·a)/b) so
# float64 trajectories agree to rounding.
# --------------------------------------------------------------------------
def lerp(start, end, weight):
    """torch.lerp: start + w·(end - start) for w < 0.5, else
    end - (end - start)·(1 - w)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def flushed(a):
    """``a`` (a state buffer, in place) with its subnormal values (0 < |x| <
    the dtype's smallest normal number) set to +0. Where
    torch keeps them: a state value that decays geometrically once its
    gradient is zero (momentum buffers, exp_avg, square averages: a weight
    on an input pixel that is always 0) ends in the subnormal range and,
    rounding back to itself, stays there for good, and every operation on a
    subnormal costs x86 cores ~100 cycles (Adam on scikit-learn's digits:
    ~1,500 of 17,000 exp_avg values, 52 -> 89 µs a step). The update such
    a value makes is below 1e-33·lr, so the parameters keep torch's bits
    unless they are themselves that small; zeros, NaN and Inf pass."""
    a[(a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)] = 0
    return a


def optimizer_step(opt: OptimizerSpec, params, grad, state, lr: float, t: int) -> None:
    """One update of ``params`` (in place) from ``grad`` (not modified);
    ``state``: the buffers ``registry.init_state`` makes."""
    OPTIMIZERS[opt.name](opt, params, grad, state, lr, t)


def sgd_step(opt, p, g, state, lr, t):
    """torch.optim.SGD:
    g ← g + wd·p;  if momentum: b ← g at t = 1, else b ← μ·b + (1-τ)·g;
    g ← g + μ·b (nesterov) or g ← b;  p ← p - lr·g."""
    d = g + opt.weight_decay * p if opt.weight_decay != 0 else g.copy()
    if opt.momentum != 0:
        b = state["momentum_buffer"]
        if t == 1:
            b[...] = d
        else:
            b[...] = flushed(b * opt.momentum + (1 - opt.dampening) * d)
        d = d + opt.momentum * b if opt.nesterov else b
    p -= lr * d


def adagrad_step(opt, p, g, state, lr, t):
    """torch.optim.Adagrad:
    g ← g + wd·p;  clr = lr/(1 + (t-1)·lr_decay);  s ← s + g²;
    p ← p - clr·g/(sqrt(s) + eps)."""
    if opt.weight_decay != 0:
        g = g + opt.weight_decay * p
    clr = lr / (1 + (t - 1) * opt.lr_decay)
    s = state["sum"]
    s += g * g
    p -= clr * g / (np.sqrt(s) + opt.eps)


def rmsprop_step(opt, p, g, state, lr, t):
    """torch.optim.RMSprop:
    g ← g + wd·p;  v ← α·v + (1-α)·g²;
    centered: ḡ ← lerp(ḡ, g, 1-α), d = sqrt(v - ḡ²) + eps; else d = sqrt(v) + eps;
    momentum: b ← μ·b + g/d, p ← p - lr·b; else p ← p - lr·g/d."""
    if opt.weight_decay != 0:
        g = g + opt.weight_decay * p
    v = state["square_avg"]
    v *= opt.alpha
    v += (1 - opt.alpha) * g * g
    flushed(v)
    if opt.centered:
        ga = state["grad_avg"]
        ga[...] = flushed(lerp(ga, g, 1 - opt.alpha))
        avg = np.sqrt(v - ga * ga) + opt.eps
    else:
        avg = np.sqrt(v) + opt.eps
    if opt.momentum > 0:
        b = state["momentum_buffer"]
        b[...] = flushed(b * opt.momentum + g / avg)
        p -= lr * b
    else:
        p -= lr * g / avg


def adam_step(opt, p, g, state, lr, t):
    """torch.optim.Adam / AdamW:
    Adam: g ← g + wd·p;  AdamW: p ← p·(1 - lr·wd);
    m ← lerp(m, g, 1-β1);  v ← β2·v + (1-β2)·g²;
    amsgrad: v̂ ← max(v̂, v), else v̂ = v;
    p ← p - (lr/(1-β1^t)) · m / (sqrt(v̂)/sqrt(1-β2^t) + eps)."""
    if opt.name == "adamw":
        p *= 1 - lr * opt.weight_decay
    elif opt.weight_decay != 0:
        g = g + opt.weight_decay * p
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = flushed(lerp(m, g, 1 - opt.beta1))
    v *= opt.beta2
    v += (1 - opt.beta2) * g * g
    flushed(v)
    if opt.amsgrad:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    step_size = lr / (1 - opt.beta1 ** t)
    bc2_sqrt = math.sqrt(1 - opt.beta2 ** t)
    p -= step_size * m / (np.sqrt(v) / bc2_sqrt + opt.eps)


# registry name -> update
OPTIMIZERS = {"sgd": sgd_step, "adagrad": adagrad_step, "rmsprop": rmsprop_step, "adam": adam_step,
              "adamw": adam_step}


def train_step(spec: ModelSpec, params, state, X, y, step: int):
    """One full training step on the reference (in place on params/state):
    gradients at ``step``, clipping, scheduled lr, optimizer update at
    t = step + 1. Returns (loss, correct, grad_norm, lr)."""
    loss, correct, grads = loss_and_grads(spec, params, X, y, step)
    norm = math.sqrt(float(np.sum(grads.astype(np.float64) ** 2)))
    scale = clip_coefficient(norm, spec.regularization.clip_grad_norm)
    if scale != 1.0:
        grads = grads * grads.dtype.type(scale)
    lr = scheduled_lr(spec.schedule, spec.optimizer.lr, step)
    optimizer_step(spec.optimizer, params, grads, state, lr, step + 1)
    return loss, correct, norm, lr
