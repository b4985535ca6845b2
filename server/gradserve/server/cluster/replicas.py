"""Data-parallel training of one model on N Ray actors (``replicas=N``).

``DataParallelGroup(spec, state)`` places N ``Replica`` actors in one
placement group (one bundle of ``cpus`` CPUs each, PACK), each holding an
nnkernels ``Model`` with the same state. ``group.step(model, X, y)`` is
one optimizer step on the batch (X, y), equal to ``model.train_step(X, y)``
on one process:

1. Shards: the n rows are split into N contiguous shards, shard i holding
   rows [i·n//N, (i+1)·n//N). Replica i runs the kernels' forward and
   backward pass on its shard, which gives g_i, the gradient of the MEAN
   loss over the shard's c_i = ``output.counted(n_i)`` terms (rows, or
   elements for per-element losses), then scales it in float64 by
   w_i = c_i / c, c = counted(n): Σ w_i g_i is the gradient of the mean
   loss over the whole batch, as the single process computes it (the
   kernels' ``inv_count`` = 1/c_i; the weighting turns it into 1/c).
2. Reduce-scatter: the flat gradient buffer is cut into N slices; replica
   i puts its N weighted slices in Ray's object store, and replica j sums
   slice j of every shard, in shard order i = 0..N-1 (a fixed order: the
   result does not depend on which actor finished first), casts it to the
   model's dtype and returns it with its squared L2 norm (float64).
3. All-gather: every replica fetches the N reduced slices, so each process
   moves about 2·(N-1)/N of the gradient's bytes whatever N is (the ring
   all-reduce's volume; a single reducer would move N times the gradient).
   The gradient's norm is Σ_j of the slices' squared norms (N = 1: the
   kernel's own, so N = 1 is bit-identical to one process); clipping
   (``clip_coefficient``, torch's ``clip_grad_norm_``), the scheduled lr and
   the optimizer update follow exactly as in ``Model.train_step``, on every
   replica and on ``model`` (the owner's copy, which serves predictions and
   snapshots), with identical inputs: the copies stay bit-identical.

Loss: Σ w_i loss_i (each loss_i a float64 mean); accuracy: Σ correct_i / c.
In float64 the result matches the single process to rounding (summation
order within the products differs: within 1e-12 relative); dropout and
input, hidden-input and target noise draw per element index within a batch,
so a spec using them is refused here (its shards would draw other values
than the full batch); weight noise draws per weight and is allowed.

Why this reduction: Ray's object store is the data plane the brief asks
for, and reduce-scatter + all-gather through it keeps every process's
traffic at 2·(N-1)/N of the gradient (bandwidth-optimal, like a ring)
while taking 2 rounds of task latency rather than the ring's 2·(N-1);
Ray's collective library (``ray.util.collective``) needs NCCL or Gloo
(pygloo), which are not installable here, and a parameter server funnels
N gradients through one process.

Every ``checksum_steps`` steps the CRC-32C of every copy's parameters,
optimizer state and step is compared; if any differs the group logs a
warning (``event=replicas_diverged``) and loads replica 0's state into the
others and into ``model``. A ``model`` changed outside ``step`` (SetWeights,
ApplyGradients, a rollback or a rebuild: another Model object, another
step count, or a bumped ``mutations`` counter) is pushed to the replicas
before the next step.
"""
from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gradserve.nnkernels import Model, ModelSpec, NonFiniteError, StepResult

from ..gradients import apply_gradients
from ..mutations import arrays_digest
from ..registry import ModelUnavailable
from .runtime import actor_env, configure_actor, kernel_cache_stats

log = logging.getLogger("gradserve.cluster")

PLACEMENT_TIMEOUT_S = 120.0


def row_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous shards of ``n`` rows: shard i is [i·n//N, (i+1)·n//N)."""
    cuts = [i * n // shards for i in range(shards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(shards)]


def state_checksum(model: Model) -> int:
    """CRC-32C of the parameters, every optimizer state buffer and the step (``state_dict``)."""
    return arrays_digest(model.state_dict())


def check_parallel_spec(spec: ModelSpec) -> None:
    """Refuses what data parallelism cannot reproduce: draws per element of
    a batch (dropout, input, hidden-input and target noise). Weight noise
    draws per weight from the step's key: every replica draws the same W̃."""
    reg = spec.regularization
    per_row = (any(l.dropout > 0 or l.noise_std > 0 for l in spec.hidden) or reg.input_noise_std > 0
               or reg.target_noise_std > 0)
    if spec.replicas > 1 and per_row:
        from gradserve.nnkernels import SpecError
        raise SpecError("replicas", spec.replicas, "dropout and input, hidden-input and target noise draw per "
                                                   "element of a batch, so shards would draw other values than "
                                                   "the whole batch: use replicas=1")


@ray.remote
class Replica:
    """One data-parallel copy of a model (see the module docstring)."""

    def __init__(self, index: int, cpus: float, spec_dict: dict, state: dict):
        self.index = index
        self.runtime = configure_actor(cpus)
        self.load(spec_dict, state)

    def describe(self) -> dict:
        return {**self.runtime, "index": self.index, "step": self.model.step, "kernel_cache": kernel_cache_stats()}

    def load(self, spec_dict: dict, state: dict) -> None:
        self.model = Model(ModelSpec.from_dict(spec_dict), state)

    def state(self) -> tuple[dict, dict]:
        return self.model.spec.to_dict(), self.model.state_dict()

    def checksum(self) -> int:
        return state_checksum(self.model)

    def shard_gradients(self, X, y, step: int, weight: float, cuts: list[tuple[int, int]]):
        """N weighted float64 slices of this shard's gradient, then (loss, correct, sq)."""
        if step != self.model.step:
            raise RuntimeError(f"replica {self.index} is at step {self.model.step}, the step is {step}")
        t0 = time.perf_counter()
        # Ray hands arrays over as read-only views, a Numba type of their own: copied, so the
        # kernels run the writable-array signature warm_up compiled (no compile in the actor)
        X, y = np.array(X), np.array(y)
        loss, correct, sq = self.model.backend.loss_and_grads(X, y, step)
        seconds = time.perf_counter() - t0
        g = self.model.backend.get_grads().astype(np.float64)
        if weight != 1.0:
            g *= weight
        return (*[g[a:b] for a, b in cuts], (loss, correct, sq, seconds))

    def reduce_slice(self, dtype: str, *parts):
        """Σ parts in the order given, in float64, cast to ``dtype``; with its squared norm."""
        total = parts[0].copy()  # not 0 + g: that would turn -0.0 into +0.0
        for p in parts[1:]:
            total += p
        out = total.astype(dtype)
        wide = out.astype(np.float64, copy=False)
        return out, float(np.dot(wide, wide))

    def apply(self, norm: float, *slices) -> int:
        return apply_gradients(self.model, np.concatenate(slices) if len(slices) > 1 else slices[0], norm=norm).step

    def perturb(self, value: float) -> None:
        """Test hook: moves one parameter, so the checksum sees a divergence."""
        params = self.model.backend.get_params()
        params[0] += value
        self.model.backend.set_params(params)


class DataParallelGroup:
    """N ``Replica`` actors in one placement group (see the module docstring)."""

    def __init__(self, spec: ModelSpec, state: dict, *, cpus: float = 1.0, checksum_steps: int = 100,
                 label: str = ""):
        check_parallel_spec(spec)
        self.n = spec.replicas
        self.cpus = cpus
        self.checksum_steps = max(1, int(checksum_steps))
        self.label = label
        self.resyncs = 0
        # seconds summed over steps: the shard phase, the slowest shard's kernels within it, the rest
        self.timing = {"compute_s": 0.0, "kernel_s": 0.0, "allreduce_s": 0.0, "steps": 0}
        self._lock = threading.Lock()
        name = f"replicas:{label}" if label else ""
        if name:  # a previous incarnation of this model's owner died holding it
            try:
                remove_placement_group(ray.util.get_placement_group(name))
                log.warning("event=stale_placement_group_removed model_id=%s", label)
            except ValueError:
                pass
        self.pg = placement_group([{"CPU": cpus}] * self.n, strategy="PACK", name=name)
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise ModelUnavailable(f"replicas: cannot place {self.n} replicas of {cpus:g} CPU each within "
                                   f"{PLACEMENT_TIMEOUT_S:.0f} s: the Ray cluster lacks the free CPUs") from None
        state_ref = ray.put(state)
        self.replicas = [
            Replica.options(num_cpus=cpus, runtime_env=actor_env(cpus), max_restarts=0,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                self.pg, placement_group_bundle_index=i)).remote(i, cpus, spec.to_dict(), state_ref)
            for i in range(self.n)]
        size = spec.num_params
        self.cuts = row_bounds(size, self.n)  # the slices of the flat buffer
        self._synced: tuple | None = None

    def describe(self) -> list[dict]:
        return ray.get([r.describe.remote() for r in self.replicas])

    def close(self) -> None:
        for r in self.replicas:
            ray.kill(r)
        remove_placement_group(self.pg)

    # -- keeping the copies equal ---------------------------------------------------------
    def _mark(self, model: Model) -> None:
        self._synced = (id(model), model.step, getattr(model, "mutations", 0))

    def push(self, model: Model) -> None:
        """Loads ``model``'s spec and state into every replica."""
        state_ref = ray.put(model.state_dict())
        ray.get([r.load.remote(model.spec.to_dict(), state_ref) for r in self.replicas])
        self._mark(model)

    def checksums(self, model: Model) -> list[int]:
        """The replicas' checksums, then ``model``'s."""
        return [*ray.get([r.checksum.remote() for r in self.replicas]), state_checksum(model)]

    def verify(self, model: Model) -> bool:
        """True when every copy is identical; otherwise resynchronises
        everyone from replica 0, logs a warning and returns False."""
        sums = self.checksums(model)
        if len(set(sums)) == 1:
            return True
        self.resyncs += 1
        log.warning("event=replicas_diverged model_id=%s step=%d checksums=%s action=resync_from_replica_0",
                    self.label, model.step, ",".join(f"{s:08x}" for s in sums))
        spec_dict, state = ray.get(self.replicas[0].state.remote())
        state_ref = ray.put(state)
        ray.get([r.load.remote(spec_dict, state_ref) for r in self.replicas[1:]])
        model.load_state_dict(state)
        self._mark(model)
        return False

    # -- the step ---------------------------------------------------------------------------
    def step(self, model: Model, X: np.ndarray, y: np.ndarray) -> StepResult:
        """One data-parallel optimizer step of ``model`` on (X, y), already
        validated (``Model._inputs``/``_targets``); raises NonFiniteError,
        model unchanged, when the loss or gradient is not finite."""
        with self._lock:
            if self._synced != (id(model), model.step, getattr(model, "mutations", 0)):
                self.push(model)
            t0 = time.perf_counter()
            n = X.shape[0]
            counted = model.spec.output.counted
            total = counted(n)
            shards = []  # (weight, refs) of the non-empty shards, in order
            for i, (a, b) in enumerate(row_bounds(n, self.n)):
                if b > a:
                    weight = counted(b - a) / total
                    refs = self.replicas[i].shard_gradients.options(num_returns=self.n + 1).remote(
                        X[a:b], y[a:b], model.step, weight, self.cuts)
                    shards.append((weight, refs))
            # the reductions are queued at once: each starts when its shards' slices exist
            reduced = [self.replicas[j].reduce_slice.options(num_returns=2).remote(
                model.dtype.name, *[refs[j] for _, refs in shards]) for j in range(self.n)]
            stats = ray.get([refs[self.n] for _, refs in shards])
            t1 = time.perf_counter()
            slice_refs = [r[0] for r in reduced]
            sqs = ray.get([r[1] for r in reduced])
            loss = 0.0
            correct = 0
            for (weight, _), (loss_i, correct_i, _, _) in zip(shards, stats):
                loss += weight * loss_i
                correct += correct_i
            sq = stats[0][2] if self.n == 1 else math.fsum(sqs)
            norm = math.sqrt(sq) if sq >= 0 else float("nan")
            # checked before any copy applies it: all of them step, or none
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise NonFiniteError(f"step {model.step + 1} not applied: loss={loss!r}, gradient norm={norm!r}")
            applied = [r.apply.remote(norm, *slice_refs) for r in self.replicas]
            slices = ray.get(slice_refs)
            result = apply_gradients(model, np.concatenate(slices) if len(slices) > 1 else slices[0], loss, norm)
            ray.get(applied)
            self._mark(model)
            t2 = time.perf_counter()
            self.timing["compute_s"] += t1 - t0
            self.timing["kernel_s"] += max(s[3] for s in stats)
            self.timing["allreduce_s"] += t2 - t1
            self.timing["steps"] += 1
            if self.timing["steps"] % self.checksum_steps == 0:
                self.verify(model)
        return StepResult(model.step, loss, model._accuracy(correct, n), norm, result.lr)
