"""The SDK ships py.typed, so its hints are part of its API: both packages type-check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_packages_type_check_with_mypy(tmp_path: Path) -> None:
    env = {**os.environ, "MYPYPATH": f"{ROOT / 'client'}{os.pathsep}{ROOT / 'server'}"}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--exclude", "/v1/",
         "--cache-dir", str(tmp_path / "mypy-cache"), "client/gradgate", "server/gradgate_server"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
