"""The client library stays light: no numba, no nnkernels, no server."""
import subprocess
import sys


def test_importing_client_does_not_import_numba_nnkernels_or_server():
    code = ("import sys, client; from client import Client, AsyncClient; "
            "bad = [m for m in ('numba', 'nnkernels', 'server') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
