"""The README's usage example runs, unchanged except for the address,
against a real server."""
import re
import subprocess
import sys
from pathlib import Path

from service_fixtures import source_env

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- readme-example --> python block"
    return match.group(1)


def test_readme_example_runs_against_a_real_server(server):
    code = readme_example()
    assert "127.0.0.1:50051" in code
    out = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:50051", server.target)],
                         env=source_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "accuracy 1.0" in out.stdout, out.stdout
