"""The wire layer: committed generated code is current and loads on every
protobuf runtime the client declares; the Tensor codec and the ModelSpec
message codec round-trip and reject malformed input."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.specmsg import spec_from_message, spec_to_message
from gradserve.wire.tensor import TensorError, decode_tensor, encode_tensor

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["v1", "inference"])
def test_committed_generated_code_matches_the_protos(tmp_path, package):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.name for p in (tmp_path / "gradserve" / package).glob("*_pb2*"))
    committed_dir = ROOT / "client" / "gradserve" / package
    committed = sorted(p.name for p in committed_dir.glob("*_pb2*"))
    assert generated and generated == committed
    for name in generated:
        fresh = (tmp_path / "gradserve" / package / name).read_text()
        assert (committed_dir / name).read_text() == fresh, \
            f"client/gradserve/{package}/{name} is stale: run python scripts/gen_protos.py"


def declared_protobuf_range() -> tuple[str, str]:
    """(lowest version, exclusive upper major) of protobuf in client/pyproject.toml."""
    text = (ROOT / "client" / "pyproject.toml").read_text()
    match = re.search(r'"protobuf>=([0-9.]+),<([0-9]+)"', text)
    assert match, "client/pyproject.toml declares protobuf as >=X,<Y"
    return match.group(1), match.group(2)


GENERATED_MODULES = sorted(
    f"gradserve.{p.parent.name}.{p.stem}" for p in (ROOT / "client" / "gradserve").glob("*/*_pb2*.py"))


@pytest.mark.parametrize("bound", ["lowest", "newest"])
def test_generated_code_loads_on_the_declared_protobuf_range(tmp_path, bound):
    """The committed code is imported under the lowest protobuf the client
    declares and under the newest release below its upper bound, each
    installed alone (pip's cache makes this a few seconds)."""
    lowest, upper_major = declared_protobuf_range()
    requirement = f"protobuf=={lowest}" if bound == "lowest" else f"protobuf>={int(upper_major) - 1},<{upper_major}"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "--target", str(site), requirement],
                   check=True, capture_output=True)
    script = ("import importlib, google.protobuf as p\n"
              f"for name in {GENERATED_MODULES!r}: importlib.import_module(name)\n"
              "print(p.__version__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "client")]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.strip()
    assert loaded == lowest if bound == "lowest" else loaded.split(".")[0] == str(int(upper_major) - 1)
    assert len(GENERATED_MODULES) >= 6  # trainer and the two inference files, _pb2 and _pb2_grpc each


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i4", "<i8", ">f4", ">i8"])
def test_tensor_round_trips_every_wire_dtype_as_little_endian(dtype):
    a = (np.arange(12) - 3).reshape(3, 4).astype(dtype)
    msg = encode_tensor(a)
    assert len(msg.data) == a.size * a.dtype.itemsize
    b = decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert b.dtype.byteorder in "<=|" and b.dtype.kind == a.dtype.kind
    np.testing.assert_array_equal(a, b)


def test_tensor_of_non_contiguous_view_is_row_major():
    a = np.arange(20, dtype=np.float32).reshape(4, 5)[:, 1:3]
    np.testing.assert_array_equal(decode_tensor(encode_tensor(a)), a)


def test_decode_rejects_byte_length_not_matching_shape():
    msg = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(TensorError, match="inputs: data has 20 bytes but shape \\[2, 3\\]"):
        decode_tensor(msg, "inputs")


def test_decode_rejects_unknown_dtype():
    with pytest.raises(TensorError, match="targets: unknown dtype DATA_TYPE_UNSPECIFIED"):
        decode_tensor(pb.Tensor(shape=[1], data=b"\0" * 4), "targets")


def test_decode_rejects_negative_dimension():
    with pytest.raises(TensorError, match="negative dimension"):
        decode_tensor(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 2], data=b""), "inputs")


def test_encode_rejects_complex():
    with pytest.raises(TensorError, match="cannot travel"):
        encode_tensor(np.zeros(2, np.complex64), "inputs")


def test_spec_message_round_trips_a_full_spec():
    nnkernels = pytest.importorskip("gradserve.nnkernels")
    spec = nnkernels.ModelSpec.from_dict({
        "input_size": 5, "hidden": [{"units": 7, "activation": "leaky_relu", "negative_slope": 0.2, "dropout": 0.1}],
        "output": {"units": 3, "kind": "softmax"}, "loss": {"label_smoothing": 0.1},
        "optimizer": {"name": "rmsprop", "lr": 0.02, "momentum": 0.5, "centered": True},
        "schedule": {"name": "cosine", "t_max": 10}, "weight_init": {"name": "normal", "std": 0.1},
        "regularization": {"clip_grad_norm": 1.0}, "dtype": "float64", "seed": 2**62})
    msg = pb.ModelSpec.FromString(spec_to_message(spec.to_dict()).SerializeToString())
    assert nnkernels.ModelSpec.from_dict(spec_from_message(msg)) == spec


def test_unset_optionals_are_left_out_so_defaults_apply():
    d = spec_from_message(spec_to_message({"input_size": 3, "output": {"units": 1}, "optimizer": {"name": "adam"}}))
    assert d == {"input_size": 3, "hidden": [], "output": {"units": 1}, "optimizer": {"name": "adam"}}


def test_spec_to_message_names_unknown_field():
    with pytest.raises(ValueError, match="optimizer.lrr"):
        spec_to_message({"input_size": 3, "output": {"units": 1}, "optimizer": {"lrr": 1}})
