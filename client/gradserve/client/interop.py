"""Weights that travel: safetensors files (PyTorch ``nn.Sequential`` names or
gradserve's) and ONNX graphs, built client-side from a model's spec
(``ModelInfo.spec``) and weights, so the server needs no part in it.

The network a spec describes is, in PyTorch terms::

    nn.Sequential(nn.Linear(in, h1), Act1, nn.Linear(h1, h2), Act2, ..., nn.Linear(hk, out))

followed by the output kind (identity, ``Sigmoid``, ``Softmax(dim=1)``).
Its state_dict keys are ``0.weight``, ``0.bias``, ``2.weight``, ... : the
Linear layers at even indices, the activation modules (no parameters)
between them. gradserve names the same tensors ``layers.{i}.weight``
(out x in, as ``nn.Linear``) and ``layers.{i}.bias``.

Needs the optional packages ``safetensors`` and ``onnx`` (the client's
extras ``safetensors`` and ``onnx``); importing this module does not.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

_GRADSERVE_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
_INDEXED_KEY = re.compile(r"^(?:.*\.)?(\d+)\.(weight|bias)$")
NAMINGS = ("gradserve", "torch")
SPEC_METADATA_KEY = "gradserve.spec"


def _need(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this; install it with "
                          f"pip install 'gradserve-client[{extra}]'") from exc


# -- names ------------------------------------------------------------------
def to_torch_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``layers.{i}.weight`` -> ``{2i}.weight`` (and biases): the keys of
    the ``nn.Sequential`` with an activation module after each hidden Linear."""
    out = {}
    for name, array in weights.items():
        match = _GRADSERVE_KEY.match(name)
        if not match:
            raise ValueError(f"weights: {name!r} is not a gradserve parameter name (layers.{{i}}.weight|bias)")
        out[f"{2 * int(match.group(1))}.{match.group(2)}"] = array
    return out


def to_gradserve_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Either naming -> gradserve's. gradserve names pass through. Otherwise
    every key must end in ``{index}.weight`` or ``{index}.bias`` (an
    ``nn.Sequential``'s state_dict, possibly under a prefix such as
    ``net.``); the distinct module indices, in increasing order, are the
    dense layers 0, 1, 2, ... — so Sequentials with Dropout or other
    parameter-free modules in between map correctly too."""
    if weights and all(_GRADSERVE_KEY.match(k) for k in weights):
        return dict(weights)
    indexed = {}
    for name in weights:
        match = _INDEXED_KEY.match(name)
        if not match:
            raise ValueError(f"weights: {name!r} is neither a gradserve name (layers.{{i}}.weight) "
                             f"nor an nn.Sequential key ({{index}}.weight)")
        indexed[name] = (int(match.group(1)), match.group(2))
    prefixes = {name[:len(name) - len(f"{i}.{kind}")] for name, (i, kind) in indexed.items()}
    if len(prefixes) > 1:
        raise ValueError(f"weights: keys come from several modules ({sorted(prefixes)}); give one Sequential's")
    layer_of = {module: layer for layer, module in enumerate(sorted({i for i, _ in indexed.values()}))}
    return {f"layers.{layer_of[i]}.{kind}": weights[name] for name, (i, kind) in indexed.items()}


# -- safetensors ----------------------------------------------------------------
def save_safetensors(weights: dict[str, np.ndarray], path, *, names: str = "gradserve",
                     spec: dict | None = None) -> None:
    """Writes ``weights`` to a safetensors file under ``names`` ("gradserve":
    ``layers.{i}.weight``; "torch": ``nn.Sequential`` keys ``0.weight``...).
    The spec, when given, goes into the file's metadata as JSON (key
    ``gradserve.spec``); ``format`` is ``pt`` so PyTorch tools accept it."""
    st = _need("safetensors.numpy", "safetensors")
    if names not in NAMINGS:
        raise ValueError(f"names: must be one of {', '.join(NAMINGS)}, got {names!r}")
    tensors = to_torch_names(weights) if names == "torch" else dict(weights)
    metadata = {"format": "pt"}
    if spec is not None:
        metadata[SPEC_METADATA_KEY] = json.dumps(spec, sort_keys=True)
    st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(Path(path)), metadata=metadata)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Reads a safetensors file written under either naming (or by
    ``safetensors.torch.save_file(sequential.state_dict(), path)``) and
    returns the tensors under gradserve's names, ready for SetWeights."""
    st = _need("safetensors.numpy", "safetensors")
    return to_gradserve_names(st.load_file(str(Path(path))))


def safetensors_spec(path) -> dict | None:
    """The spec stored in a file's metadata by ``save_safetensors``, if any."""
    safetensors = _need("safetensors", "safetensors")
    with safetensors.safe_open(str(Path(path)), framework="numpy") as f:
        meta = f.metadata() or {}
    return json.loads(meta[SPEC_METADATA_KEY]) if SPEC_METADATA_KEY in meta else None


# -- ONNX -------------------------------------------------------------------------
ONNX_OPSET = 17
GELU_C = math.sqrt(2.0 / math.pi)
SOFTPLUS_THRESHOLD = 20.0


class _Graph:
    """Nodes and constants under construction, with fresh tensor names."""

    def __init__(self, helper, numpy_helper, dtype: np.dtype):
        self.helper = helper
        self.numpy_helper = numpy_helper
        self.dtype = dtype
        self.nodes = []
        self.initializers = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _softplus(g: _Graph, x: str) -> str:
    # torch's Softplus(beta=1, threshold=20): x itself above 20, where
    # log(1 + exp(x)) would overflow in float32
    big = g.op("Greater", x, g.const(SOFTPLUS_THRESHOLD))
    capped = g.op("Min", x, g.const(SOFTPLUS_THRESHOLD))
    soft = g.op("Log", g.op("Add", g.op("Exp", capped), g.const(1.0)))
    return g.op("Where", big, x, soft)


def _activation(g: _Graph, x: str, layer: dict) -> str:
    """Nodes computing the hidden layer's activation, as torch.nn.functional
    defines it (see nnkernels.reference); composed from primitives that
    ONNX Runtime implements for float32 and float64 alike."""
    name = layer.get("activation", "relu")
    positive = lambda: g.op("Greater", x, g.const(0.0))  # noqa: E731
    if name == "identity":
        return g.op("Identity", x)
    if name == "relu":
        return g.op("Relu", x)
    if name == "leaky_relu":
        slope = layer.get("negative_slope", 0.01)
        return g.op("Where", positive(), x, g.op("Mul", x, g.const(slope)))
    if name == "elu":
        alpha = layer.get("alpha", 1.0)
        neg = g.op("Mul", g.const(alpha), g.op("Sub", g.op("Exp", g.op("Min", x, g.const(0.0))), g.const(1.0)))
        return g.op("Where", positive(), x, neg)
    if name == "softplus":
        return _softplus(g, x)
    if name == "sigmoid":
        return g.op("Sigmoid", x)
    if name == "tanh":
        return g.op("Tanh", x)
    if name == "hardswish":
        # x·clip(x/6 + 1/2, 0, 1) = 0 below -3, x above 3, x·(x+3)/6 between
        gate = g.op("Min", g.op("Max", g.op("Add", g.op("Div", x, g.const(6.0)), g.const(0.5)), g.const(0.0)),
                    g.const(1.0))
        return g.op("Mul", x, gate)
    if name == "gelu":
        # 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))) (approximate='tanh')
        cube = g.op("Mul", g.op("Mul", x, x), x)
        inner = g.op("Mul", g.const(GELU_C), g.op("Add", x, g.op("Mul", g.const(0.044715), cube)))
        return g.op("Mul", g.op("Mul", g.const(0.5), x), g.op("Add", g.const(1.0), g.op("Tanh", inner)))
    if name == "step":
        return g.op("Cast", positive(), to=g.helper.np_dtype_to_tensor_dtype(g.dtype))
    if name == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if name == "mish":
        return g.op("Mul", x, g.op("Tanh", _softplus(g, x)))
    raise ValueError(f"hidden activation {name!r} has no ONNX export")


def onnx_model(spec: dict, weights: dict[str, np.ndarray], *, opset: int = ONNX_OPSET,
               producer: str = "gradserve"):
    """The ``onnx.ModelProto`` of a spec (``ModelInfo.spec``) with its
    weights: per dense layer ``Gemm(h, W, b, transB=1)`` (h·Wᵀ + b, W as
    out x in), then the hidden activation's nodes; after the last layer the
    output kind (identity, ``Sigmoid``, ``Softmax(axis=1)``). Input
    ``input`` (batch x input_size, batch dynamic), output ``output``, both
    of the spec's dtype (float32 or float64). Dropout and the noise
    regularizers act only in training and are absent."""
    onnx = _need("onnx", "onnx")
    from onnx import helper, numpy_helper

    dtype = np.dtype(spec.get("dtype", "float32"))
    weights = to_gradserve_names(weights)
    hidden = list(spec.get("hidden", ()))
    g = _Graph(helper, numpy_helper, dtype)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    h = "input"
    for i in range(len(hidden) + 1):
        try:
            W, b = weights[f"layers.{i}.weight"], weights[f"layers.{i}.bias"]
        except KeyError as exc:
            raise ValueError(f"weights: {exc.args[0]!r} is missing for a spec with {len(hidden)} hidden layers")
        W_name = g.name(f"layers.{i}.weight")
        b_name = g.name(f"layers.{i}.bias")
        g.initializers += [numpy_helper.from_array(np.asarray(W, dtype=dtype), W_name),
                           numpy_helper.from_array(np.asarray(b, dtype=dtype), b_name)]
        h = g.op("Gemm", h, W_name, b_name, hint=f"linear{i}", transB=1)
        if i < len(hidden):
            h = _activation(g, h, hidden[i])
    kind = spec.get("output", {}).get("kind", "identity")
    ops = {"identity": ("Identity", {}), "sigmoid": ("Sigmoid", {}), "softmax": ("Softmax", {"axis": 1})}
    if kind not in ops:
        raise ValueError(f"output.kind {kind!r} has no ONNX export")
    op_type, attrs = ops[kind]
    g.nodes.append(helper.make_node(op_type, [h], ["output"], **attrs))
    units = int(spec["output"]["units"])
    graph = helper.make_graph(
        g.nodes, "gradserve_mlp",
        [helper.make_tensor_value_info("input", elem, ["batch", int(spec["input_size"])])],
        [helper.make_tensor_value_info("output", elem, ["batch", units])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(spec: dict, weights: dict[str, np.ndarray], path, *, opset: int = ONNX_OPSET) -> None:
    """Writes ``onnx_model(spec, weights)`` to ``path``."""
    onnx = _need("onnx", "onnx")
    onnx.save(onnx_model(spec, weights, opset=opset), str(Path(path)))
