"""Mutual TLS and bearer-token auth on a real server (certificates made with
the openssl CLI for this test)."""
import shutil
import subprocess

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from service_fixtures import ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
TOKEN = "s3cret-token"


def make_pki(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", *(["-extfile", "san.cnf"] if name == "server" else []))


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    proc = ServerProcess(d / "g.db", "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
                         "--tls-client-ca", str(d / "ca.pem"), env={"GRADSERVE_AUTH_TOKEN": TOKEN})
    yield proc, d
    assert proc.stop() == 0


def test_client_with_certificate_and_token_trains(secure_server):
    proc, d = secure_server
    with Client(proc.target, token=TOKEN, tls_ca=str(d / "ca.pem"), tls_cert=str(d / "client.pem"),
                tls_key=str(d / "client.key"), timeout=30) as c:
        model = c.create_model(2, hidden=[4], output=1)
        assert model.train_step(np.ones((3, 2), np.float32), np.ones((3, 1), np.float32)).step == 1
        results = list(model.train_stream([(np.ones((3, 2), np.float32), np.ones((3, 1), np.float32))]))
        assert results[0].step == 2


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, token):
    proc, d = secure_server
    with Client(proc.target, token=token, tls_ca=str(d / "ca.pem"), tls_cert=str(d / "client.pem"),
                tls_key=str(d / "client.key"), timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_models()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_without_certificate_cannot_connect(secure_server):
    proc, d = secure_server
    with Client(proc.target, token=TOKEN, tls_ca=str(d / "ca.pem"), timeout=10, retries=0) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_models()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(secure_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    proc, d = secure_server
    creds = grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(), (d / "client.key").read_bytes(),
                                         (d / "client.pem").read_bytes())
    with grpc.secure_channel(proc.target, creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
