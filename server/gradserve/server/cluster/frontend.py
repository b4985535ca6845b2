"""ClusterRegistry: what a stateless front-end (``gradserve serve
--ray-address ...``) serves from. It holds no model: each call goes to the
model's owner actor (``cluster.owner``), found by name, so several
front-ends attached to one Ray cluster serve the same models and every call
for a model reaches its single owner.

It has the methods of ``ModelRegistry`` the servicers call; the handle it
gives out (``ClusterHandle``) names the model and its owner and fetches the
spec once, when asked. The model-level methods (``train_step``, ``predict``,
``get_weights``, ``set_weights``, ``gradients``, ``save``, ``set_optimizer``,
checkpoints, ``apply_gradients``, ``accumulate_gradients``,
``optimizer_step``, ``describe``) run as ``registry.<method>`` in the owner.
Data sets and server-side Fit are not served in this mode (FAILED_PRECONDITION).

Failures: an owner that is restarting, or that died during a call, makes
the call UNAVAILABLE (Ray's ActorUnavailableError/ActorDiedError do not say
whether the call ran). It is retry-safe (``OwnerRestarting``) when the call
could not have changed the model (a read) or its retry is deduplicated
(TrainStep with ``expected_step``; the create of a named model; delete);
otherwise ``OwnerLost``, without the trailer. An owner that does not answer
within ``call_timeout_s`` is UNAVAILABLE (retry-safe only as above).
"""
from __future__ import annotations

import logging
import os
import uuid

import ray

from gradserve.nnkernels import ModelSpec

from ..limits import LimitExceeded, Limits
from ..registry import MODEL_ID, ModelNotFound, ModelUnavailable
from ..tenants import visible_to
from .errors import OwnerLost, OwnerRestarting
from .owner import NAMESPACE, ModelOwner, actor_name, raise_refusal
from .runtime import actor_env

log = logging.getLogger("gradserve.cluster")

READS = {"describe", "predict", "get_weights", "gradients", "save", "list_checkpoints"}
FORWARDED = READS | {"set_weights", "set_optimizer", "save_checkpoint", "restore_checkpoint",
                     "apply_gradients", "accumulate_gradients", "optimizer_step"}


def connect(address: str) -> None:
    """Attaches this process to the Ray cluster at ``address`` (``auto``: the
    one this node belongs to; ``local``: start one here), unless it already is."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    log.info("event=ray_connected address=%s resources=%s", address, ray.cluster_resources())


class _Model:
    """What the V2 statistics read of a served model: its step."""

    def __init__(self, handle: "ClusterHandle"):
        self._handle = handle

    @property
    def step(self) -> int:
        return self._handle.registry.describe(self._handle)["step"]


class ClusterHandle:
    def __init__(self, registry: "ClusterRegistry", model_id: str, owner, tenant: str | None = None):
        self.registry = registry
        self.model_id = model_id
        self.owner = owner
        self.deleted = False
        self.model = _Model(self)
        self._spec: ModelSpec | None = None
        self._tenant = tenant

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = ModelSpec.from_dict(self.registry.describe(self)["spec"])
        return self._spec

    @property
    def tenant(self) -> str:
        if self._tenant is None:
            self._tenant = self.registry._owner_call(self, "tenant", (), safe=True)
        return self._tenant


class _NoDatasets:
    """Data sets live in one server's store; the cluster mode does not serve them yet."""

    def __getattr__(self, name):
        def refuse(*args, **kwargs):
            raise ModelUnavailable("data sets and server-side Fit are not served under --ray-address yet: "
                                   "train with TrainStep/TrainStream (fit(..., server_side=False))")
        return refuse


class ClusterRegistry:
    """The front-end's view of the cluster's models (see the module docstring)."""

    def __init__(self, *, address: str, store: str, durability, sqlite_sync: str, limits: Limits,
                 default_device: str, cpus_per_model: float = 1.0, checksum_steps: int = 100,
                 call_timeout_s: float = 300.0):
        connect(address)
        self.limits = limits
        self.default_device = default_device
        self.durability = durability
        self.store_root = os.path.abspath(store + ".models")
        self.sqlite_sync = sqlite_sync
        self.cpus_per_model = cpus_per_model
        self.checksum_steps = checksum_steps
        self.call_timeout_s = call_timeout_s
        self.datasets = _NoDatasets()

    # -- lifecycle (owners live on their own) ------------------------------------------------
    def stats(self) -> dict:
        return {}

    def load_stored(self) -> int:
        return len(self._names())

    def start_checkpointer(self) -> None:
        pass

    def close(self) -> int:
        return 0

    # -- owners ---------------------------------------------------------------------------
    def _names(self) -> list[str]:
        from ray.util import list_named_actors
        return sorted(a["name"][len("model:"):] for a in list_named_actors(all_namespaces=True)
                      if a.get("namespace") == NAMESPACE and a["name"].startswith("model:"))

    def _owner(self, model_id: str):
        try:
            return ray.get_actor(actor_name(model_id), namespace=NAMESPACE)
        except ValueError:
            raise ModelNotFound(model_id) from None

    def _owner_call(self, handle: ClusterHandle, method: str, args: tuple, safe: bool):
        try:
            status, value = ray.get(getattr(handle.owner, method).remote(*args), timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            kind = OwnerRestarting if safe else OwnerLost  # it may still apply the call
            raise kind(f"model {handle.model_id!r}: its owner did not answer within "
                       f"{self.call_timeout_s:.0f} s") from None
        except ray.exceptions.RayActorError as exc:
            try:
                self._owner(handle.model_id)
            except ModelNotFound:
                raise ModelNotFound(handle.model_id) from None
            log.warning("event=owner_unavailable model_id=%s method=%s error=%s", handle.model_id, method,
                        type(exc).__name__)
            kind = OwnerRestarting if safe else OwnerLost
            raise kind(f"model {handle.model_id!r}: its owner actor is restarting (it recovers from the store at "
                       f"its last acknowledged step); retry") from None
        if status == "refused":
            raise_refusal(value)
        return value

    # -- lookup -----------------------------------------------------------------------------
    def handles(self, tenant: str | None = None) -> list[ClusterHandle]:
        out = []
        for model_id in self._names():
            try:
                handle = ClusterHandle(self, model_id, self._owner(model_id))
                if tenant is None or visible_to(handle.tenant, tenant):
                    out.append(handle)
            except (ModelNotFound, OwnerRestarting):
                continue
        return out

    def get(self, model_id: str, tenant: str | None = None) -> ClusterHandle:
        if not MODEL_ID.match(model_id or ""):
            raise ModelNotFound(model_id)
        handle = ClusterHandle(self, model_id, self._owner(model_id))
        if tenant is not None and not visible_to(handle.tenant, tenant):
            raise ModelNotFound(model_id)
        return handle

    # -- create / delete ------------------------------------------------------------------
    def create(self, spec_dict: dict, model_id: str = "", tenant: str | None = None) -> tuple[ClusterHandle, bool]:
        from gradserve.nnkernels import InputError
        if model_id and not MODEL_ID.match(model_id):
            raise InputError("model_id", f"{model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
        spec = ModelSpec.from_dict({"device": self.default_device, **spec_dict})
        self.limits.check_spec(spec)
        model_id = model_id or uuid.uuid4().hex
        if len(self._names()) >= self.limits.max_models and model_id not in self._names():
            raise LimitExceeded("max_models", self.limits.max_models, len(self._names()) + 1,
                                "this model would make models:")
        cpus = self.cpus_per_model if spec.replicas == 1 else 0
        d = self.durability
        owner = ModelOwner.options(
            name=actor_name(model_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=cpus, runtime_env=actor_env(max(cpus, 1))).remote(
            model_id, self.store_root,
            {"mode": d.mode, "checkpoint_steps": d.checkpoint_steps, "checkpoint_seconds": d.checkpoint_seconds,
             "checkpoint_log_mb": d.checkpoint_log_mb, "checkpoint_replay_seconds": d.checkpoint_replay_seconds,
             "segment_mb": d.segment_mb},
            self.sqlite_sync, _limits_dict(self.limits), self.default_device, cpus, self.cpus_per_model,
            self.checksum_steps)
        handle = ClusterHandle(self, model_id, owner)
        owned_by, created = self._owner_call(handle, "create", (spec_dict, tenant), safe=True)
        handle._tenant = owned_by
        if created:
            log.info("event=model_created model_id=%s params=%d replicas=%d", model_id, spec.num_params,
                     spec.replicas)
        return handle, created

    def delete(self, model_id: str, tenant: str | None = None) -> None:
        handle = self.get(model_id, tenant)
        self._owner_call(handle, "delete", (tenant,), safe=True)
        ray.kill(handle.owner, no_restart=True)
        log.info("event=model_deleted model_id=%s", model_id)

    # -- everything the owner's registry does ------------------------------------------------
    def describe(self, handle: ClusterHandle, listing: bool = False) -> dict:
        return self._forward(handle, "describe", (listing,))

    def train_step(self, handle: ClusterHandle, X, y, expected_step: int | None = None):
        # retry-safe with an expected step: a repeat is answered from the owner's replies
        return self._forward(handle, "train_step", (X, y, expected_step), safe=expected_step is not None)

    def _forward(self, handle: ClusterHandle, method: str, args: tuple, safe: bool | None = None):
        return self._owner_call(handle, "call", (method, args), safe=method in READS if safe is None else safe)

    def delete_dataset(self, dataset_id: str) -> None:
        self.datasets.delete(dataset_id)  # refused: no data sets here

    def __getattr__(self, method: str):
        if method not in FORWARDED:
            raise AttributeError(method)
        return lambda handle, *args: self._forward(handle, method, args)

    def _usable(self, handle):
        raise ModelUnavailable("server-side Fit is not served under --ray-address yet")


def _limits_dict(limits: Limits) -> dict:
    return {"max_models": 1, "max_params": limits.max_params, "max_batch_rows": limits.max_batch_rows,
            "max_message_mb": limits.max_message_mb, "max_layers": limits.max_layers,
            "max_memory_mb": limits.max_memory_mb}

