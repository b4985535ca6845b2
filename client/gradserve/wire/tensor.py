"""The one place that knows a Tensor's byte layout on the wire.

A ``gradserve.v1.Tensor`` is ``dtype``, ``shape`` and ``data``: prod(shape)
elements, row-major, little-endian. ``encode_tensor`` turns an array into a
message; ``decode_tensor`` turns a message into a read-only array that
shares the message's bytes (``np.frombuffer``: no copy). Both server and
client use these two functions and nothing else.
"""
from __future__ import annotations

import math

import numpy as np

from gradserve.v1 import trainer_pb2 as pb

# Data bytes per message of a chunked transfer (tensor chunks, data-set uploads), either way, or half
# the message limit when that is smaller. Measured on a 188 MB upload (loopback, 2 cores): 4 MB chunks
# took 0.6 s, 32 MB ones 1.2-1.6 s (each copy of a big message leaves the caches and touches fresh
# pages), 2 MB ones 0.9 s (per-message costs).
CHUNK_BYTES = 4 << 20

# wire dtype <-> numpy dtype (always little-endian on the wire)
WIRE_DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
}
_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in WIRE_DTYPES.items()}
MAX_RANK = 32  # numpy's own limit is 64; no gradserve tensor has more than 2 axes
# no axis can be longer: a longer one of any wire dtype is over gRPC's 2 GiB message
# bound, and a zero-size tensor with such an axis is only a way to make numpy fail
MAX_DIM = 2**31 - 1


class TensorError(ValueError):
    """A Tensor message (or an array to encode) is malformed. ``field`` names
    where it came from (``inputs``, ``targets``, a parameter name)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def wire_array(array, field: str = "tensor") -> np.ndarray:
    """``array`` as a C-contiguous little-endian array of a wire dtype:
    float16 becomes float32, bool and other integer widths become int64."""
    a = np.asarray(array)
    if a.dtype.kind == "f" and a.dtype.itemsize < 4:
        a = a.astype(np.float32)
    elif a.dtype.kind in "biu" and (a.dtype.kind, a.dtype.itemsize) not in _BY_KIND:
        a = a.astype(np.int64)
    elif a.dtype.kind == "u":
        a = a.astype(np.int64)
    if (a.dtype.kind, a.dtype.itemsize) not in _BY_KIND:
        raise TensorError(field, f"dtype {a.dtype} cannot travel; use float32, float64, int32 or int64")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def tensor_chunks(array, name: str, chunk_bytes: int, **fields):
    """``array`` (a wire array) as TensorChunk messages of at most
    ``chunk_bytes`` data bytes each, in order; ``fields`` (model_id, step,
    loss) go into every chunk."""
    a = wire_array(array, name)
    raw = memoryview(a.reshape(-1)).cast("B")
    code = _BY_KIND[(a.dtype.kind, a.dtype.itemsize)]
    step = max(a.dtype.itemsize, chunk_bytes - chunk_bytes % a.dtype.itemsize)
    for offset in range(0, max(len(raw), 1), step):
        yield pb.TensorChunk(name=name, dtype=code, shape=a.shape, offset=offset,
                             data=bytes(raw[offset:offset + step]), **fields)


class ChunkAssembler:
    """Rebuilds named tensors from TensorChunk messages (``add`` each in
    order, then ``arrays()``). ``shapes`` (name -> shape), when given, is
    what may arrive: anything else is refused before memory is allocated."""

    def __init__(self, shapes: dict[str, tuple] | None = None):
        self.shapes = shapes
        self._parts: dict[str, tuple[np.dtype, tuple, bytearray]] = {}
        self._filled: dict[str, int] = {}

    def add(self, chunk: pb.TensorChunk) -> None:
        name, shape = chunk.name, tuple(chunk.shape)
        part = self._parts.get(name)
        if part is None:
            if self.shapes is not None and name not in self.shapes:
                raise TensorError("name", f"{name[:64]!r} is not one of {', '.join(self.shapes)}")
            dtype = WIRE_DTYPES.get(chunk.dtype)
            if dtype is None:
                raise TensorError(name, f"unknown dtype {chunk.dtype}")
            if self.shapes is not None and shape != tuple(self.shapes[name]):
                raise TensorError(name, f"shape {_shape_text(shape)}; the parameter has {list(self.shapes[name])}")
            if len(shape) > MAX_RANK or any(d < 0 or d > MAX_DIM for d in shape):
                raise TensorError(name, f"shape {_shape_text(shape)} is not a tensor's")
            part = self._parts[name] = (dtype, shape, bytearray(math.prod(shape) * dtype.itemsize))
            self._filled[name] = 0
        dtype, first_shape, buf = part
        if WIRE_DTYPES.get(chunk.dtype) != dtype or shape != first_shape:
            raise TensorError(name, "dtype or shape differs from the tensor's first chunk")
        data = chunk.data
        if chunk.offset != self._filled[name] or chunk.offset + len(data) > len(buf):
            raise TensorError(name, f"chunk at byte {chunk.offset} of {len(data)} bytes: expected the next one "
                                    f"at byte {self._filled[name]} of {len(buf)}")
        buf[chunk.offset:chunk.offset + len(data)] = data
        self._filled[name] += len(data)

    def arrays(self) -> dict[str, np.ndarray]:
        for name, (_, _, buf) in self._parts.items():
            if self._filled[name] != len(buf):
                raise TensorError(name, f"the chunks gave {self._filled[name]} of its {len(buf)} bytes")
        return {name: np.frombuffer(buf, dtype).reshape(shape) for name, (dtype, shape, buf) in self._parts.items()}


def encode_tensor(array, field: str = "tensor", out: pb.Tensor | None = None) -> pb.Tensor:
    """An array as a Tensor message (fills ``out`` when given, e.g. a
    sub-message field of a request)."""
    a = wire_array(array, field)
    msg = pb.Tensor() if out is None else out
    msg.dtype = _BY_KIND[(a.dtype.kind, a.dtype.itemsize)]
    msg.shape[:] = a.shape
    msg.data = a.tobytes()
    return msg


def _shape_text(shape) -> str:
    text = str(list(shape))
    return text if len(text) <= 80 else f"{text[:80]}... ({len(shape)} axes)"


def decode_tensor(msg: pb.Tensor, field: str = "tensor", ndim: tuple[int, ...] | None = None) -> np.ndarray:
    """A Tensor message as a read-only ndarray sharing the message's bytes.
    Raises TensorError naming ``field`` for a missing (empty) tensor, an
    unknown dtype, a rank not in ``ndim`` (when given) or over MAX_RANK, a
    dimension that is negative or over MAX_DIM, or a byte length that is
    not prod(shape) * itemsize."""
    if msg.dtype == pb.DATA_TYPE_UNSPECIFIED and not msg.shape and not msg.data:
        raise TensorError(field, "is required (the tensor is missing or empty)")
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        name = pb.DataType.Name(msg.dtype) if msg.dtype in pb.DataType.values() else str(msg.dtype)
        raise TensorError(field, f"unknown dtype {name}; expected one of "
                          + ", ".join(pb.DataType.Name(c) for c in WIRE_DTYPES))
    if len(msg.shape) > MAX_RANK:
        raise TensorError(field, f"has {len(msg.shape)} axes; at most {MAX_RANK}")
    shape = tuple(msg.shape)
    if ndim is not None and len(shape) not in ndim:
        raise TensorError(field, f"has shape {_shape_text(shape)} ({len(shape)} axes); expected "
                          + " or ".join(f"{n} axes" for n in ndim))
    if any(d < 0 for d in shape):
        raise TensorError(field, f"negative dimension in shape {_shape_text(shape)}")
    if any(d > MAX_DIM for d in shape):
        raise TensorError(field, f"shape {_shape_text(shape)} has an axis longer than {MAX_DIM}")
    count = math.prod(shape)
    data = msg.data  # each read of a bytes field makes a new copy (upb): read it once
    if len(data) != count * dtype.itemsize:
        raise TensorError(field, f"data has {len(data)} bytes but shape {_shape_text(shape)} of "
                          f"{dtype.name} needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)
