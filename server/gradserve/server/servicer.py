"""TrainerServicer: the gradserve.v1.Trainer RPCs. Each method admits the
request, decodes it, calls the registry (plain Python over nnkernels) and
encodes the reply; the ``rpc`` decorator (errors.py) turns whatever it
raises into one status code. Testable without a server: pass any object
with ``abort(code, details)`` and ``set_trailing_metadata(pairs)``."""
from __future__ import annotations

import threading

from gradserve.wire.specmsg import spec_from_message, spec_to_message
from gradserve.wire.tensor import decode_tensor, encode_tensor
from gradserve.v1 import trainer_pb2 as pb
from gradserve.v1 import trainer_pb2_grpc as pb_grpc

from .errors import BadRequest, NotServing, rpc
from .registry import MODEL_ID, ModelNotFound, ModelRegistry


class TrainerServicer(pb_grpc.TrainerServicer):
    def __init__(self, registry: ModelRegistry, metrics=None):
        self.registry = registry
        self.metrics = metrics
        self.ready = threading.Event()  # set once kernels are warm and stored models loaded

    # -- plumbing -------------------------------------------------------------
    def _admit(self, request) -> None:
        """Refuses, before any work, a call the server cannot take now or a
        request over the message limit."""
        if not self.ready.is_set():
            raise NotServing("server is not serving yet (warming up) or is shutting down")
        self.registry.limits.check_message(request.ByteSize())

    def _info(self, handle) -> pb.ModelInfo:
        d = self.registry.describe(handle)
        msg = pb.ModelInfo(model_id=d["model_id"], num_params=d["num_params"], step=d["step"],
                           created_unix=d["created"])
        spec_to_message(d["spec"], msg.spec)
        for name, shape in d["params"]:
            msg.params.add(name=name, shape=shape)
        return msg

    def _step(self, request) -> pb.TrainStepResponse:
        self._admit(request)
        handle = self.registry.get(request.model_id)
        X, y = decode_tensor(request.inputs, "inputs"), decode_tensor(request.targets, "targets")
        r = self.registry.train_step(handle, X, y)
        if self.metrics is not None:
            self.metrics.step()
        resp = pb.TrainStepResponse(step=r.step, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr)
        if r.accuracy is not None:
            resp.accuracy = r.accuracy
        return resp

    # -- RPCs -------------------------------------------------------------------
    @rpc
    def CreateModel(self, request, context):
        self._admit(request)
        if not request.HasField("spec"):
            raise BadRequest("spec", "is required")
        if request.model_id and not MODEL_ID.match(request.model_id):
            raise BadRequest("model_id", f"{request.model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
        handle, _ = self.registry.create(spec_from_message(request.spec), request.model_id)
        return self._info(handle)

    @rpc
    def TrainStep(self, request, context):
        return self._step(request)

    @rpc
    def TrainStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._step(request)

    @rpc
    def Predict(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id)
        out = self.registry.predict(handle, decode_tensor(request.inputs, "inputs"), request.logits)
        self.registry.limits.check_message(out.nbytes + 64, "the reply would have bytes:")
        return pb.PredictResponse(outputs=encode_tensor(out, "outputs"))

    @rpc
    def GetGradients(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id)
        X, y = decode_tensor(request.inputs, "inputs"), decode_tensor(request.targets, "targets")
        loss, grads, step = self.registry.gradients(handle, X, y)
        resp = pb.GetGradientsResponse(loss=loss, step=step)
        for name, g in grads.items():
            encode_tensor(g, name, resp.gradients.add(name=name).tensor)
        return resp

    @rpc
    def GetModel(self, request, context):
        self._admit(request)
        return self._info(self.registry.get(request.model_id))

    @rpc
    def ListModels(self, request, context):
        self._admit(request)
        resp = pb.ListModelsResponse()
        for handle in self.registry.handles():
            try:
                resp.models.append(self._info(handle))
            except ModelNotFound:  # deleted meanwhile
                pass
        return resp

    @rpc
    def DeleteModel(self, request, context):
        self._admit(request)
        self.registry.delete(request.model_id)
        return pb.DeleteModelResponse()

    @rpc
    def GetWeights(self, request, context):
        self._admit(request)
        step, weights = self.registry.get_weights(self.registry.get(request.model_id))
        resp = pb.GetWeightsResponse(step=step)
        for name, w in weights.items():
            encode_tensor(w, name, resp.weights.add(name=name).tensor)
        return resp

    @rpc
    def SetWeights(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id)
        weights = {}
        for t in request.weights:
            if t.name in weights:
                raise BadRequest("weights", f"{t.name!r} given twice")
            weights[t.name] = decode_tensor(t.tensor, t.name)
        self.registry.set_weights(handle, weights)
        return self._info(handle)

    @rpc
    def SaveModel(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id)
        step = self.registry.checkpoint(handle)
        if step is None:  # nothing new since the last commit
            step = self.registry.describe(handle)["step"]
        return pb.SaveModelResponse(step=step)
