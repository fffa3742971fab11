"""Real server processes for end-to-end tests: ``python -m gradgate_server`` with JSON logs."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from obs import GRADIENT_SERVICE, Scrape

ROOT = Path(__file__).resolve().parent.parent


def memory_of(pid: int, field: str = "VmRSS") -> int:
    """A process's memory in bytes from /proc: VmRSS (resident now) or VmHWM (the most it ever had)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


class ServerProcess:
    """``python -m gradgate_server`` with JSON logs; reads its bound addresses from the log."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradgate_server", "--port", "0", "--metrics-port", "0", "--log-format", "json",
             *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        listening = self.next_line(lambda line: line.get("event") == "listening", timeout=20)
        self.address, self.metrics_address = listening["address"], listening["metrics_address"]

    def _read(self) -> None:
        for text in self.proc.stderr:
            line = json.loads(text)  # every line is JSON with --log-format json
            self.log.append(line)
            self.lines.put(line)

    def next_line(self, match, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no matching log line within {timeout}s; log so far: {self.log}")
            if match(line):
                return line

    def in_flight(self, method: str) -> float:
        s = Scrape.of(self.metrics_address)
        labels = dict(grpc_service=GRADIENT_SERVICE, grpc_method=method)
        return s.value("grpc_server_started_total", **labels) - s.value("grpc_server_handled_total", **labels)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stderr.close()
