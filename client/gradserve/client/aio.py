"""The asyncio client (grpc.aio): ``AsyncClient`` and ``AsyncRemoteModel``,
the same calls as the blocking ones, awaited. Used by the load-test tool."""
from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np

from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire import shuffle as shuffle_schedule
from gradserve.wire.tensor import ChunkAssembler, decode_tensor, tensor_chunks

from . import _fit, _wire
from ._fit import DatasetInfo
from ._wire import ModelInfo, StepResult
from .sync import CHUNK_BYTES, _Connection, done_by_earlier_attempt, new_model_id, retryable


class AsyncClient(_Connection):
    """The grpc.aio twin of ``Client`` (same arguments); use ``async with``."""

    _grpc = grpc.aio

    async def _call(self, method: str, request, timeout: float | None = None):
        rpc = getattr(self._stub, method)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return await rpc(request() if callable(request) else request,
                                 timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if done_by_earlier_attempt(method, exc, attempt):
                    return None
                if not retryable(method, exc) or attempt == self.retries:
                    raise
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 2

    async def wait_ready(self, timeout: float = 30.0) -> "AsyncClient":
        await asyncio.wait_for(self._channel.channel_ready(), timeout)
        return self

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def create_model(self, input_size: int, hidden=(), output=None, *, model_id: str | None = None,
                           **spec_kwargs) -> "AsyncRemoteModel":
        spec = _wire.build_spec(input_size, hidden, output, **spec_kwargs)
        info = _wire.model_info(await self._call("CreateModel", _wire.create_request(spec, model_id or new_model_id())))
        return AsyncRemoteModel(self, info)

    async def get_model(self, model_id: str) -> "AsyncRemoteModel":
        msg = await self._call("GetModel", pb.GetModelRequest(model_id=model_id))
        return AsyncRemoteModel(self, _wire.model_info(msg))

    async def list_models(self) -> list[ModelInfo]:
        return [_wire.model_info(m) for m in (await self._call("ListModels", pb.ListModelsRequest())).models]

    async def delete_model(self, model_id: str) -> None:
        await self._call("DeleteModel", pb.DeleteModelRequest(model_id=model_id))


    # -- data sets (server-side fit) ------------------------------------------------
    async def upload_dataset(self, X, y, *, name: str = "", timeout: float | None = None) -> DatasetInfo:
        """As ``Client.upload_dataset``."""
        X, y = _fit.wire_arrays(X, y)
        try:
            return await self.get_dataset(_fit.content_id(X, y))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        # a client stream: its chunks are made afresh for each attempt
        return _fit.dataset_info(await self._call(
            "UploadDataset", lambda: _fit.dataset_chunks(X, y, self.max_message_bytes, name), timeout))

    async def list_datasets(self) -> list[DatasetInfo]:
        return [_fit.dataset_info(d) for d in (await self._call("ListDatasets", pb.ListDatasetsRequest())).datasets]

    async def get_dataset(self, dataset_id: str) -> DatasetInfo:
        return _fit.dataset_info(await self._call("GetDataset", pb.GetDatasetRequest(dataset_id=dataset_id)))

    async def delete_dataset(self, dataset_id: str) -> None:
        await self._call("DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id))


class AsyncRemoteModel:
    """One model on the server, awaited calls (see ``RemoteModel``)."""

    def __init__(self, client: AsyncClient, info: ModelInfo):
        self.client = client
        self.info = info
        self.model_id = info.model_id
        self._steps = _wire.StepCounter(info.step)

    async def refresh(self) -> ModelInfo:
        self.info = _wire.model_info(await self.client._call("GetModel", pb.GetModelRequest(model_id=self.model_id)))
        self._steps.observe(self.info.step)
        return self.info

    async def train_step(self, X, y, *, timeout: float | None = None) -> StepResult:
        """Applied exactly once, retried like ``RemoteModel.train_step``."""
        client = self.client
        attempts = _wire.TrainAttempts(self.model_id, X, y, self._steps, client.retries, client.backoff)
        while True:
            try:
                resp = await client._stub.TrainStep(attempts.request,
                                                    timeout=client.timeout if timeout is None else timeout,
                                                    metadata=client._metadata)
            except grpc.aio.AioRpcError as exc:
                await asyncio.sleep(attempts.retry_delay(exc))  # raises when the step must not be sent again
                continue
            return attempts.result(resp)

    async def predict(self, X, *, logits: bool = False, timeout: float | None = None) -> np.ndarray:
        parts = []
        for req in _wire.predict_chunks(self.model_id, X, self.info.output_units, self.client.max_message_bytes, logits):
            parts.append(decode_tensor((await self.client._call("Predict", req, timeout)).outputs, "outputs"))
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    async def gradients(self, X, y, *, timeout: float | None = None) -> tuple[float, dict[str, np.ndarray]]:
        req = _wire.gradients_request(self.model_id, X, y)
        if self._chunked():
            return await self._fetch_chunks("GetGradientsChunks", req, timeout)
        resp = await self.client._call("GetGradients", req, timeout)
        return resp.loss, _wire.named_arrays(resp.gradients)

    async def get_weights(self) -> dict[str, np.ndarray]:
        req = pb.GetWeightsRequest(model_id=self.model_id)
        if self._chunked():
            return (await self._fetch_chunks("GetWeightsChunks", req, None))[1]
        return _wire.named_arrays((await self.client._call("GetWeights", req)).weights)

    async def set_weights(self, weights: dict) -> None:
        if self._chunked():
            chunks = [c for name, array in weights.items()
                      for c in tensor_chunks(np.asarray(array), name, CHUNK_BYTES, model_id=self.model_id)]
            client = self.client
            resp = await client._stub.SetWeightsChunks(iter(chunks), timeout=client.timeout, metadata=client._metadata)
        else:
            resp = await self.client._call("SetWeights", _wire.set_weights_request(self.model_id, weights))
        self.info = _wire.model_info(resp)

    # -- models over the message limit: tensors in chunks (as RemoteModel) -------------------
    def _chunked(self) -> bool:
        return self.info.num_params * 8 > self.client.max_message_bytes // 2

    async def _fetch_chunks(self, method: str, request, timeout) -> tuple[float, dict[str, np.ndarray]]:
        client = self.client
        assembler, loss = ChunkAssembler(), 0.0
        async for chunk in getattr(client._stub, method)(request, timeout=client.timeout if timeout is None
                                                         else timeout, metadata=client._metadata):
            assembler.add(chunk)
            loss = chunk.loss
        return loss, assembler.arrays()

    async def save(self) -> int:
        return (await self.client._call("SaveModel", pb.SaveModelRequest(model_id=self.model_id))).step

    # -- optimizer hyper-parameters and named checkpoints (see RemoteModel) ------------
    async def set_optimizer(self, **changes) -> dict:
        resp = await self.client._call("SetOptimizer", _wire.set_optimizer_request(self.model_id, changes))
        self.info = _wire.model_info(resp)
        return self.info.spec["optimizer"]

    async def save_checkpoint(self, tag: str) -> int:
        req = pb.SaveCheckpointRequest(model_id=self.model_id, tag=tag)
        return (await self.client._call("SaveCheckpoint", req)).step

    async def list_checkpoints(self) -> list[tuple[str, int, float]]:
        resp = await self.client._call("ListCheckpoints", pb.ListCheckpointsRequest(model_id=self.model_id))
        return [(c.tag, c.step, c.saved_unix) for c in resp.checkpoints]

    async def apply_gradients(self, grads: dict, *, timeout: float | None = None) -> StepResult:
        req = _wire.apply_gradients_request(self.model_id, grads)
        return _wire.step_result(await self.client._call("ApplyGradients", req, timeout))

    async def accumulate_gradients(self, X, y, *, timeout: float | None = None) -> int:
        req = _wire.accumulate_request(self.model_id, X, y)
        return (await self.client._call("AccumulateGradients", req, timeout)).rows

    async def optimizer_step(self, *, timeout: float | None = None) -> StepResult:
        req = pb.OptimizerStepRequest(model_id=self.model_id)
        return _wire.step_result(await self.client._call("OptimizerStep", req, timeout))

    async def restore_checkpoint(self, tag: str) -> int:
        req = pb.RestoreCheckpointRequest(model_id=self.model_id, tag=tag)
        resp = await self.client._call("RestoreCheckpoint", req)
        await self.refresh()
        return resp.checkpoint_step

    async def delete(self) -> None:
        await self.client.delete_model(self.model_id)

    async def train_stream(self, batches, *, timeout: float | None = None):
        """Async generator of StepResults, one per (X, y) in ``batches``;
        each request names its step, so none is applied twice (a broken
        stream is raised, not reopened: see ``RemoteModel.train_stream``)."""
        start = (await self.refresh()).step
        requests = (_wire.train_request(self.model_id, X, y, start + k + 1) for k, (X, y) in enumerate(batches))
        async for resp in self.client._stub.TrainStream(requests, timeout=timeout, metadata=self.client._metadata):
            result = _wire.step_result(resp)
            self._steps.observe(result.step)
            yield result

    async def fit(self, X, y, *, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
                  validation_data=None, seed: int | None = None, timeout: float | None = None,
                  server_side: bool = True, patience: int = 0, min_delta: float = 0.0,
                  restore_best_weights: bool = False, progress_every_steps: int = 0) -> dict[str, list[float]]:
        """As ``RemoteModel.fit``, without a progress bar (a broken Fit call is raised, not resent)."""
        X, y, steps_per_epoch = _wire.check_fit_args(X, y, epochs, batch_size)
        seed = _fit.fit_seed(seed)
        if server_side:
            client = self.client
            dataset = await client.upload_dataset(X, y)
            validation = await client.upload_dataset(*validation_data) if validation_data is not None else None
            request = _fit.fit_request(self.model_id, dataset.dataset_id, epochs=epochs, batch_size=batch_size,
                                       shuffle=shuffle, seed=seed,
                                       validation_dataset_id=validation.dataset_id if validation else "",
                                       patience=patience, min_delta=min_delta,
                                       restore_best_weights=restore_best_weights,
                                       progress_every_steps=progress_every_steps,
                                       start_step=(await self.refresh()).step)
            history = _fit.FitHistory()
            async for msg in client._stub.Fit(request, timeout=timeout, metadata=client._metadata):
                self._steps.observe(msg.step)
                history.add(msg)
            return history.history
        _fit.check_server_side_only(patience=patience, min_delta=min_delta, restore_best_weights=restore_best_weights,
                                    progress_every_steps=progress_every_steps)
        history: dict[str, list[float]] = {}
        for epoch in range(epochs):
            order = shuffle_schedule.epoch_order(seed, epoch, len(X), shuffle)
            index = [shuffle_schedule.batch_index(order, b, batch_size) for b in range(steps_per_epoch)]
            acc = _wire.EpochAccumulator()
            rows = iter([len(i) for i in index])
            async for result in self.train_stream(((_wire.take(X, i), _wire.take(y, i)) for i in index),
                                                  timeout=timeout):
                acc.add(result, next(rows))
            metrics = acc.summary()
            if validation_data is not None:
                Xv, yv = validation_data
                metrics.update(_wire.validation_metrics(self.info, await self.predict(Xv), yv))
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
        return history
