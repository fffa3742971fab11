"""What a session holds and when it changes: nothing is committed by a call that fails,
Backward names its forward, memory budgets cover parameters and data, memory goes back
to the OS, and health answers while every compute thread is busy."""
from __future__ import annotations

import logging
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradgate as gg
from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import Config, serve
from gradgate_server.engine import compile_graph
from gradgate_server.engine.cost import estimate, plan_bytes

from obs import Scrape, chain_graph, chain_params, create_request, forward_request
from procs import ServerProcess, memory_of
from test_engine import mlp

Code = grpc.StatusCode


def batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"x": rng.normal(size=(n, 2)), "y": rng.integers(0, 3, n)}


def test_a_reply_over_the_message_limit_commits_nothing(caplog) -> None:
    """Forward with new parameters whose requested output is too big for a message: the client
    gets RESOURCE_EXHAUSTED, and the parameters and the cached forward stay as they were;
    metrics and the log line record the status the client got."""
    with serve("127.0.0.1:0", Config(max_message_bytes=16 * 1024, metrics_port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        params = {"W": np.ones((2, 3)), "b": np.zeros(3)}
        sid = stub.CreateSession(create_request(mlp(), params), timeout=10).session_id
        first = stub.Forward(forward_request(sid, batch(4)), timeout=10)
        request = forward_request(sid, batch(400))  # 9.6 KB in, 19.2 KB out (two outputs of 400 x 3)
        codec.to_tensor_map({"W": np.full((2, 3), 7.0)}, request.params)
        request.outputs.extend(["scores", "xw"])
        with caplog.at_level(logging.INFO, logger="gradgate_server.rpc"), pytest.raises(grpc.RpcError) as e:
            stub.Forward(request, timeout=10)
        assert e.value.code() == Code.RESOURCE_EXHAUSTED and "more than the message limit" in e.value.details()
        got = stub.GetParameters(pb.GetParametersRequest(session_id=sid), timeout=10)
        np.testing.assert_array_equal(codec.from_tensor(got.params["W"]), params["W"])
        # the earlier forward is still the cached one
        stub.Backward(pb.BackwardRequest(session_id=sid, forward_id=first.forward_id), timeout=10)
        scrape = Scrape.of(server.metrics_address)
        assert scrape.value("grpc_server_handled_total", grpc_method="Forward", grpc_code="ResourceExhausted") == 1
        assert scrape.value("grpc_server_handled_total", grpc_method="Forward", grpc_code="OK") == 1
        lines = [f for r in caplog.records if (f := getattr(r, "fields", {})).get("method", "").endswith("/Forward")]
        assert [line["code"] for line in lines] == ["RESOURCE_EXHAUSTED"]


def test_backward_names_its_forward() -> None:
    with serve("127.0.0.1:0") as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = stub.CreateSession(create_request(mlp(), {"W": np.ones((2, 3)), "b": np.zeros(3)}),
                                 timeout=10).session_id
        a = stub.Forward(forward_request(sid, batch(4)), timeout=10).forward_id
        b = stub.Forward(forward_request(sid, batch(5)), timeout=10).forward_id
        assert 0 < a < b
        with pytest.raises(grpc.RpcError) as e:
            stub.Backward(pb.BackwardRequest(session_id=sid, forward_id=a), timeout=10)
        assert e.value.code() == Code.FAILED_PRECONDITION
        assert f"forward {a} of session {sid[:8]} is no longer cached: forward {b} replaced it" in e.value.details()
        stub.Backward(pb.BackwardRequest(session_id=sid, forward_id=b), timeout=10)
        stub.Backward(pb.BackwardRequest(session_id=sid), timeout=10)  # 0: whichever is cached
        fb = pb.ForwardBackwardRequest(session_id=sid)
        codec.to_tensor_map(batch(3), fb.inputs)
        c = stub.ForwardBackward(fb, timeout=10).forward_id
        assert c == b + 1
        stub.Backward(pb.BackwardRequest(session_id=sid, forward_id=c), timeout=10)


def graph_bytes(g: gg.Graph) -> int:
    """What the server counts for ``g``'s compiled plan."""
    proto = g.to_proto()
    return plan_bytes(compile_graph(proto), proto.ByteSize())


def test_state_budgets_cover_parameters() -> None:
    g = gg.Graph("float64")
    x = g.input("x", (None, 100))
    W = g.param("W", (100, 100))  # 80 000 bytes
    g.set_loss(gg.sum(x @ W))
    with serve("127.0.0.1:0", Config(state_bytes=200_000, session_bytes=100_000)) as server, \
            gg.connect(server.address, timeout=10) as client:
        a, b = client.session(g), client.session(g)
        assert server.store.state_bytes == 2 * (80_000 + graph_bytes(g))
        with pytest.raises(gg.GradgateError) as e:
            client.session(g)
        assert e.value.code == Code.RESOURCE_EXHAUSTED
        assert "more than its budget of 200000; close sessions you no longer need" in e.value.message
        a.close()
        c = client.session(g)
        big = gg.Graph("float64")
        big.set_loss(gg.sum(big.param("W", (200, 100))))
        with pytest.raises(gg.GradgateError) as e:
            client.session(big)
        assert e.value.code == Code.RESOURCE_EXHAUSTED and "per-session budget of 100000" in e.value.message
        b.close()
        c.close()
        assert server.store.state_bytes == 0


def test_parameters_never_pin_a_bigger_request() -> None:
    """Parameters that arrive with a big batch are views into that request's bytes; the session
    keeps copies, so what it holds is what it counts. Parameters that are most of their
    request stay views (no copy on the hot path of a client-driven loop), until some of them
    are replaced and the rest would pin the request alone."""
    g = gg.Graph("float64")
    x = g.input("x", (None, 1000))
    w, v = g.param("w", (1000,)), g.param("v", (1000,))
    g.set_loss(gg.sum(x * w + x * v))
    with serve("127.0.0.1:0") as server, gg.connect(server.address, timeout=10) as client, \
            client.session(g) as sess:
        sess.forward_backward({"x": np.ones((500, 1000))}, params={"w": np.full(1000, 2.0), "v": np.ones(1000)})
        held = server.store._sessions[sess.id].params["w"]
        assert getattr(buffer_of(held), "nbytes", None) == 8000  # its own 8 KB, not the 4 MB request
        np.testing.assert_array_equal(held, 2.0)

        # an 8 KB batch: each parameter is a third of the request, the two together two thirds
        sess.forward_backward({"x": np.ones((1, 1000))}, params={"w": np.full(1000, 3.0), "v": np.ones(1000)})
        held = server.store._sessions[sess.id].params
        request = buffer_of(held["w"])
        assert isinstance(request, bytes) and 24000 < len(request) < 2 * 16000 + 4096  # the request itself
        assert buffer_of(held["v"]) is request
        np.testing.assert_array_equal(held["w"], 3.0)

        sess.set_params({"w": np.full(1000, 4.0)})  # w replaced: v alone would pin the whole request
        held = server.store._sessions[sess.id].params
        assert getattr(buffer_of(held["v"]), "nbytes", None) == 8000
        np.testing.assert_array_equal(held["v"], 1.0)


def buffer_of(a: np.ndarray) -> object:
    """The buffer an array views in the end (itself if it owns its memory)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def rss_by_mapping(pid: int) -> dict[str, int]:
    """Resident KiB by mapping: files together, the heap, and each anonymous mapping by its size
    (malloc arenas are 64 MiB reservations, Python's arenas 1 MiB, thread stacks 8 MiB)."""
    out: dict[str, int] = {}
    kind = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                kind = ("files" if fields[5].startswith("/") else fields[5]) if len(fields) > 5 else \
                    f"anon {(end - start) // 1024} KiB"
            elif fields[0] == "Rss:" and int(fields[1]):
                out[kind] = out.get(kind, 0) + int(fields[1])
    return out


def test_memory_goes_back_to_the_os_after_a_thousand_sessions() -> None:
    """A real server process: 1,000 sessions with 256 KB of parameters each are created, used
    and closed, 100 at a time; RSS ends within 10% of where it started (after a warm-up of the same)."""
    server = ServerProcess()
    try:
        g = gg.Graph("float64")
        x = g.input("x", (None, 128))
        W = g.param("W", (128, 256))  # 256 KiB
        g.set_loss(gg.mean(gg.tanh(x @ W)))
        X = np.random.default_rng(0).normal(size=(32, 128))
        with gg.connect(server.address, timeout=30) as client:
            def use(n: int) -> None:
                sessions = [client.session(g, gg.init_params(g, seed=i)) for i in range(n)]
                for s in sessions:
                    s.forward_backward({"x": X})
                for s in sessions:
                    s.close()

            for _ in range(3):  # warm up: imports, first allocations of every kind, the allocator's own tables
                use(100)
            time.sleep(2.5)  # the sweeper releases what the warm-up gave back
            start, start_maps = memory_of(server.proc.pid), rss_by_mapping(server.proc.pid)
            for _ in range(10):
                use(100)
            deadline = time.monotonic() + 10
            while memory_of(server.proc.pid) > 1.1 * start and time.monotonic() < deadline:
                time.sleep(0.2)  # the sweeper returns memory about once a second
            end, end_maps = memory_of(server.proc.pid), rss_by_mapping(server.proc.pid)
    finally:
        server.close()
    assert end <= 1.1 * start, f"RSS {start / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB ({start_maps} -> {end_maps})"


def test_health_answers_while_every_compute_thread_is_busy() -> None:
    """As many slow Forwards as RPC threads: health Check still answers, well before any of them
    ends (120 matmuls of 400x400 each: >= 0.3 s, asserted). Its checks took up to 106 ms on a
    loaded 2-core machine, each waiting for the GIL among four computing threads."""
    width = 400
    with serve("127.0.0.1:0", Config(max_workers=4)) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        sids = [stub.CreateSession(create_request(chain_graph(120, width), chain_params(width)), timeout=10).session_id
                for _ in range(4)]
        X = np.random.default_rng(0).normal(size=(400, width))
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # its pool's first thread starts now, not under load
        busy = [stub.Forward.future(forward_request(sid, {"x": X}), timeout=60) for sid in sids]
        time.sleep(0.3)
        assert not any(f.done() for f in busy), "the forwards finished too fast to occupy the threads"
        latencies = []
        for _ in range(10):
            start = time.perf_counter()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            latencies.append(time.perf_counter() - start)
            assert status == health_pb2.HealthCheckResponse.SERVING
        still_busy = sum(not f.done() for f in busy)
        for f in busy:
            f.result()
    assert still_busy >= 3, "the checks ran after the forwards"
    assert max(latencies) < 0.25, latencies


def test_state_bytes_are_exported() -> None:
    g = gg.Graph("float64")
    g.set_loss(gg.sum(g.param("W", (10, 10))))
    with serve("127.0.0.1:0", Config(metrics_port=0, state_bytes=10**6)) as server, \
            gg.connect(server.address, timeout=10) as client, client.session(g):
        scrape = Scrape.of(server.metrics_address)
        assert scrape.value("gradgate_state_bytes") == 800 + graph_bytes(g)
        assert scrape.value("gradgate_state_budget_bytes") == 10**6


def test_a_sessions_compiled_graph_counts_against_the_budgets() -> None:
    """A 9,000-node graph holds megabytes as a compiled plan, with no parameters at all: 1,024
    sessions of such graphs once went unaccounted for. The estimate bounds what compiling it takes."""
    g = gg.Graph("float32")
    v = g.input("x", (None, 4))
    for i in range(4500):
        v = gg.tanh(gg.relu(v))
    g.set_loss(gg.sum(v))
    proto = g.to_proto()
    tracemalloc.start()
    plan = compile_graph(proto)
    for batch in range(1, 17):  # the plan caches the cost of up to 16 batch sizes
        estimate(plan, batch)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    estimated = plan_bytes(plan, proto.ByteSize())
    assert held <= estimated <= 3 * held, (held, estimated)
    with serve("127.0.0.1:0", Config(state_bytes=3 * estimated)) as server, \
            gg.connect(server.address, timeout=30) as client:
        sessions = [client.session(g, {}) for _ in range(3)]
        assert server.store.state_bytes == 3 * estimated
        with pytest.raises(gg.GradgateError) as e:
            client.session(g, {})
        assert e.value.code == Code.RESOURCE_EXHAUSTED and "more than its budget" in e.value.message
        for s in sessions:
            s.close()
        assert server.store.state_bytes == 0
