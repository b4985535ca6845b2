"""Prometheus metrics in the text exposition format, served over plain HTTP
(stdlib ``http.server``; no extra dependency): request counts by method and
status code, request latency histograms, train steps, models served."""
from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

log = logging.getLogger("gradserve.metrics")

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.train_steps = 0
        self.models = lambda: 0  # set by the server: how many models are served

    def observe(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            self.requests[(method, code)] = self.requests.get((method, code), 0) + 1
            counts = self.latency.setdefault(method, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[method] = self.latency_sum.get(method, 0.0) + seconds

    def step(self) -> None:
        with self._lock:
            self.train_steps += 1

    def render(self) -> str:
        with self._lock:
            out = ["# HELP gradserve_requests_total gRPC calls by method and status code.",
                   "# TYPE gradserve_requests_total counter"]
            for (method, code), n in sorted(self.requests.items()):
                out.append(f'gradserve_requests_total{{method="{method}",code="{code}"}} {n}')
            out += ["# HELP gradserve_request_seconds gRPC call latency (streams: whole call).",
                    "# TYPE gradserve_request_seconds histogram"]
            for method, counts in sorted(self.latency.items()):
                for bound, n in zip(BUCKETS, counts):
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(f'gradserve_request_seconds_bucket{{method="{method}",le="{le}"}} {n}')
                out.append(f'gradserve_request_seconds_sum{{method="{method}"}} {self.latency_sum[method]}')
                out.append(f'gradserve_request_seconds_count{{method="{method}"}} {counts[-1]}')
            out += ["# HELP gradserve_train_steps_total Optimizer steps applied.",
                    "# TYPE gradserve_train_steps_total counter", f"gradserve_train_steps_total {self.train_steps}"]
        out += ["# HELP gradserve_models Models served.", "# TYPE gradserve_models gauge",
                f"gradserve_models {self.models()}"]
        return "\n".join(out) + "\n"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call and counts it by final status code."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def code_of(context, exc) -> str:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                return "UNKNOWN" if exc is not None else "OK"
            return code.name if isinstance(code, grpc.StatusCode) else str(code)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                start, exc = time.perf_counter(), None
                try:
                    return inner(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    metrics.observe(method, code_of(context, exc), time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            def stream(request_iterator, context):
                start, exc = time.perf_counter(), None
                try:
                    yield from inner_stream(request_iterator, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    metrics.observe(method, code_of(context, exc), time.perf_counter() - start)

            return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler  # unary-stream / stream-unary: none in gradserve's services


def serve_metrics(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Starts the /metrics endpoint in a daemon thread; returns the server (``.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: scrapes are not events
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
