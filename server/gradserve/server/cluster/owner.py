"""ModelOwner: the named, detached Ray actor that owns one model.

Every call for model ``m``, whichever front-end received it, goes to the
actor named ``model:m`` in the Ray namespace ``gradserve``, so the model
has a single owner in the cluster. The owner serves it with the ordinary
``ModelRegistry`` (locks, exactly-once TrainStep, rollback of non-finite
steps, snapshots) over the model's own SQLite store and mutation log,
``STORE.models/<model_id>/model.db`` (and ``model.db.mutations/``): the
store and the log stay the source of truth. The actor is restarted by Ray
when its process dies (``max_restarts=-1``); a restarted owner recovers as a
restarted server does (newest good snapshot, then the log), so it is back
at or past its last acknowledged step, and a retried TrainStep carrying
``expected_step`` gets its original reply. With ``--durability none`` a
restarted owner has nothing to recover from: its model is gone.

A model with ``replicas > 1`` trains through ``cluster.replicas``: in the
owner's process the registry builds ``ReplicatedModel``s, whose
``train_step`` runs the data-parallel step on the process's one
``DataParallelGroup`` (the owner serves one model, so one group). The
owner's own copy serves predictions and snapshots; it reserves no CPU then,
its replicas one bundle each.

Errors: a refusal (an exception ``server/errors.py`` maps to a status other
than INTERNAL) is sent back as its class, args and attributes and raised
again in the front-end, so the caller gets the same status and message as
from one process; anything else raises in the actor (INTERNAL, traceback
logged by Ray and the front-end).
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import threading

import ray

from gradserve.nnkernels import Model
from gradserve.nnkernels.spec import ModelSpec

from ..limits import Limits
from ..registry import Durability, ModelRegistry
from ..store import SqliteStore
from ..wal import DURABLE, Commit
from .replicas import DataParallelGroup, check_parallel_spec
from .runtime import configure_actor

log = logging.getLogger("gradserve.cluster")

NAMESPACE = "gradserve"


def actor_name(model_id: str) -> str:
    return f"model:{model_id}"


class ReplicatedModel(Model):
    """A Model whose TrainStep runs on the owner process's replica group
    when its spec has ``replicas > 1``; counts the changes made around it
    (``mutations``) so the group pushes them to the replicas."""

    mutations = 0

    def train_step(self, X, y):
        if self.spec.replicas == 1:
            return super().train_step(X, y)
        X = self._inputs(X)
        y = self._targets(y, X.shape[0])
        with self._grad_lock:
            return replica_group(self).step(self, X, y)

    def set_weights(self, weights: dict) -> None:
        super().set_weights(weights)
        self.mutations += 1

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.mutations += 1


_group: DataParallelGroup | None = None
_group_lock = threading.Lock()
_settings = {"replica_cpus": 1.0, "checksum_steps": 100, "label": ""}


def configure_process(**settings) -> None:
    """Settings of this process's replica group (module-level functions: Ray
    pickles the actor class by value, with copies of the globals it names)."""
    _settings.update(settings)


def current_group() -> DataParallelGroup | None:
    return _group


def replica_group(model: Model) -> DataParallelGroup:
    """This process's replica group, placed on first use."""
    global _group
    with _group_lock:
        if _group is None:
            _group = DataParallelGroup(model.spec, model.state_dict(), cpus=_settings["replica_cpus"],
                                       checksum_steps=_settings["checksum_steps"], label=_settings["label"])
            _group._mark(model)
        return _group


def _refusal(exc: BaseException):
    """(module, class name, args, attributes) of a refusal; None for a server error."""
    import grpc

    from ..errors import status_for
    if status_for(exc)[0] == grpc.StatusCode.INTERNAL:
        return None
    return type(exc).__module__, type(exc).__qualname__, exc.args, dict(vars(exc))


def raise_refusal(packed) -> None:
    """Raises the refusal ``_refusal`` packed, as its own class."""
    module, name, args, attrs = packed
    cls = getattr(importlib.import_module(module), name)
    exc = cls.__new__(cls)
    exc.args = tuple(args)
    exc.__dict__.update(attrs)
    raise exc


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=16)
class ModelOwner:
    """One model's single owner (see the module docstring)."""

    def __init__(self, model_id: str, store_root: str, durability: dict, sqlite_sync: str, limits: dict,
                 default_device: str, cpus: float, replica_cpus: float, checksum_steps: int):
        self.model_id = model_id
        self.runtime = configure_actor(cpus)
        self.runtime["restarted"] = ray.get_runtime_context().was_current_actor_reconstructed
        configure_process(replica_cpus=replica_cpus, checksum_steps=checksum_steps, label=model_id)
        dur = Durability(**durability)
        self.directory = os.path.join(store_root, model_id)
        store = None
        if dur.mode != "none":
            os.makedirs(self.directory, exist_ok=True)
            store = SqliteStore(os.path.join(self.directory, "model.db"),
                                synchronous=sqlite_sync)
        self.registry = ModelRegistry(store, limits=Limits(**limits), durability=dur, default_device=default_device,
                                      model_class=ReplicatedModel)
        loaded = self.registry.load_stored()
        self.registry.start_checkpointer()
        for handle in self.registry.handles():
            if handle.model is not None and handle.spec.replicas > 1:
                replica_group(handle.model)
        log.info("event=owner_started model_id=%s restarted=%s loaded=%d pid=%d", model_id,
                 self.runtime["restarted"], loaded, os.getpid())

    def ping(self) -> dict:
        return dict(self.runtime)

    def _guard(self, fn, *args):
        try:
            return ("ok", fn(*args))
        except Exception as exc:  # noqa: BLE001 — refusals travel back as themselves
            packed = _refusal(exc)
            if packed is None:
                raise
            return ("refused", packed)

    def create(self, spec_dict: dict, tenant: str | None) -> tuple:
        def run():
            spec = ModelSpec.from_dict({"device": self.registry.default_device, **spec_dict})
            check_parallel_spec(spec)
            handle, created = self.registry.create(spec_dict, self.model_id, tenant)
            if created and spec.replicas > 1:
                try:
                    replica_group(handle.model)
                except BaseException:
                    self.registry.delete(self.model_id)
                    raise
            return handle.tenant, created
        return self._guard(run)

    def call(self, method: str, args: tuple) -> tuple:
        """``registry.<method>(handle, *args)`` on the model (the front-end
        checked the tenant); a Commit in the result is waited for (the reply
        follows durability) and travels back as ``DURABLE``."""
        def run():
            handle = self.registry.get(self.model_id)
            result = getattr(self.registry, method)(handle, *args)
            if isinstance(result, tuple) and result and isinstance(result[-1], Commit):
                result[-1].wait()
                result = (*result[:-1], DURABLE)
            return result
        return self._guard(run)

    def tenant(self) -> tuple:
        return self._guard(lambda: self.registry.get(self.model_id).tenant)

    def replica_info(self) -> dict:
        """The replica group's placement and timings (empty without replicas)."""
        group = current_group()
        if group is None:
            return {}
        return {"replicas": group.describe(), "timing": dict(group.timing), "resyncs": group.resyncs}

    def delete(self, tenant: str | None) -> tuple:
        def run():
            self.registry.delete(self.model_id, tenant)
            if current_group() is not None:
                current_group().close()
            self.registry.close()
            if self.registry.store is not None:
                self.registry.store.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        return self._guard(run)
