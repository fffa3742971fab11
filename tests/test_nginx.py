"""deploy/nginx/nginx.conf for real: `nginx -t`, then a real nginx on 127.0.0.1 in front
of real servers. Sessions stick to one server, large messages pass, nginx's own errors
reach the client as gRPC statuses. (Replicas killed behind nginx: test_failover.py.)
Skipped without nginx, except in CI (.ci/run installs Debian's nginx)."""
from __future__ import annotations

import re
import time
from collections.abc import Iterator

import numpy as np
import pytest

import gradgate as gg
from gradgate.cli import two_layer_net
from gradgate_server import Config, serve

from cluster import NGINX_CONF, Nginx, nginx_binary, nginx_config, nginx_test
from obs import Scrape

MiB = 2**20


def directive(name: str) -> str:
    [value] = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), re.M)
    return value


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
    return int(number) * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


def test_config_routes_by_session_and_fits_the_limits() -> None:
    assert directive("hash") == "$http_x_session_id consistent"
    assert directive("grpc_pass") == "grpc://gradgate"
    size = directive("client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * MiB >= Config().max_message_bytes + 5  # 5-byte gRPC prefix
    for timeout in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout", "send_timeout"):
        assert seconds(directive(timeout)) >= 300, timeout  # a long Forward on a big batch


def test_nginx_t_accepts_the_config(tmp_path) -> None:
    nginx_binary()
    config = nginx_config(["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"], "127.0.0.1:50050", tmp_path)
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


@pytest.fixture
def servers() -> Iterator[list]:
    started = [serve("127.0.0.1:0", Config(metrics_port=-1)) for _ in range(3)]
    yield started
    for s in started:
        s.stop(0)


def test_sessions_stick_through_nginx_and_large_messages_pass(servers, tmp_path) -> None:
    nginx_binary()
    proxy = Nginx([s.address for s in servers], tmp_path)
    try:
        with gg.connect(proxy.address, timeout=20, retry_seconds=2) as client:
            g = two_layer_net(hidden=8)
            sessions = [client.session(g, gg.init_params(g, seed=i)) for i in range(12)]
            X, y = gg.spiral(n_per_class=10, seed=1)
            for _ in range(3):
                for sess in sessions:
                    sess.forward_backward({"x": X, "y": y})
            holders = [[s.store._sessions.get(sess.id) is not None for s in servers].index(True)
                       for sess in sessions]
            assert len(set(holders)) >= 2  # spread over the replicas...
            assert sum(len(s.store) for s in servers) == len(sessions)  # ...and never re-created
            for s in servers:
                assert Scrape(s.metrics.scrape()).value("grpc_server_handled_total", grpc_code="NotFound") == 0

            # 3 MiB up and back: above nginx's default 1m client_max_body_size
            big = gg.Graph("float64")
            x = big.input("x", (None, 1024))
            w = big.param("w", (1024, 1))
            big.set_loss(gg.mean(x @ w))
            wide = client.session(big, {"w": np.ones((1024, 1))})
            rows = np.random.default_rng(0).normal(size=(384, 1024))
            assert wide.forward({"x": rows}).loss == pytest.approx(rows.sum(axis=1).mean())
            assert wide.backward(inputs=True)["x"].shape == rows.shape
    finally:
        proxy.stop()


def test_no_replica_left_is_unavailable_after_the_retries(tmp_path) -> None:
    nginx_binary()
    with serve("127.0.0.1:0") as gone:
        address = gone.address
    proxy = Nginx([address], tmp_path)
    try:
        with gg.connect(proxy.address, timeout=20, retry_seconds=0.6) as client:
            started = time.monotonic()
            with pytest.raises(gg.GradgateError) as e:
                client.list_ops()
            waited = time.monotonic() - started
        assert e.value.code.name == "UNAVAILABLE"
        assert "no gradgate replica answered (nginx)" in e.value.message  # a gRPC status, not an HTML page
        assert 0.3 < waited < 10, f"re-sent for {waited:.2f}s, expected about 0.6s"
    finally:
        proxy.stop()
