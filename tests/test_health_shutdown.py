"""grpc.health.v1, reflection, and graceful shutdown of a real server process on a real signal."""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import Config, serve
from gradgate_server.app import parse_args

from obs import GRADIENT_SERVICE, chain_graph, chain_params, create_request, forward_request, wait_for
from procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# -- in process -----------------------------------------------------------------

def test_health_check_for_the_server_and_the_service() -> None:
    with serve("127.0.0.1:0") as server, grpc.insecure_channel(server.address) as channel:
        assert check(channel) == SERVING
        assert check(channel, GRADIENT_SERVICE) == SERVING
        with pytest.raises(grpc.RpcError) as e:
            check(channel, "no.such.Service")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_watchers_see_not_serving_then_their_stream_ends_on_stop() -> None:
    server = serve("127.0.0.1:0")
    with grpc.insecure_channel(server.address) as channel:
        stubs = health_pb2_grpc.HealthStub(channel)
        watches = [stubs.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
                   for name in ("", GRADIENT_SERVICE)]
        assert [next(w).status for w in watches] == [SERVING, SERVING]
        start = time.monotonic()
        server.stop(grace=10)
        # an open Watch must not hold the drain for the whole grace period
        assert time.monotonic() - start < 3
        for w in watches:
            assert [r.status for r in w] == [NOT_SERVING]  # then the stream ends
            assert w.code() == grpc.StatusCode.OK


def test_reflection_only_with_the_flag() -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with serve("127.0.0.1:0") as server, grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with serve("127.0.0.1:0", Config(reflection=True)) as server, grpc.insecure_channel(server.address) as channel:
        [response] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                           timeout=5)
        names = {s.name for s in response.list_services_response.service}
        assert {GRADIENT_SERVICE, "grpc.health.v1.Health"} <= names


def test_cli_flags() -> None:
    address, config = parse_args([])
    assert address == "127.0.0.1:50051" and config.metrics_port == 9464 and not config.reflection
    assert config.log_format == "text" and config.grace_seconds == 10
    _, config = parse_args(["--reflection", "--log-format", "json", "--metrics-port", "-1", "--grace-seconds", "2.5"])
    assert config.reflection and config.log_format == "json" and config.metrics_port == -1
    assert config.grace_seconds == 2.5
    with pytest.raises(SystemExit):
        parse_args(["--log-format", "xml"])


# -- a real process and a real signal --------------------------------------------

@pytest.fixture
def server_process() -> Iterator:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]
    yield start
    for p in started:
        p.close()


# Wide matmuls: the most compute per cached byte, so a long call needs little memory
# (about 200 MB of activations per second on a 2-core machine).
LAYERS, WIDTH = 10, 2048


def slow_forward(stub: pb_grpc.GradientServiceStub, seconds: float) -> tuple[str, np.ndarray]:
    """A session and a batch whose Forward takes about ``seconds`` on this machine."""
    sid = stub.CreateSession(create_request(chain_graph(LAYERS, WIDTH), chain_params(WIDTH)), timeout=20).session_id
    rows = 32
    x = np.random.default_rng(0).normal(size=(rows, WIDTH))
    stub.Forward(forward_request(sid, {"x": x}), timeout=20)  # warm up
    start = time.perf_counter()
    stub.Forward(forward_request(sid, {"x": x}), timeout=20)
    rows = int(np.clip(rows * seconds / (time.perf_counter() - start), 32, 4096))
    return sid, np.random.default_rng(1).normal(size=(rows, WIDTH))


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0(server_process) -> None:
    server = server_process("--grace-seconds", "30")
    with grpc.insecure_channel(server.address) as channel, futures.ThreadPoolExecutor(2) as pool:
        stub = pb_grpc.GradientServiceStub(channel)
        sid, x = slow_forward(stub, seconds=1.0)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == SERVING
        slow = pool.submit(stub.Forward, forward_request(sid, {"x": x}), timeout=60)
        wait_for(lambda: server.in_flight("Forward") == 1, what="the slow Forward to be running")

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # health goes first
        assert list(watch) == [] and watch.code() == grpc.StatusCode.OK  # then the watch ends
        assert not slow.done()

        def refused() -> bool:
            with grpc.insecure_channel(server.address) as fresh:
                try:
                    check(fresh)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.UNAVAILABLE
            return False
        wait_for(refused, timeout=10, what="new calls to be refused")
        refused_after = time.monotonic() - signalled
        assert not slow.done(), "the slow call finished too early to show draining; make it slower"

        response = slow.result(timeout=60)  # the in-flight call completes
        assert np.isfinite(response.loss)
        assert server.proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled
    rpc_lines = [line for line in server.log if line.get("method") == f"/{GRADIENT_SERVICE}/Forward"]
    assert rpc_lines[-1]["code"] == "OK"
    assert any("SIGTERM" in line.get("message", "") for line in server.log)
    print(f"\nslow Forward {rpc_lines[-1]['duration_ms']:.0f} ms, {len(x)} rows; new calls refused "
          f"{refused_after * 1e3:.0f} ms after SIGTERM; exit {exited:.2f}s after it")


def test_grace_period_bounds_the_drain(server_process) -> None:
    server = server_process("--grace-seconds", "0.5")
    with grpc.insecure_channel(server.address) as channel, futures.ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.GradientServiceStub(channel)
        sid, x = slow_forward(stub, seconds=2.0)
        slow = pool.submit(stub.Forward, forward_request(sid, {"x": x}), timeout=60)
        wait_for(lambda: server.in_flight("Forward") == 1, what="the slow Forward to be running")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=20) == 0
        exited = time.monotonic() - signalled
        with pytest.raises(grpc.RpcError) as e:
            slow.result(timeout=10)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e.value
    # the computation stopped at the next op once grace ran out, well before its ~2 s
    assert exited < 1.8, f"exit took {exited:.2f}s after SIGINT with a 0.5 s grace"
    print(f"\nSIGINT with 0.5 s grace during a ~2 s call: exit after {exited:.2f}s")
