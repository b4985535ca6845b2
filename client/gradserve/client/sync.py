"""The blocking client: ``Client`` (one channel) and ``RemoteModel`` (one
model on the server). numpy in, numpy out; errors are ``grpc.RpcError`` with
the server's status code and a message naming the field or limit."""
from __future__ import annotations

import random
import threading
import time
import uuid
import warnings
from collections import deque
from typing import Any

import grpc
import numpy as np

from gradserve.v1 import trainer_pb2 as pb
from gradserve.v1 import trainer_pb2_grpc as pb_grpc
from gradserve.wire import shuffle as shuffle_schedule
from gradserve.wire.address import is_loopback
from gradserve.wire.status import is_retry_safe
from gradserve.wire.tensor import CHUNK_BYTES, ChunkAssembler, decode_tensor, tensor_chunks

from . import _fit, _wire
from ._fit import DatasetInfo
from ._wire import RETRYABLE, ModelInfo, StepResult

# A TrainStep applies an optimizer step, and UNAVAILABLE also reports a
# connection lost after the server received (and maybe applied) the call:
# retrying then would train twice on the batch. So a TrainStep is retried
# only when the server marked the failure retry-safe (it refused the call
# before touching any model: warming up, shutting down). The same holds for
# the gradient calls, which carry no expected step.
NOT_IDEMPOTENT = frozenset({"TrainStep", "ApplyGradients", "AccumulateGradients", "OptimizerStep"})


# On a retry, this status means an earlier attempt (whose reply was lost) did it.
DONE_BY_EARLIER_ATTEMPT = {"DeleteModel": grpc.StatusCode.NOT_FOUND}


def new_model_id() -> str:
    """An id for a model the caller did not name, picked before the first
    CreateModel attempt so that a retried create finds the model its lost
    first attempt made instead of making a second one."""
    return uuid.uuid4().hex


def done_by_earlier_attempt(method: str, exc: grpc.RpcError, attempt: int) -> bool:
    return attempt > 0 and DONE_BY_EARLIER_ATTEMPT.get(method) == exc.code()


def retryable(method: str, exc: grpc.RpcError) -> bool:
    """Whether ``method`` may be sent again after failing with ``exc``."""
    if exc.code() not in RETRYABLE:
        return False
    return method not in NOT_IDEMPOTENT or is_retry_safe(exc)


def tls_credentials(ca=None, cert=None, key=None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM paths or bytes (ca: the server's CA,
    system roots when None; cert/key: a client certificate for mutual TLS);
    None when none is given (plaintext)."""
    if ca is None and cert is None and key is None:
        return None

    def pem(v):
        if v is None or isinstance(v, bytes):
            return v
        with open(v, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(pem(ca), pem(key), pem(cert))


def channel_options(max_message_mb: float) -> list[tuple[str, Any]]:
    limit = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class _Connection:
    """What Client and AsyncClient share: the channel (plaintext or TLS),
    the bearer token, deadlines, retries and the message size limit.
    ``_grpc`` is the module that makes channels (grpc or grpc.aio)."""

    _grpc = grpc

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, retries: int = 3,
                 backoff: float = 0.1, max_message_mb: float = _wire.DEFAULT_MAX_MESSAGE_MB,
                 token: str | None = None, tls_ca: str | bytes | None = None, tls_cert: str | bytes | None = None,
                 tls_key: str | bytes | None = None, credentials: grpc.ChannelCredentials | None = None):
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_message_bytes = int(max_message_mb * 1024 * 1024)
        options = channel_options(max_message_mb)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        credentials = credentials or tls_credentials(tls_ca, tls_cert, tls_key)
        if token and credentials is None and not is_loopback(target):
            warnings.warn(f"gradserve: the bearer token travels in plaintext to {target}; use TLS (tls_ca=...) "
                          "off this machine", stacklevel=3)
        self._channel = (self._grpc.secure_channel(target, credentials, options) if credentials
                         else self._grpc.insecure_channel(target, options))
        self._stub = pb_grpc.TrainerStub(self._channel)


class Client(_Connection):
    """A connection to a gradserve server.

    ``timeout``: default deadline in seconds for each unary call (None: no
    deadline; streams default to none). ``retries``: how many times a call
    that failed with UNAVAILABLE is tried again, after exponential back-off
    (``backoff`` seconds, doubling, with jitter). A TrainStep names the step
    it produces (``expected_step``), so the server applies it exactly once:
    it is retried on UNAVAILABLE and dropped connections too, and a broken
    TrainStream is reopened where it stopped. ``max_message_mb`` must not
    exceed the server's limit; Predict splits larger batches to fit.
    """


    # -- plumbing ---------------------------------------------------------
    def _call(self, method: str, request, timeout: float | None = None):
        """``method`` with ``request`` (a callable: called for each attempt,
        e.g. a client stream's iterator), retried with backoff where
        ``retryable`` allows."""
        rpc = getattr(self._stub, method)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return rpc(request() if callable(request) else request,
                           timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if done_by_earlier_attempt(method, exc, attempt):
                    return None
                if not retryable(method, exc) or attempt == self.retries:
                    raise
            time.sleep(delay * (1 + random.random()))
            delay *= 2

    def wait_ready(self, timeout: float = 30.0) -> "Client":
        """Blocks until the channel connects (or raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        return self

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- models -----------------------------------------------------------
    def create_model(self, input_size: int, hidden=(), output=None, *, model_id: str | None = None,
                     **spec_kwargs) -> "RemoteModel":
        """Creates a model (kwargs mirror ``nnkernels.ModelSpec``: loss,
        optimizer, schedule, weight_init, bias_init, regularization, dtype,
        device, seed, replicas). The call is idempotent: without ``model_id`` the client
        picks one (a uuid) before the first attempt."""
        spec = _wire.build_spec(input_size, hidden, output, **spec_kwargs)
        info = _wire.model_info(self._call("CreateModel", _wire.create_request(spec, model_id or new_model_id())))
        return RemoteModel(self, info)

    def get_model(self, model_id: str) -> "RemoteModel":
        return RemoteModel(self, _wire.model_info(self._call("GetModel", pb.GetModelRequest(model_id=model_id))))

    def list_models(self) -> list[ModelInfo]:
        return [_wire.model_info(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

    def delete_model(self, model_id: str) -> None:
        """Deletes the model; NOT_FOUND on a retry means the first attempt did."""
        self._call("DeleteModel", pb.DeleteModelRequest(model_id=model_id))

    # -- data sets (server-side fit) ------------------------------------------------
    def upload_dataset(self, X, y, *, name: str = "", timeout: float | None = None) -> DatasetInfo:
        """Stores (X, y) on the server (streamed in chunks under the message
        limit) for ``RemoteModel.fit`` on any model; the same content is
        stored once: when the server holds it (same content hash), nothing
        is sent and its ``dataset_id`` is returned.
        Retried on UNAVAILABLE (an upload is idempotent)."""
        X, y = _fit.wire_arrays(X, y)
        try:  # already stored: nothing to send
            return self.get_dataset(_fit.content_id(X, y))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        # a client stream: its chunks are made afresh for each attempt
        return _fit.dataset_info(self._call(
            "UploadDataset", lambda: _fit.dataset_chunks(X, y, self.max_message_bytes, name), timeout))

    def list_datasets(self) -> list[DatasetInfo]:
        return [_fit.dataset_info(d) for d in self._call("ListDatasets", pb.ListDatasetsRequest()).datasets]

    def get_dataset(self, dataset_id: str) -> DatasetInfo:
        return _fit.dataset_info(self._call("GetDataset", pb.GetDatasetRequest(dataset_id=dataset_id)))

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id))


class RemoteModel:
    """One model on the server. ``info`` is the last ModelInfo fetched."""

    def __init__(self, client: Client, info: ModelInfo):
        self.client = client
        self.info = info
        self.model_id = info.model_id
        self._steps = _wire.StepCounter(info.step)

    def __repr__(self) -> str:
        return f"RemoteModel({self.model_id!r}, params={self.info.num_params}, target={self.client.target!r})"

    def refresh(self) -> ModelInfo:
        self.info = _wire.model_info(self.client._call("GetModel", pb.GetModelRequest(model_id=self.model_id)))
        self._steps.observe(self.info.step)
        return self.info

    @property
    def step(self) -> int:
        """The server's step count (one round trip)."""
        return self.refresh().step

    def train_step(self, X, y, *, timeout: float | None = None) -> StepResult:
        """One optimizer step on the batch (X, y), applied exactly once.

        The request names the step it produces. On UNAVAILABLE or a dropped
        connection it is sent again unchanged (the server answers a step it
        already applied with the original reply). When the server refuses a
        first attempt because the model moved on (another writer), the
        request is resent for the next step; after a failed attempt that may
        have been applied, such a refusal is raised instead."""
        client = self.client
        attempts = _wire.TrainAttempts(self.model_id, X, y, self._steps, client.retries, client.backoff)
        while True:
            try:
                resp = client._stub.TrainStep(attempts.request, timeout=client.timeout if timeout is None else timeout,
                                              metadata=client._metadata)
            except grpc.RpcError as exc:
                time.sleep(attempts.retry_delay(exc))  # raises when the step must not be sent again
                continue
            return attempts.result(resp)

    def predict(self, X, *, logits: bool = False, timeout: float | None = None) -> np.ndarray:
        """Outputs (probabilities for classifiers; pre-activation logits with
        ``logits=True``) for every row of X, in chunks under the message limit."""
        parts = [decode_tensor(self.client._call("Predict", req, timeout).outputs, "outputs")
                 for req in _wire.predict_chunks(self.model_id, X, self.info.output_units,
                                                 self.client.max_message_bytes, logits)]
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def gradients(self, X, y, *, timeout: float | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, {parameter name: d loss / d parameter}); the model is unchanged."""
        req = _wire.gradients_request(self.model_id, X, y)
        if self._chunked():
            loss, arrays = self._fetch_chunks("GetGradientsChunks", req, timeout)
            return loss, arrays
        resp = self.client._call("GetGradients", req, timeout)
        return resp.loss, _wire.named_arrays(resp.gradients)

    def get_weights(self) -> dict[str, np.ndarray]:
        """{"layers.{i}.weight" (out x in), "layers.{i}.bias": array}."""
        req = pb.GetWeightsRequest(model_id=self.model_id)
        if self._chunked():
            return self._fetch_chunks("GetWeightsChunks", req, None)[1]
        return _wire.named_arrays(self.client._call("GetWeights", req).weights)

    def set_weights(self, weights: dict) -> None:
        """Replaces every parameter; optimizer state and step are kept."""
        if self._chunked():
            client = self.client

            def chunks():
                for name, array in weights.items():
                    yield from tensor_chunks(np.asarray(array), name, CHUNK_BYTES, model_id=self.model_id)
            reply = client._stub.SetWeightsChunks(chunks(), timeout=client.timeout, metadata=client._metadata)
            self.info = _wire.model_info(reply)
            return
        self.info = _wire.model_info(self.client._call("SetWeights", _wire.set_weights_request(self.model_id, weights)))

    # -- models over the message limit: tensors in chunks -------------------------------
    def _chunked(self) -> bool:
        """Whether the model's parameters (as float64, the widest) take over
        half the message limit: then weights and gradients travel in chunks."""
        return self.info.num_params * 8 > self.client.max_message_bytes // 2

    def _fetch_chunks(self, method: str, request, timeout) -> tuple[float, dict[str, np.ndarray]]:
        client = self.client
        assembler, loss = ChunkAssembler(), 0.0
        for chunk in getattr(client._stub, method)(request, timeout=client.timeout if timeout is None else timeout,
                                                   metadata=client._metadata):
            assembler.add(chunk)
            loss = chunk.loss
        return loss, assembler.arrays()  # writable: backed by the assembler's own buffers

    def save_safetensors(self, path, *, names: str = "gradserve") -> None:
        """Writes the weights to a safetensors file, named as gradserve
        (``layers.{i}.weight``) or, with ``names="torch"``, as the
        ``nn.Sequential`` of Linear and activation modules (``0.weight``,
        ``2.weight``...); the spec goes into the file's metadata. Needs the
        ``safetensors`` extra."""
        from . import interop
        interop.save_safetensors(self.get_weights(), path, names=names, spec=self.info.spec)

    def load_safetensors(self, path) -> None:
        """SetWeights from a safetensors file in either naming (see
        ``save_safetensors``); optimizer state and step are kept."""
        from . import interop
        self.set_weights(interop.load_safetensors(path))

    def export_onnx(self, path, *, opset: int = 17) -> None:
        """Writes an ONNX graph (Gemm + activation nodes, the output kind,
        dynamic batch, the model's dtype) computing what Predict computes.
        Needs the ``onnx`` extra; see ``interop.onnx_model``."""
        from . import interop
        interop.export_onnx(self.info.spec, self.get_weights(), path, opset=opset)

    def save(self) -> int:
        """Checkpoints the model to the server's store now; returns the step saved."""
        return self.client._call("SaveModel", pb.SaveModelRequest(model_id=self.model_id)).step

    # -- optimizer hyper-parameters and named checkpoints ----------------------------
    def set_optimizer(self, **changes) -> dict:
        """Changes optimizer hyper-parameters from the next step on (e.g.
        ``lr=1e-4``; see SetOptimizer for which may change); a new lr
        replaces ``optimizer.lr``, the base of the schedule. Returns the
        optimizer now in force (the spec's ``optimizer`` part)."""
        self.info = _wire.model_info(self.client._call("SetOptimizer",
                                                       _wire.set_optimizer_request(self.model_id, changes)))
        return self.info.spec["optimizer"]

    def save_checkpoint(self, tag: str) -> int:
        """Stores the whole state (parameters, optimizer state and
        hyper-parameters) on the server under ``tag``; returns its step."""
        return self.client._call("SaveCheckpoint", pb.SaveCheckpointRequest(model_id=self.model_id, tag=tag)).step

    def list_checkpoints(self) -> list[tuple[str, int, float]]:
        """[(tag, step, saved unix time)], oldest first."""
        resp = self.client._call("ListCheckpoints", pb.ListCheckpointsRequest(model_id=self.model_id))
        return [(c.tag, c.step, c.saved_unix) for c in resp.checkpoints]

    # -- gradients in and out (PyTorch's param.grad = g; optimizer.step()) --------------
    def apply_gradients(self, grads: dict, *, timeout: float | None = None) -> StepResult:
        """One optimizer step on ``grads`` ({parameter name: gradient}, every
        parameter), with the model's clipping and schedule; ``loss`` is NaN."""
        resp = self.client._call("ApplyGradients", _wire.apply_gradients_request(self.model_id, grads), timeout)
        return _wire.step_result(resp)

    def accumulate_gradients(self, X, y, *, timeout: float | None = None) -> int:
        """Adds rows · (the batch's mean-loss gradient) to the model's
        accumulation; returns the rows accumulated so far. Lost if the server
        restarts before ``optimizer_step``."""
        req = _wire.accumulate_request(self.model_id, X, y)
        return self.client._call("AccumulateGradients", req, timeout).rows

    def optimizer_step(self, *, timeout: float | None = None) -> StepResult:
        """One step on the accumulated gradients' row-weighted mean (the mean
        loss over every accumulated row); ``loss`` is that mean loss."""
        resp = self.client._call("OptimizerStep", pb.OptimizerStepRequest(model_id=self.model_id), timeout)
        return _wire.step_result(resp)

    def restore_checkpoint(self, tag: str) -> int:
        """Puts back the state saved under ``tag`` (the step count goes on);
        returns the step it was saved at."""
        resp = self.client._call("RestoreCheckpoint", pb.RestoreCheckpointRequest(model_id=self.model_id, tag=tag))
        self.refresh()
        return resp.checkpoint_step

    def delete(self) -> None:
        self.client.delete_model(self.model_id)

    def train_stream(self, batches, *, timeout: float | None = None):
        """Streams (X, y) batches through TrainStream; yields a StepResult
        per batch, in order, without a round trip per batch.

        Each request names the step it produces (from the model's step, read
        first). When the stream breaks with UNAVAILABLE (a dropped
        connection, a server restart) it is reopened after back-off (up to
        the client's ``retries`` in a row) and every batch not yet answered
        is sent again: the server answers those it had applied with their
        original replies, so no batch is lost or trained twice."""
        client = self.client
        self.refresh()
        source = iter(batches)
        unanswered: deque = deque()  # (expected step, X, y), in order
        lock = threading.Lock()
        state = {"next": self._steps.known + 1, "generation": 0}

        def requests(generation: int):
            for expected, X, y in list(unanswered):
                yield _wire.train_request(self.model_id, X, y, expected)
            while True:
                with lock:  # a request thread of a broken call must not take batches
                    if generation != state["generation"]:
                        return
                    try:
                        X, y = next(source)
                    except StopIteration:
                        return
                    expected = state["next"]
                    state["next"] += 1
                    unanswered.append((expected, X, y))
                yield _wire.train_request(self.model_id, X, y, expected)

        retries, delay = 0, client.backoff
        while True:
            try:
                call = client._stub.TrainStream(requests(state["generation"]), timeout=timeout,
                                                metadata=client._metadata)
                for resp in call:
                    unanswered.popleft()
                    result = _wire.step_result(resp)
                    self._steps.observe(result.step)
                    retries, delay = 0, client.backoff
                    yield result
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or retries >= client.retries:
                    raise
                with lock:
                    state["generation"] += 1
                retries += 1
                time.sleep(delay * (1 + random.random()))
                delay *= 2

    def fit(self, X, y, *, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            validation_data=None, seed: int | None = None, progress: bool = True,
            timeout: float | None = None, server_side: bool = True, patience: int = 0, min_delta: float = 0.0,
            restore_best_weights: bool = False, progress_every_steps: int = 0,
            callbacks=()) -> dict[str, list[float]]:
        """Trains for ``epochs`` passes over (X, y) in batches, shuffled each
        epoch by ``gradserve.wire.shuffle.epoch_order(seed, epoch)`` when
        ``shuffle`` (a random seed when None), with a tqdm progress bar.
        Returns the per-epoch history: ``loss`` (and ``accuracy`` for
        classifiers) as row-weighted means of the steps' values, plus
        ``val_loss``/``val_accuracy`` when ``validation_data=(X_val, y_val)``.

        ``server_side`` (default): uploads the data once (``Client.upload_dataset``)
        and runs the Fit RPC, which trains next to the model and streams
        progress; early stopping (``patience`` epochs without ``val_loss``,
        or ``loss``, improving by more than ``min_delta``) and
        ``restore_best_weights`` need it. When the call breaks with
        UNAVAILABLE (a server restart) it is sent again and continues where
        the model is. ``server_side=False`` streams every batch through
        TrainStream instead (the same batches, so the same result).
        ``callbacks``: ``gradserve.client.callbacks`` objects (EarlyStopping,
        ReduceLROnPlateau, BestCheckpoint...), called after each epoch with
        its history values and ``lr``; one may stop training early. They
        run on the client between epochs, so with callbacks the fit streams
        per batch (as ``server_side=False``)."""
        X, y, steps_per_epoch = _wire.check_fit_args(X, y, epochs, batch_size)
        seed = _fit.fit_seed(seed)
        if not server_side or callbacks:
            _fit.check_server_side_only(patience=patience, min_delta=min_delta,
                                        restore_best_weights=restore_best_weights,
                                        progress_every_steps=progress_every_steps)
            return self._fit_per_batch(X, y, epochs, batch_size, shuffle, validation_data, seed, progress, timeout,
                                       callbacks)
        from tqdm.auto import tqdm

        client = self.client
        dataset = client.upload_dataset(X, y)
        validation = client.upload_dataset(*validation_data) if validation_data is not None else None
        request = _fit.fit_request(self.model_id, dataset.dataset_id, epochs=epochs, batch_size=batch_size,
                                   shuffle=shuffle, seed=seed,
                                   validation_dataset_id=validation.dataset_id if validation else "",
                                   patience=patience, min_delta=min_delta, restore_best_weights=restore_best_weights,
                                   progress_every_steps=progress_every_steps, start_step=self.refresh().step)
        history = _fit.FitHistory()
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", desc=f"fit {self.model_id}")
        retries, delay = 0, client.backoff
        try:
            while True:
                try:
                    for msg in client._stub.Fit(request, timeout=timeout, metadata=client._metadata):
                        self._steps.observe(msg.step)
                        bar.n = (msg.epoch - 1) * steps_per_epoch + msg.epoch_step
                        metrics = history.add(msg)
                        if metrics is None:
                            bar.set_postfix(epoch=msg.epoch, loss=f"{msg.loss:.4g}", refresh=False)
                        else:
                            bar.set_postfix({"epoch": msg.epoch, **{k: f"{v:.4g}" for k, v in metrics.items()}},
                                            refresh=False)
                        bar.refresh()
                        retries, delay = 0, client.backoff
                    return history.history
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE or retries >= client.retries:
                        raise
                retries += 1
                time.sleep(delay * (1 + random.random()))
                delay *= 2
        finally:
            bar.close()

    def _fit_per_batch(self, X, y, epochs, batch_size, shuffle, validation_data, seed, progress, timeout,
                       callbacks=()):
        from tqdm.auto import tqdm

        from .callbacks import CallbackList

        hooks = CallbackList(callbacks)
        steps_per_epoch = shuffle_schedule.steps_per_epoch(len(X), batch_size)
        history: dict[str, list[float]] = {}
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step",
                   desc=f"fit {self.model_id}")
        hooks.train_begin(self)
        try:
            for epoch in range(epochs):
                order = shuffle_schedule.epoch_order(seed, epoch, len(X), shuffle)
                index = [shuffle_schedule.batch_index(order, b, batch_size) for b in range(steps_per_epoch)]
                acc = _wire.EpochAccumulator()
                rows = iter([len(i) for i in index])
                # consume the stream to its end (stopping early would cancel the call)
                for result in self.train_stream(((_wire.take(X, i), _wire.take(y, i)) for i in index),
                                                timeout=timeout):
                    acc.add(result, next(rows))
                    bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4g}", refresh=False)
                    bar.update(1)
                metrics = acc.summary()
                if validation_data is not None:
                    Xv, yv = validation_data
                    metrics.update(_wire.validation_metrics(self.info, self.predict(Xv), yv))
                for key, value in metrics.items():
                    history.setdefault(key, []).append(value)
                bar.set_postfix({"epoch": epoch + 1, **{k: f"{v:.4g}" for k, v in metrics.items()}})
                if hooks.epoch_end(epoch, {**metrics, "lr": result.lr}, self):
                    break
        finally:
            bar.close()
        hooks.train_end(self)
        return history
