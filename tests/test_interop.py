"""Weights that travel: safetensors files read by PyTorch and written by it,
and ONNX graphs run by ONNX Runtime, each checked against the server's
Predict on a real server."""
from __future__ import annotations

import numpy as np
import pytest

from gradserve.client import interop
from gradserve.nnkernels.registry import ACTIVATIONS, OUTPUTS

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

# extra parameters away from their defaults, so the export must carry them
LAYER_EXTRAS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 0.7}}


def _inputs(rows: int, features: int, dtype) -> np.ndarray:
    X = np.random.default_rng(1).normal(0, 2.5, (rows, features))
    X[:4] *= 12  # pre-activations far out: softplus's threshold, saturated sigmoid/tanh, hardswish's flat parts
    return X.astype(dtype)


def _torch_activation(layer: dict):
    name = layer["activation"]
    nn = torch.nn
    return {"identity": lambda: nn.Identity(), "relu": lambda: nn.ReLU(), "tanh": lambda: nn.Tanh(),
            "sigmoid": lambda: nn.Sigmoid(), "softplus": lambda: nn.Softplus(),
            "hardswish": lambda: nn.Hardswish(), "gelu": lambda: nn.GELU(approximate="tanh"),
            "silu": lambda: nn.SiLU(), "mish": lambda: nn.Mish(),
            "leaky_relu": lambda: nn.LeakyReLU(layer["negative_slope"]),
            "elu": lambda: nn.ELU(layer["alpha"])}[name]()


def _torch_sequential(spec: dict) -> "torch.nn.Sequential":
    """The nn.Sequential interop's docstring describes, with the output kind
    as a last parameter-free module."""
    nn = torch.nn
    sizes = [spec["input_size"], *(l["units"] for l in spec["hidden"]), spec["output"]["units"]]
    modules = []
    for i in range(len(sizes) - 1):
        modules.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(spec["hidden"]):
            modules.append(_torch_activation(spec["hidden"][i]))
    modules.append({"identity": nn.Identity(), "sigmoid": nn.Sigmoid(), "softmax": nn.Softmax(dim=1)}
                   [spec["output"]["kind"]])
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec.get("dtype", "float32")]
    return nn.Sequential(*modules).to(dtype)


def test_torch_reads_the_torch_named_file_and_predicts_the_same(client, tmp_path):
    model = client.create_model(6, hidden=[{"units": 16, "activation": "tanh"},
                                           {"units": 8, "activation": "leaky_relu", "negative_slope": 0.1}],
                                output=(3, "softmax"), seed=5)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path, names="torch")
    state = torch_load_file(str(path))
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    net = _torch_sequential(model.info.spec)
    net.load_state_dict(state)  # strict: every key matches, nothing missing
    X = _inputs(50, 6, np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), expected, rtol=0, atol=1e-6)
    assert interop.safetensors_spec(path)["hidden"][1]["negative_slope"] == pytest.approx(0.1)


def test_weights_from_torch_through_a_file_into_setweights(client, tmp_path):
    model = client.create_model(5, hidden=[(12, "relu"), (7, "gelu")], output=(2, "sigmoid"), dtype="float64")
    torch.manual_seed(3)
    net = _torch_sequential(model.info.spec)
    path = tmp_path / "from_torch.safetensors"
    torch_save_file(net.state_dict(), str(path))
    before = model.predict(_inputs(30, 5, np.float64))
    model.load_safetensors(path)
    X = _inputs(30, 5, np.float64)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    after = model.predict(X)
    assert not np.allclose(before, after)  # the weights did change
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-12)


def test_gradserve_names_round_trip(client, tmp_path):
    model = client.create_model(4, hidden=[(9, "elu")], output=(1, "identity"), seed=1)
    path = tmp_path / "own.safetensors"
    model.save_safetensors(path)
    assert sorted(interop.load_safetensors(path)) == ["layers.0.bias", "layers.0.weight",
                                                     "layers.1.bias", "layers.1.weight"]
    other = client.create_model(4, hidden=[(9, "elu")], output=(1, "identity"), seed=2)
    X = _inputs(10, 4, np.float32)
    assert not np.allclose(other.predict(X), model.predict(X))
    other.load_safetensors(path)
    np.testing.assert_array_equal(other.predict(X), model.predict(X))


def test_sequential_keys_with_dropout_modules_between_map_by_order():
    # nn.Sequential(Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear): Linears at 0, 3, 6
    w = {f"{i}.{k}": np.zeros(1) for i in (0, 3, 6) for k in ("weight", "bias")}
    assert sorted(interop.to_gradserve_names(w)) == [f"layers.{i}.{k}" for i in range(3) for k in ("bias", "weight")]
    with pytest.raises(ValueError, match="neither a gradserve name"):
        interop.to_gradserve_names({"fc.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="names: must be one of"):
        interop.save_safetensors({}, "unused", names="keras")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_onnx_matches_predict_for_every_activation(client, tmp_path, dtype, kind):
    """One model per activation the server supports (the spec's table, so an
    activation added there without an export fails here), through ONNX
    Runtime, within 1e-5 of Predict."""
    units = {"identity": 2, "sigmoid": 3, "softmax": 4}[kind]
    np_dtype = np.dtype(dtype)
    for activation in ACTIVATIONS:
        layer = {"units": 10, "activation": activation, **LAYER_EXTRAS.get(activation, {})}
        model = client.create_model(7, hidden=[layer, dict(layer, units=6)], output=(units, kind),
                                    dtype=dtype, seed=11)
        try:
            path = tmp_path / f"{activation}-{kind}-{dtype}.onnx"
            model.export_onnx(path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for rows in (1, 33):  # the batch dimension is dynamic
                X = _inputs(rows, 7, np_dtype)
                (got,) = session.run(["output"], {"input": X})
                assert got.dtype == np_dtype
                np.testing.assert_allclose(got, model.predict(X), rtol=0, atol=1e-5,
                                           err_msg=f"{activation} / {kind} / {dtype}")
        finally:
            model.delete()


def test_onnx_graph_shape(client, tmp_path):
    import onnx

    model = client.create_model(3, hidden=[(4, "step")], output=(2, "softmax"))
    proto = interop.onnx_model(model.info.spec, model.get_weights())
    assert proto.opset_import[0].version >= 17
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gemm") == 2 and ops[-1] == "Softmax" and "Cast" in ops
    assert all(a.i == 1 for n in proto.graph.node if n.op_type == "Gemm" for a in n.attribute if a.name == "transB")
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    onnx.checker.check_model(proto)
