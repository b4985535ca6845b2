"""The server's error contract: which exceptions are the caller's doing,
the gRPC status each one gets, and ``rpc``, the decorator every RPC method
goes through so that the mapping happens in one place.

Only the exception types in ``STATUS`` are refusals; anything else (a bare
ValueError, TypeError, KeyError...) is a server bug: INTERNAL, with its
traceback in the log. A bad request is
a ``BadRequest`` (or nnkernels' ``SpecError``/``InputError``, or the wire's
``TensorError``), never a bare ValueError. A MemoryError: the limits
(--max-memory-mb among them) bound what a caller may ask for, so running
out of memory within them means they are set too high for the machine:
RESOURCE_EXHAUSTED
(not INTERNAL, which would blame the server's code), logged with its traceback.

A refusal marked retry-safe in ``STATUS`` also carries the wire's
``gradserve-retry-safe`` trailer (``gradserve.wire.status``): such errors
must be raised before any model state changes.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re

import grpc

from gradserve.nnkernels import DeviceUnavailableError, InputError, NonFiniteError, NotTrainableError, SpecError
from gradserve.wire.status import mark_retry_safe
from gradserve.wire.tensor import TensorError

from .batching import CallCancelled, CallDeadlineExceeded
from .cluster.errors import OwnerLost
from .datasets import DatasetNotFound
from .limits import LimitExceeded
from .registry import (
    CheckpointNotFound,
    DatasetInUse,
    DurabilityOff,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NothingAccumulated,
    ShuttingDown,
    StepConflict,
)

log = logging.getLogger("gradserve.servicer")

# A model id (every Trainer RPC's model_id, the V2 protocol's model_name and
# name): checked with fullmatch, so no trailing newline
# slips through as ``$`` would let it.
MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_SHOWN = 64  # characters of a caller's value echoed in an error message
MAX_DETAILS = 1024  # characters of status details (they travel in a header, whose size is limited)


def shown(value, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was:
    error messages echo what the caller sent without echoing all of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if hasattr(value, "__len__") else len(text)
    return f"{text[:limit]}... ({size} long)"


def check_model_id(value: str, field: str = "model_id", required: bool = True) -> None:
    """Refuses an id that is not 1-128 characters from A-Z a-z 0-9 . _ - (an
    empty one only when ``required``)."""
    if not value:
        if required:
            raise BadRequest(field, "is required")
        return
    if not MODEL_ID.fullmatch(value):
        raise BadRequest(field, f"{shown(value)}: use 1-128 characters from A-Z a-z 0-9 . _ -")


class BadRequest(Exception):
    """A request field is missing or malformed (INVALID_ARGUMENT). ``field``
    names it as the caller wrote it (``spec``, ``model_id``, ``weights``)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class VersionNotFound(Exception):
    """A V2 request names a model version (step) the model is not at (NOT_FOUND)."""


class NotServing(Exception):
    """The server is warming up or shutting down and runs no calls
    (UNAVAILABLE, retry-safe)."""


# exception types -> (status code, retry-safe); the first match wins
STATUS = (
    ((NotServing, ShuttingDown), grpc.StatusCode.UNAVAILABLE, True),
    # --ray-address: a model's owner actor died during a mutation that may have been logged
    (OwnerLost, grpc.StatusCode.UNAVAILABLE, False),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    # within the limits yet out of memory: --max-memory-mb is set above what the machine has
    # (logged with its traceback; not retry-safe: the call may have got part-way)
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED, False),
    ((ModelNotFound, VersionNotFound, CheckpointNotFound, DatasetNotFound), grpc.StatusCode.NOT_FOUND, False),
    # a queued Predict whose caller gave up: it left the queue without computing
    (CallDeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, False),
    (CallCancelled, grpc.StatusCode.CANCELLED, False),
    (ModelExists, grpc.StatusCode.ALREADY_EXISTS, False),
    # a failed test-and-set on the step: re-read the step and decide (not "fix the state first")
    (StepConflict, grpc.StatusCode.ABORTED, False),
    ((NonFiniteError, NotTrainableError, DeviceUnavailableError, ModelUnavailable, DurabilityOff,
      NothingAccumulated, DatasetInUse),
     grpc.StatusCode.FAILED_PRECONDITION, False),
    ((BadRequest, SpecError, InputError, TensorError), grpc.StatusCode.INVALID_ARGUMENT, False),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """(status code, details, retry-safe) for an exception an RPC raised."""
    for types, code, retry_safe in STATUS:
        if isinstance(exc, types):
            details = str(exc)
            if len(details) > MAX_DETAILS:
                details = details[:MAX_DETAILS] + f"... ({len(details)} characters)"
            if isinstance(exc, MemoryError):
                details = "out of memory: the server could not allocate what this call needs (lower " \
                          "--max-memory-mb or --max-batch-rows to what the machine has)"
            return code, details, retry_safe
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged its traceback", False


def abort_with(context, exc: Exception, method: str):
    """Ends the call with ``exc``'s status (``context.abort`` raises)."""
    code, details, retry_safe = status_for(exc)
    if code == grpc.StatusCode.INTERNAL or isinstance(exc, MemoryError):
        log.error("event=rpc_error method=%s error=%s", method, type(exc).__name__, exc_info=exc)
    else:
        log.debug("event=rpc_refused method=%s code=%s details=%r", method, code.name, details)
    if retry_safe:
        mark_retry_safe(context)
    context.abort(code, details)


def rpc(method):
    """Wraps a servicer method (unary, or a generator for a stream) so any
    exception it raises ends the call with the status ``STATUS`` gives it.
    A stream that fails after some replies ends with that status too."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request_iterator, context):
            try:
                yield from method(self, request_iterator, context)
            except grpc.RpcError:  # reading the next request failed: the client cancelled or went away
                log.debug("event=stream_cancelled method=%s", name)
            except Exception as exc:
                abort_with(context, exc, name)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            abort_with(context, exc, name)
    return unary
