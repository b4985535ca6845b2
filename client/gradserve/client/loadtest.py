"""gradserve-loadtest: put load on a gradserve server and report latencies
like ghz (count, RPS, fastest/average/slowest, percentiles, histogram,
status codes, grouped errors), as text or JSON.

Closed loop by default: ``--concurrency`` callers on one asyncio loop, each
issuing its next call when the previous one returns; ``--rps`` makes it an
open loop at that rate. Requests are built and serialized once per model
before the run and sent as bytes, so the hot loop costs one grpc.aio call
and one histogram record: the tool measures the server, not itself.

    gradserve-loadtest --target 127.0.0.1:50051 --call predict \\
        --concurrency 16 --duration 10s --models 4 --batch-size 1

It creates ``--models`` models from the spec flags and deletes them at the
end (also on Ctrl-C), or uses the ``--model-id`` models it is given.
``--protocol v2`` (or the call kind ``infer``) sends inference as the Open
Inference Protocol's ModelInfer instead of Predict; model management stays
on gradserve's own service. ``--tls-ca`` and ``--token`` reach TLS and
token-protected servers.
Imports grpc, numpy, hdrh and gradserve's messages only (never numba).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass

import grpc
import numpy as np

from gradserve.client.loadtest_runner import CallKind, format_report, result_to_dict, run_load, run_load_threads
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.specmsg import spec_to_message
from gradserve.wire.tensor import encode_tensor

SERVICE = "/gradserve.v1.Trainer/"
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
CALLS = {"predict": SERVICE + "Predict", "train-step": SERVICE + "TrainStep",
         "gradients": SERVICE + "GetGradients", "infer": INFERENCE_SERVICE + "ModelInfer"}
THREADS_UP_TO = 8  # --engine auto: threads for this many callers or fewer
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


# ---------------------------------------------------------------- flag parsing

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'10s', '500ms', '2m', '1.5' (seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 10s, 500ms, 2m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_warmup(text: str) -> tuple[int, float]:
    """'100' -> 100 calls; '2s' / '500ms' -> seconds. Returns (calls, seconds)."""
    if text.strip().isdigit():
        return int(text), 0.0
    return 0, parse_duration(text)


def parse_mix(text: str) -> dict[str, int]:
    """'predict=8,train-step=2' -> {'predict': 8, 'train-step': 2}."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in CALLS:
            raise argparse.ArgumentTypeError(f"--mix: unknown call {name!r}; one of {', '.join(CALLS)}")
        try:
            mix[name] = int(weight) if weight else 1
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix: weight of {name} must be an integer, got {weight!r}")
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"--mix: weight of {name} must be >= 0")
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("--mix: needs one positive weight")
    return {k: v for k, v in mix.items() if v > 0}


def parse_layers(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers: comma-separated sizes, got {text!r}")
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--layers: input,hidden...,output sizes >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gradserve-loadtest",
        description="Closed- or open-loop load against a gradserve server, with a ghz-like report.")
    ap.add_argument("--target", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    ap.add_argument("--call", default="predict", choices=[*CALLS, "mixed"],
                    help="which RPC to call ('infer': the V2 protocol's ModelInfer); 'mixed' follows --mix "
                         "(default %(default)s)")
    ap.add_argument("--protocol", default="gradserve", choices=["gradserve", "v2"],
                    help="v2: send predict calls as the Open Inference Protocol's ModelInfer (KServe V2, "
                         "as tritonclient does) (default %(default)s)")
    ap.add_argument("--mix", type=parse_mix, default=None,
                    help="ratio of calls for --call mixed, e.g. predict=8,train-step=2")
    ap.add_argument("-c", "--concurrency", type=int, default=1, help="concurrent callers (default 1)")
    stop = ap.add_mutually_exclusive_group()
    stop.add_argument("-z", "--duration", type=parse_duration, default=None,
                      help="measure for this long, e.g. 10s (default 10s unless --total)")
    stop.add_argument("-n", "--total", type=int, default=None, help="measure this many calls")
    ap.add_argument("--warmup", type=parse_warmup, default=(0, 0.0),
                    help="calls (e.g. 50) or time (e.g. 2s) before measuring, not counted")
    ap.add_argument("--rps", type=float, default=None,
                    help="open loop: start calls at this rate (latency counted from the scheduled time)")
    ap.add_argument("--connections", type=int, default=1,
                    help="gRPC channels (HTTP/2 connections) shared round-robin by the callers")
    ap.add_argument("--engine", default="auto", choices=["auto", "aio", "threads"],
                    help="callers as grpc.aio coroutines on one loop, or as threads making blocking "
                         "calls; auto: threads up to %d callers, aio above (lower tool overhead "
                         "measured each way)" % THREADS_UP_TO)
    ap.add_argument("--call-timeout", type=parse_duration, default=30.0,
                    help="deadline of each call (default 30s)")
    ap.add_argument("--tls-ca", default=None,
                    help="PEM file of the CA that signed the server's certificate: connect with TLS")
    ap.add_argument("--tls-cert", default=None, help="PEM client certificate, for mutual TLS (with --tls-key)")
    ap.add_argument("--tls-key", default=None, help="PEM client private key, for mutual TLS")
    ap.add_argument("--token", default=os.environ.get("GRADSERVE_AUTH_TOKEN") or None,
                    help="bearer token sent with every call (default: $GRADSERVE_AUTH_TOKEN)")
    models = ap.add_argument_group("models")
    models.add_argument("--model-id", action="append", default=[],
                        help="use this existing model (repeatable, or comma-separated); "
                             "the tool then creates none")
    models.add_argument("--models", type=int, default=1,
                        help="models to create and spread the callers over (default 1)")
    models.add_argument("--layers", type=parse_layers, default=parse_layers("784,512,256,10"),
                        help="input,hidden...,output sizes (default 784,512,256,10)")
    models.add_argument("--activation", default="relu", help="hidden activation (default relu)")
    models.add_argument("--output-kind", default="softmax", choices=["identity", "sigmoid", "softmax"])
    models.add_argument("--optimizer", default="adam", help="optimizer name (default adam)")
    models.add_argument("--lr", type=float, default=None, help="learning rate (optimizer default)")
    models.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    models.add_argument("--device", default="", help="cpu or cuda (server default)")
    models.add_argument("-b", "--batch-size", type=int, default=32, help="rows per call (default 32)")
    models.add_argument("--seed", type=int, default=0, help="seed of models and data")
    out = ap.add_argument_group("output")
    out.add_argument("--format", default="text", choices=["text", "json"])
    out.add_argument("-o", "--output", default=None, help="write the report to this file")
    return ap


# ---------------------------------------------------------------- models and payloads

@dataclass(frozen=True)
class Shape:
    """What the payloads need to know of a model."""
    input_size: int
    output_units: int
    output_kind: str
    dtype: str


def spec_from_args(args) -> dict:
    layers = args.layers
    optimizer = {"name": args.optimizer}
    if args.lr is not None:
        optimizer["lr"] = args.lr
    spec = {
        "input_size": layers[0],
        "hidden": [{"units": u, "activation": args.activation} for u in layers[1:-1]],
        "output": {"units": layers[-1], "kind": args.output_kind},
        "optimizer": optimizer,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    if args.device:
        spec["device"] = args.device
    return spec


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: TLS roots (and client pair) and a bearer
    token sent as call metadata."""
    target: str
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_args(cls, args) -> "Connection":
        def read(path):
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()
        return cls(args.target, read(args.tls_ca), read(args.tls_cert), read(args.tls_key), args.token)

    @property
    def metadata(self) -> tuple | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _credentials(self):
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        return grpc.secure_channel(self.target, self._credentials(), options=_CHANNEL_OPTIONS)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.target, self._credentials(), options=_CHANNEL_OPTIONS)


def as_connection(target) -> Connection:
    return target if isinstance(target, Connection) else Connection(target)


def infer_request(model_id: str, X: np.ndarray) -> bytes:
    """A serialized V2 ModelInferRequest of ``X`` as raw contents (as
    tritonclient sends it). The generated V2 code is imported here only: it
    cannot share a process with tritonclient's copy of the same protos."""
    from gradserve.inference import grpc_service_pb2 as v2
    req = v2.ModelInferRequest(model_name=model_id)
    req.inputs.add(name="inputs", datatype="FP32" if X.dtype == np.float32 else "FP64", shape=X.shape)
    req.raw_input_contents.append(np.ascontiguousarray(X, X.dtype.newbyteorder("<")).tobytes())
    return req.SerializeToString()


def make_payloads(model_ids: list[str], shape: Shape, batch: int, calls, seed: int) -> dict[str, list[bytes]]:
    """One serialized request per call kind and model: the same batch for
    every model, random inputs and valid targets for the output kind."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if shape.dtype == "float32" else np.float64
    X = rng.standard_normal((batch, shape.input_size)).astype(dtype)
    if shape.output_kind == "softmax":
        y = rng.integers(0, shape.output_units, size=batch, dtype=np.int64)
    elif shape.output_kind == "sigmoid":
        y = (rng.random((batch, shape.output_units)) < 0.5).astype(dtype)
    else:
        y = rng.standard_normal((batch, shape.output_units)).astype(dtype)
    inputs = encode_tensor(X, "inputs")
    targets = encode_tensor(y, "targets")
    out: dict[str, list[bytes]] = {}
    for call in calls:
        reqs = []
        for mid in model_ids:
            if call == "infer":
                reqs.append(infer_request(mid, X))
                continue
            if call == "predict":
                req = pb.PredictRequest(model_id=mid, inputs=inputs)
            elif call == "train-step":
                req = pb.TrainStepRequest(model_id=mid, inputs=inputs, targets=targets)
            else:
                req = pb.GetGradientsRequest(model_id=mid, inputs=inputs, targets=targets)
            reqs.append(req.SerializeToString())
        out[call] = reqs
    return out


class ModelSet:
    """The models a run uses: created here (and deleted by ``close``) or
    given. Management calls go over a plain blocking channel."""

    def __init__(self, target: "str | Connection", timeout: float = 60.0):
        connection = as_connection(target)
        self.channel = connection.channel()
        self.metadata = connection.metadata
        self.timeout = timeout
        self._create = self.channel.unary_unary(
            SERVICE + "CreateModel", request_serializer=pb.CreateModelRequest.SerializeToString,
            response_deserializer=pb.ModelInfo.FromString)
        self._get = self.channel.unary_unary(
            SERVICE + "GetModel", request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=pb.ModelInfo.FromString)
        self._delete = self.channel.unary_unary(
            SERVICE + "DeleteModel", request_serializer=pb.DeleteModelRequest.SerializeToString,
            response_deserializer=pb.DeleteModelResponse.FromString)
        self.created: list[str] = []

    def create(self, spec: dict, count: int) -> list[str]:
        """Create ``count`` models with ids chosen here, so that a model
        whose reply was lost to Ctrl-C is still deleted."""
        prefix = f"loadtest-{os.getpid()}-{os.urandom(3).hex()}"
        for i in range(count):
            mid = f"{prefix}-{i}"
            req = pb.CreateModelRequest(model_id=mid)
            spec_to_message(spec, req.spec)
            self.created.append(mid)
            self._create(req, timeout=self.timeout, metadata=self.metadata)
        return list(self.created)

    def shape_of(self, model_id: str) -> Shape | None:
        try:
            info = self._get(pb.GetModelRequest(model_id=model_id), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError:
            return None
        return Shape(info.spec.input_size, info.spec.output.units,
                     info.spec.output.kind or "identity", info.spec.dtype or "float32")

    def close(self) -> list[str]:
        """Delete the created models; returns the ids it could not delete."""
        failed = []
        for mid in self.created:
            try:
                self._delete(pb.DeleteModelRequest(model_id=mid), timeout=min(self.timeout, 10.0),
                             metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    failed.append(mid)
        self.created = []
        self.channel.close()
        return failed


# ---------------------------------------------------------------- the run

def build_calls(channels, payloads: dict[str, list[bytes]], mix: dict[str, int], concurrency: int,
                batch: int, call_timeout: float, metadata=None) -> list[CallKind]:
    """Call kinds whose invoke(caller, n) sends the n-th request of a caller
    (channels of grpc.aio: invoke returns an awaitable; blocking: it blocks):
    caller i on channel i mod C, model (i + n·N) mod K — so with K dividing
    N each caller keeps to one model, and with K > N callers rotate."""
    kinds = []
    n_channels = len(channels)
    for call, weight in mix.items():
        reqs = payloads[call]
        k = len(reqs)
        methods = [ch.unary_unary(CALLS[call]) for ch in channels]  # bytes in, bytes out

        def invoke(i, n, methods=methods, reqs=reqs, k=k):
            return methods[i % n_channels](reqs[(i + n * concurrency) % k], timeout=call_timeout,
                                           metadata=metadata)

        kinds.append(CallKind(call, invoke, weight, rows=batch))
    return kinds


def _run_bounds(args) -> dict:
    warm_calls, warm_s = args.warmup
    duration = args.duration if args.total is None else None
    if args.total is None and duration is None:
        duration = 10.0
    return dict(concurrency=args.concurrency, total=args.total, duration_s=duration,
                warmup_calls=warm_calls, warmup_s=warm_s, rps=args.rps,
                max_run_s=(duration or 0) + warm_s + 600.0)


async def run_calls(target, payloads, mix, args, stop_event: asyncio.Event | None = None):
    """The run on the aio engine."""
    connection = as_connection(target)
    channels = [connection.aio_channel() for _ in range(max(1, args.connections))]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), timeout=30)
        kinds = build_calls(channels, payloads, mix, args.concurrency, args.batch_size, args.call_timeout,
                            connection.metadata)
        return await run_load(kinds, stop_event=stop_event, **_run_bounds(args))
    finally:
        for ch in channels:
            await ch.close()


def run_calls_threads(target, payloads, mix, args):
    """The run on the threads engine; the first Ctrl-C ends it early and
    keeps the figures, a second one interrupts at once."""
    connection = as_connection(target)
    channels = [connection.channel() for _ in range(max(1, args.connections))]
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        kinds = build_calls(channels, payloads, mix, args.concurrency, args.batch_size, args.call_timeout,
                            connection.metadata)
        return run_load_threads(kinds, stop_event=stop, **_run_bounds(args))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for ch in channels:
            ch.close()


def engine_for(args) -> str:
    if args.engine != "auto":
        return args.engine
    return "threads" if args.concurrency <= THREADS_UP_TO else "aio"


async def _run_with_signals(target, payloads, mix, args):
    """The run, where the first Ctrl-C (or SIGTERM) ends it early and keeps
    the figures; a second one interrupts at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal():
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        return await run_calls(target, payloads, mix, args, stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.models < 1 or args.batch_size < 1 or args.connections < 1:
        print("gradserve-loadtest: --concurrency, --models, --batch-size and --connections must be >= 1",
              file=sys.stderr)
        return 2
    if args.total is not None and args.total < 1:
        print("gradserve-loadtest: --total must be >= 1", file=sys.stderr)
        return 2
    if args.call == "mixed":
        mix = args.mix or {"predict": 8, "train-step": 2}
    else:
        if args.mix:
            print("gradserve-loadtest: --mix needs --call mixed", file=sys.stderr)
            return 2
        mix = {args.call: 1}
    if args.protocol == "v2":
        mix = {("infer" if k == "predict" else k): v for k, v in mix.items()}
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        print("gradserve-loadtest: --tls-cert and --tls-key go together, with --tls-ca", file=sys.stderr)
        return 2
    try:
        connection = Connection.from_args(args)
    except OSError as e:
        print(f"gradserve-loadtest: {e}", file=sys.stderr)
        return 2
    given = [m for ids in args.model_id for m in ids.split(",") if m]
    models = ModelSet(connection)
    failed_cleanup: list[str] = []
    try:
        spec = spec_from_args(args)
        flag_shape = Shape(args.layers[0], args.layers[-1], args.output_kind, args.dtype)
        if given:
            ids = given
            shape = models.shape_of(ids[0]) or flag_shape
        else:
            try:
                ids = models.create(spec, args.models)
            except grpc.RpcError as e:
                print(f"gradserve-loadtest: creating models failed: {e.code().name}: {e.details()}",
                      file=sys.stderr)
                return 1
            shape = flag_shape
        payloads = make_payloads(ids, shape, args.batch_size, mix, args.seed)
        engine = engine_for(args)
        if engine == "threads":
            result = run_calls_threads(connection, payloads, mix, args)
        else:
            result = asyncio.run(_run_with_signals(connection, payloads, mix, args))
    except KeyboardInterrupt:
        print("gradserve-loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        failed_cleanup = models.close()
        if failed_cleanup:
            print(f"gradserve-loadtest: could not delete models {failed_cleanup}", file=sys.stderr)
    report = result_to_dict(
        result, target=args.target, call=",".join(mix) if args.call != "mixed" else
        ",".join(f"{k}={v}" for k, v in mix.items()), protocol=args.protocol,
        engine=engine, models=len(ids), model_ids=ids, models_created=not given, batch_size=args.batch_size,
        layers=[shape.input_size, *args.layers[1:-1], shape.output_units])
    text = json.dumps(report, indent=2) + "\n" if args.format == "json" else format_report(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
