"""benchmarks/cuda.py stays runnable: its --smoke mode (tiny network,
PyTorch on the CPU, allowed under the simulator) exercises every code path
of the real GPU benchmark except the device choice."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_smoke():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5-4-3" in proc.stdout and "train" in proc.stdout and "predict" in proc.stdout
    assert "ratio" in proc.stdout


def test_benchmark_script_refuses_the_simulator_for_timings():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "NUMBA_ENABLE_CUDASIM" in proc.stderr
