"""gradserve-loadtest against a TLS, token-protected server, over both
protocols. The tool runs as its own process (as a user runs it): with
``--protocol v2`` it loads gradserve's V2 messages, which cannot share a
process with the tritonclient that other test modules import."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_security import make_pki

from service_fixtures import ServerProcess, source_env

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "loadtest-token"
SMALL = ["--layers", "8,16,3", "--batch-size", "4", "--total", "40", "--concurrency", "4", "--format", "json"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    proc = ServerProcess(d / "g.db", "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
                         "--durability", "interval", env={"GRADSERVE_AUTH_TOKEN": TOKEN})
    yield proc, d
    proc.stop()


def run_tool(*argv):
    env = source_env()
    env.pop("GRADSERVE_AUTH_TOKEN", None)  # the token comes from --token or not at all
    return subprocess.run([sys.executable, "-m", "gradserve.client.loadtest", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("protocol, call", [("gradserve", "predict"), ("v2", "infer")])
def test_tool_reaches_a_tls_token_server_over_both_protocols(tls_server, protocol, call):
    proc, d = tls_server
    run = run_tool("--target", f"localhost:{proc.port}", "--tls-ca", str(d / "ca.pem"), "--token", TOKEN,
                   "--protocol", protocol, *SMALL)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["protocol"] == protocol and report["call"] == call
    assert report["count"] == 40 and report["errors"] == 0, report.get("error_messages")


def test_tool_without_the_token_is_refused_and_says_so(tls_server):
    proc, d = tls_server
    run = run_tool("--target", f"localhost:{proc.port}", "--tls-ca", str(d / "ca.pem"), *SMALL)
    assert run.returncode == 1
    assert "UNAUTHENTICATED" in run.stderr
