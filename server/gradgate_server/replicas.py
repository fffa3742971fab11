"""``gradgate-replicas``: run N gradgate servers on consecutive ports, one per core.

One server process computes on one core (Python's GIL), so a machine with N cores
serves N times the steps with N replicas. This starts them as child processes
(``python -m gradgate_server``, one BLAS thread each, each on a core of its own:
``--cpus``, see cpus.py), prints the address list for
``gg.connect`` on stdout, forwards their JSON log lines to stderr, restarts a replica
that dies (on the same port), and stops them all on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO

from . import cpus
from .app import parse_args

READY_SECONDS = 60.0  # a replica that has not said where it listens by then failed to start
# One BLAS thread per replica: N replicas already fill N cores.
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def cores() -> int:
    """Cores this process may run on."""
    return len(cpus.available())


class Replica:
    """One server process. ``address``/``metrics_address`` are what it bound; its stderr
    lines are kept in ``lines`` and copied to ``sink`` (None: kept only). ``cpu``: the one
    it runs on (None: any)."""

    def __init__(self, host: str, port: int, metrics_port: int, args: Sequence[str] = (),
                 sink: IO[str] | None = None, cpu: int | None = None):
        self.host, self.port, self.metrics_port, self.args, self.sink = host, port, metrics_port, list(args), sink
        if cpu is not None:
            self.args += ["--cpus", str(cpu)]
        self.lines: deque[str] = deque(maxlen=100_000)  # the latest log lines
        self.address = ""
        self.metrics_address: str | None = None
        self.spawn()

    def spawn(self) -> None:
        """Start the process; ``wait_ready`` waits until it listens."""
        command = [sys.executable, "-m", "gradgate_server", "--host", self.host, "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port), *self.args, "--log-format", "json"]
        self._ready = threading.Event()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env={**ONE_THREAD, **os.environ})
        threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True,
                         name=f"replica-{self.process.pid}").start()

    def wait_ready(self) -> None:
        if not self._ready.wait(READY_SECONDS) or not self.running():
            self.kill()
            log = "".join(list(self.lines)[-20:])
            raise RuntimeError(f"gradgate server {self.host}:{self.port} did not start:\n{log}")
        # a restart keeps the ports, so the address list stays valid
        self.port = int(self.address.rsplit(":", 1)[1])
        if self.metrics_address:
            self.metrics_port = int(self.metrics_address.rsplit(":", 1)[1])

    def restart(self) -> None:
        self.address = ""
        self.spawn()
        self.wait_ready()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)
            if self.sink is not None:
                self.sink.write(line)
                self.sink.flush()
            if not self._ready.is_set() and line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "listening":  # app.main's first line
                    self.address, self.metrics_address = event["address"], event.get("metrics_address")
                    self._ready.set()
        self._ready.set()  # the process ended (before listening, if address is still "")

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains its calls), then SIGKILL after ``timeout``; the exit code."""
        return stop([self], timeout)[0]

    def kill(self) -> int:
        if self.running():
            self.process.kill()
        return self.process.wait()


def start(n: int, host: str = "127.0.0.1", port: int = 50051, metrics_port: int = 9464, args: Sequence[str] = (),
          sink: IO[str] | None = None, pin: bool = True) -> list[Replica]:
    """Start ``n`` replicas on ports ``port``, ``port + 1``, ... (0: each picks a free one) and
    metrics ports likewise (-1: off); returns them listening. ``pin``: replica i runs on the
    i-th available core (round robin), unless ``args`` choose ``--cpus`` themselves."""
    replicas: list[Replica] = []
    own = cpus.available() if pin and hasattr(os, "sched_setaffinity") and not _names_cpus(args) else []
    try:
        for i in range(n):  # all start at once, each on its own core
            replicas.append(Replica(host, port and port + i, metrics_port + i if metrics_port > 0 else metrics_port,
                                    args, sink, own[i % len(own)] if own else None))
        for r in replicas:
            r.wait_ready()
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


def _names_cpus(args: Sequence[str]) -> bool:
    return any(a == "--cpus" or a.startswith("--cpus=") for a in args)


def stop(replicas: Sequence[Replica], timeout: float) -> list[int]:
    """SIGTERM to every replica at once (each drains its calls), SIGKILL to those still running
    after ``timeout`` seconds; their exit codes. One SIGTERM each: a second one could land
    after the server restored the default handler on its way out."""
    for r in replicas:
        if r.running():
            r.process.terminate()
    deadline = time.monotonic() + timeout
    for r in replicas:
        try:
            r.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.process.kill()
    return [r.process.wait() for r in replicas]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradgate-replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other flags go to every gradgate-server (see gradgate-server --help).")
    p.add_argument("-n", "--replicas", type=int, default=cores(), help=f"how many (default: one per core, {cores()})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="first gRPC port (default 50051; 0 = any free ports)")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="first Prometheus port (default 9464; 0 = any free ports, -1 = off)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="run replica i on the i-th core only, so each keeps its threads on one core's caches "
                        "(default; Linux; --cpus among the server flags overrides it)")
    p.add_argument("--restart-delay", type=float, default=1.0, help="seconds before a replica that died is restarted")
    args, server_args = p.parse_known_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be >= 1")
    grace = parse_args(server_args)[1].grace_seconds  # also rejects a bad server flag before anything starts

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        replicas = start(args.replicas, args.host, args.port, args.metrics_port, server_args, sys.stderr, args.pin)
    except RuntimeError as e:
        print(f"gradgate-replicas: {e}", file=sys.stderr)
        return 1
    addresses = ",".join(r.address for r in replicas)
    print(addresses, flush=True)
    print(f"gradgate-replicas: {len(replicas)} replicas; connect with gg.connect({addresses!r}); "
          f"metrics at {', '.join(str(r.metrics_address) for r in replicas)}", file=sys.stderr, flush=True)
    while not stopping.wait(0.2):
        for i, r in enumerate(replicas):
            if not r.running() and not stopping.is_set():
                print(f"gradgate-replicas: replica {i} ({r.address}, pid {r.pid}) exited with code "
                      f"{r.process.returncode}; restarting it in {args.restart_delay:g}s", file=sys.stderr, flush=True)
                if stopping.wait(args.restart_delay):
                    break
                try:
                    r.restart()
                except RuntimeError as e:
                    print(f"gradgate-replicas: {e}", file=sys.stderr, flush=True)
    codes = stop(replicas, grace + 10)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
