"""The README's SDK example runs as written (in a subprocess, through an embedded server)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from optional import require

ROOT = Path(__file__).resolve().parent.parent


def test_readme_sdk_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The SDK"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(code + "\nprint(f'{losses[0]:.4f} {losses[-1]:.4f} {sorted(params)}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last, names = result.stdout.split(" ", 2)
    assert float(last) < 0.5 * float(first)
    assert names.strip() == "['W1', 'W2', 'b1', 'b2']"


def run_block(code: str, tmp_path: Path) -> str:
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def test_readme_real_networks_example_runs(tmp_path: Path) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", section("Real networks"), re.S)
    out = run_block(code, tmp_path)
    assert "['bn1.running_mean', 'bn1.running_var']" in out
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert last < 0.5 * first


def test_readme_onnx_example_trains_an_exported_model_remotely(tmp_path: Path) -> None:
    require("torch", "pip install torch==2.13.0")
    require("onnxscript", "pip install onnxscript")
    require("sklearn", "pip install 'gradgate[examples]'")
    (code,) = re.findall(r"```python\n(.*?)```", section("ONNX import"), re.S)
    out = run_block(code, tmp_path)
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert last < 0.3 * first
    assert float(re.search(r"accuracy ([0-9.]+)", out).group(1)) >= 0.9
