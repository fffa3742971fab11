"""A CallStream's big calls through shared memory (gradgate.shared_memory and
gradgate_server.shared_memory), against real servers on 127.0.0.1, in this process and in
another, read back from their /metrics; and the protocol as an attacker would send it."""
from __future__ import annotations

import gc
import os
import queue
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from gradgate_server import Server
from gradgate_server import shared_memory as server_side
from gradgate_server.engine import InvalidArgument

import gradgate as gg
import gradgate.call_stream
from gradgate import codec
from gradgate.security import on_this_host
from gradgate.shared_memory import ENDED, Pipes, Region
from gradgate.v1 import gradient_service_pb2 as pb

from cluster import tanh_chain
from obs import GRADIENT_SERVICE, Scrape, served, wait_for
from procs import ServerProcess

MiB = 2**20


def metric(address: str, name: str, **labels: str) -> float:
    return Scrape.of(address).value(name, **labels)


def shared_calls(address: str) -> float:
    return metric(address, "gradgate_shared_memory_calls_total")


def stream_messages(address: str) -> float:
    return metric(address, "grpc_server_msg_received_total", grpc_service=GRADIENT_SERVICE, grpc_method="CallStream")


def wide() -> gg.Graph:
    """A layer whose parameters (640 KB) make every step's call and answer big."""
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 200)), g.input("y", (None,), dtype="int64")
    w1, w2 = g.param("W1", (200, 400)), g.param("W2", (400, 3))
    g.set_loss(gg.softmax_cross_entropy(gg.tanh(x @ w1) @ w2, y))
    return g


def batch(seed: int, n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 200)), "y": rng.integers(0, 3, n)}


def test_big_calls_go_through_shared_memory_and_answer_as_over_the_stream() -> None:
    g = wide()
    params = gg.init_params(g, seed=0)
    with served() as server, gg.connect(server.address) as shared, \
            gg.connect(server.address, shared_memory=False) as socket:
        with shared.session(g, params) as a, socket.session(g, params) as b:
            params_a = params_b = params
            for step in range(4):
                sent = params_a
                la, ga = a.forward_backward(batch(step), params=params_a)
                lb, gb = b.forward_backward(batch(step), params=params_b)
                assert la == lb
                for k in params:
                    np.testing.assert_array_equal(ga[k], gb[k])
                params_a = {k: v - 0.1 * ga[k] for k, v in params_a.items()}
                params_b = {k: v - 0.1 * gb[k] for k, v in params_b.items()}
            got, got_b = a.get_params(), b.get_params()
            for k in params:
                np.testing.assert_array_equal(got[k], got_b[k])
                np.testing.assert_array_equal(got[k], sent[k])  # what the last step set
            address = server.metrics_address
            # a's 4 steps and get_params in the region (its request for one is not a call); b's beside them
            assert shared_calls(address) == 5
            assert stream_messages(address) == 5 + 5
            assert metric(address, "gradgate_shared_memory_bytes") == 2 * MiB  # twice a step's call, in MiB
        wait_for(lambda: metric(address, "gradgate_shared_memory_bytes") == 0, what="the region freed")


def test_small_calls_are_signalled_through_pipes() -> None:
    """The lecture's f = (x + y) z: small calls gain most from the pipes, which wake the server's
    thread directly instead of passing each message between gRPC's threads."""
    g = gg.Graph("float64")
    x, y, z = g.input("x", (None,)), g.param("y", ()), g.param("z", ())
    g.set_loss(gg.sum((x + y) * z))
    with served() as server, gg.connect(server.address) as client, \
            client.session(g, {"y": np.array(5.0), "z": np.array(-4.0)}) as sess:
        for _ in range(3):
            loss, grads = sess.forward_backward({"x": np.array([-2.0])})
            assert loss == -12.0 and {k: float(v) for k, v in grads.items()} == {"y": -4.0, "z": 3.0}
        assert shared_calls(server.metrics_address) == 3
        assert stream_messages(server.metrics_address) == 3
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == MiB


def test_a_big_answer_comes_through_the_region() -> None:
    g = wide()
    params = gg.init_params(g, seed=1)
    with served() as server, gg.connect(server.address) as client, client.session(g, params) as sess:
        for _ in range(2):
            got = sess.get_params()
            assert all(np.array_equal(got[k], params[k]) for k in params)
        assert shared_calls(server.metrics_address) == 2
        assert stream_messages(server.metrics_address) == 2


def test_a_call_bigger_than_its_region_gets_a_bigger_one() -> None:
    g = gg.Graph("float64")
    x = g.input("x", (None, 1000))
    g.set_loss(gg.sum(x * x))
    with served() as server, gg.connect(server.address) as client, client.session(g, {}) as sess:
        for rows in (10, 500, 20):  # 80 KB (a 1 MiB region), 4 MB (8 MiB), 160 KB
            x = np.linspace(-1, 1, rows * 1000).reshape(rows, 1000)
            assert sess.forward({"x": x}).loss == pytest.approx(float((x * x).sum()), rel=1e-12)
        assert shared_calls(server.metrics_address) == 3
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 8 * MiB


def test_an_answer_bigger_than_the_region_comes_on_the_stream() -> None:
    """Signalled, an answer that does not fit the region comes on the stream (the pipe says 0);
    the next call asks for a region that fits it."""
    g = gg.Graph("float64")
    x, w = g.input("x", (None, 10)), g.param("W", (10, 100_000))
    h = gg.matmul(x, w, name="h")
    g.set_loss(gg.sum(h))
    W = np.linspace(-1, 1, 10 * 100_000).reshape(10, 100_000)
    with served() as server, gg.connect(server.address) as client, client.session(g, {"W": W}) as sess:
        for rows in (1, 2, 2):  # answers of 0.8 MB (in the 1 MiB region), 1.6 MB (on the stream), 1.6 MB
            x = np.arange(rows * 10.0).reshape(rows, 10)
            np.testing.assert_array_equal(sess.forward({"x": x}, outputs=["h"]).outputs["h"], x @ W)
        assert shared_calls(server.metrics_address) == 3
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 4 * MiB


def test_a_call_past_its_timeout_on_the_pipes_is_cancelled_and_the_next_one_runs() -> None:
    with served() as server, gg.connect(server.address, timeout=0.2) as client, \
            client.session(*tanh_chain(120, 600)) as sess:  # >= 0.5 s at 600 rows, on two BLAS threads too
        sess.forward({"x": np.ones((1, 600))})  # its stream now signals through the pipes
        with pytest.raises(gg.GradgateError) as late:
            sess.forward({"x": np.ones((600, 600))})
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        small = sess.forward({"x": np.zeros((1, 600))})
        assert small.loss == 0.0
        wait_for(lambda: metric(server.metrics_address, "grpc_server_handled_total", grpc_service=GRADIENT_SERVICE,
                                grpc_method="Forward", grpc_code="Canceled") == 1, what="the late call cancelled")


def test_a_server_in_another_process_lends_a_region() -> None:
    """Two processes of the same user on one host: the SDK maps the server's region through /proc."""
    server = ServerProcess()
    try:
        g = wide()
        params = gg.init_params(g, seed=2)
        with gg.connect(server.address) as client, client.session(g, params) as sess:
            b = batch(0)
            sess.forward_backward(b)
            loss, grads = sess.forward_backward(b)
            h = np.tanh(b["x"] @ params["W1"])
            s = h @ params["W2"]
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            assert loss == pytest.approx(-np.log(p[np.arange(8), b["y"]]).mean(), rel=1e-12)
            p[np.arange(8), b["y"]] -= 1
            np.testing.assert_allclose(grads["W2"], h.T @ p / 8, rtol=1e-10)
            assert shared_calls(server.metrics_address) == 2
    finally:
        server.close()


CHILD = """
import sys, numpy as np, gradgate as gg
from cluster import tanh_chain
client = gg.connect(sys.argv[1])
sess = client.session(*tanh_chain(40, 600))
sess.forward({"x": np.ones((1, 600))})
print("ready", flush=True)
sess.forward({"x": np.ones((600, 600))})
"""


def test_a_client_killed_mid_call_leaves_nothing_behind() -> None:
    """Its answer has no reader (the answer pipe is broken): the server drops it quietly, ends
    the stream, frees the region and logs no error."""
    server = ServerProcess()
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, server.address], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        wait_for(lambda: server.in_flight("Forward") == 1, what="the slow call running")
        child.kill()
        child.wait(10)
        child.stdout.close()
        wait_for(lambda: server.in_flight("CallStream") == 0, what="the stream ended")
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 0
        assert [line for line in server.log if line.get("level") == "ERROR"] == []
    finally:
        server.close()


def test_an_answer_to_a_client_gone_is_dropped_quietly() -> None:
    pipes = server_side.Pipes()
    pipes.handed_over()  # and the client, the only reader left, is gone
    pipes.signal(5)  # no BrokenPipeError: the call pipe's end ends the stream next
    assert pipes.next(lambda: True) is None
    pipes.close()


def test_descriptors_past_1024_work_on_both_sides() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        g = wide()
        params = gg.init_params(g, seed=8)
        with served() as server, gg.connect(server.address) as client, client.session(g, params) as sess, \
                gg.connect(server.address, call_streams=False) as unary, unary.session(g, params) as twin:
            for step in range(3):
                la, ga = sess.forward_backward(batch(step))
                lb, gb = twin.forward_backward(batch(step))
                assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in params)
            assert shared_calls(server.metrics_address) == 3
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pipes_open() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))


def test_sessions_dropped_without_close_leave_no_pipes_open() -> None:
    g = wide()
    with served() as server, gg.connect(server.address) as client:
        before = pipes_open()
        for seed in range(4):
            sess = client.session(g, gg.init_params(g, seed=seed))
            sess.forward_backward(batch(seed))
            del sess
        gc.collect()
        # (<=: pipes of earlier tests' streams, in this process too, may close meanwhile)
        wait_for(lambda: pipes_open() <= before, what="every pipe closed, the SDK's and the server's")
        wait_for(lambda: metric(server.metrics_address, "gradgate_shared_memory_bytes") == 0, what="regions freed")


def test_a_region_that_cannot_grow_leaves_the_call_on_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server, out of descriptors, lends no bigger region (and closes the pipes): the big call
    still goes, on the stream, at once."""
    g = gg.Graph("float64")
    x = g.input("x", (None, 1000))
    g.set_loss(gg.sum(x * x))
    with served() as server, gg.connect(server.address, timeout=5) as client, client.session(g, {}) as sess:
        assert sess.forward({"x": np.ones((1, 1000))}).loss == 1000.0  # a 1 MiB region, and the pipes
        def no_more(self: object, size: int) -> None:
            raise OSError(24, "Too many open files")
        monkeypatch.setattr(server_side.Region, "__init__", no_more)
        started = time.monotonic()
        assert sess.forward({"x": np.ones((300, 1000))}).loss == 300_000.0  # 2.4 MB
        assert sess.forward({"x": np.ones((2, 1000))}).loss == 2000.0
        assert time.monotonic() - started < 2


def test_an_answer_over_the_client_s_message_limit_is_refused_as_grpc_would() -> None:
    g = gg.Graph("float64")
    x, w = g.input("x", (None, 100)), g.param("W", (100, 300))  # 240 KB of parameters
    g.set_loss(gg.sum(gg.matmul(x, w, name="h")))
    with served() as server, gg.connect(server.address, max_message_bytes=300_000) as client, \
            client.session(g, {"W": np.ones((100, 300))}) as sess:
        assert sess.forward({"x": np.ones((1, 100))}).loss == 30_000.0  # its region: 1 MiB
        with pytest.raises(gg.GradgateError) as big:
            sess.forward({"x": np.ones((200, 100))}, outputs=["h"])  # 480 KB of answer
        assert big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in big.value.message
        assert sess.forward({"x": np.ones((2, 100))}).loss == 60_000.0


def test_without_shared_memory_the_server_says_so_once() -> None:
    g = wide()
    params = gg.init_params(g, seed=3)
    with served(shared_memory=False) as server, gg.connect(server.address) as client, \
            client.session(g, params) as sess:
        for step in range(3):
            sess.forward_backward(batch(step))
        assert shared_calls(server.metrics_address) == 0
        assert stream_messages(server.metrics_address) == 3  # (and one request for a region, refused)


def test_a_region_the_sdk_cannot_map_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client in another PID namespace (a sidecar on the same loopback) cannot map the region
    it is lent: it hands it back at once and carries on over the stream."""
    monkeypatch.setattr(gradgate.call_stream.Region, "mapped", classmethod(lambda cls, described: None))
    g = wide()
    params = gg.init_params(g, seed=6)
    with served() as server, gg.connect(server.address) as client, client.session(g, params) as sess:
        for step in range(3):
            assert np.isfinite(sess.forward_backward(batch(step), params=params).loss)
        address = server.metrics_address
        assert metric(address, "gradgate_shared_memory_bytes") == 0 and shared_calls(address) == 0
        assert stream_messages(address) == 3  # (asked for and given back once before them)


def test_a_server_that_predates_regions_still_answers_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older server reads open_region as a StreamCall without a call: INVALID_ARGUMENT ends
    that stream; the SDK sends the call on a new one and asks no more."""
    def old(self: server_side.Lane, request: pb.SharedRegionRequest) -> bytes:
        raise InvalidArgument("a StreamCall holds no call (set one field of its oneof)", "call")
    monkeypatch.setattr(server_side.Lane, "open", old)
    g = wide()
    params = gg.init_params(g, seed=4)
    with served() as server, gg.connect(server.address) as client, client.session(g, params) as sess:
        for step in range(3):
            loss, _ = sess.forward_backward(batch(step))
            assert np.isfinite(loss)
        assert stream_messages(server.metrics_address) == 3
        assert metric(server.metrics_address, "grpc_server_started_total", grpc_service=GRADIENT_SERVICE,
                      grpc_method="CallStream") == 2


# -- the protocol, sent by hand ---------------------------------------------------------

class RawStream:
    """A CallStream driven one message at a time, as any gRPC client may."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        call = self.channel.stream_stream(f"/{GRADIENT_SERVICE}/CallStream", request_serializer=lambda b: b,
                                          response_deserializer=pb.StreamAnswer.FromString)
        self.answers = call(iter(self.inbox.get, None), timeout=20)

    def send(self, message: pb.StreamCall | bytes) -> pb.StreamAnswer:
        self.inbox.put(message if isinstance(message, bytes) else message.SerializeToString())
        return next(self.answers)

    def close(self) -> None:
        self.inbox.put(None)
        self.channel.close()


@contextmanager
def raw(**config: object) -> Iterator[tuple[Server, RawStream, Callable[[int], pb.SharedRegion]]]:
    with served(**config) as server:
        stream = RawStream(server.address)

        def region(size: int) -> pb.SharedRegion:
            return stream.send(pb.StreamCall(open_region=pb.SharedRegionRequest(size=size))).region
        try:
            yield server, stream, region
        finally:
            stream.close()


def refused(stream: RawStream, message: pb.StreamCall | bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        stream.send(message)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return e.value


def in_region(length: int) -> pb.StreamCall:
    return pb.StreamCall(in_region=pb.InRegion(length=length))


def test_a_signal_without_pipes_is_invalid() -> None:
    with raw() as (_, stream, region):
        mapped = Region.mapped(region(MiB))
        assert mapped is not None
        call = codec.pieces_within(5, pb.GetParametersRequest(session_id="nope"))
        assert "without pipes" in refused(stream, mapped.write(call, signal=True)).details()
        mapped.close()


def test_a_torn_word_on_the_pipe_ends_the_stream() -> None:
    g = wide()
    with raw() as (server, stream, _), gg.connect(server.address) as client, \
            client.session(g, gg.init_params(g, seed=7)) as sess:
        described = stream.send(pb.StreamCall(open_region=pb.SharedRegionRequest(size=MiB, signal=True))).region
        mapped, pipes = Region.mapped(described), Pipes.opened(described)
        assert mapped is not None and pipes is not None
        stream.inbox.put(mapped.write(codec.pieces_within(5, pb.GetParametersRequest(session_id=sess.id)),
                                      signal=True))  # from this call on, through the pipes
        length = pipes.wait(time.monotonic() + 10)
        assert length and codec.decode_within(mapped.read(length) or b"", pb.StreamAnswer)[0] == "get_parameters"
        os.write(pipes.calls, b"abc")
        assert pipes.wait(time.monotonic() + 10) == ENDED  # the pipe's end: the stream says why
        with pytest.raises(grpc.RpcError) as e:
            next(stream.answers)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "3 bytes on the call pipe" in e.value.details()
        pipes.close()
        mapped.close()
        wait_for(lambda: metric(server.metrics_address, "gradgate_shared_memory_bytes") == 0, what="all freed")


def test_a_call_in_a_region_that_was_never_opened_is_invalid() -> None:
    with raw() as (_, stream, _region):
        assert "in_region without a region" in refused(stream, in_region(10)).details()


def test_a_length_past_the_region_is_invalid() -> None:
    with raw() as (_, stream, region):
        described = region(MiB)
        assert described.size == MiB and len(described.token) == server_side.TOKEN_BYTES
        assert "must be in [1, 1048576]" in refused(stream, in_region(MiB + 1)).details()


def test_garbage_or_a_region_inside_the_region_is_invalid() -> None:
    for body, text in ((b"\xff" * 64, "is not a valid gradgate.v1.StreamCall"),
                       (in_region(5).SerializeToString(), "the shared-memory region holds in_region, not a call")):
        with raw() as (_, stream, region):
            mapped = Region.mapped(region(MiB))
            assert mapped is not None
            stream.inbox.put(mapped.write(codec.Pieces([body], len(body))))
            with pytest.raises(grpc.RpcError) as e:
                next(stream.answers)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details()
            mapped.close()


def test_a_region_is_at_most_the_message_limit_and_never_shrinks() -> None:
    with raw(max_message_bytes=4 * MiB) as (server, stream, region):
        first = region(2 * MiB)
        assert first.size == 2 * MiB
        assert region(MiB) == first  # the stream keeps the bigger one it has
        assert region(2**64 - 1).size == 4 * MiB  # as big as the limit allows
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 4 * MiB
        assert region(0).size == 0  # none, and the stream's is freed
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 0
    with raw(max_message_bytes=MiB // 2) as (_, stream, region):  # too small for a region to pay
        assert region(MiB // 2).size == 0


def test_the_sdk_keeps_its_region_with_a_server_of_a_smaller_message_limit() -> None:
    g = gg.Graph("float64")
    x = g.input("x", (None, 1000))
    g.set_loss(gg.sum(x * x))
    with served(max_message_bytes=4 * MiB) as server, gg.connect(server.address) as client, \
            client.session(g, {}) as sess:
        for rows in (100, 300, 100, 300):  # 0.8 MB calls, then 2.4 MB ones: twice that is past the server's 4 MiB
            x = np.full((rows, 1000), 0.5)
            assert sess.forward({"x": x}).loss == rows * 250.0
        assert shared_calls(server.metrics_address) == 4
        assert metric(server.metrics_address, "gradgate_shared_memory_bytes") == 4 * MiB


def test_a_region_is_emptied_when_the_server_lets_it_go() -> None:
    """A client that keeps the region's file open does not keep its memory."""
    with raw() as (_, stream, region):
        described = region(MiB)
        fd = os.open(f"/proc/{described.pid}/fd/{described.fd}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x01" * MiB, 0)
            assert os.fstat(fd).st_blocks * 512 >= MiB
            assert region(2 * MiB).size == 2 * MiB  # replaces it
            assert os.fstat(fd).st_blocks == 0 and os.pread(fd, 16, 0) == bytes(16)
        finally:
            os.close(fd)


def test_a_client_cannot_shrink_the_region_under_the_server() -> None:
    """Shrinking a file under a process that maps it kills that process with SIGBUS when it reads
    past the new end: the server's regions are sealed at their size."""
    with raw() as (_, stream, region):
        described = region(MiB)
        fd = os.open(f"/proc/{described.pid}/fd/{described.fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 2 * MiB)
        finally:
            os.close(fd)
        request = pb.StreamCall(forward=pb.ForwardRequest(session_id="nope"))
        mapped = Region.mapped(described)
        assert mapped is not None
        data = request.SerializeToString()
        stream.inbox.put(mapped.write(codec.Pieces([data], len(data))))
        with pytest.raises(grpc.RpcError) as e:  # read from the region, and answered
            next(stream.answers)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        mapped.close()


def test_a_region_that_is_not_the_one_described_is_not_mapped() -> None:
    with raw() as (_, _stream, region):
        described = region(MiB)
        assert Region.mapped(described) is not None
        for wrong in (pb.SharedRegion(size=described.size, pid=described.pid, fd=described.fd, token=b"x" * 16),
                      pb.SharedRegion(size=described.size, pid=described.pid, fd=2**20, token=described.token),
                      pb.SharedRegion(size=2 * MiB, pid=described.pid, fd=described.fd, token=described.token),
                      pb.SharedRegion()):
            assert Region.mapped(wrong) is None


def test_an_answer_left_in_the_region_outlives_its_stream() -> None:
    """A server ends a stream right after an answer when it idles, ages or stops: the client may
    read that answer from the region after the stream has gone, so those pages stay."""
    g = wide()
    params = gg.init_params(g, seed=5)
    with raw(stream_idle_seconds=0.2) as (server, stream, region), gg.connect(server.address) as client, \
            client.session(g, params) as sess:
        mapped = Region.mapped(region(4 * MiB))
        assert mapped is not None
        call = codec.pieces_within(5, pb.GetParametersRequest(session_id=sess.id))
        marker = stream.send(mapped.write(call))
        wait_for(lambda: metric(server.metrics_address, "gradgate_shared_memory_bytes") == 0, what="stream gone")
        answer = mapped.read(marker.in_region.length)
        assert answer is not None
        name, _, got = codec.decode_within(answer, pb.StreamAnswer)
        assert name == "get_parameters"
        for k in params:
            np.testing.assert_array_equal(got["params"][k], params[k])
        mapped.close()


def test_a_server_cannot_make_the_sdk_write_to_another_file(tmp_path: object) -> None:
    """A server (or anyone in the middle) that describes some other open file of this host,
    with its size and first bytes as the token, gets nothing mapped: only a gradgate memfd,
    sealed at its size, is."""
    path = os.path.join(str(tmp_path), "victim.db")
    with open(path, "wb") as f:
        f.write(b"SQLite format 3\x00" + bytes(MiB - 16))
    fd = os.open(path, os.O_RDONLY)
    try:
        for token in (b"SQLite format 3\x00", b"S"):
            fake = pb.SharedRegion(size=MiB, pid=os.getpid(), fd=fd, token=token)
            assert Region.mapped(fake) is None
        unsealed = os.memfd_create("gradgate-call-stream")
        os.ftruncate(unsealed, MiB)
        os.pwrite(unsealed, b"t" * 16, 0)
        assert Region.mapped(pb.SharedRegion(size=MiB, pid=os.getpid(), fd=unsealed, token=b"t" * 16)) is None
        os.close(unsealed)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"


def test_only_servers_on_this_host_are_asked_for_a_region() -> None:
    for address in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.1:1,127.0.0.2:2",
                    "ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///localhost:50051", "unix:/tmp/gradgate.sock"):
        assert on_this_host(address), address
    for address in ("10.0.0.7:50051", "127.0.0.1:1,10.0.0.7:2", "[2001:db8::1]:50051", "ipv4:192.0.2.1:1",
                    "gradgate.invalid:50051"):
        assert not on_this_host(address), address


def test_only_local_peers_are_offered_a_region() -> None:
    assert server_side.local("ipv4:127.0.0.1:50051") and server_side.local("ipv6:%5B::1%5D:50051")
    assert server_side.local("unix:/tmp/gradgate.sock")
    for peer in ("ipv4:10.0.0.7:50051", "ipv6:%5B2001:db8::1%5D:50051", "ipv6:%5B::ffff:10.0.0.7%5D:1",
                 "ipv4:128.0.0.1:1", ""):
        assert not server_side.local(peer)
    from gradgate_server.metrics import Metrics
    lane = server_side.Lane(False, 64 * MiB, Metrics())
    assert pb.StreamAnswer.FromString(lane.open(pb.SharedRegionRequest(size=MiB))).region.size == 0
