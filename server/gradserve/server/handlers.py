"""gRPC method handlers built from a service's descriptor: requests arrive
as raw bytes and are parsed here, ids are checked on every RPC, and
streaming calls run within their own budget with an idle timeout.

Parsing ourselves (grpcio's handlers given no request deserializer) turns
unparseable bytes into INVALID_ARGUMENT naming the method, instead of
grpcio's INTERNAL "Exception deserializing request!", whose error path also
keeps memory per call and, after a failed stream, makes ``server.stop``
hang. Every method of the service goes through here, so an RPC added to
the servicer gets the same treatment with no extra code.

Streams: each streaming call holds one of the pool's threads for its
whole life. The pool has ``workers`` threads for unary calls plus
``max_streams`` for streams; a stream over ``max_streams`` is refused
(RESOURCE_EXHAUSTED), and a client-streaming call whose client sends
nothing and receives nothing for ``stream_idle_s`` is cancelled, so idle
streams cannot take the threads unary calls and health checks need.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from .errors import BadRequest, abort_with, check_model_id
from .limits import LimitExceeded

log = logging.getLogger("gradserve.servicer")


class StreamBudget:
    """Counts streaming calls against ``max_streams`` and cancels
    client-streaming calls idle for ``idle_s`` (0: never)."""

    def __init__(self, max_streams: int, idle_s: float):
        self.max_streams = max_streams
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._open = 0
        self._watched: dict[int, list] = {}  # id -> [last activity (monotonic), context]
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def enter(self) -> None:
        with self._lock:
            if self._open >= self.max_streams:
                raise LimitExceeded("max_streams", self.max_streams, self._open + 1, "this call would make streams:")
            self._open += 1

    def leave(self) -> None:
        with self._lock:
            self._open -= 1

    def watch(self, context) -> list:
        """Starts watching a client-streaming call; the caller refreshes
        ``entry[0]`` on each message in or out and calls ``unwatch``."""
        entry = [time.monotonic(), context]
        with self._lock:
            self._watched[id(entry)] = entry
            if self.idle_s > 0 and self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_idle, name="stream-idle", daemon=True)
                self._watchdog.start()
        return entry

    def unwatch(self, entry: list) -> None:
        with self._lock:
            self._watched.pop(id(entry), None)

    def _watch_idle(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [e for e in self._watched.values() if now - e[0] > self.idle_s]
            for entry in idle:
                log.info("event=stream_idle_cancelled idle_s=%.1f", now - entry[0])
                self.unwatch(entry)
                entry[1].cancel()  # the request iterator raises; the stream ends CANCELLED

    def close(self) -> None:
        self._stop.set()


def _parser(request_class, method: str, ids: "ModelIds"):
    required_id = method not in ids.optional_in
    id_fields = [f for f in ids.fields if f in request_class.DESCRIPTOR.fields_by_name]

    def parse(raw: bytes):
        try:
            request = request_class.FromString(raw)
        except DecodeError:
            raise BadRequest("request", f"{len(raw)} bytes do not parse as {request_class.DESCRIPTOR.full_name} "
                                        f"(method {method})") from None
        for field in id_fields:
            check_model_id(getattr(request, field), field, required_id)
        return request
    return parse


def _handler(servicer, method_desc, request_class, response_class, budget: StreamBudget | None, ids: "ModelIds"):
    name = method_desc.name
    behaviour = getattr(servicer, name)
    parse = _parser(request_class, name, ids)
    serialize = response_class.SerializeToString
    client_streaming, server_streaming = method_desc.client_streaming, method_desc.server_streaming

    def parsed_stream(raw_iterator, activity):
        for raw in raw_iterator:
            if activity is not None:
                activity[0] = time.monotonic()
            yield parse(raw)

    def enter(context):
        if budget is None:
            return None
        try:
            budget.enter()
        except LimitExceeded as exc:
            abort_with(context, exc, name)
        return budget.watch(context) if client_streaming else None

    def leave(activity):
        if budget is not None:
            budget.leave()
            if activity is not None:
                budget.unwatch(activity)

    if not client_streaming and not server_streaming:
        def unary_unary(raw, context):
            try:
                request = parse(raw)
            except BadRequest as exc:
                abort_with(context, exc, name)
            return behaviour(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)

    if not client_streaming:
        def unary_stream(raw, context):
            try:
                request = parse(raw)
            except BadRequest as exc:
                abort_with(context, exc, name)
            activity = enter(context)
            try:
                yield from behaviour(request, context)
            finally:
                leave(activity)
        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)

    if not server_streaming:
        def stream_unary(raw_iterator, context):
            activity = enter(context)
            try:
                return behaviour(parsed_stream(raw_iterator, activity), context)
            except BadRequest as exc:  # a servicer without the rpc decorator (reflection) let it through
                abort_with(context, exc, name)
            finally:
                leave(activity)
        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)

    def stream_stream(raw_iterator, context):
        activity = enter(context)
        try:
            for response in behaviour(parsed_stream(raw_iterator, activity), context):
                if activity is not None:
                    activity[0] = time.monotonic()
                yield response
        except BadRequest as exc:  # a servicer without the rpc decorator (reflection) let it through
            abort_with(context, exc, name)
        finally:
            leave(activity)
    return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serialize)


@dataclass(frozen=True)
class ModelIds:
    """Which top-level request fields of a service hold a model id (checked
    on every call), and the methods where an empty one is allowed."""
    fields: tuple[str, ...] = ()
    optional_in: frozenset = frozenset()


TRAINER_IDS = ModelIds(("model_id",), frozenset({"CreateModel"}))  # empty there: the server picks one
# V2: ModelInfer's model_name, the metadata calls' name; ModelStatistics without one: every model
INFERENCE_IDS = ModelIds(("model_name", "name"), frozenset({"ModelStatistics"}))


def parsing_handler(service_desc, servicer, budget: StreamBudget | None = None, ids: ModelIds = ModelIds()):
    """A generic handler serving every method of ``service_desc`` (a
    protobuf ServiceDescriptor) with ``servicer``'s method of the same name."""
    handlers = {}
    for method_desc in service_desc.methods:
        behaviour = getattr(type(servicer), method_desc.name, None)
        if behaviour is None or behaviour.__module__.endswith("_pb2_grpc"):
            continue  # the generated base's stub: left out, grpc answers UNIMPLEMENTED
        request_class = GetMessageClass(method_desc.input_type)
        response_class = GetMessageClass(method_desc.output_type)
        handlers[method_desc.name] = _handler(servicer, method_desc, request_class, response_class, budget, ids)
    return grpc.method_handlers_generic_handler(service_desc.full_name, handlers)
