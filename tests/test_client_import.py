"""The client distribution stays light: it installs alone, without numba,
scipy or tbb, and importing it loads none of the server side."""
import shutil
import subprocess
import sys
import venv

from service_fixtures import ROOT, source_env


def test_importing_client_does_not_import_numba_nnkernels_or_server():
    code = ("import sys; from gradserve.client import Client, AsyncClient; "
            "bad = [m for m in ('numba', 'scipy', 'gradserve.nnkernels', 'gradserve.server') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], env=source_env(), check=True)


def test_client_distribution_installs_alone_without_numba(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    source = shutil.copytree(ROOT / "client", tmp_path / "client",  # a build writes next to its sources
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
                   check=True, timeout=600, cwd=tmp_path)
    code = ("import importlib.util, numpy; from gradserve.client import Client; import gradserve.wire.tensor; "
            "missing = [m for m in ('numba', 'scipy', 'tbb', 'gradserve.server', 'gradserve.nnkernels') "
            "if importlib.util.find_spec(m) is not None]; assert not missing, missing; print(Client.__module__)")
    out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "gradserve.client.sync"
