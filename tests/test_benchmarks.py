"""The benchmark command runs (quick mode), so it cannot rot. Its timings are never asserted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_mode_writes_every_target(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for target in ("T7 batch 1 ", "T7 batch 256 ", "T2 batch 1 ", "T2 batch 256 ", "T3 3-4-4-1 net",
                   "3-4-4-1 net, forward + backward", "T16 16 MiB input", "BLAS threads", "engine batch 256", "2 replicas",
                   "server on one core, T3's call", "server on one core, T2's batch-1 step",
                   "/metrics scrape, server computing"):
        assert f"| {target}" in report, target
    assert "Machine: " in report and "numpy " in report
