"""Helpers for the observability tests: a server in this process with its metrics on,
scrape a metrics endpoint, wait boundedly, find binaries, build a slow graph."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from gradgate_server import Config, Server, serve
from prometheus_client.parser import text_string_to_metric_families

from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import graph_pb2

from graphs import declare, node

GRADIENT_SERVICE = "gradgate.v1.GradientService"


@contextmanager
def served(**config: object) -> Iterator[Server]:
    """A server on 127.0.0.1 with ``Config(**config)`` and /metrics on a free port."""
    with serve("127.0.0.1:0", Config(metrics_port=0, **config)) as server:  # type: ignore[arg-type]
        yield server


def fetch(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class Scrape:
    """One scrape of /metrics; ``value(name, **labels)`` sums the samples that carry
    those labels (0.0 when there are none)."""

    def __init__(self, text: str):
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    @classmethod
    def of(cls, metrics_address: str) -> Scrape:
        return cls(fetch(f"http://{metrics_address}/metrics"))

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until ``condition()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def free_port() -> int:
    """A port free right now on 127.0.0.1, for programs that cannot bind port 0 and report it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def require_binary(name: str, package: str = "prometheus") -> str:
    """Path of ``name`` (also looked for in /usr/sbin, where Debian puts nginx); skipped when
    absent, except in CI (CI installs it: .ci/run)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} not installed (Debian: apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


def chain_graph(layers: int, width: int) -> graph_pb2.Graph:
    """loss = sum(tanh(... tanh(x @ W) ... @ W)): ``layers`` matmuls of width x width,
    so a Forward takes as long as the batch makes it."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float64", (-1, width))
    declare(g.params, "W", "float64", (width, width))
    h = "x"
    for i in range(layers):
        h = node(g, f"t{i}", "tanh", node(g, f"m{i}", "matmul", h, "W"))
    g.loss = node(g, "loss", "sum", h)
    return g


def chain_params(width: int) -> dict[str, np.ndarray]:
    return {"W": np.random.default_rng(0).normal(size=(width, width)) / np.sqrt(width)}


def create_request(graph: graph_pb2.Graph, params: dict[str, np.ndarray]) -> pb.CreateSessionRequest:
    request = pb.CreateSessionRequest(graph=graph)
    codec.to_tensor_map(params, request.params)
    return request


def forward_request(session_id: str, inputs: dict[str, np.ndarray]) -> pb.ForwardRequest:
    request = pb.ForwardRequest(session_id=session_id)
    codec.to_tensor_map(inputs, request.inputs)
    return request
