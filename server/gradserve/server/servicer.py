"""TrainerServicer: the gradserve.v1.Trainer RPCs. Each method admits the
request, decodes it, calls the registry (plain Python over nnkernels) and
encodes the reply; the ``rpc`` decorator (errors.py) turns whatever it
raises into one status code. Testable without a server: pass any object
with ``abort(code, details)``, ``set_trailing_metadata(pairs)`` and
``is_active()``."""
from __future__ import annotations

import contextvars
import queue
import threading
import time

from gradserve.nnkernels import ModelSpec
from gradserve.nnkernels.finite import all_finite
from gradserve.v1 import trainer_pb2 as pb
from gradserve.v1 import trainer_pb2_grpc as pb_grpc
from gradserve.wire.specmsg import optimizer_changes, spec_from_message, spec_to_message
from gradserve.wire.tensor import CHUNK_BYTES, ChunkAssembler, decode_tensor, encode_tensor, tensor_chunks

from . import fitting
from .batching import BatchingConfig, PredictBatcher
from .datasets import DatasetInfo
from .errors import BadRequest, NotServing, check_model_id, rpc, shown, status_for
from .registry import ModelNotFound, ModelRegistry, StepConflict
from .tenants import current_tenant

STREAM_AHEAD = 8  # TrainStream steps applied ahead of the replies (waiting to be durable)


class TrainerServicer(pb_grpc.TrainerServicer):
    def __init__(self, registry: ModelRegistry, metrics=None, predictor=None, curves=None):
        self.registry = registry
        self.metrics = metrics
        self.curves = curves  # TrainingCurves (--tensorboard-dir) or None
        # Predict's path (validation, dynamic batching), shared with the V2 protocol
        self.predictor = predictor or PredictBatcher(registry, BatchingConfig(enabled=False))
        self.ready = threading.Event()  # set once kernels are warm and stored models loaded
        self._create_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------
    def _ready(self) -> None:
        if not self.ready.is_set():
            raise NotServing("server is not serving yet (warming up) or is shutting down")

    def _admit(self, request) -> None:
        """Refuses, before any work, a call the server cannot take now or a
        request over the message limit."""
        self._ready()
        self.registry.limits.check_message(request.ByteSize())

    def _check_memory(self, spec_dict: dict, model_id: str) -> None:
        """Refuses a new model whose worst-case memory would take all models
        over --max-memory-mb (an existing id is the idempotent create: no check)."""
        if model_id:
            try:
                self.registry.get(model_id)  # unscoped: another tenant's id is refused by create
                return
            except ModelNotFound:
                pass
        spec = ModelSpec.from_dict({"device": self.registry.default_device, **spec_dict})
        limits = self.registry.limits
        limits.check_spec(spec)
        limits.check_memory(spec, sum(limits.model_bytes(h.spec) for h in self.registry.handles()
                                      if h.spec is not None))

    def _info(self, handle, listing: bool = False) -> pb.ModelInfo:
        d = self.registry.describe(handle, listing)
        msg = pb.ModelInfo(model_id=d["model_id"], num_params=d["num_params"], step=d["step"],
                           created_unix=d["created"], load_error=d["load_error"])
        spec_to_message(d["spec"], msg.spec)
        for name, shape in d["params"]:
            msg.params.add(name=name, shape=shape)
        return msg

    def _step(self, request, context):
        """Admits and applies one TrainStep; returns (reply, commit): send the
        reply once ``commit.wait()`` returns (the step is durable)."""
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        X, y = decode_tensor(request.inputs, "inputs", (2,)), decode_tensor(request.targets, "targets", (1, 2))
        expected = request.expected_step if request.HasField("expected_step") else None
        try:
            r, commit = self.registry.train_step(handle, X, y, expected)
        except StepConflict as exc:
            context.set_trailing_metadata((("gradserve-model-step", str(exc.current_step)),))
            raise
        if self.metrics is not None:
            self.metrics.step()
        if self.curves is not None:
            self.curves.step(request.model_id, r)
        resp = pb.TrainStepResponse(step=r.step, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr)
        if r.accuracy is not None:
            resp.accuracy = r.accuracy
        return resp, commit

    # -- RPCs -------------------------------------------------------------------
    @rpc
    def CreateModel(self, request, context):
        self._admit(request)
        if not request.HasField("spec"):
            raise BadRequest("spec", "is required")
        check_model_id(request.model_id, required=False)
        spec_dict = spec_from_message(request.spec)
        with self._create_lock:  # the memory check and the create, one create at a time
            self._check_memory(spec_dict, request.model_id)
            handle, _ = self.registry.create(spec_dict, request.model_id, current_tenant())
        return self._info(handle)

    @rpc
    def TrainStep(self, request, context):
        resp, commit = self._step(request, context)
        commit.wait()  # the step computed while its log record became durable
        return resp

    @rpc
    def TrainStream(self, request_iterator, context):
        """Steps are applied by a reader thread as requests arrive; replies
        leave in order, each once its step is durable, so step k+1 computes
        while step k's record is made durable."""
        applied: queue.Queue = queue.Queue(maxsize=STREAM_AHEAD)
        end = object()

        def put(item) -> bool:
            while context.is_active():
                try:
                    applied.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read_and_apply() -> None:
            try:
                for request in request_iterator:
                    if not put(self._step(request, context)):
                        return
            except BaseException as exc:  # noqa: BLE001 — handed to the replying side
                put(exc)
                return
            put(end)

        # in this call's context, so the reader resolves models as the calling tenant
        threading.Thread(target=contextvars.copy_context().run, args=(read_and_apply,), name="train-stream",
                         daemon=True).start()
        while True:
            try:
                item = applied.get(timeout=0.2)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item  # the rpc decorator ends the stream with its status
            resp, commit = item
            commit.wait()
            yield resp

    @rpc
    def Predict(self, request, context):
        start = time.perf_counter()
        self._ready()
        handle = self.registry.get(request.model_id, current_tenant())
        try:
            X = decode_tensor(request.inputs, "inputs", (2,))
            # the tensor's bytes stand for the message: ByteSize() would serialize it all again
            self.registry.limits.check_message(X.nbytes + len(request.model_id) + 64)
            if handle.spec is not None:  # the reply is sized before anything computes it
                itemsize = 8 if handle.spec.dtype == "float64" else 4
                self.registry.limits.check_message(len(X) * handle.spec.output.units * itemsize + 64,
                                                   "the reply would have bytes:")
            decoded = time.perf_counter()
            call = self.predictor.predict(handle, X, request.logits, context)
            computed = time.perf_counter()
            reply = pb.PredictResponse(outputs=encode_tensor(call.outputs, "outputs"))
        except Exception as exc:
            if self.metrics is not None:  # unknown ids make no series: they failed above
                self.metrics.inference.request_failed(request.model_id, status_for(exc)[0].name,
                                                      time.perf_counter() - start)
            raise
        if self.metrics is not None:
            end = time.perf_counter()
            self.metrics.inference.request_done(request.model_id, call.rows, end - start, decoded - start,
                                                call.queue_seconds, call.compute_seconds, end - computed)
        return reply

    @rpc
    def GetGradients(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        X, y = decode_tensor(request.inputs, "inputs", (2,)), decode_tensor(request.targets, "targets", (1, 2))
        loss, grads, step = self.registry.gradients(handle, X, y)
        resp = pb.GetGradientsResponse(loss=loss, step=step)
        for name, g in grads.items():
            encode_tensor(g, name, resp.gradients.add(name=name).tensor)
        return resp

    @rpc
    def GetModel(self, request, context):
        self._admit(request)
        return self._info(self.registry.get(request.model_id, current_tenant()))

    @rpc
    def ListModels(self, request, context):
        self._admit(request)
        resp = pb.ListModelsResponse()
        for handle in self.registry.handles(current_tenant()):
            try:
                resp.models.append(self._info(handle, listing=True))
            except ModelNotFound:  # deleted meanwhile
                pass
        return resp

    @rpc
    def DeleteModel(self, request, context):
        self._admit(request)
        self.registry.delete(request.model_id, current_tenant())
        if self.curves is not None:
            self.curves.forget(request.model_id)
        return pb.DeleteModelResponse()

    @rpc
    def GetWeights(self, request, context):
        self._admit(request)
        step, weights = self.registry.get_weights(self.registry.get(request.model_id, current_tenant()))
        resp = pb.GetWeightsResponse(step=step)
        for name, w in weights.items():
            encode_tensor(w, name, resp.weights.add(name=name).tensor)
        return resp

    @rpc
    def SetWeights(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        weights = {}
        for t in request.weights:
            if t.name in weights:
                raise BadRequest("weights", f"{shown(t.name)} given twice")
            weights[t.name] = decode_tensor(t.tensor, t.name)
        self.registry.set_weights(handle, weights)
        return self._info(handle)

    @rpc
    def SaveModel(self, request, context):
        self._admit(request)
        return pb.SaveModelResponse(step=self.registry.save(self.registry.get(request.model_id, current_tenant())))

    # -- optimizer hyper-parameters and named checkpoints ------------------------------
    @rpc
    def SetOptimizer(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        self.registry.set_optimizer(handle, optimizer_changes(request.optimizer))
        return self._info(handle)

    @rpc
    def SaveCheckpoint(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        step = self.registry.save_checkpoint(handle, request.tag)
        return pb.Checkpoint(tag=request.tag, step=step, saved_unix=time.time())

    @rpc
    def ListCheckpoints(self, request, context):
        self._admit(request)
        infos = self.registry.list_checkpoints(self.registry.get(request.model_id, current_tenant()))
        return pb.ListCheckpointsResponse(checkpoints=[pb.Checkpoint(tag=c.tag, step=c.step, saved_unix=c.saved)
                                                       for c in infos])

    @rpc
    def RestoreCheckpoint(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        saved_step, step = self.registry.restore_checkpoint(handle, request.tag)
        return pb.RestoreCheckpointResponse(checkpoint_step=saved_step, step=step)

    # -- gradients in and out ---------------------------------------------------------------
    def _gradient_step_done(self, model_id: str, r) -> pb.TrainStepResponse:
        if self.metrics is not None:
            self.metrics.step()
        if self.curves is not None:
            self.curves.step(model_id, r)
        return pb.TrainStepResponse(step=r.step, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr)

    @rpc
    def ApplyGradients(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        grads = {}
        for t in request.gradients:
            if t.name in grads:
                raise BadRequest("gradients", f"{t.name!r} given twice")
            grads[t.name] = decode_tensor(t.tensor, t.name)
        r, commit = self.registry.apply_gradients(handle, grads)
        commit.wait()
        return self._gradient_step_done(request.model_id, r)

    @rpc
    def AccumulateGradients(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        X, y = decode_tensor(request.inputs, "inputs", (2,)), decode_tensor(request.targets, "targets", (1, 2))
        rows, loss, step = self.registry.accumulate_gradients(handle, X, y)
        return pb.AccumulateGradientsResponse(rows=rows, loss=loss, step=step)

    @rpc
    def OptimizerStep(self, request, context):
        self._admit(request)
        r, commit = self.registry.optimizer_step(self.registry.get(request.model_id, current_tenant()))
        commit.wait()
        return self._gradient_step_done(request.model_id, r)

    # -- chunked transfer (models over the message limit) -------------------------
    def _chunks(self, arrays: dict, **fields):
        size = min(CHUNK_BYTES, self.registry.limits.max_message_bytes // 2)
        for name, array in arrays.items():
            yield from tensor_chunks(array, name, size, **fields)

    @rpc
    def GetWeightsChunks(self, request, context):
        self._admit(request)
        step, weights = self.registry.get_weights(self.registry.get(request.model_id, current_tenant()))
        yield from self._chunks(weights, step=step)

    @rpc
    def GetGradientsChunks(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        X, y = decode_tensor(request.inputs, "inputs", (2,)), decode_tensor(request.targets, "targets", (1, 2))
        loss, grads, step = self.registry.gradients(handle, X, y)
        yield from self._chunks(grads, step=step, loss=loss)

    @rpc
    def SetWeightsChunks(self, request_iterator, context):
        self._ready()
        handle, assembler = None, None
        for chunk in request_iterator:
            self.registry.limits.check_message(chunk.ByteSize())
            if handle is None:
                handle = self.registry.get(chunk.model_id, current_tenant())
                # only the model's parameters, at their shapes: the stream cannot make the server allocate more
                assembler = ChunkAssembler({name: tuple(shape) for name, shape in
                                            self.registry.describe(handle)["params"]})
            elif chunk.model_id != handle.model_id:
                raise BadRequest("model_id", "differs between the chunks of one stream")
            assembler.add(chunk)
        if handle is None:
            raise BadRequest("chunks", "the stream sent none")
        self.registry.set_weights(handle, assembler.arrays())
        return self._info(handle)

    # -- data sets and server-side Fit (issue 11) -------------------------------------
    @staticmethod
    def _dataset_info(info: DatasetInfo) -> pb.DatasetInfo:
        wire = {"float32": pb.DATA_TYPE_FLOAT32, "float64": pb.DATA_TYPE_FLOAT64, "int32": pb.DATA_TYPE_INT32,
                "int64": pb.DATA_TYPE_INT64}
        return pb.DatasetInfo(dataset_id=info.dataset_id, content_hash=info.content_hash, rows=info.rows,
                              inputs_shape=info.inputs_shape, inputs_dtype=wire.get(info.inputs_dtype, 0),
                              targets_shape=info.targets_shape, targets_dtype=wire.get(info.targets_dtype, 0),
                              nbytes=info.nbytes, created_unix=info.created, name=info.name)

    @rpc
    def UploadDataset(self, request_iterator, context):
        """Chunks of rows; each is checked as it arrives (dtypes and trailing
        shapes equal to the first chunk's, sizes within the limits), so an
        oversized upload is refused before it is all read."""
        self._ready()
        limits = self.registry.limits
        xs, ys, name, nbytes = [], [], "", 0
        for i, chunk in enumerate(request_iterator):
            X, y = decode_tensor(chunk.inputs, "inputs"), decode_tensor(chunk.targets, "targets")
            # the tensors' bytes stand for the chunk: ByteSize() serializes a 64 MB chunk again (0.2 s a 188 MB upload)
            limits.check_message(X.nbytes + y.nbytes + len(chunk.name) + 64)
            where = f"(chunk {i})"
            if X.ndim != 2:
                raise BadRequest("inputs", f"must be 2-D (rows, features), got shape {X.shape} {where}")
            if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
                raise BadRequest("targets", f"must be ({X.shape[0]},) labels or ({X.shape[0]}, units), "
                                            f"got shape {y.shape} {where}")
            if not all_finite(X):
                raise BadRequest("inputs", f"contains NaN or Inf {where}")
            if not all_finite(y):
                raise BadRequest("targets", f"contains NaN or Inf {where}")
            if xs:
                for field, a, first in (("inputs", X, xs[0]), ("targets", y, ys[0])):
                    if a.dtype != first.dtype or a.shape[1:] != first.shape[1:]:
                        raise BadRequest(field, f"{a.dtype} {a.shape[1:]} per row {where}, but chunk 0 sent "
                                                f"{first.dtype} {first.shape[1:]}")
            else:
                name = chunk.name
            nbytes += X.nbytes + y.nbytes
            limits.check_dataset(nbytes)
            xs.append(X)
            ys.append(y)
        if not xs or sum(len(x) for x in xs) == 0:
            raise BadRequest("inputs", "the upload holds no rows")
        info, _ = self.registry.datasets.put(xs, ys, name)  # the chunks as they came: no concatenated copy
        return self._dataset_info(info)

    @rpc
    def ListDatasets(self, request, context):
        self._admit(request)
        return pb.ListDatasetsResponse(datasets=[self._dataset_info(i) for i in self.registry.datasets.infos()])

    @rpc
    def GetDataset(self, request, context):
        self._admit(request)
        return self._dataset_info(self.registry.datasets.info(request.dataset_id))

    @rpc
    def DeleteDataset(self, request, context):
        self._admit(request)
        self.registry.delete_dataset(request.dataset_id)
        return pb.DeleteDatasetResponse()

    @rpc
    def Fit(self, request, context):
        self._admit(request)
        handle = self.registry.get(request.model_id, current_tenant())
        params = fitting.FitParams(
            dataset_id=request.dataset_id, epochs=request.epochs, batch_size=request.batch_size,
            shuffle=request.shuffle, seed=request.seed, validation_dataset_id=request.validation_dataset_id,
            patience=request.patience, min_delta=request.min_delta,
            restore_best_weights=request.restore_best_weights, progress_every_steps=request.progress_every_steps,
            start_step=request.start_step if request.HasField("start_step") else None)
        on_steps = self.metrics.train_steps.inc if self.metrics is not None else None
        for p in fitting.fit(self.registry, handle, params, context.is_active, on_steps):
            msg = pb.FitProgress(epoch=p.epoch, epoch_step=p.epoch_step, steps_per_epoch=p.steps_per_epoch,
                                 step=p.step, loss=p.loss, lr=p.lr, epoch_end=p.epoch_end,
                                 stopped_early=p.stopped_early, best_epoch=p.best_epoch,
                                 restored_best=p.restored_best)
            if p.accuracy is not None:
                msg.accuracy = p.accuracy
            if "val_loss" in p.val:
                msg.val_loss = p.val["val_loss"]
            if "val_accuracy" in p.val:
                msg.val_accuracy = p.val["val_accuracy"]
            yield msg
