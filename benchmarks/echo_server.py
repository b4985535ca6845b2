"""A bare gRPC server answering gradserve's Trainer methods with no model
behind them: the floor a gradserve call cannot beat on this machine.

It parses each request as gradserve does (upb protobuf) and replies with a
message of the shape gradserve would send — a (rows, outputs) float32
tensor for Predict, the step figures for TrainStep, one tensor per parameter
for GetGradients — built once and cached, so what is left is gRPC, HTTP/2
and protobuf. ``--raw`` answers every call with its own request bytes
instead (the bare floor of grpcio on loopback).

    python benchmarks/echo_server.py --port 0 --layers 784,512,256,10
prints ``listening on 127.0.0.1:PORT`` once it serves.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gradserve.v1 import trainer_pb2 as pb  # noqa: E402

SERVICE = "gradserve.v1.Trainer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _tensor(shape) -> pb.Tensor:
    n = 1
    for d in shape:
        n *= d
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(shape), data=bytes(4 * n))


class ShapedReplies:
    """Replies of gradserve's shapes for a network of ``layers`` sizes."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self._predict: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._step = 0
        grads = pb.GetGradientsResponse(loss=1.0, step=0)
        for i, (n_in, n_out) in enumerate(zip(layers, layers[1:])):
            grads.gradients.add(name=f"layers.{i}.weight").tensor.CopyFrom(_tensor((n_out, n_in)))
            grads.gradients.add(name=f"layers.{i}.bias").tensor.CopyFrom(_tensor((n_out,)))
        self.gradients = grads.SerializeToString()
        self.train = pb.TrainStepResponse(step=1, loss=1.0, accuracy=0.5, grad_norm=1.0,
                                          lr=1e-3).SerializeToString()
        info = pb.ModelInfo(model_id="echo", num_params=sum(
            (a + 1) * b for a, b in zip(layers, layers[1:])), step=0)
        info.spec.input_size = layers[0]
        for units in layers[1:-1]:
            info.spec.hidden.add(units=units, activation="relu")
        info.spec.output.units = layers[-1]
        info.spec.output.kind = "softmax"
        self.info = info

    def predict(self, request: bytes, context) -> bytes:
        req = pb.PredictRequest.FromString(request)
        rows = req.inputs.shape[0] if req.inputs.shape else 1
        reply = self._predict.get(rows)
        if reply is None:
            reply = pb.PredictResponse(outputs=_tensor((rows, self.layers[-1]))).SerializeToString()
            with self._lock:
                self._predict[rows] = reply
        return reply

    def train_step(self, request: bytes, context) -> bytes:
        pb.TrainStepRequest.FromString(request)
        return self.train

    def get_gradients(self, request: bytes, context) -> bytes:
        pb.GetGradientsRequest.FromString(request)
        return self.gradients

    def create_model(self, request: bytes, context) -> bytes:
        req = pb.CreateModelRequest.FromString(request)
        info = pb.ModelInfo()
        info.CopyFrom(self.info)
        info.model_id = req.model_id or f"echo-{os.urandom(4).hex()}"
        return info.SerializeToString()

    def get_model(self, request: bytes, context) -> bytes:
        info = pb.ModelInfo()
        info.CopyFrom(self.info)
        info.model_id = pb.GetModelRequest.FromString(request).model_id
        return info.SerializeToString()

    def empty(self, request: bytes, context) -> bytes:
        return b""


def _echo(request: bytes, context) -> bytes:
    return request


class EchoHandler(grpc.GenericRpcHandler):
    """Routes Trainer's unary methods to raw-bytes handlers (no
    serializers: the handlers see and return bytes)."""

    def __init__(self, raw: bool, layers: list[int]):
        if raw:
            self.methods = None
        else:
            r = ShapedReplies(layers)
            self.methods = {
                "Predict": r.predict, "TrainStep": r.train_step, "GetGradients": r.get_gradients,
                "CreateModel": r.create_model, "GetModel": r.get_model, "DeleteModel": r.empty,
                "ListModels": r.empty,
            }

    def service(self, handler_call_details):
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if self.methods is None:
            return grpc.unary_unary_rpc_method_handler(_echo)
        if service != SERVICE or method not in self.methods:  # health, or UNIMPLEMENTED
            return None  # UNIMPLEMENTED
        return grpc.unary_unary_rpc_method_handler(self.methods[method])


def serve(host: str, port: int, workers: int, raw: bool, layers: list[int]) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((EchoHandler(raw, layers),))
    if not raw:  # so the same readiness check serves both servers
        from grpc_health.v1 import health, health_pb2_grpc
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    ap.add_argument("--workers", type=int, default=8, help="gRPC thread-pool size")
    ap.add_argument("--layers", default="784,512,256,10", help="network sizes for reply shapes")
    ap.add_argument("--raw", action="store_true", help="echo each request's bytes back")
    args = ap.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    server, port = serve(args.host, args.port, args.workers, args.raw, layers)
    print(f"listening on {args.host}:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
