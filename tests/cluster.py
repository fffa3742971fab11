"""Real replicas (server processes, gradgate-replicas' own code) and a real nginx in
front of them, all on 127.0.0.1, for the scale-out tests."""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import gradgate as gg
from gradgate_server import replicas as replicas_mod
from gradgate_server.replicas import Replica

from obs import Scrape, free_port, require_binary, stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


@contextmanager
def replicas(n: int, *args: str) -> Iterator[list[Replica]]:
    """``n`` server processes on free ports, metrics on; killed at the end."""
    started = replicas_mod.start(n, port=0, metrics_port=0, args=args)
    try:
        yield started
    finally:
        for r in started:
            r.kill()


def tanh_chain(layers: int, width: int) -> tuple[gg.Graph, dict[str, np.ndarray]]:
    """loss = mean(tanh(... tanh(x @ W) ... @ W)) in float64, and its parameters: as slow
    as ``layers`` and the batch make it."""
    g = gg.Graph("float64")
    h = g.input("x", (None, width))
    W = g.param("W", (width, width))
    for _ in range(layers):
        h = gg.tanh(h @ W)
    g.set_loss(gg.mean(h))
    return g, {"W": np.random.default_rng(0).normal(size=(width, width)) / np.sqrt(width)}


def rpc_sessions(replica: Replica, method: str | None = None) -> set[str]:
    """The sessions (first 8 hex digits) that ``replica`` logged calls for."""
    found = set()
    for text in list(replica.lines):
        line = json.loads(text)
        if "session" in line and (method is None or line["method"].endswith("/" + method)):
            found.add(line["session"])
    return found


def metric(replica: Replica, name: str, **labels: str) -> float:
    return Scrape.of(replica.metrics_address).value(name, **labels)


def not_found(replica: Replica) -> float:
    """Session calls answered NOT_FOUND: a session the replica never held came to it."""
    return metric(replica, "grpc_server_handled_total", grpc_service="gradgate.v1.GradientService",
                  grpc_code="NotFound")


def nginx_binary() -> str:
    return require_binary("nginx", package="nginx")


def nginx_config(upstreams: list[str], listen: str, workdir: Path) -> Path:
    """deploy/nginx/nginx.conf pointed at ``upstreams`` and listening on ``listen``;
    everything else as shipped, plus temp folders under ``workdir`` (the packaged ones
    need root)."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^( *)server gradgate-\d+:50051( .*;)$", text, re.M)
    assert len(servers) == 3, "the shipped upstream lists 3 replicas"
    indent, options = servers[0]
    text = re.sub(r"^ *server gradgate-\d+:50051 .*;\n", "", text, flags=re.M)
    text = text.replace("keepalive 32;", "".join(f"server {u}{options}\n{indent}" for u in upstreams) + "keepalive 32;")
    text = text.replace("listen 50051 http2;", f"listen {listen} http2;")
    temp = "".join(f"    {kind}_temp_path {workdir / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def nginx_test(config: Path, workdir: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` on ``config``."""
    return subprocess.run([nginx_binary(), "-t", *_paths(config, workdir), "-g", f"pid {workdir / 'nginx.pid'};"],
                          capture_output=True, text=True, timeout=30)


def _paths(config: Path, workdir: Path) -> list[str]:
    return ["-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]


class Nginx:
    """A real nginx on 127.0.0.1 with the shipped config, in front of ``upstreams``."""

    def __init__(self, upstreams: list[str], workdir: Path):
        self.workdir = workdir
        for _ in range(3):  # the port is picked before nginx binds it: retry if taken meanwhile
            self.address = f"127.0.0.1:{free_port()}"
            config = nginx_config(upstreams, self.address, workdir)
            checked = nginx_test(config, workdir)
            assert checked.returncode == 0, checked.stderr
            self.proc = subprocess.Popen(
                [nginx_binary(), *_paths(config, workdir), "-g", f"daemon off; pid {workdir / 'nginx.pid'};"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if wait_for(lambda: self.proc.poll() is not None or self._listening(), timeout=20,
                        what="nginx to listen") is True and self.proc.poll() is None:
                return
        pytest.fail("nginx did not start: " + self.log())

    def _listening(self) -> bool:
        import socket
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    def log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
