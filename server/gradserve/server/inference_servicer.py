"""InferenceServicer: the Open Inference Protocol (KServe V2, as Triton
extends it; ``inference.GRPCInferenceService``) over gradserve's models, so
``tritonclient`` and Triton's tools call gradserve.

A model's name is its model id; its version is its step (the reply's
``model_version`` names the weights that answered). A request may name the
current step or no version. Each model has one input, ``inputs``
(``[-1, input_size]``, FP32 or FP64 as the model), and one output,
``outputs`` (probabilities for classifiers, values for regression; the
request parameter ``logits: true`` gives logits instead). Inputs come as
``raw_input_contents`` or as typed contents; outputs always go as
``raw_output_contents``, which is what ``tritonclient`` reads. Inference
goes through the same ``PredictBatcher`` as gradserve's Predict, so calls
of both protocols share a model's batches. Unimplemented RPCs (streaming,
repository, shared memory, trace, logging) answer UNIMPLEMENTED.
"""
from __future__ import annotations

import math
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.inference import grpc_service_pb2_grpc as pb_grpc
from gradserve.inference import model_config_pb2 as mc
from gradserve.wire.tensor import MAX_DIM

from .batching import PredictBatcher
from .errors import BadRequest, NotServing, VersionNotFound, rpc, shown, status_for
from .registry import ModelNotFound, ModelRegistry
from .tenants import current_tenant

INPUT_NAME = "inputs"
OUTPUT_NAME = "outputs"
PLATFORM = "gradserve_mlp"

# V2 datatype -> numpy dtype of the raw bytes (little-endian) and the typed
# contents field that carries it
DATATYPES = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "INT8": (np.dtype("i1"), "int_contents"), "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"), "INT64": (np.dtype("<i8"), "int64_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"), "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"), "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "FP16": (np.dtype("<f2"), None), "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
MODEL_DATATYPE = {"float32": ("FP32", mc.TYPE_FP32), "float64": ("FP64", mc.TYPE_FP64)}


def server_version() -> str:
    try:
        return version("gradserve")
    except PackageNotFoundError:
        return "unknown"


def decode_infer_inputs(request: pb.ModelInferRequest) -> np.ndarray:
    """The one input tensor of a ModelInferRequest, from raw or typed
    contents (raw: a read-only view of the request's bytes, no copy)."""
    if len(request.inputs) != 1:
        raise BadRequest("inputs", f"the model takes exactly one input, {INPUT_NAME!r}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise BadRequest("inputs[0].name", f"{shown(tensor.name)} is not an input of this model (expected {INPUT_NAME!r})")
    entry = DATATYPES.get(tensor.datatype)
    if entry is None:
        raise BadRequest("inputs[0].datatype", f"{shown(tensor.datatype)} is not supported; use one of "
                         + ", ".join(DATATYPES))
    dtype, contents_field = entry
    shape = tuple(tensor.shape)
    if len(shape) != 2:
        raise BadRequest("inputs[0].shape", f"has {len(shape)} axes; expected 2 ([batch, features])")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise BadRequest("inputs[0].shape", f"{list(shape)}: each dimension must lie in [0, {MAX_DIM}]")
    count = math.prod(shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadRequest("raw_input_contents", f"{len(request.raw_input_contents)} entries for 1 input")
        raw = request.raw_input_contents[0]  # read once: each read of a bytes field copies
        if len(raw) != count * dtype.itemsize:
            raise BadRequest("raw_input_contents[0]", f"{len(raw)} bytes, but shape {list(shape)} of "
                             f"{tensor.datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if contents_field is None:
        raise BadRequest("inputs[0].datatype", f"{tensor.datatype} travels only as raw_input_contents")
    values = getattr(tensor.contents, contents_field)
    if len(values) != count:
        raise BadRequest(f"inputs[0].contents.{contents_field}", f"{len(values)} values, but shape "
                         f"{list(shape)} needs {count}")
    return np.array(values, dtype=dtype).reshape(shape)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, predictor: PredictBatcher, ready, metrics=None):
        self.registry = registry
        self.predictor = predictor
        self.ready = ready  # the Trainer servicer's event: set while serving
        self.metrics = metrics

    # -- plumbing -------------------------------------------------------------
    def _model(self, name: str, version: str = ""):
        """(handle, its description) for a model name and optional version."""
        if not self.ready.is_set():
            raise NotServing("server is not serving yet (warming up) or is shutting down")
        handle = self.registry.get(name, current_tenant())
        described = self.registry.describe(handle)
        if version and version != str(described["step"]):
            raise VersionNotFound(f"model_version: model {name!r} is at version {described['step']} "
                                  f"(its step), not {shown(version)}")
        return handle, described

    @staticmethod
    def _datatype(described) -> tuple[str, int]:
        return MODEL_DATATYPE[described["spec"]["dtype"]]

    # -- health and metadata ------------------------------------------------------
    @rpc
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready.is_set())

    @rpc
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gradserve", version=server_version(),
                                         extensions=["model_configuration", "statistics", "parameters"])

    @rpc
    def ModelReady(self, request, context):
        try:
            self._model(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)
        except (ModelNotFound, VersionNotFound, NotServing):
            return pb.ModelReadyResponse(ready=False)

    @rpc
    def ModelMetadata(self, request, context):
        _, d = self._model(request.name, request.version)
        datatype, _ = self._datatype(d)
        spec = d["spec"]
        return pb.ModelMetadataResponse(
            name=d["model_id"], versions=[str(d["step"])], platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=INPUT_NAME, datatype=datatype,
                                                            shape=[-1, spec["input_size"]])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=OUTPUT_NAME, datatype=datatype,
                                                             shape=[-1, spec["output"]["units"]])])

    @rpc
    def ModelConfig(self, request, context):
        _, d = self._model(request.name, request.version)
        _, data_type = self._datatype(d)
        spec = d["spec"]
        batching = self.predictor.config
        config = mc.ModelConfig(
            name=d["model_id"], platform=PLATFORM, backend="gradserve",
            max_batch_size=self.registry.limits.max_batch_rows,  # rows one request may carry
            input=[mc.ModelInput(name=INPUT_NAME, data_type=data_type, dims=[spec["input_size"]])],
            output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=data_type, dims=[spec["output"]["units"]])])
        if batching.enabled:
            config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
            config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        return pb.ModelConfigResponse(config=config)

    @rpc
    def ModelStatistics(self, request, context):
        if request.name:
            handles = [self._model(request.name, request.version)[0]]
        else:
            handles = self.registry.handles(current_tenant())
        stats = self.metrics.inference.snapshot() if self.metrics is not None else {}
        resp = pb.ModelStatisticsResponse()
        for handle in handles:
            s = stats.get(handle.model_id)
            entry = resp.model_stats.add(name=handle.model_id, version=str(handle.model.step))
            if s is None:
                continue
            entry.last_inference = s.last_inference_ms
            entry.inference_count = s.inference_count
            entry.execution_count = s.execution_count
            for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                d = getattr(s, name)
                part = getattr(entry.inference_stats, name)
                part.count, part.ns = d.count, d.ns
            for rows, d in sorted(s.batches.items()):
                b = entry.batch_stats.add(batch_size=rows)
                b.compute_infer.count, b.compute_infer.ns = d.count, d.ns
        return resp

    # -- inference ------------------------------------------------------------------
    @rpc
    def ModelInfer(self, request, context):
        start = time.perf_counter()
        name = request.model_name
        if not self.ready.is_set():
            raise NotServing("server is not serving yet (warming up) or is shutting down")
        handle = self.registry.get(name, current_tenant())
        try:
            X = decode_infer_inputs(request)
            self.registry.limits.check_message(X.nbytes + 256)
            for out in request.outputs:
                if out.name != OUTPUT_NAME:
                    raise BadRequest("outputs", f"{shown(out.name)} is not an output of this model "
                                     f"(expected {OUTPUT_NAME!r})")
            logits = False
            if "logits" in request.parameters:
                param = request.parameters["logits"]
                if param.WhichOneof("parameter_choice") != "bool_param":
                    raise BadRequest("parameters.logits", "must be a bool parameter")
                logits = param.bool_param
            if handle.spec is not None and X.ndim == 2:  # the reply is sized before anything computes it
                itemsize = 8 if handle.spec.dtype == "float64" else 4
                self.registry.limits.check_message(len(X) * handle.spec.output.units * itemsize + 256,
                                                   "the reply would have bytes:")
            decoded = time.perf_counter()
            call = self.predictor.predict(handle, X, logits, context)
            if request.model_version and request.model_version != str(call.step):
                raise VersionNotFound(f"model_version: model {name!r} is at version {call.step} "
                                      f"(its step), not {shown(request.model_version)}")
            computed = time.perf_counter()
            out = call.outputs
            self.registry.limits.check_message(out.nbytes + 256, "the reply would have bytes:")
            datatype = "FP32" if out.dtype == np.float32 else "FP64"
            reply = pb.ModelInferResponse(model_name=name, model_version=str(call.step), id=request.id)
            reply.outputs.add(name=OUTPUT_NAME, datatype=datatype, shape=out.shape)
            reply.raw_output_contents.append(np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes())
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.inference.request_failed(name, status_for(exc)[0].name, time.perf_counter() - start)
            raise
        if self.metrics is not None:
            end = time.perf_counter()
            self.metrics.inference.request_done(name, call.rows, end - start, decoded - start,
                                                call.queue_seconds, call.compute_seconds, end - computed)
        return reply
