"""The README's SDK example runs as written (in a subprocess, through an embedded server)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
