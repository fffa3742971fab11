"""Proxyless sticky routing: gRPC's ring_hash on the x-session-id header over real
servers on 127.0.0.1. Each session stays on one server; when a server stops, only its
sessions move (and the SDK re-creates them on the next server of the ring)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gradgate as gg
from gradgate.cli import two_layer_net
from gradgate.client import RING_HASH_FLAG, channel_target, service_config
from gradgate_server import serve

from obs import Scrape

BATCH = dict(zip(("x", "y"), gg.spiral(n_per_class=10, seed=1)))


def holder(servers, sess) -> int:
    """Index of the one server that holds ``sess``."""
    [index] = [i for i, s in enumerate(servers) if sess.id in s.store._sessions]
    return index


def not_found(server) -> float:
    return Scrape(server.metrics.scrape()).value("grpc_server_handled_total", grpc_code="NotFound")


def test_channel_targets() -> None:
    assert channel_target("127.0.0.1:5000") == ("127.0.0.1:5000", False)
    assert channel_target(["127.0.0.1:5000"]) == ("127.0.0.1:5000", False)
    assert channel_target(["127.0.0.1:5000", "127.0.0.2:5001"]) == ("ipv4:127.0.0.1:5000,127.0.0.2:5001", True)
    assert channel_target("localhost:5000, localhost:5001") == ("ipv4:127.0.0.1:5000,127.0.0.1:5001", True)
    assert channel_target(["[::1]:5000", "[0:0::1]:5001"]) == ("ipv6:[::1]:5000,[::1]:5001", True)
    assert channel_target("dns:///gradgate.default.svc.cluster.local:50051") == (
        "dns:///gradgate.default.svc.cluster.local:50051", True)
    for bad in ([], "", ["127.0.0.1:1", "no-port"], ["127.0.0.1:1", "[::1]:2"]):
        with pytest.raises(ValueError):
            channel_target(bad)


def test_service_config_retries_for_about_retry_seconds() -> None:
    config = json.loads(service_config(True, 10.0))
    assert config["loadBalancingConfig"] == [{"ring_hash_experimental": {"requestHashHeader": "x-session-id"}}]
    policy = config["methodConfig"][0]["retryPolicy"]
    first, top = float(policy["initialBackoff"][:-1]), float(policy["maxBackoff"][:-1])
    backoffs = [min(first * policy["backoffMultiplier"] ** k, top) for k in range(policy["maxAttempts"] - 1)]
    assert sum(backoffs) == pytest.approx(10.0)
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(service_config(False, 0)) == {}


def test_sessions_stick_to_one_server_and_only_a_stopped_servers_sessions_move() -> None:
    from gradgate_server import Config

    servers = [serve("127.0.0.1:0", Config(metrics_port=-1)) for _ in range(3)]
    try:
        with gg.connect([s.address for s in servers], timeout=10, retry_seconds=3) as client:
            assert client.balanced
            g = two_layer_net(hidden=8)
            sessions = []
            while len(sessions) < 40 and len({holder(servers, s) for s in sessions}) < 3:
                sessions.append(client.session(g, gg.init_params(g, seed=len(sessions))))
            assert len({holder(servers, s) for s in sessions}) == 3, "40 random keys all on two servers"
            for _ in range(3):
                for sess in sessions:
                    sess.forward_backward(BATCH)
            assert sum(len(s.store) for s in servers) == len(sessions)  # nothing was re-created
            assert [not_found(s) for s in servers] == [0, 0, 0]  # no call went to the wrong server

            before = {sess.id: holder(servers, sess) for sess in sessions}
            stopped = before[sessions[0].id]
            servers[stopped].stop(0)
            for sess in sessions:
                sess.forward_backward(BATCH)
            survivors = [i for i in range(3) if i != stopped]
            moved = [s for s in sessions if before.get(s.id) is None]
            for sess in sessions:
                if sess.id in before:  # never moved: same server, same session
                    assert before[sess.id] != stopped and holder(servers, sess) == before[sess.id]
                else:
                    assert holder(servers, sess) in survivors
            assert len(moved) == sum(1 for i in before.values() if i == stopped) >= 1
            # each moved session asked its new server once, found nothing and was re-created there
            assert sum(not_found(servers[i]) for i in survivors) == len(moved)
    finally:
        for s in servers:
            s.stop(0)


def test_a_dns_target_is_balanced_too() -> None:
    with serve("127.0.0.1:0") as server, \
            gg.connect(f"dns:///localhost:{server.port}", timeout=10, retry_seconds=3) as client:
        assert client.balanced
        g = two_layer_net(hidden=4)
        sess = client.session(g)
        first = sess.forward(BATCH).loss
        assert sess.forward(BATCH).loss == first and len(server.store) == 1


def test_works_without_the_user_setting_the_grpc_flag() -> None:
    """In a fresh process without the variable: the SDK sets it before making the channel
    (without it, grpcio 1.85 fails every call with 'hash attribute not present')."""
    script = """
import sys, gradgate as gg
from gradgate.cli import two_layer_net
from gradgate_server import serve
servers = [serve("127.0.0.1:0") for _ in range(2)]
with gg.connect([s.address for s in servers], timeout=10) as client:
    sess = client.session(two_layer_net(hidden=4))
    X, y = gg.spiral(n_per_class=5)
    print(sess.forward({"x": X, "y": y}).loss, [len(s.store) for s in servers])
"""
    env = {k: v for k, v in os.environ.items() if k != RING_HASH_FLAG}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    loss, counts = result.stdout.split(" ", 1)
    assert np.isfinite(float(loss)) and sorted(json.loads(counts)) == [0, 1]
