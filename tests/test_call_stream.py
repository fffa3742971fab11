"""A session's calls over its CallStream (gradgate.call_stream), against a real server on
127.0.0.1, read back from its /metrics."""
from __future__ import annotations

import _thread
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from gradgate_server import Config, Server, serve
from gradgate_server.metrics import Metrics
from gradgate_server.rpc import gradient_service_handlers
from gradgate_server.service import GradientService
from gradgate_server.sessions import SessionStore

import gradgate as gg
import gradgate.call_stream
import gradgate.transport
from gradgate import GradgateError
from gradgate import codec
from gradgate.call_stream import CARRIED, CallStream
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.watchdog import Watchdog

from cluster import tanh_chain
from obs import GRADIENT_SERVICE, Scrape, served, wait_for
from procs import ServerProcess

STREAM = "CallStream"


@pytest.fixture(autouse=True, params=["direct", "threaded"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both of gradgate.transport' transports: the caller's own thread, and
    grpc's public stream with its threads (where grpcio's internal API differs)."""
    monkeypatch.setattr(gradgate.transport, "DIRECT", request.param == "direct" and gradgate.transport.DIRECT)
    return request.param


@contextmanager
def both_ways(g: gg.Graph, params: dict[str, np.ndarray], **config: object
              ) -> Iterator[tuple[Server, gg.Session, gg.Session]]:
    """A server, a session on it whose calls go over its CallStream, and a twin whose calls go unary."""
    with served(**config) as server, gg.connect(server.address) as streaming, \
            gg.connect(server.address, call_streams=False) as unary, \
            streaming.session(g, params) as a, unary.session(g, params) as b:
        yield server, a, b


def count(server: Server, name: str, method: str, **labels: str) -> float:
    return Scrape.of(server.metrics_address).value(name, grpc_service=GRADIENT_SERVICE, grpc_method=method, **labels)


def streamed_calls(server: Server) -> float:
    return count(server, "grpc_server_msg_received_total", STREAM)


def unary_calls(server: Server) -> float:
    """Calls of the methods a CallStream carries that came unary: every call counts as a call
    of its method, whichever way it came."""
    return sum(count(server, "grpc_server_handled_total", method) for method in CARRIED) - streamed_calls(server)


def ended(server: Server) -> float:
    """Streams that ended, with any status."""
    return count(server, "grpc_server_handled_total", STREAM)


def lecture() -> gg.Graph:
    """f = (x + y) * z, x a batch of scalars (summed), y and z parameters."""
    g = gg.Graph("float64")
    x = g.input("x", (None,))
    y, z = g.param("y", ()), g.param("z", ())
    g.set_loss(gg.sum((x + y) * z))
    return g


POINT = {"y": np.array(5.0), "z": np.array(-4.0)}


def mlp() -> gg.Graph:
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 6)), g.input("y", (None,), dtype="int64")
    w1, w2 = g.param("W1", (6, 8)), g.param("W2", (8, 3))
    g.set_loss(gg.softmax_cross_entropy(gg.relu(x @ w1) @ w2, y))
    return g


def batch(seed: int, n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)), "y": rng.integers(0, 3, n)}


def test_the_transport_under_test_is_the_one_in_use(transport: str) -> None:
    """The direct transport drives grpcio's internal ``segregated_call``: with the grpcio
    installed it must be available, or every stream would fall back to grpc's threads unseen."""
    assert gradgate.transport.DIRECT == (transport == "direct"), f"grpcio {grpc.__version__}"
    with served() as server, gg.connect(server.address, shared_memory=False) as client:
        stream = client.open_stream(STREAM)
        assert isinstance(stream, gradgate.transport.DirectStream if transport == "direct"
                          else gradgate.transport.ThreadedStream)
        stream.put(pb.StreamCall(get_parameters=pb.GetParametersRequest(session_id="gone")).SerializeToString())
        with pytest.raises(grpc.RpcError) as error:  # a call's error ends the stream, as its status
            next(stream)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "gone" in error.value.details()
        stream.abandon()


def test_the_lecture_numbers_over_the_stream() -> None:
    with served() as server, gg.connect(server.address) as client, client.session(lecture(), POINT) as sess:
        for _ in range(3):
            loss, grads = sess.forward_backward({"x": np.array([-2.0])})
            assert loss == -12.0
            assert {k: float(v) for k, v in grads.items()} == {"y": -4.0, "z": 3.0}
        assert streamed_calls(server) == 3
        assert unary_calls(server) == 0
        assert count(server, "grpc_server_started_total", STREAM) == 1  # one stream carried all three


def test_forward_then_backward_over_one_stream() -> None:
    """The lecture's two passes as two calls: both travel over the session's one stream."""
    with served() as server, gg.connect(server.address) as client, client.session(lecture(), POINT) as sess:
        for _ in range(3):
            assert sess.forward({"x": np.array([-2.0])}).loss == -12.0
            assert {k: float(v) for k, v in sess.backward().items()} == {"y": -4.0, "z": 3.0}
        assert streamed_calls(server) == 6
        assert unary_calls(server) == 0
        assert count(server, "grpc_server_started_total", STREAM) == 1
        assert count(server, "grpc_server_handled_total", "Forward", grpc_code="OK") == 3
        assert count(server, "grpc_server_handled_total", "Backward", grpc_code="OK") == 3


def test_every_carried_call_answers_as_its_unary_call() -> None:
    g = mlp()
    with both_ways(g, gg.init_params(g, seed=4)) as (server, a, b):
        for step in range(3):
            fa, fb = (s.forward(batch(step), outputs=["x", "W1"], train=step != 1) for s in (a, b))
            assert fa.loss == fb.loss and fa.outputs.keys() == fb.outputs.keys() == {"x", "W1"}
            for k in fa.outputs:
                np.testing.assert_array_equal(fa.outputs[k], fb.outputs[k])
            ga, gb = a.backward(inputs=True), b.backward(inputs=True)
            assert ga.keys() == gb.keys() == {"W1", "W2", "x"}
            for k in ga:
                np.testing.assert_array_equal(ga[k], gb[k])
            new = {k: v - 0.1 * ga[k] for k, v in a.get_params().items()}
            a.set_params(new)
            b.set_params(new)
        final_a, final_b = a.get_params(), b.get_params()
        assert final_a.keys() == final_b.keys() == {"W1", "W2"}
        assert all(np.array_equal(final_a[k], final_b[k]) for k in final_a)
        assert streamed_calls(server) == 3 * 4 + 1  # forward, backward, get_params and set_params: a's
        assert unary_calls(server) == 3 * 3 + 1  # b's


def test_a_failed_backward_on_the_stream_is_its_unary_error() -> None:
    with served() as server, gg.connect(server.address) as client, client.session(lecture(), POINT) as sess:
        with pytest.raises(GradgateError) as no_forward:
            sess.backward()
        assert no_forward.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "forward" in no_forward.value.message
        assert sess.forward({"x": np.array([-2.0])}).loss == -12.0
        assert float(sess.backward()["z"]) == 3.0
        assert count(server, "grpc_server_handled_total", "Backward", grpc_code="FailedPrecondition") == 1
        assert count(server, "grpc_server_started_total", STREAM) == 2 and unary_calls(server) == 0


def test_any_protobuf_client_can_use_the_stream() -> None:
    """A StreamCall as protobuf itself writes it is answered like the SDK's; one without a call,
    or not protobuf at all, ends the stream with INVALID_ARGUMENT and a message."""
    with served() as server, gg.connect(server.address) as client, client.session(lecture(), POINT) as sess:
        channel = grpc.insecure_channel(server.address)
        stream = channel.stream_stream(f"/{GRADIENT_SERVICE}/{STREAM}", request_serializer=lambda b: b,
                                       response_deserializer=pb.StreamAnswer.FromString)
        forward = pb.StreamCall(forward=pb.ForwardRequest(session_id=sess.id))
        gg.codec.to_tensor_map({"x": np.array([-2.0])}, forward.forward.inputs)
        backward = pb.StreamCall(backward=pb.BackwardRequest(session_id=sess.id))
        answers = list(stream(iter([forward.SerializeToString(), backward.SerializeToString()]), timeout=10))
        assert [a.WhichOneof("answer") for a in answers] == ["forward", "backward"]
        assert answers[0].forward.loss == -12.0
        grads = gg.codec.from_tensor_map(answers[1].backward.param_grads, "param_grads")
        assert {k: float(v) for k, v in grads.items()} == {"y": -4.0, "z": 3.0}
        for body, text in ((b"", "holds no call"), (b"\xff\xff\xff", "is not a valid gradgate.v1.StreamCall")):
            with pytest.raises(grpc.RpcError) as bad:
                list(stream(iter([body]), timeout=10))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in bad.value.details()
        channel.close()
        assert sess.forward({"x": np.array([-2.0])}).loss == -12.0  # the server carries on


def test_answers_equal_unary_calls_bit_for_bit() -> None:
    g = mlp()
    params = gg.init_params(g, seed=3)
    with both_ways(g, params) as (server, a, b):
        params_a = params_b = params
        for step in range(6):
            la, ga = a.forward_backward(batch(step), params=params_a)
            lb, gb = b.forward_backward(batch(step), params=params_b)
            assert la == lb
            assert ga.keys() == gb.keys() == {"W1", "W2"}
            for k in ga:
                np.testing.assert_array_equal(ga[k], gb[k])
            params_a = {k: v - 0.1 * ga[k] for k, v in params_a.items()}
            params_b = {k: v - 0.1 * gb[k] for k, v in params_b.items()}
        for k in params:  # the server committed the same parameters on both roads
            np.testing.assert_array_equal(a.get_params()[k], b.get_params()[k])
        assert streamed_calls(server) == 6 + 2  # and a's two get_params
        assert unary_calls(server) == 6 + 2


def test_an_error_is_raised_and_the_next_call_opens_a_new_stream() -> None:
    with served() as server, gg.connect(server.address) as client, client.session(mlp()) as sess:
        sess.forward_backward(batch(0))
        with pytest.raises(GradgateError) as bad:
            sess.forward_backward({"x": np.zeros((5, 7)), "y": np.zeros(5, np.int64)})
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.violations and bad.value.violations[0][0] == "inputs['x']"
        assert "must have shape" in bad.value.message
        loss, _ = sess.forward_backward(batch(1))
        assert np.isfinite(loss)
        assert count(server, "grpc_server_handled_total", STREAM, grpc_code="InvalidArgument") == 1
        assert count(server, "grpc_server_started_total", STREAM) == 2
        assert unary_calls(server) == 0
        # each call is counted as the ForwardBackward call it is, with its status and its time
        assert count(server, "grpc_server_handled_total", "ForwardBackward", grpc_code="InvalidArgument") == 1
        assert count(server, "grpc_server_handled_total", "ForwardBackward", grpc_code="OK") == 2
        assert count(server, "grpc_server_handling_seconds_count", "ForwardBackward") == 3


def test_a_server_without_free_slots_gets_unary_calls() -> None:
    g = mlp()
    with served(max_call_streams=1) as server, gg.connect(server.address) as client:
        first, second = client.session(g, gg.init_params(g, seed=0)), client.session(g, gg.init_params(g, seed=0))
        loss1, grads1 = first.forward_backward(batch(0))  # takes the only slot
        for _ in range(3):
            loss2, grads2 = second.forward_backward(batch(0))  # refused once, then unary without asking again
            assert loss2 == loss1
            np.testing.assert_array_equal(grads2["W1"], grads1["W1"])
        assert count(server, "grpc_server_handled_total", STREAM, grpc_code="ResourceExhausted") == 1
        assert unary_calls(server) == 3
        first.close()  # frees the slot
        wait_for(lambda: count(server, "grpc_server_handled_total", STREAM, grpc_code="OK") == 1, what="stream end")
        third = client.session(g)
        third.forward_backward(batch(0))
        assert streamed_calls(server) == 2
    with served(max_call_streams=0) as server, gg.connect(server.address) as client, client.session(g) as sess:
        sess.forward_backward(batch(0))
        sess.forward_backward(batch(1))
        assert unary_calls(server) == 2 and streamed_calls(server) == 0


def test_calls_after_the_client_is_closed_say_so() -> None:
    """A session's call after its client's close is CANCELLED with that reason (grpc raised a
    bare ValueError); closing the session then is harmless, and its stream ends on the server."""
    with served() as server:
        client = gg.connect(server.address, shared_memory=False)
        sess = client.session(lecture(), POINT)
        assert sess.forward({"x": np.array([-2.0])}).loss == -12.0  # over the stream
        client.close()
        for call in (lambda: sess.forward({"x": np.array([-2.0])}), sess.get_params, client.list_ops,
                     lambda: sess.upload({"x": np.zeros(3)}),
                     lambda: list(sess.train_stream(gg.optim.SGD(0.1), 1, 1, 0))):
            with pytest.raises(GradgateError) as closed:
                call()
            assert closed.value.code == grpc.StatusCode.CANCELLED and "client is closed" in closed.value.message
        sess.close()
        wait_for(lambda: ended(server) == 1, what="the session's stream ended on the server")


def test_a_session_dropped_without_close_frees_its_stream() -> None:
    g = mlp()
    with served(max_call_streams=1) as server, gg.connect(server.address) as client:
        dropped = client.session(g)
        dropped.forward_backward(batch(0))
        del dropped
        gc.collect()
        wait_for(lambda: ended(server) == 1, what="the dropped session's stream ended")
        with client.session(g) as sess:
            sess.forward_backward(batch(1))
        assert streamed_calls(server) == 2 and unary_calls(server) == 0


def test_the_sdk_ends_a_stream_it_has_not_used_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle stream holds a server thread: the SDK ends it after IDLE_SECONDS (20 s; here
    0.5 s), long before the server's --stream-idle-seconds would, and opens another when needed."""
    monkeypatch.setattr(gradgate.call_stream, "IDLE_SECONDS", 0.5)
    with served() as server, gg.connect(server.address) as client, client.session(lecture(), POINT) as sess:
        assert sess.forward_backward({"x": np.array([-2.0])}).loss == -12.0
        wait_for(lambda: count(server, "grpc_server_handled_total", STREAM, grpc_code="OK") == 1, timeout=3,
                 what="the idle stream to end")
        assert sess.forward_backward({"x": np.array([-2.0])}).loss == -12.0
        assert count(server, "grpc_server_started_total", STREAM) == 2 and unary_calls(server) == 0


def test_the_server_ends_an_idle_stream_and_the_session_carries_on() -> None:
    g = mlp()
    with served(stream_idle_seconds=0.3) as server, gg.connect(server.address) as client, \
            client.session(g, gg.init_params(g, seed=1)) as sess:
        expected = sess.forward_backward(batch(0)).loss
        wait_for(lambda: count(server, "grpc_server_handled_total", STREAM, grpc_code="Canceled") == 1,
                 timeout=5, what="the idle stream ended")
        assert sess.forward_backward(batch(0)).loss == expected  # the broken stream's call went unary
        assert sess.forward_backward(batch(0)).loss == expected  # and the next opened a new stream
        assert unary_calls(server) == 1 and streamed_calls(server) == 2


def test_a_call_past_its_timeout_is_cancelled_on_the_server() -> None:
    g = gg.Graph("float64")
    x, w = g.input("x", (None, 256)), g.param("W", (256, 256))
    h = x
    for _ in range(40):
        h = gg.tanh(h @ w)
    g.set_loss(gg.sum(h))
    slow = {"x": np.random.default_rng(0).normal(size=(4096, 256))}  # seconds of compute
    with served() as server, gg.connect(server.address, timeout=0.5) as client, client.session(g) as sess:
        sess.forward_backward({"x": slow["x"][:2]})  # opens the stream
        start = time.monotonic()
        with pytest.raises(GradgateError) as late:
            sess.forward_backward(slow)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "within 0.5 s" in late.value.message
        assert time.monotonic() - start < 1.5
        # the server stops computing for it (and frees the session) instead of finishing
        wait_for(lambda: count(server, "grpc_server_handled_total", STREAM, grpc_code="DeadlineExceeded")
                 + count(server, "grpc_server_handled_total", STREAM, grpc_code="Canceled") == 1, timeout=5)
        loss, _ = sess.forward_backward({"x": slow["x"][:2]})
        assert np.isfinite(loss)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["over the socket", "shared memory"])
def test_ctrl_c_during_a_call_leaves_no_answer_for_the_next(shared_memory: bool) -> None:
    """KeyboardInterrupt while the caller waits for an answer (inside grpc's wait on the
    direct transport, in poll() on the pipes) ends the stream: the next call opens another
    and gets its own answer, not the interrupted one's."""
    g, params = tanh_chain(120, 600)  # >= 0.5 s at 600 rows
    with served() as server, gg.connect(server.address, shared_memory=shared_memory) as client, \
            client.session(g, params) as sess:
        sess.forward({"x": np.zeros((1, 600))})  # opens the stream (and signals through the pipes from here on)
        timer = threading.Timer(0.15, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            sess.forward({"x": np.ones((600, 600))})
            time.sleep(5)  # (the interrupt lands here if the call was faster)
        timer.join()
        for k in (1.0, 2.0):
            expected = np.full((1, 600), k)
            for _ in range(120):
                expected = np.tanh(expected @ params["W"])
            assert sess.forward({"x": np.full((1, 600), k)}).loss == pytest.approx(float(expected.mean()), rel=1e-12)
        assert streamed_calls(server) == 4 and unary_calls(server) == 0  # a second stream, not unary calls


@pytest.mark.parametrize("call_streams", [True, False], ids=["on the stream", "unary"])
def test_ctrl_c_among_fast_calls_leaves_no_stream_open_and_no_lock_taken(call_streams: bool, transport: str) -> None:
    """Interrupts that land at random moments of a loop of fast calls, mostly inside grpc's
    own bookkeeping: each ends its stream on the server too, and leaves no grpc lock taken,
    so another thread's call on the same client is answered (it hung for good before: at the
    second interrupt among unary calls)."""
    if not call_streams and transport == "threaded":
        pytest.skip("grpcio's own unary call: a Ctrl-C inside its bookkeeping can leave its lock taken")

    def open_streams() -> float:
        return count(server, "grpc_server_started_total", STREAM) - count(server, "grpc_server_handled_total", STREAM)

    rng = np.random.default_rng(0)
    x = {"x": np.array([-2.0])}
    with served() as server, gg.connect(server.address, shared_memory=False, timeout=5,
                                        call_streams=call_streams) as client, \
            client.session(lecture(), POINT) as sess, client.session(lecture(), POINT) as other:
        expected = sess.forward(x).loss  # (x + y) * z = -12
        assert expected == -12.0
        for _ in range(20):
            timer = threading.Timer(rng.uniform(0.001, 0.01), _thread.interrupt_main)
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                for _ in range(10_000):
                    sess.forward(x)
            timer.join()
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(other.forward, x).result(timeout=10).loss == expected
            assert sess.forward(x).loss == expected
            wait_for(lambda: open_streams() == (2 if call_streams else 0), timeout=5, what="one stream per session")
        assert (streamed_calls(server) > 0) == call_streams


def test_threads_sharing_a_session_all_get_their_answers() -> None:
    g = mlp()
    params = gg.init_params(g, seed=2)
    with served() as server, gg.connect(server.address) as client, client.session(g, params) as sess:
        expected = {i: sess.forward_backward(batch(i), params=params).loss for i in range(4)}
        got: dict[tuple[int, int], float] = {}

        def work(t: int) -> None:
            for i in range(15):
                got[t, i] = sess.forward_backward(batch(i % 4), params=params).loss

        threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == {(t, i): expected[i % 4] for t in range(3) for i in range(15)}
        assert streamed_calls(server) + unary_calls(server) == 4 + 45


def test_a_stopping_server_ends_idle_streams_without_waiting_out_its_grace() -> None:
    server = serve("127.0.0.1:0", Config(metrics_port=0))
    with gg.connect(server.address, retry_seconds=0) as client:
        sess = client.session(mlp())
        sess.forward_backward(batch(0))  # the stream now waits for its next call
        start = time.monotonic()
        server.stop(10.0)
        assert time.monotonic() - start < 2.0
        with pytest.raises(GradgateError) as gone:
            sess.forward_backward(batch(0))
        assert gone.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_script_that_never_closes_its_client_still_exits() -> None:
    script = textwrap.dedent("""
        import numpy as np
        import gradgate as gg
        g = gg.Graph("float64")
        x, w = g.input("x", (None, 2)), g.param("w", (2, 1))
        g.set_loss(gg.sum(x @ w))
        client = gg.connect()  # an embedded server, never closed: the interpreter must not wait for it
        print(client.session(g).forward_backward({"x": np.ones((3, 2))}).loss)
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert np.isfinite(float(done.stdout))
    assert time.monotonic() - start < 20  # not the 60 s of the server's idle limit


def test_a_script_that_exits_while_a_thread_is_in_a_call_exits_cleanly(transport: str) -> None:
    """At exit a daemon thread is still in a loop of calls over its session's stream: the
    stream is left to the process's end (taking its events from a second thread at exit gave
    "KeyError: None" from grpc in half the runs, and read a freed completion queue). The server
    runs in a process of its own: an embedded one has a race of its own at exit (grpcio's
    server thread fails to hand a unary call to its executor, shut down by then)."""
    script = textwrap.dedent(f"""
        import sys, threading, time
        import numpy as np
        import gradgate as gg, gradgate.transport
        gradgate.transport.DIRECT = {transport == "direct"} and gradgate.transport.DIRECT
        g = gg.Graph("float64")
        x, w = g.input("x", (None, 2)), g.param("w", (2, 1))
        g.set_loss(gg.sum(x @ w))
        client = gg.connect(sys.argv[1], shared_memory=False)
        sess = client.session(g)
        def calls():
            while True:
                sess.forward({{"x": np.ones((3, 2))}})
        threading.Thread(target=calls, daemon=True).start()
        time.sleep(0.3)
        print("exiting", flush=True)
    """)
    server = ServerProcess()
    try:
        for _ in range(6):
            done = subprocess.run([sys.executable, "-c", script, server.address], capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0 and done.stdout == "exiting\n" and done.stderr == "", done.stderr
    finally:
        server.close()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["over the socket", "shared memory"])
def test_closing_a_session_on_a_frozen_server_takes_one_timeout(shared_memory: bool) -> None:
    """Leaving a session's with block when its server stopped answering (SIGSTOP) takes one
    client timeout, for its stream's end and CloseSession together (it took one each)."""
    server = ServerProcess()
    try:
        with gg.connect(server.address, timeout=1.0, shared_memory=shared_memory) as client:
            sess = client.session(lecture(), POINT)
            assert sess.forward({"x": np.array([-2.0])}).loss == -12.0  # the stream is open
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(GradgateError) as frozen:
                    sess.close()
                took = time.monotonic() - start
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert frozen.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.9 < took < 1.5
    finally:
        server.close()


def test_closing_a_session_while_another_thread_calls_it() -> None:
    g = mlp()
    with served() as server, gg.connect(server.address, timeout=5) as client:
        for _ in range(5):
            sess = client.session(g)
            sess.forward_backward(batch(0))
            errors: list[str] = []
            stop = threading.Event()

            def loop() -> None:
                while not stop.is_set():
                    try:
                        sess.forward_backward(batch(1))
                    except GradgateError as e:  # after the close: the session is gone
                        errors.append(e.code.name)
                        return

            worker = threading.Thread(target=loop)
            worker.start()
            time.sleep(0.03)
            sess.close()
            stop.set()
            worker.join(10)
            assert not worker.is_alive()
            assert set(errors) <= {"NOT_FOUND"}
        with client.session(g) as sess:  # the client is still whole
            assert np.isfinite(sess.forward_backward(batch(0)).loss)
        wait_for(lambda: ended(server) == count(server, "grpc_server_started_total", STREAM), what="every stream ended")


def test_stream_slots_leave_a_thread_for_unary_calls() -> None:
    g = mlp()
    with served(max_workers=2, max_call_streams=4) as server, gg.connect(server.address, timeout=5) as client:
        sessions = [client.session(g) for _ in range(3)]
        for sess in sessions:  # one stream; the others are refused and go unary
            sess.forward_backward(batch(0))
        assert streamed_calls(server) == 1 and unary_calls(server) == 2
        assert client.list_ops()  # a unary call still finds a thread


def test_streams_of_every_kind_leave_a_thread_for_unary_calls() -> None:
    """CallStreams, UploadData and Train streams share --max-workers - 1 RPC threads: quiet
    streams of any kind cannot make unary calls wait, and a stream that finds no thread free
    is refused at once."""
    g = mlp()
    with served(max_workers=3, max_call_streams=4, stream_idle_seconds=5) as server, \
            gg.connect(server.address, timeout=10) as client, client.session(g) as sess:
        quiet = threading.Event()
        upload, metadata = client.stream("UploadData", sess.key)
        held = [upload.future(iter(quiet.wait, True), metadata=metadata) for _ in range(2)]  # send nothing
        wait_for(lambda: count(server, "grpc_server_started_total", "UploadData") == 2, what="both uploads open")
        with pytest.raises(grpc.RpcError) as refused:  # a third stream, of any kind: no thread is left for it
            list(client.stream("Train", sess.key)[0](iter(quiet.wait, True), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-workers - 1 streams are open" in refused.value.details()
        started = time.monotonic()
        assert np.isfinite(sess.forward_backward(batch(0)).loss)  # its CallStream is refused: sent unary
        assert sess.get_params().keys() == {"W1", "W2"}
        assert time.monotonic() - started < 2  # not after a quiet stream's 5 s
        assert count(server, "grpc_server_handled_total", STREAM, grpc_code="ResourceExhausted") == 1
        assert streamed_calls(server) == 0 and unary_calls(server) == 2
        quiet.set()
        for call in held:
            call.cancel()
        wait_for(lambda: count(server, "grpc_server_handled_total", "UploadData") == 2, what="both uploads ended")
        sess.upload({"x": np.zeros((4, 6)), "y": np.zeros(4, np.int64)})  # their threads are free again


def test_one_rpc_thread_is_for_unary_calls_only() -> None:
    """--max-workers 1: no stream may take the only thread."""
    g = mlp()
    with served(max_workers=1) as server, gg.connect(server.address, timeout=5, retry_seconds=0.5) as client, \
            client.session(g) as sess:
        assert np.isfinite(sess.forward_backward(batch(0)).loss)  # its CallStream refused: unary
        with pytest.raises(GradgateError) as refused:
            sess.upload({"x": np.zeros((4, 6)), "y": np.zeros(4, np.int64)})
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams are open" in refused.value.message
        assert client.list_ops()
        assert streamed_calls(server) == 0 and unary_calls(server) == 1


@pytest.mark.parametrize("shared_memory", [False, True], ids=["over the socket", "shared memory"])
def test_aging_connections_never_cut_a_call_that_ran(shared_memory: bool) -> None:
    """With --max-connection-age the server ends each stream between calls (after half the
    grace), before the connection's cut could drop an answer the client would then ask again:
    every call runs once, so batchnorm's running statistics equal those of a unary-only run
    on a server whose connections do not age (a unary call of its own could be cut)."""
    g = gg.Graph("float64")
    x = g.input("x", (None, 3))
    gamma, beta = g.param("gamma", (3,)), g.param("beta", (3,))
    big = g.param("big", (1000, 1000))  # 8 MB of gradient in every answer: longer on the wire, where a cut falls
    g.set_loss(gg.sum(gg.batchnorm(x, gamma, beta, momentum=0.9, name="bn") ** 2) + 0.0 * gg.sum(big))
    params = {"gamma": np.ones(3), "beta": np.zeros(3), "big": np.zeros((1000, 1000))}
    data = np.random.default_rng(0).normal(size=(8, 3))
    with served(max_connection_age_seconds=0.4, grace_seconds=2.0) as server, served() as reference, \
            gg.connect(server.address, shared_memory=shared_memory) as aging, \
            gg.connect(reference.address, call_streams=False) as unary, \
            aging.session(g, params) as a, unary.session(g, params) as b:
        calls, stop = 0, time.monotonic() + 4.0
        while time.monotonic() < stop and calls < 2000:
            a.forward_backward({"x": data + calls})
            b.forward_backward({"x": data + calls})
            calls += 1
        assert count(server, "grpc_server_started_total", STREAM) > 2  # streams came and went
        assert streamed_calls(server) + unary_calls(server) == calls  # each call ran once
        for name, value in b.get_buffers().items():
            np.testing.assert_array_equal(a.get_buffers()[name], value)


def test_a_server_without_call_streams_gets_unary_calls_after_one_try() -> None:
    """An older server, without CallStream, answers UNIMPLEMENTED once: the session's calls
    go unary from then on, without asking again."""
    config, metrics = Config(), Metrics()
    store = SessionStore(config.session_ttl_seconds, config.max_sessions, config.cache_bytes)
    handlers = gradient_service_handlers(GradientService(store, config, metrics), metrics, config.max_message_bytes,
                                         config.max_tensor_elements)
    del handlers[STREAM]
    asked: list[str] = []

    class Unknown(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> None:
            asked.append(details.method)  # type: ignore[attr-defined]

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_registered_method_handlers(GRADIENT_SERVICE, handlers)
    server.add_generic_rpc_handlers((Unknown(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with gg.connect(f"127.0.0.1:{port}") as client, client.session(lecture(), POINT) as sess:
            for _ in range(4):
                loss, grads = sess.forward_backward({"x": np.array([-2.0])})
                assert loss == -12.0 and float(grads["y"]) == -4.0
        assert asked == [f"/{GRADIENT_SERVICE}/{STREAM}"]
        assert metrics.registry.get_sample_value("grpc_server_handled_total", {
            "grpc_service": GRADIENT_SERVICE, "grpc_method": "ForwardBackward", "grpc_type": "unary",
            "grpc_code": "OK"}) == 4
    finally:
        server.stop(0)


def test_a_request_that_comes_as_the_idle_wait_expires_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle watchdog takes an expired wait, then cancels the stream. A request read in
    between is run and answered, never run and then cut off (the client would send it again,
    and it would run twice). Here every expiry is acted on 0.15 s late, so the slow call lands
    in that gap."""
    arm = Watchdog.arm
    monkeypatch.setattr(Watchdog, "arm", lambda self, key, seconds, expire: arm(
        self, key, seconds, lambda: (time.sleep(0.15), expire())))
    g, params = tanh_chain(120, 600)  # a forward of >= 0.5 s at 600 rows (two BLAS threads): still running
    # when the late cancel comes
    small, big = {"x": np.ones((1, 600))}, {"x": np.ones((600, 600))}
    # (without shared memory: the big forward's request for a region would count as a stream message)
    with served(stream_idle_seconds=0.2) as server, gg.connect(server.address, shared_memory=False) as client, \
            client.session(g, params) as sess:
        sess.forward(small)
        time.sleep(0.27)  # the wait expired (the watchdog looks every 0.05 s); its cancel comes 0.15 s later
        started = time.monotonic()
        sess.forward(big)
        assert time.monotonic() - started > 0.2  # still running when the cancel came
        sess.forward(small)
        assert count(server, "grpc_server_handled_total", "Forward") == 3  # each ran once, whatever its status
        assert count(server, "grpc_server_handled_total", "Forward", grpc_code="OK") == 3
        assert streamed_calls(server) == 3 and unary_calls(server) == 0


def test_a_call_that_fits_only_unary_goes_unary() -> None:
    """A StreamCall or StreamAnswer can be a few bytes longer than the unary message it holds
    (its tensor data stays aligned): a request or an answer that fits the limit only unary is
    sent unary, and answered as always."""
    def answer(name: str, within: bool) -> int:  # the bytes of the forward's answer, as the server encodes it
        response, outputs = pb.ForwardResponse(loss=1.0, forward_id=1), {name: np.ones((20, 300))}
        return len(codec.encode_within(1, response, outputs=outputs) if within else codec.encode(response, outputs=outputs))

    name = next(n for n in ("w" * k for k in range(1, 17)) if answer(n, within=True) > answer(n, within=False))
    g = gg.Graph("float64")
    x = g.input("x", (None, 1))
    g.set_loss(gg.sum(gg.exp(x + gg.constant(np.linspace(0, 1, 300)[None, :], name="c"), name=name)))
    batch = {"x": np.linspace(-1, 1, 20)[:, None]}
    with served(max_message_bytes=answer(name, within=False)) as server, gg.connect(server.address) as client, \
            client.session(g, {}) as sess:
        got = sess.forward(batch, outputs=[name])
        np.testing.assert_allclose(got.outputs[name], np.exp(batch["x"] + np.linspace(0, 1, 300)[None, :]))
        assert count(server, "grpc_server_handled_total", "Forward", grpc_code="OK") == 1
        assert count(server, "grpc_server_handled_total", "Forward", grpc_code="Canceled") == 1  # the stream's try
        # and a request that fits only unary never goes on the stream
        inputs = {"x": np.ones((100, 1))}
        request = next(r for r in (pb.ForwardRequest(session_id=sess.id, seed=2**k) for k in range(0, 64, 7))
                       if len(codec.encode_within(1, r, inputs=inputs)) > len(codec.encode(r, inputs=inputs)))
        unary_size = len(codec.encode(request, inputs=inputs))
        with gg.connect(server.address, max_message_bytes=unary_size) as tight:
            stream = CallStream(tight, sess.key)
            response, _ = tight.call("Forward", request, sess.key, stream=stream, inputs=inputs)
            assert response.loss == pytest.approx(len(inputs["x"]) * np.exp(np.linspace(0, 1, 300) + 1).sum())
            stream.close(time.monotonic() + 5)
        assert count(server, "grpc_server_handled_total", "Forward", grpc_code="OK") == 2
