"""TrainerServicer: the gradserve.v1.Trainer RPCs. Each method decodes the
request, calls the registry (plain Python over nnkernels) and encodes the
reply; every failure leaves through ``context.abort`` with one status code
(see ``status_for``). Testable without a server: pass any object with
``abort(code, details)``."""
from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np

from gradserve.wire.specmsg import spec_from_message, spec_to_message
from gradserve.wire.tensor import TensorError, decode_tensor, encode_tensor
from gradserve.v1 import trainer_pb2 as pb
from gradserve.v1 import trainer_pb2_grpc as pb_grpc
from gradserve.nnkernels import (DeviceUnavailableError, InputError, NonFiniteError,
                       NotTrainableError, SpecError)

from .batching import BatchingConfig, CallCancelled, CallDeadlineExceeded, PredictBatcher
from .limits import LimitExceeded
from .registry import ModelExists, ModelNotFound, ModelRegistry, ShuttingDown

log = logging.getLogger("gradserve.servicer")

# exception type -> status code; the first match wins
STATUS = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (CallDeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CallCancelled, grpc.StatusCode.CANCELLED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelExists, grpc.StatusCode.ALREADY_EXISTS),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    ((NonFiniteError, NotTrainableError, DeviceUnavailableError), grpc.StatusCode.FAILED_PRECONDITION),
    ((SpecError, InputError, TensorError, ValueError), grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for types, code in STATUS:
        if isinstance(exc, types):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class TrainerServicer(pb_grpc.TrainerServicer):
    def __init__(self, registry: ModelRegistry, metrics=None, predictor=None):
        self.registry = registry
        self.metrics = metrics
        # Predict's path (validation, dynamic batching), shared with the V2 protocol
        self.predictor = predictor or PredictBatcher(registry, BatchingConfig(enabled=False))
        self.ready = threading.Event()  # set once kernels are warm and stored models loaded

    # -- plumbing -------------------------------------------------------------
    def _fail(self, context, exc: BaseException, method: str):
        code, details = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("event=rpc_error method=%s", method)
        else:
            log.debug("event=rpc_refused method=%s code=%s details=%r", method, code.name, details)
        context.abort(code, details)

    def _check(self, request, context) -> None:
        if not self.ready.is_set():
            raise ShuttingDown("server is not serving yet (warming up) or is shutting down")
        self.registry.limits.check_message(request.ByteSize())

    def _info(self, handle) -> pb.ModelInfo:
        d = self.registry.describe(handle)
        msg = pb.ModelInfo(model_id=d["model_id"], num_params=d["num_params"], step=d["step"],
                           created_unix=d["created"])
        spec_to_message(d["spec"], msg.spec)
        for name, shape in d["params"]:
            msg.params.add(name=name, shape=shape)
        return msg

    def _batch(self, request, with_targets: bool = True):
        X = decode_tensor(request.inputs, "inputs")
        y = decode_tensor(request.targets, "targets") if with_targets else None
        return X, y

    def _step(self, request) -> pb.TrainStepResponse:
        handle = self.registry.get(request.model_id)
        X, y = self._batch(request)
        r = self.registry.train_step(handle, X, y)
        if self.metrics is not None:
            self.metrics.step()
        resp = pb.TrainStepResponse(step=r.step, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr)
        if r.accuracy is not None:
            resp.accuracy = r.accuracy
        return resp

    # -- RPCs -------------------------------------------------------------------
    def CreateModel(self, request, context):
        try:
            self._check(request, context)
            if not request.HasField("spec"):
                raise ValueError("spec: is required")
            handle, _ = self.registry.create(spec_from_message(request.spec), request.model_id)
            return self._info(handle)
        except Exception as exc:
            self._fail(context, exc, "CreateModel")

    def TrainStep(self, request, context):
        try:
            self._check(request, context)
            return self._step(request)
        except Exception as exc:
            self._fail(context, exc, "TrainStep")

    def TrainStream(self, request_iterator, context):
        try:
            for request in request_iterator:
                self._check(request, context)
                yield self._step(request)
        except grpc.RpcError:  # the client cancelled or went away: nothing to answer
            log.debug("event=stream_cancelled method=TrainStream")
        except Exception as exc:
            self._fail(context, exc, "TrainStream")

    def Predict(self, request, context):
        start = time.perf_counter()
        model_id, handle = request.model_id, None
        try:
            if not self.ready.is_set():
                raise ShuttingDown("server is not serving yet (warming up) or is shutting down")
            handle = self.registry.get(model_id)
            X = decode_tensor(request.inputs, "inputs")
            # the tensor's bytes stand for the message: ByteSize() would serialize it all again
            self.registry.limits.check_message(X.nbytes + len(model_id) + 64)
            decoded = time.perf_counter()
            call = self.predictor.predict(handle, X, request.logits, context)
            computed = time.perf_counter()
            self.registry.limits.check_message(call.outputs.nbytes + 64, "the reply would have bytes:")
            reply = pb.PredictResponse(outputs=encode_tensor(call.outputs, "outputs"))
            if self.metrics is not None:
                end = time.perf_counter()
                self.metrics.inference.request_done(model_id, call.rows, end - start, decoded - start,
                                                    call.queue_seconds, call.compute_seconds, end - computed)
            return reply
        except Exception as exc:
            if self.metrics is not None and handle is not None:  # unknown ids make no series
                self.metrics.inference.request_failed(model_id, status_for(exc)[0].name, time.perf_counter() - start)
            self._fail(context, exc, "Predict")

    def GetGradients(self, request, context):
        try:
            self._check(request, context)
            handle = self.registry.get(request.model_id)
            X, y = self._batch(request)
            loss, grads, step = self.registry.gradients(handle, X, y)
            resp = pb.GetGradientsResponse(loss=loss, step=step)
            for name, g in grads.items():
                encode_tensor(g, name, resp.gradients.add(name=name).tensor)
            return resp
        except Exception as exc:
            self._fail(context, exc, "GetGradients")

    def GetModel(self, request, context):
        try:
            self._check(request, context)
            return self._info(self.registry.get(request.model_id))
        except Exception as exc:
            self._fail(context, exc, "GetModel")

    def ListModels(self, request, context):
        try:
            self._check(request, context)
            resp = pb.ListModelsResponse()
            for handle in self.registry.handles():
                try:
                    resp.models.append(self._info(handle))
                except ModelNotFound:  # deleted meanwhile
                    pass
            return resp
        except Exception as exc:
            self._fail(context, exc, "ListModels")

    def DeleteModel(self, request, context):
        try:
            self._check(request, context)
            self.registry.delete(request.model_id)
            return pb.DeleteModelResponse()
        except Exception as exc:
            self._fail(context, exc, "DeleteModel")

    def GetWeights(self, request, context):
        try:
            self._check(request, context)
            step, weights = self.registry.get_weights(self.registry.get(request.model_id))
            resp = pb.GetWeightsResponse(step=step)
            for name, w in weights.items():
                encode_tensor(w, name, resp.weights.add(name=name).tensor)
            return resp
        except Exception as exc:
            self._fail(context, exc, "GetWeights")

    def SetWeights(self, request, context):
        try:
            self._check(request, context)
            handle = self.registry.get(request.model_id)
            weights = {}
            for t in request.weights:
                if t.name in weights:
                    raise ValueError(f"weights: {t.name!r} given twice")
                weights[t.name] = decode_tensor(t.tensor, t.name)
            self.registry.set_weights(handle, weights)
            return self._info(handle)
        except Exception as exc:
            self._fail(context, exc, "SetWeights")

    def SaveModel(self, request, context):
        try:
            self._check(request, context)
            handle = self.registry.get(request.model_id)
            step = self.registry.checkpoint(handle)
            if step is None:  # nothing new since the last commit
                step = self.registry.describe(handle)["step"]
            return pb.SaveModelResponse(step=step)
        except Exception as exc:
            self._fail(context, exc, "SaveModel")
