"""Prometheus metrics, with ``prometheus_client``: every gRPC call by method
and status code, latency histograms, calls in flight, train steps, models,
and the inference figures under the names Triton users know
(``nv_inference_*`` becomes ``gradserve_inference_*``), kept per model in
``InferenceStatistics``, which also answers the V2 ModelStatistics RPC.

prometheus_client writes counters with a ``_total`` suffix:
Triton's ``nv_inference_count`` is ``gradserve_inference_count_total``.
Per-model series carry the label ``model`` (the model id); Triton's
``version`` label is left out because a gradserve model's version is its
step, which would make a new series every train step.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelInferenceStats:
    """Cumulative inference figures of one model (Triton's ModelStatistics).
    ``inference_count`` counts rows, ``execution_count`` kernel calls: their
    ratio is the average batch size dynamic batching reached."""

    success: Duration = field(default_factory=Duration)  # whole request, arrival to reply
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # waiting for its batch to start
    compute_input: Duration = field(default_factory=Duration)  # decode and validate
    compute_infer: Duration = field(default_factory=Duration)  # the batch's kernel call, once per request
    compute_output: Duration = field(default_factory=Duration)  # encode the reply
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)  # rows per kernel call -> its durations
    failures: dict[str, int] = field(default_factory=dict)  # reason (status code name) -> count


class InferenceStatistics:
    """Per-model inference figures, shared by both Predict protocols, the
    ModelStatistics RPC and /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, ModelInferenceStats] = {}

    def _of(self, model: str) -> ModelInferenceStats:
        stats = self._models.get(model)
        if stats is None:
            stats = self._models[model] = ModelInferenceStats()
        return stats

    def request_done(self, model: str, rows: int, total_s: float, input_s: float, queue_s: float,
                     infer_s: float, output_s: float) -> None:
        with self._lock:
            s = self._of(model)
            s.success.add(total_s)
            s.compute_input.add(input_s)
            s.queue.add(queue_s)
            s.compute_infer.add(infer_s)
            s.compute_output.add(output_s)
            s.inference_count += rows
            s.last_inference_ms = int(time.time() * 1000)

    def request_failed(self, model: str, reason: str, total_s: float) -> None:
        with self._lock:
            s = self._of(model)
            s.fail.add(total_s)
            s.failures[reason] = s.failures.get(reason, 0) + 1

    def batch_done(self, model: str, rows: int, infer_s: float) -> None:
        with self._lock:
            s = self._of(model)
            s.execution_count += 1
            s.batches.setdefault(rows, Duration()).add(infer_s)

    def retain(self, models) -> None:
        """Drops the figures of models no longer served (deleted), so their
        series leave /metrics, as Triton's do when a model is unloaded."""
        keep = set(models)
        with self._lock:
            for model in [m for m in self._models if m not in keep]:
                del self._models[model]

    def snapshot(self) -> dict[str, ModelInferenceStats]:
        """Copies, so a reader never sees a half-recorded request."""
        import copy
        with self._lock:
            return copy.deepcopy(self._models)


class _InferenceCollector:
    """Writes ``InferenceStatistics`` as Triton-named families at scrape time."""

    def __init__(self, stats: InferenceStatistics, pending_by_model, served_models):
        self._stats = stats
        self._pending = pending_by_model
        self._served = served_models

    def collect(self):
        served = self._served()
        if served is not None:
            self._stats.retain(served)
        snap = self._stats.snapshot()
        us = lambda d: d.ns / 1000  # noqa: E731
        families = [
            ("gradserve_inference_request_success", "Inference requests answered successfully, per model.",
             lambda s: s.success.count),
            ("gradserve_inference_count", "Inferences performed (rows; a request of n rows counts n).",
             lambda s: s.inference_count),
            ("gradserve_inference_exec_count", "Model executions (kernel calls); inference_count / exec_count "
             "is the average batch size dynamic batching reached.", lambda s: s.execution_count),
            ("gradserve_inference_request_duration_us", "Cumulative end-to-end time of successful inference "
             "requests, microseconds (arrival at the servicer to reply).", lambda s: us(s.success)),
            ("gradserve_inference_queue_duration_us", "Cumulative time requests waited for their batch to "
             "start, microseconds.", lambda s: us(s.queue)),
            ("gradserve_inference_compute_input_duration_us", "Cumulative time decoding and validating "
             "request inputs, microseconds.", lambda s: us(s.compute_input)),
            ("gradserve_inference_compute_infer_duration_us", "Cumulative kernel time, microseconds, counted "
             "once per request (a batch of k requests adds its duration k times, as Triton).",
             lambda s: us(s.compute_infer)),
            ("gradserve_inference_compute_output_duration_us", "Cumulative time encoding replies, microseconds.",
             lambda s: us(s.compute_output)),
        ]
        for name, doc, value in families:
            family = CounterMetricFamily(name, doc, labels=["model"])
            for model, s in sorted(snap.items()):
                family.add_metric([model], value(s))
            yield family
        failure = CounterMetricFamily("gradserve_inference_request_failure",
                                      "Inference requests that failed, per model and reason (status code).",
                                      labels=["model", "reason"])
        for model, s in sorted(snap.items()):
            for reason, n in sorted(s.failures.items()):
                failure.add_metric([model, reason], n)
        yield failure
        pending = GaugeMetricFamily("gradserve_inference_pending_request_count",
                                    "Inference requests queued for dynamic batching now, per model.",
                                    labels=["model"])
        for model, n in sorted(self._pending().items()):
            pending.add_metric([model], n)
        yield pending


class _DurabilityCollector:
    """The registry's durability counters (``ModelRegistry.stats``) as
    ``gradserve_durability_*`` families at scrape time."""

    # stats key -> (metric name, help, counter (else gauge))
    FAMILIES = {
        "log_bytes": ("gradserve_durability_log_bytes", "Bytes appended to the mutation log.", True),
        "log_records": ("gradserve_durability_log_records", "Mutation records appended to the log.", True),
        "log_fsyncs": ("gradserve_durability_log_fsyncs", "fdatasync calls on the log (group commits; "
                       "log_records / log_fsyncs is the average group).", True),
        "log_fsync_seconds": ("gradserve_durability_log_fsync_seconds", "Cumulative time in log fdatasync.", True),
        "log_fsync_seconds_max": ("gradserve_durability_log_fsync_seconds_max", "Longest log fdatasync.", False),
        "log_segments_removed": ("gradserve_durability_log_segments_removed", "Log segments removed once "
                                 "snapshots covered them.", True),
        "snapshots": ("gradserve_durability_snapshots", "Snapshots written.", True),
        "snapshot_seconds": ("gradserve_durability_snapshot_seconds", "Cumulative time writing snapshots.", True),
        "snapshot_seconds_max": ("gradserve_durability_snapshot_seconds_max", "Longest snapshot write.", False),
        "snapshot_bytes": ("gradserve_durability_snapshot_bytes", "Bytes of snapshots written.", True),
        "snapshot_failures": ("gradserve_durability_snapshot_failures", "Snapshot writes that failed.", True),
        "replayed_records": ("gradserve_durability_replayed_records", "Log records replayed at start-up.", True),
        "replay_seconds": ("gradserve_durability_replay_seconds", "Time replaying the log at start-up.", True),
        "dropped_records": ("gradserve_durability_dropped_records", "Log records dropped as damaged or "
                            "unreadable at start-up.", True),
        "damaged_log_bytes": ("gradserve_durability_damaged_log_bytes", "Bytes of damaged log found at "
                              "start-up.", True),
        "rollbacks": ("gradserve_durability_rollbacks", "Mutations refused and rolled back (non-finite "
                      "state, failed log write).", True),
    }

    def __init__(self, stats):
        self._stats = stats

    def collect(self):
        stats = self._stats() or {}
        for key, (name, doc, counter) in self.FAMILIES.items():
            if key in stats:
                family = CounterMetricFamily if counter else GaugeMetricFamily
                yield family(name, doc, value=stats[key])


class Metrics:
    """The server's metric registry (its own ``CollectorRegistry``, so two
    servers in one process never share figures)."""

    def __init__(self):
        disable_created_metrics()  # process-wide: no *_created series (Triton has none; they double the output)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gradserve_requests", "gRPC calls by method and status code.",
                                ["method", "code"], registry=r)
        self.latency = Histogram("gradserve_request_seconds", "gRPC call latency, seconds (streams: whole call).",
                                 ["method"], buckets=BUCKETS, registry=r)
        self.in_flight = Gauge("gradserve_requests_in_flight", "gRPC calls being served now, by method.",
                               ["method"], registry=r)
        self.train_steps = Counter("gradserve_train_steps", "Optimizer steps applied.", registry=r)
        self._models_gauge = Gauge("gradserve_models", "Models served.", registry=r)
        self.models = lambda: 0  # set by the server: how many models are served
        self._models_gauge.set_function(lambda: self.models())
        self.inference = InferenceStatistics()
        self.pending_by_model = lambda: {}  # set by the server: the batcher's queue lengths
        self.served_models = lambda: None  # set by the server: ids of the models served now
        r.register(_InferenceCollector(self.inference, lambda: self.pending_by_model(),
                                       lambda: self.served_models()))
        self.durability_stats = lambda: {}  # set by the server: ModelRegistry.stats
        r.register(_DurabilityCollector(lambda: self.durability_stats()))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def step(self) -> None:
        self.train_steps.inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call, counts it by final status code, and counts calls in
    flight. The wrapped handler is made once per method, not per call."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[tuple[str, int], tuple] = {}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        key = (details.method, id(handler))
        entry = self._wrapped.get(key)  # holds the handler, so its id is never reused
        if entry is None:
            entry = self._wrapped[key] = (handler, self._wrap(handler, details.method.rsplit("/", 1)[-1]))
        return entry[1]

    def _wrap(self, handler, method: str):
        metrics = self.metrics
        requests, latency = metrics.requests, metrics.latency.labels(method)
        in_flight = metrics.in_flight.labels(method)

        def code_of(context, exc) -> str:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                return "UNKNOWN" if exc is not None else "OK"
            return code.name if isinstance(code, grpc.StatusCode) else str(code)

        @contextmanager
        def observed(context):
            start, exc = time.perf_counter(), None
            in_flight.inc()
            try:
                yield
            except BaseException as e:
                exc = e
                raise
            finally:
                in_flight.dec()
                requests.labels(method, code_of(context, exc)).inc()
                latency.observe(time.perf_counter() - start)

        # one wrapper per reply shape; a streamed reply is observed until its last message
        def single(inner):
            def call(request, context):
                with observed(context):
                    return inner(request, context)
            return call

        def streamed(inner):
            def call(request, context):
                with observed(context):
                    yield from inner(request, context)
            return call

        shapes = ((handler.unary_unary, single, grpc.unary_unary_rpc_method_handler),
                  (handler.stream_unary, single, grpc.stream_unary_rpc_method_handler),
                  (handler.unary_stream, streamed, grpc.unary_stream_rpc_method_handler),
                  (handler.stream_stream, streamed, grpc.stream_stream_rpc_method_handler))
        for inner, wrap, make in shapes:
            if inner:
                return make(wrap(inner), handler.request_deserializer, handler.response_serializer)
        return handler


def serve_metrics(metrics: Metrics, host: str, port: int):
    """Starts the /metrics endpoint (prometheus_client's HTTP server, in a
    daemon thread); returns the server (``.server_port``, ``.shutdown()``)."""
    httpd, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd
