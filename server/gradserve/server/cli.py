"""``gradserve serve``: every setting is a flag with an environment-variable
twin (``--max-message-mb`` <-> ``GRADSERVE_MAX_MESSAGE_MB``); a flag given on
the command line wins over its variable."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .limits import Limits
from .registry import Durability

# (flag, type, default, help)
SERVE_FLAGS = [
    ("host", str, "127.0.0.1", "address to listen on"),
    ("port", int, 50051, "port (0: any free port; the log line event=serving names it)"),
    ("store", str, "./gradserve.db", "SQLite file holding every model's spec and snapshots (the mutation log "
                                     "lives beside it, in STORE.mutations/)"),
    ("durability", str, "step", "step: log every mutation (a step's batch, set-weights) and make it durable "
                                "before replying, snapshots in the background; interval: snapshots only, every "
                                "--checkpoint-steps or --checkpoint-seconds and at shutdown; none: memory only"),
    ("sqlite-sync", str, "", "full: fsync every snapshot commit (survives power loss); normal: survives a process "
                             "crash only; empty: full for step durability, normal for interval"),
    ("checkpoint-steps", int, 1000, "snapshot a model after this many mutations"),
    ("checkpoint-seconds", float, 60.0, "snapshot a changed model after this many seconds"),
    ("checkpoint-log-mb", float, 64.0, "step durability: snapshot a model once it logged this many MiB since its "
                                       "last snapshot"),
    ("checkpoint-replay-seconds", float, 0.25, "step durability: snapshot a model once its steps since the last "
                                               "snapshot took this long to compute (bounds its replay at restart)"),
    ("log-segment-mb", float, 64.0, "step durability: size of one mutation-log segment file"),
    ("workers", int, 8, "gRPC worker threads for unary calls (streams have threads of their own)"),
    ("max-streams", int, 8, "streaming calls (TrainStream) open at once; more are refused with RESOURCE_EXHAUSTED"),
    ("stream-idle-s", float, 300.0, "cancel a TrainStream that sends and receives nothing for this long "
                                    "(0: never)"),
    ("max-message-mb", float, Limits.max_message_mb, "largest request or reply, MiB"),
    ("max-models", int, Limits.max_models, "models per server"),
    ("max-params", int, Limits.max_params, "parameters per model"),
    ("max-batch-rows", int, Limits.max_batch_rows, "rows per batch (train, gradients, predict)"),
    ("max-layers", int, Limits.max_layers, "dense layers per model (hidden + output)"),
    ("max-memory-mb", float, 0.0, "memory all models may need at worst (parameters, optimizer state, "
                                  "workspaces for --max-batch-rows), MiB; a create over it is refused; "
                                  "0: half the machine's physical memory"),
    ("max-dataset-mb", float, Limits.max_dataset_mb, "largest data set (inputs + targets) UploadDataset stores, MiB"),
    ("max-datasets-mb", float, Limits.max_datasets_mb, "all stored data sets together, MiB"),
    ("default-device", str, "cpu", "device for specs that name none (cpu, cuda)"),
    ("kernel-threads", int, 0, "threads one kernel call may use (Numba and BLAS); 0: all cores. "
                               "Under many concurrent callers about cores / concurrent calls is best"),
    ("grace-s", float, 10.0, "seconds in-flight calls get to finish at shutdown"),
    ("log-level", str, "info", "debug, info, warning, error"),
    ("log-format", str, "kv", "kv (key=value) or json"),
    ("dynamic-batching", str, "on", "coalesce concurrent Predict/ModelInfer calls to one model into one kernel "
                                    "call (on, off)"),
    ("max-queue-delay-us", int, 0, "dynamic batching: how long the oldest queued call may wait for more rows "
                                   "before its batch runs, microseconds; 0 (Triton's default): never wait, "
                                   "batches form from the calls that queued while the previous batch ran"),
    ("preferred-batch-sizes", str, "", "dynamic batching: comma-separated row counts to prefer (e.g. 64,256); "
                                       "waiting stops once the largest is queued"),
    ("max-batch-size", int, 0, "dynamic batching: most rows in one kernel call (0: --max-batch-rows); "
                               "a larger single call still runs, alone"),
    ("metrics-port", int, -1, "serve Prometheus metrics on http://HOST:PORT/metrics (-1: off; 0: any free port)"),
    ("auth-token", str, "", "when set, every Trainer call must carry 'authorization: Bearer <token>' "
                            "(health and reflection stay open); prefer the environment twin"),
    ("auth-token-file", str, "", "read the bearer token from this file (first line) instead of --auth-token, "
                                 "which any user can read in the process list"),
    ("auth-tokens", str, "", "tenants: a file of 'tenant token' lines ('#' comments); each tenant sees only the "
                             "models it created, tenant 'admin' sees all (not with --auth-token/--auth-token-file)"),
    ("tls-cert", str, "", "PEM certificate chain: serve TLS instead of plaintext (with --tls-key)"),
    ("tls-key", str, "", "PEM private key for --tls-cert"),
    ("tls-client-ca", str, "", "PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    ("tensorboard-dir", str, "", "write each model's loss, accuracy, lr and gradient norm per step as TensorBoard "
                                 "event files, one run directory per model (needs gradserve[tensorboard])"),
    # --ray-address: a stateless front-end of a Ray cluster (gradserve.server.cluster; needs gradserve[ray])
    ("ray-address", str, "", "serve models from a Ray cluster: its address, 'auto', or 'local' to start one "
                             "here; each model lives in a named actor, replicas=N trains on N actors "
                             "(needs gradserve[ray]); empty: this process holds every model"),
    ("ray-cpus-per-model", float, 1.0, "--ray-address: CPUs each model's owner (replicas=1) or each replica "
                                       "reserves; its kernel thread budget"),
    ("ray-checksum-steps", int, 100, "--ray-address: compare the replicas' checksums every this many steps"),
]
CHOICES = {"durability": ("step", "interval", "none"), "sqlite-sync": ("", "full", "normal"),
           "log-format": ("kv", "json"), "dynamic-batching": ("on", "off"),
           "log-level": ("debug", "info", "warning", "error")}


def env_name(flag: str) -> str:
    return "GRADSERVE_" + flag.upper().replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description="gradserve: MLP training as a gRPC service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server",
                           description="Run the gRPC server. Each flag has an environment twin GRADSERVE_<FLAG>.")
    for flag, typ, default, help_ in SERVE_FLAGS:
        env = env_name(flag)
        value = os.environ.get(env)
        shown = "(unset)" if flag == "auth-token" else default
        serve.add_argument(f"--{flag}", type=typ, default=typ(value) if value is not None else default,
                           choices=CHOICES.get(flag), help=f"{help_} [env {env}; default {shown}]")
    return parser


def config_from_args(args):
    from .app import ServerConfig
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise SystemExit("gradserve: --tls-cert and --tls-key go together; --tls-client-ca needs both")
    token = args.auth_token
    if args.auth_token_file:
        if token:
            raise SystemExit("gradserve: give --auth-token or --auth-token-file, not both")
        try:
            with open(args.auth_token_file) as f:
                token = f.readline().strip()
        except OSError as exc:
            raise SystemExit(f"gradserve: --auth-token-file: {exc}") from None
        if not token:
            raise SystemExit(f"gradserve: --auth-token-file {args.auth_token_file}: the first line is empty")
    elif token and os.environ.get(env_name("auth-token")) != token:
        logging.getLogger("gradserve.server").warning(
            "event=auth_token_in_argv (every user of this machine can read it in the process list; use "
            "--auth-token-file or the environment variable %s)", env_name("auth-token"))
    tokens = {}
    if args.auth_tokens:
        if token:
            raise SystemExit("gradserve: give --auth-tokens (tenants) or --auth-token/--auth-token-file "
                             "(one token), not both")
        from .tenants import parse_tokens
        try:
            with open(args.auth_tokens) as f:
                tokens = parse_tokens(f.read(), f"--auth-tokens {args.auth_tokens}")
        except (OSError, ValueError) as exc:
            raise SystemExit(f"gradserve: {exc}") from None
    try:
        durability = Durability(args.durability, args.checkpoint_steps, args.checkpoint_seconds,
                                args.checkpoint_log_mb, args.checkpoint_replay_seconds, args.log_segment_mb)
    except ValueError as exc:
        raise SystemExit(f"gradserve: {exc}") from None
    if args.durability == "step" and args.sqlite_sync == "normal":
        # the log is trimmed behind snapshots: a snapshot a power loss can undo would take its log with it
        raise SystemExit("gradserve: --sqlite-sync normal does not go with --durability step (the mutation log "
                         "is trimmed behind snapshots, which must be fsynced); use full, or --durability interval")
    return ServerConfig(
        host=args.host, port=args.port, store=args.store,
        durability=durability,
        sqlite_sync=args.sqlite_sync,
        workers=args.workers, max_streams=args.max_streams, stream_idle_s=args.stream_idle_s,
        limits=Limits(max_models=args.max_models, max_params=args.max_params, max_batch_rows=args.max_batch_rows,
                      max_message_mb=args.max_message_mb, max_layers=args.max_layers,
                      max_dataset_mb=args.max_dataset_mb, max_datasets_mb=args.max_datasets_mb,
                      **({"max_memory_mb": args.max_memory_mb} if args.max_memory_mb > 0 else {})),
        default_device=args.default_device, grace_s=args.grace_s,
        kernel_threads=args.kernel_threads, metrics_port=args.metrics_port, auth_token=token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        batching=batching_from_args(args), tensorboard_dir=args.tensorboard_dir, auth_tokens=tokens,
        ray_address=args.ray_address, ray_cpus_per_model=args.ray_cpus_per_model,
        ray_checksum_steps=args.ray_checksum_steps)


def batching_from_args(args):
    from .batching import BatchingConfig
    try:
        preferred = tuple(int(p) for p in args.preferred_batch_sizes.split(",") if p.strip())
        return BatchingConfig(enabled=args.dynamic_batching == "on", max_queue_delay_us=args.max_queue_delay_us,
                              preferred_batch_sizes=preferred, max_batch_size=args.max_batch_size)
    except ValueError as exc:
        raise SystemExit(f"gradserve: dynamic batching: {exc}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import logs
    logs.configure(args.log_level, args.log_format)
    from .app import serve
    return serve(config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
