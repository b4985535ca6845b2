"""Real gradserve servers for the service tests, started the way a user
starts one: ``python -m gradserve.server.cli serve`` in a subprocess, on a free
loopback port, with a SQLite file under a temporary directory.

Import the fixtures you use into a test module (``from service_fixtures
import server, client``). ``server`` is one process for the whole session,
shared by every module that imports it; ``ServerProcess`` starts private
ones (the durability tests kill theirs)."""
from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The source roots of this checkout (the namespace package ``gradserve`` spans
# them); child processes get them on PYTHONPATH, as pytest's ``pythonpath``.
SOURCE_ROOTS = [str(ROOT / d) for d in ("client", "server", "nnkernels")]


def source_env(**extra) -> dict:
    """os.environ with this checkout's source roots first on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*SOURCE_ROOTS, env.get("PYTHONPATH")]))
    return env

# The shared server's limits are small enough to test against and large
# enough for every other test (784-512-256-10 has 535,818 parameters).
SHARED_FLAGS = ["--max-layers", "8", "--max-params", "1000000", "--max-batch-rows", "20000",
                "--max-message-mb", "8", "--workers", "8", "--metrics-port", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m gradserve.server.cli serve --port 0`` (any free port, read back from
    its log), logging to a file; the start-up includes Numba's warm-up, which
    can take minutes when the kernel cache is cold."""

    def __init__(self, store: Path, *flags: str, env: dict | None = None, startup_timeout: float = 300):
        self.store = Path(store)
        self.log_path = self.store.with_suffix(f".{time.time_ns()}.log")
        self.flags = flags
        self.port = 0  # the server binds any free port (no race with other processes) and logs it
        environment = source_env(**(env or {}))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server.cli", "serve", "--port", "0", "--store", str(self.store),
             *flags], cwd=ROOT, env=environment, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_serving(startup_timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"event=serving port=(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not serving after {timeout} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


_shared: dict[str, ServerProcess] = {}


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """The session's shared server (started on first use, stopped at exit)."""
    if "server" not in _shared:
        _shared["server"] = ServerProcess(tmp_path_factory.mktemp("shared") / "gradserve.db", *SHARED_FLAGS)
        atexit.register(_shared["server"].stop)
    proc = _shared["server"]
    assert proc.proc.poll() is None, proc.log()
    return proc


@pytest.fixture
def client(server):
    from gradserve.client import Client
    with Client(server.target, timeout=120, max_message_mb=8) as c:
        yield c
