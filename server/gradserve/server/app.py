"""Assembles and runs the server: store, registry, servicer, health,
reflection; warm-up before SERVING; graceful shutdown on SIGTERM/SIGINT."""
from __future__ import annotations

import contextvars
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.address import is_loopback
from gradserve.wire.status import mark_retry_safe

from .batching import BatchingConfig, PredictBatcher
from .handlers import INFERENCE_IDS, TRAINER_IDS, StreamBudget, parsing_handler
from .limits import Limits
from .metrics import Metrics, MetricsInterceptor, serve_metrics
from .registry import Durability, ModelRegistry
from .servicer import TrainerServicer
from .store import SqliteStore
from .tenants import SINGLE_TOKEN, set_current_tenant, tenant_of

log = logging.getLogger("gradserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trainer"].full_name  # "gradserve.v1.Trainer"
# The Open Inference Protocol, on the same port. Its generated code is imported
# only when a server starts: tritonclient registers the same proto names, and a
# process that imports this module (e.g. for ServerConfig) may also use tritonclient.
INFERENCE_SERVICE_NAME = "inference.GRPCInferenceService"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    store: str = "./gradserve.db"
    durability: Durability = field(default_factory=Durability)
    sqlite_sync: str = ""  # "": FULL for step durability, NORMAL for interval
    workers: int = 8  # threads for unary calls
    max_streams: int = 8  # streaming calls at once, on threads of their own
    stream_idle_s: float = 300.0  # a client stream that moves nothing for this long is cancelled (0: never)
    limits: Limits = field(default_factory=Limits)
    default_device: str = "cpu"
    grace_s: float = 10.0
    kernel_threads: int = 0  # 0: nnkernels' default (every Numba thread)
    auth_token: str = ""
    auth_tokens: dict[str, str] = field(default_factory=dict)  # --auth-tokens: token -> tenant
    metrics_port: int = -1  # -1: off; 0: any free port
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    tensorboard_dir: str = ""  # "": no training curves
    # --ray-address: a front-end of a Ray cluster (gradserve.server.cluster), imported only then
    ray_address: str = ""
    ray_cpus_per_model: float = 1.0
    ray_checksum_steps: int = 100


def warm_up_kernels(kernel_threads: int = 0, default_device: str = "cpu") -> tuple[float, str, dict]:
    """Compiles (or loads from cache) every CPU kernel, and every CUDA kernel
    when a GPU is usable, so no request waits for (or races on) a compile;
    refuses a default device this process cannot use (and ``nnkernels.warm_up``
    a threading layer that aborts under concurrent callers)."""
    from gradserve.nnkernels import available_devices, set_thread_budget, thread_config, warm_up
    devices = available_devices()
    if default_device not in devices:
        raise RuntimeError(f"--default-device {default_device!r} is not usable here "
                           f"(available: {', '.join(devices)})")
    if kernel_threads:
        set_thread_budget(kernel_threads)
    t0 = time.perf_counter()
    _, layer = warm_up()
    if "cuda" in devices:
        from gradserve.nnkernels.cuda import warm_up as warm_up_cuda
        warm_up_cuda()
    return time.perf_counter() - t0, layer, thread_config()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses Trainer and inference calls without ``authorization: Bearer
    <token>`` (UNAUTHENTICATED, retry-safe: the call never reached a model).
    Health, reflection and the V2 liveness and readiness probes stay open
    for probes and grpcurl.

    ``tokens`` maps each accepted token to its tenant (--auth-tokens), or is
    the single --auth-token, which scopes nothing. Under a tenant the
    handler's behaviour runs in a context whose ``current_tenant()`` is that
    tenant: the behaviour runs later on a worker thread, so the context goes
    with it rather than being set here."""

    OPEN = {f"/{INFERENCE_SERVICE_NAME}/ServerLive", f"/{INFERENCE_SERVICE_NAME}/ServerReady"}
    GUARDED = (f"/{SERVICE_NAME}/", f"/{INFERENCE_SERVICE_NAME}/")

    def __init__(self, tokens: str | dict[str, str]):
        # a str is the single --auth-token
        self._tokens = {tokens: SINGLE_TOKEN} if isinstance(tokens, str) else dict(tokens)

        def deny(request, context):
            mark_retry_safe(context)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")

        def deny_stream(request, context):
            deny(request, context)
            yield  # a generator: the handler of a server-streaming call

        # by the method's cardinality: (client streaming, server streaming) -> handler
        self._deny = {(False, False): grpc.unary_unary_rpc_method_handler(deny),
                      (False, True): grpc.unary_stream_rpc_method_handler(deny_stream),
                      (True, False): grpc.stream_unary_rpc_method_handler(deny),
                      (True, True): grpc.stream_stream_rpc_method_handler(deny_stream)}

    def intercept_service(self, continuation, details):
        if not details.method.startswith(self.GUARDED) or details.method in self.OPEN:
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        tenant = tenant_of(given, self._tokens)
        handler = continuation(details)
        if handler is None:
            return None
        if tenant is None:
            return self._deny[bool(handler.request_streaming), bool(handler.response_streaming)]
        if tenant is SINGLE_TOKEN:
            return handler
        return as_tenant(handler, tenant)


def as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour (and, when it streams replies, each step
    of its iterator) run in one context of this call whose current tenant is
    ``tenant``; a fresh context per call, so nothing stays on the worker thread."""
    ctx = contextvars.copy_context()
    ctx.run(set_current_tenant, tenant)
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None)
    behaviour = getattr(handler, kind)
    if not handler.response_streaming:
        def wrapped(request, context):
            return ctx.run(behaviour, request, context)
    else:
        def wrapped(request, context):
            replies = ctx.run(behaviour, request, context)
            while True:
                try:
                    reply = ctx.run(next, replies)
                except StopIteration:
                    return
                yield reply
    return handler._replace(**{kind: wrapped})


class GradServer:
    """The running service. ``start()`` binds and returns the port (health
    NOT_SERVING), then warms up and turns SERVING; ``stop()`` drains and
    checkpoints."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store: SqliteStore | None = None
        self.registry: ModelRegistry | None = None
        self.servicer: TrainerServicer | None = None
        self.predictor: PredictBatcher | None = None
        self.inference = None  # InferenceServicer
        self.health = health.HealthServicer()
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self.metrics = Metrics()
        self._metrics_http = None
        self.curves = None  # TrainingCurves with --tensorboard-dir
        self.streams = StreamBudget(config.max_streams, config.stream_idle_s)

    def _inference_protocol(self):
        """The V2 protocol's generated service module, with ``self.inference``
        set; None when this process cannot load it. Its messages share the
        proto names ``inference.*`` with tritonclient's, and protobuf refuses a
        second definition in one process: a server embedded next to
        tritonclient serves the Trainer service alone and says so."""
        try:
            from gradserve.inference import grpc_service_pb2_grpc as inference_pb_grpc

            from .inference_servicer import InferenceServicer
        except TypeError as exc:  # protobuf: "Couldn't build proto file into descriptor pool: duplicate ..."
            log.warning("event=inference_protocol_off reason=%r (tritonclient's protos are loaded in this "
                        "process; run the server in its own process to serve both)", str(exc))
            return None
        self.inference = InferenceServicer(self.registry, self.predictor, self.servicer.ready, self.metrics)
        return inference_pb_grpc

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> int:
        cfg = self.config
        t0 = time.perf_counter()
        sync = cfg.sqlite_sync or ("FULL" if cfg.durability.mode == "step" else "NORMAL")
        if cfg.ray_address:  # models live in their owner actors, each with its own store under STORE.models/
            from .cluster.frontend import ClusterRegistry
            self.registry = ClusterRegistry(
                address=cfg.ray_address, store=cfg.store, durability=cfg.durability, sqlite_sync=sync,
                limits=cfg.limits, default_device=cfg.default_device, cpus_per_model=cfg.ray_cpus_per_model,
                checksum_steps=cfg.ray_checksum_steps)
        else:
            # --durability none keeps models in memory only: no store is opened
            self.store = SqliteStore(cfg.store, synchronous=sync) if cfg.durability.mode != "none" else None
            self.registry = ModelRegistry(self.store, limits=cfg.limits, durability=cfg.durability,
                                          default_device=cfg.default_device)
        self.predictor = PredictBatcher(self.registry, cfg.batching, self.metrics.inference)
        if cfg.tensorboard_dir:
            from .curves import TrainingCurves
            self.curves = TrainingCurves(cfg.tensorboard_dir)
            log.info("event=training_curves dir=%s", cfg.tensorboard_dir)
        self.servicer = TrainerServicer(self.registry, self.metrics, self.predictor, self.curves)
        inference_pb_grpc = self._inference_protocol()
        self.metrics.models = lambda: len(self.registry.handles())
        self.metrics.durability_stats = self.registry.stats
        self.metrics.pending_by_model = self.predictor.pending_by_model
        self.metrics.served_models = lambda: [h.model_id for h in self.registry.handles()]
        # grpc's own cap sits above ours so the servicer can refuse oversize
        # requests with a message naming --max-message-mb; beyond it grpc refuses.
        cap = 2 * cfg.limits.max_message_bytes + 1024 * 1024
        options = [("grpc.max_receive_message_length", min(cap, 2**31 - 1)),
                   ("grpc.max_send_message_length", min(cap, 2**31 - 1)),
                   ("grpc.so_reuseport", 0)]
        interceptors = [MetricsInterceptor(self.metrics)]
        if cfg.auth_token:
            interceptors.append(BearerTokenInterceptor(cfg.auth_token))
        elif cfg.auth_tokens:
            interceptors.append(BearerTokenInterceptor(cfg.auth_tokens))
        # unary calls keep `workers` threads however many streams are open
        pool = futures.ThreadPoolExecutor(max_workers=cfg.workers + cfg.max_streams, thread_name_prefix="rpc")
        self._server = grpc.server(pool, options=options, interceptors=interceptors)
        # requests arrive as bytes and are parsed in handlers.py (INVALID_ARGUMENT when they do not parse)
        self._server.add_generic_rpc_handlers((parsing_handler(pb.DESCRIPTOR.services_by_name["Trainer"],
                                                               self.servicer, self.streams, TRAINER_IDS),))
        if inference_pb_grpc is not None:
            from gradserve.inference import grpc_service_pb2 as inference_pb
            self._server.add_generic_rpc_handlers((parsing_handler(
                inference_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], self.inference, self.streams,
                INFERENCE_IDS),))
        # health and reflection too: their Watch and ServerReflectionInfo streams count as streams
        self._server.add_generic_rpc_handlers((parsing_handler(health_pb2.DESCRIPTOR.services_by_name["Health"],
                                                               self.health, self.streams),))
        services = (SERVICE_NAME, INFERENCE_SERVICE_NAME) if inference_pb_grpc is not None else (SERVICE_NAME,)
        reflector = reflection.ReflectionServicer(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME))
        self._server.add_generic_rpc_handlers((parsing_handler(
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], reflector, self.streams),))
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_server_credentials(
                [(read(cfg.tls_key), read(cfg.tls_cert))],
                root_certificates=read(cfg.tls_client_ca) if cfg.tls_client_ca else None,
                require_client_auth=bool(cfg.tls_client_ca))
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not bind {cfg.host}:{cfg.port}")
        self._server.start()
        if (cfg.auth_token or cfg.auth_tokens) and not cfg.tls_cert and not is_loopback(cfg.host):
            log.warning("event=plaintext_token host=%s (bearer tokens cross the network unencrypted: serve TLS "
                        "with --tls-cert/--tls-key)", cfg.host)
        if cfg.metrics_port >= 0:
            self._metrics_http = serve_metrics(self.metrics, cfg.host, cfg.metrics_port)
            log.info("event=metrics url=http://%s:%d/metrics", cfg.host, self._metrics_http.server_port)
        log.info("event=listening host=%s port=%d store=%s durability=%s sqlite_sync=%s workers=%d tls=%s "
                 "mtls=%s auth=%s max_streams=%d stream_idle_s=%g max_memory_mb=%.0f health=NOT_SERVING",
                 cfg.host, self.port, cfg.store, cfg.durability.mode, sync.lower(), cfg.workers, bool(cfg.tls_cert),
                 bool(cfg.tls_client_ca), "tenants" if cfg.auth_tokens else bool(cfg.auth_token), cfg.max_streams,
                 cfg.stream_idle_s,
                 cfg.limits.max_memory_mb)
        b = cfg.batching
        log.info("event=dynamic_batching enabled=%s max_queue_delay_us=%d preferred_batch_sizes=%s "
                 "max_batch_size=%d", b.enabled, b.max_queue_delay_us,
                 ",".join(map(str, b.preferred_batch_sizes)) or "-", b.max_batch_size or cfg.limits.max_batch_rows)
        seconds, layer, threads = warm_up_kernels(cfg.kernel_threads, cfg.default_device)
        log.info("event=kernels_warm seconds=%.2f threading_layer=%s kernel_threads=%s numba_num_threads=%s "
                 "blas_threads=%s", seconds, layer, threads.get("budget"),
                 threads.get("numba_num_threads"), threads.get("blas_threads"))
        loaded = self.registry.load_stored()
        self.registry.start_checkpointer()
        self.servicer.ready.set()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("event=serving port=%d models=%d startup_seconds=%.2f", self.port, loaded, time.perf_counter() - t0)
        return self.port

    def stop(self) -> None:
        """Stops accepting calls, lets in-flight calls finish (up to grace_s),
        checkpoints every model and closes the store."""
        log.info("event=shutting_down grace_s=%.1f", self.config.grace_s)
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            # stop() cancels what still runs after the grace period; the wait is
            # bounded too, so a stuck call can never keep the final checkpoint from happening
            if not self._server.stop(self.config.grace_s).wait(self.config.grace_s + 5.0):
                log.warning("event=shutdown_wait_expired grace_s=%.1f (checkpointing anyway)", self.config.grace_s)
        self.streams.close()
        if self.servicer is not None:
            self.servicer.ready.clear()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.curves is not None:
            self.curves.close()
        if self.registry is not None:
            written = self.registry.close()
            log.info("event=checkpointed models=%d", written)
        if self.store is not None:
            self.store.close()
        log.info("event=stopped")


def serve(config: ServerConfig) -> int:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully; returns the exit code."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = GradServer(config)
    try:
        server.start()
    except Exception:
        log.exception("event=start_failed")
        server.stop()
        return 1
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0
