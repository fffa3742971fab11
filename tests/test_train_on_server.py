"""Training on the server: UploadData + the Train stream, against the client-driven loop,
over real gRPC, with a real server process killed mid-run, and client checkpoints."""
from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradgate as gg
from gradgate import codec, schedule
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import train_pb2
from gradgate_server import Config, Server, serve

from obs import Scrape, free_port, wait_for
from procs import ROOT, ServerProcess

Code = grpc.StatusCode


def mlp(dtype: str = "float64", hidden: int = 16) -> gg.Graph:
    g = gg.Graph(dtype)
    x, y = g.input("x", (None, 2)), g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (2, hidden)), g.param("b1", (hidden,))
    W2, b2 = g.param("W2", (hidden, 3)), g.param("b2", (3,))
    g.set_loss(gg.softmax_cross_entropy(gg.tanh(x @ W1 + b1) @ W2 + b2, y) + 1e-3 * gg.l2(W1))
    return g


def spiral(n: int = 60) -> dict[str, np.ndarray]:
    X, y = gg.spiral(n_per_class=n, seed=2)
    return {"x": X, "y": y}


def run(client: gg.Client, optimizer: gg.optim.Optimizer, on_server: bool, **kw) -> tuple[list[float], dict]:
    g = mlp()
    with client.session(g, gg.init_params(g, seed=1)) as sess:
        losses = gg.train(sess, spiral(), optimizer, progress=False, on_server=on_server, **kw)
        return losses, sess.get_params()


@pytest.fixture(scope="module")
def client():
    with gg.connect(timeout=20) as c:
        yield c


@pytest.mark.parametrize("make", [lambda: gg.optim.SGD(0.2, momentum=0.9), lambda: gg.optim.Adam(0.02)],
                         ids=["sgd-momentum", "adam"])
def test_server_training_equals_the_client_driven_loop(client, make) -> None:
    kw = dict(epochs=4, batch_size=25, seed=5, sync_every=3)
    here_opt, there_opt = make(), make()
    here, here_params = run(client, here_opt, False, **kw)
    there, there_params = run(client, there_opt, True, **kw)
    assert len(there) == 4 * 8 and np.mean(there[-8:]) < np.mean(there[:8])  # the last epoch against the first
    np.testing.assert_allclose(there, here, rtol=1e-12)
    for name in here_params:
        np.testing.assert_allclose(there_params[name], here_params[name], rtol=1e-12, atol=0)
    # the optimizer comes back with the server's state: training can go on from either
    assert there_opt.step_count == here_opt.step_count == 32
    for key, value in here_opt.state().items():
        np.testing.assert_allclose(there_opt.state()[key], value, rtol=1e-12)


def test_explicit_row_ranges_and_a_sync_on_request(client) -> None:
    """Raw RPCs: TrainStart.batches names contiguous rows; a `sync` request gets the state mid-run."""
    g, data = mlp(), spiral(10)
    params = gg.init_params(g, seed=4)
    ranges = [(0, 7), (7, 30), (3, 4)]
    with client.session(g, params) as here:
        opt = gg.optim.SGD(0.1)
        p = here.get_params()
        expected = []
        for start, stop in ranges:
            loss, grads = here.forward_backward({k: v[start:stop] for k, v in data.items()}, params=p)
            expected.append(loss)
            p = opt.step(p, grads)
    with client.session(g, params) as sess:
        assert sess.upload(data) == 30 * (2 * 8 + 8)
        start = train_pb2.TrainStart(session_id=sess.id, optimizer=gg.optim.SGD(0.1).to_proto(),
                                     batches=[train_pb2.RowRange(start=a, stop=b) for a, b in ranges])
        requests = [train_pb2.TrainRequest(start=start), train_pb2.TrainRequest(sync=True)]
        call, metadata = client.stream("Train", sess.id)
        replies = [train_pb2.TrainResponse.FromString(r) for r in
                   call(iter(r.SerializeToString() for r in requests), metadata=metadata, timeout=20)]
    losses = [x for r in replies if r.HasField("progress") for x in r.progress.losses]
    assert losses == pytest.approx(expected, rel=1e-12)
    final = replies[-1].sync
    assert final.done and final.step == 3 and final.optimizer_state.step == 3
    for name, value in p.items():
        np.testing.assert_allclose(codec.from_tensor(final.params[name]), value, rtol=1e-12)


def raw_error(client: gg.Client, method: str, messages: list) -> grpc.RpcError:
    call, metadata = client.stream(method)
    with pytest.raises(grpc.RpcError) as e:
        out = call(iter(m.SerializeToString() for m in messages), timeout=20)
        if method == "Train":
            list(out)
    return e.value


def test_bad_uploads_and_train_starts_are_clear_errors(client) -> None:
    g = mlp()
    with client.session(g) as sess:
        x = np.zeros((4, 2))
        y = np.zeros(4, np.int64)

        def upload(rows: int, **columns) -> grpc.RpcError:
            msg = train_pb2.UploadDataRequest(session_id=sess.id, rows=rows)
            codec.to_tensor_map(columns, msg.columns)
            return raw_error(client, "UploadData", [msg])

        e = upload(4, x=x)
        assert e.code() == Code.INVALID_ARGUMENT and "every input column ['x', 'y']" in e.details()
        e = upload(3, x=x, y=y)
        assert e.code() == Code.INVALID_ARGUMENT and "more than the 3 rows it announced" in e.details()
        e = upload(5, x=x, y=y)
        assert e.code() == Code.INVALID_ARGUMENT and "announced 5 rows but sent 4" in e.details()
        e = upload(4, x=np.zeros((4, 3)), y=y)
        assert e.code() == Code.INVALID_ARGUMENT and "column 'x' rows must be float64 (N, 2)" in e.details()
        e = upload(4, x=x, y=y[:3])
        assert e.code() == Code.INVALID_ARGUMENT and "rows in this chunk, the others" in e.details()

        def start(**kw) -> grpc.RpcError:
            return raw_error(client, "Train", [train_pb2.TrainRequest(start=train_pb2.TrainStart(
                session_id=sess.id, **kw))])

        e = start(optimizer=gg.optim.SGD(0.1).to_proto(), epochs=1)
        assert e.code() == Code.INVALID_ARGUMENT and "call UploadData before Train" in e.details()
        sess.upload({"x": x, "y": y})
        e = start(epochs=1)
        assert e.code() == Code.INVALID_ARGUMENT and "no optimizer given" in e.details()
        e = start(optimizer=train_pb2.Optimizer(adam=train_pb2.Adam(lr=float("inf"))), epochs=1)
        assert e.code() == Code.INVALID_ARGUMENT and "lr must be a finite number > 0, got inf" in e.details()
        e = start(optimizer=gg.optim.SGD(0.1).to_proto(), epochs=1, start_step=9)
        assert e.code() == Code.INVALID_ARGUMENT and "past the schedule's 1 steps" in e.details()
        e = start(optimizer=gg.optim.SGD(0.1).to_proto(), batches=[train_pb2.RowRange(start=2, stop=9)])
        assert e.code() == Code.INVALID_ARGUMENT and "not within the dataset's 4 rows" in e.details()
        for step in (-1, 2**63 - 1):  # NaN parameters; INTERNAL at the final sync, once
            e = start(optimizer=gg.optim.Adam(0.1).to_proto(), epochs=1,
                      optimizer_state=train_pb2.OptimizerState(step=step))
            assert e.code() == Code.INVALID_ARGUMENT and f"step count must be in [0, 2**62], got {step}" in e.details()
        sess.upload({"x": x, "y": np.array([0, 1, 2, 7])})  # a label out of range: the last row's step fails
        e = start(optimizer=gg.optim.SGD(0.1).to_proto(), batches=[train_pb2.RowRange(start=i, stop=i + 1)
                                                                   for i in range(4)])
        assert e.code() == Code.INVALID_ARGUMENT and e.details().startswith("step 3: node ") and "7" in e.details()
        e = raw_error(client, "Train", [train_pb2.TrainRequest(sync=True)])
        assert e.code() == Code.INVALID_ARGUMENT and "first Train message must be `start`" in e.details()


def test_the_schedule_resumes_at_any_step_with_the_same_batches() -> None:
    full = list(schedule.batches(10, 4, 3, seed=7))
    assert len(full) == schedule.step_count(10, 4, 3) == 9
    for epoch in range(3):  # each epoch visits every row once
        assert sorted(np.concatenate(full[3 * epoch:3 * epoch + 3]).tolist()) == list(range(10))
    assert [b.tolist() for b in full[:3]] != [b.tolist() for b in full[3:6]]  # a fresh order per epoch
    for start in range(10):
        assert [b.tolist() for b in schedule.batches(10, 4, 3, 7, start)] == [b.tolist() for b in full[start:]]


def test_a_train_resumed_at_a_huge_step_starts_at_once(client) -> None:
    # skipping 2**40 - 1 epochs must not walk through them (it once held a server thread for good)
    g = mlp()
    with client.session(g) as sess:
        sess.upload(spiral(2))
        epochs = 2**40
        start = time.monotonic()
        replies = list(sess.train_stream(gg.optim.SGD(0.1), 6, epochs, seed=3, start_step=epochs - 1))
        assert time.monotonic() - start < 5
        assert [r.progress.first_step for r in replies if r.HasField("progress")] == [epochs - 1]
        assert replies[-1].sync.done and replies[-1].sync.step == epochs


def test_one_train_at_a_time_and_no_upload_while_it_runs(client) -> None:
    g = mlp()
    with client.session(g) as sess:
        sess.upload(spiral(10))
        running = sess.train_stream(gg.optim.Adam(0.01), 5, 10**6, seed=1, sync_every=1)
        assert next(running).HasField("progress")  # the first step ran: the stream is live
        with pytest.raises(gg.GradgateError) as e:
            list(sess.train_stream(gg.optim.Adam(0.01), 5, 1, seed=1))
        assert e.value.code == Code.FAILED_PRECONDITION and "cannot start another Train" in e.value.message
        with pytest.raises(gg.GradgateError) as e:
            sess.upload(spiral(2))  # fewer rows under a running schedule once gave INTERNAL (IndexError)
        assert e.value.code == Code.FAILED_PRECONDITION and "cannot replace the dataset" in e.value.message
        running.close()  # cancels the stream; the server notices between steps

        def uploaded() -> bool:
            try:
                return sess.upload(spiral(2)) > 0
            except gg.GradgateError as e:
                assert e.code == Code.FAILED_PRECONDITION
                return False

        wait_for(uploaded, what="the cancelled Train to release the session")
        losses = gg.train(sess, spiral(2), gg.optim.Adam(0.01), batch_size=3, progress=False, on_server=True)
        assert len(losses) == 2 and all(np.isfinite(losses))


def test_an_upload_over_the_data_budget_is_refused_before_allocating() -> None:
    g = mlp()
    with serve("127.0.0.1:0", Config(session_bytes=64 * 1024)) as server, \
            gg.connect(server.address, timeout=20) as client, client.session(g) as sess:
        before = server.store.state_bytes
        with pytest.raises(gg.GradgateError) as e:
            sess.upload({"x": np.zeros((5000, 2)), "y": np.zeros(5000, np.int64)})
        assert e.value.code == Code.RESOURCE_EXHAUSTED and "per-session budget of 65536" in e.value.message
        assert server.store.state_bytes == before
        assert sess.upload({"x": np.zeros((100, 2)), "y": np.zeros(100, np.int64)}) == 2400
        assert server.store.state_bytes == before + 2400


def test_uploads_in_flight_count_against_the_budget() -> None:
    # 24 bytes a row: two uploads of 30,000 rows fit one at a time in 1 MB, not both at once
    g = mlp()
    rows = 30_000
    with serve("127.0.0.1:0", Config(state_bytes=2**20)) as server, gg.connect(server.address, timeout=20) as client, \
            client.session(g) as a, client.session(g) as b:
        release = threading.Event()

        def held_open():  # announces the upload, then waits before sending the rows
            msg = train_pb2.UploadDataRequest(session_id=a.id, rows=rows)
            yield codec.encode(msg, columns={"x": np.zeros((1, 2)), "y": np.zeros(1, np.int64)})
            release.wait(20)
            yield codec.encode(train_pb2.UploadDataRequest(),
                               columns={"x": np.zeros((rows - 1, 2)), "y": np.zeros(rows - 1, np.int64)})

        call, _ = client.stream("UploadData")
        first = call.future(held_open(), timeout=20)
        wait_for(lambda: server.store.reserved_bytes, interval=0.01, what="the first upload's reservation")
        assert server.store.reserved_bytes == rows * 24
        with pytest.raises(gg.GradgateError) as e:
            b.upload({"x": np.zeros((rows, 2)), "y": np.zeros(rows, np.int64)})
        assert e.value.code == Code.RESOURCE_EXHAUSTED and "more than its budget of 1048576" in e.value.message
        release.set()
        assert train_pb2.UploadDataResponse.FromString(first.result()).bytes == rows * 24
        assert server.store.reserved_bytes == 0 and server.store.state_bytes < 2**20
        with pytest.raises(gg.GradgateError):  # still refused: the first dataset is held now
            b.upload({"x": np.zeros((rows, 2)), "y": np.zeros(rows, np.int64)})
        assert server.store.reserved_bytes == 0


def test_quiet_streams_end_instead_of_holding_rpc_threads() -> None:
    g = mlp()
    with serve("127.0.0.1:0", Config(max_workers=3, stream_idle_seconds=0.5)) as server, \
            gg.connect(server.address, timeout=20) as client, client.session(g) as sess:
        stop = threading.Event()

        def then_quiet(first: bytes):
            yield first
            stop.wait(30)

        announce = codec.encode(train_pb2.UploadDataRequest(session_id=sess.id, rows=10),
                                columns={"x": np.zeros((1, 2)), "y": np.zeros(1, np.int64)})
        upload, _ = client.stream("UploadData")
        train, _ = client.stream("Train")
        quiet = upload.future(then_quiet(announce))  # no deadline: one of the two RPC threads streams may hold
        start = time.monotonic()
        assert quiet.exception(10).code() == Code.DEADLINE_EXCEEDED
        assert "sent no message on this stream for 0.5 s" in quiet.exception().details()
        assert time.monotonic() - start < 5
        with pytest.raises(grpc.RpcError) as e:  # a Train that never sends its start
            list(train(iter(stop.wait, True), timeout=10))
        assert e.value.code() == Code.DEADLINE_EXCEEDED
        assert sess.forward_backward(spiral(2)).loss > 0  # the threads are free again

        # after its start, a Train's request side may stay quiet for as long as it runs
        sess.upload(spiral(10))
        ask = threading.Event()

        def start_then_a_sync_later():
            yield train_pb2.TrainRequest(start=train_pb2.TrainStart(
                session_id=sess.id, optimizer=gg.optim.SGD(0.1).to_proto(), batch_size=3, epochs=10**6)
            ).SerializeToString()
            ask.wait(20)
            yield train_pb2.TrainRequest(sync=True).SerializeToString()
            stop.wait(30)

        replies = train(start_then_a_sync_later(), timeout=20)
        time.sleep(1.5)  # three idle periods
        ask.set()
        for data in replies:
            reply = train_pb2.TrainResponse.FromString(data)
            if reply.HasField("sync"):
                assert not reply.sync.done and reply.sync.step > 0
                break
        replies.cancel()
        stop.set()


# -- surviving the server ----------------------------------------------------------

def test_training_on_the_server_survives_sigkill_and_restart(caplog) -> None:
    """The server process is killed with SIGKILL mid-run and restarted on the same port a
    moment later; the SDK waits for it, re-creates the session from the last sync and
    resumes, ending with the parameters and losses of an uninterrupted run."""
    kw = dict(epochs=200, batch_size=10, seed=3, sync_every=25)  # 3,600 steps: a wide window for the kill
    with gg.connect(timeout=20) as local:
        expected, expected_params = run(local, gg.optim.Adam(0.01), True, **kw)

    port = free_port()
    server = ServerProcess("--port", str(port))
    replacement: list[ServerProcess] = []
    try:
        with gg.connect(server.address, timeout=20, retry_seconds=30) as client:
            g = mlp()
            done = threading.Event()

            def kill_and_restart() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and \
                        Scrape.of(server.metrics_address).value("gradgate_examples_processed_total") < 3000:
                    time.sleep(0.01)  # 300 of the 3,600 steps done: several syncs in
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(10)
                time.sleep(0.5)  # unreachable for a while
                replacement.append(ServerProcess("--port", str(port)))
                done.set()

            killer = threading.Thread(target=kill_and_restart)
            killer.start()
            with caplog.at_level(logging.WARNING, logger="gradgate"), \
                    client.session(g, gg.init_params(g, seed=1)) as sess:
                losses = gg.train(sess, spiral(), gg.optim.Adam(0.01), progress=False, on_server=True, **kw)
                params = sess.get_params()
            killer.join(30)
            assert done.is_set()
    finally:
        server.close()
        for p in replacement:
            p.close()
    assert any("resuming from the last sync" in r.message for r in caplog.records), "the kill came too late"
    assert losses == pytest.approx(expected, rel=1e-12)
    for name, value in expected_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-12, atol=0)


CLIENT = """
import sys, numpy as np, gradgate as gg
sys.path.insert(0, {tests!r})
from test_train_on_server import mlp, spiral
g = mlp()
with gg.connect({address!r}, timeout=20) as client, client.session(g, gg.init_params(g, seed=1)) as sess:
    losses = gg.train(sess, spiral(), gg.optim.SGD(0.1, momentum=0.9), epochs=80, batch_size=30, seed=4,
                      progress=False, on_server={on_server}, sync_every=5, checkpoint={path!r})
    np.savez({out!r}, losses=np.array(losses), **sess.get_params())
"""


@pytest.mark.parametrize("on_server", [False, True], ids=["client-driven", "on-server"])
def test_a_killed_client_resumes_from_its_checkpoint(tmp_path: Path, on_server: bool) -> None:
    with serve("127.0.0.1:0") as server:
        def client(name: str, checkpoint: Path) -> subprocess.Popen:
            script = CLIENT.format(tests=str(ROOT / "tests"), address=server.address, on_server=on_server,
                                   path=str(checkpoint), out=str(tmp_path / f"{name}.npz"))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
            return subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)

        whole = client("whole", tmp_path / "whole-ckpt.npz")
        assert whole.wait(120) == 0, whole.stderr.read()
        checkpoint = tmp_path / "run" / "ckpt.npz"
        killed = client("killed", checkpoint)
        deadline = time.monotonic() + 60
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        with np.load(checkpoint) as f:
            stopped_at = int(f["step"])
        assert 0 < stopped_at < 80 * 6, "the kill came too late to test a resume"
        resumed = client("killed", checkpoint)
        assert resumed.wait(120) == 0, resumed.stderr.read()
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "killed.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(b[name], a[name])


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path, client) -> None:
    g = mlp()
    path = tmp_path / "c.npz"
    with client.session(g) as sess:
        gg.train(sess, spiral(5), gg.optim.SGD(0.1), epochs=1, progress=False, checkpoint=path)
        with pytest.raises(ValueError, match="of another run"):
            gg.train(sess, spiral(5), gg.optim.SGD(0.1), epochs=2, progress=False, checkpoint=path)


def test_forward_ids_keep_interleaved_threads_from_getting_others_gradients() -> None:
    """Forward and Backward on one session from many threads: every Backward either returns
    the gradients of its own thread's batch or fails with FAILED_PRECONDITION."""
    g = mlp(hidden=4)
    with serve("127.0.0.1:0") as server, gg.connect(server.address, timeout=20) as client:
        sess = client.session(g, gg.init_params(g, seed=0))
        batches = [{k: v[i::4] for k, v in spiral(8).items()} for i in range(4)]
        with client.session(g, gg.init_params(g, seed=0)) as ref:
            expected = [ref.forward_backward(b).grads for b in batches]
        outcomes = {"ok": 0, "replaced": 0}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            try:
                steps(i)
            except BaseException as e:  # noqa: BLE001  # reported by the main thread
                errors.append(e)

        def steps(i: int) -> None:
            own = gg.connect(server.address, timeout=20)  # its own SDK session object on the same server session
            for _ in range(40):
                request = pb.ForwardRequest(session_id=sess.id)
                reply, _ = own.call("Forward", request, inputs=batches[i])
                try:
                    _, arrays = own.call("Backward", pb.BackwardRequest(session_id=sess.id,
                                                                        forward_id=reply.forward_id))
                except gg.GradgateError as e:
                    assert e.code == Code.FAILED_PRECONDITION and "replaced it" in e.message
                    with lock:
                        outcomes["replaced"] += 1
                    continue
                for name, value in expected[i].items():
                    np.testing.assert_array_equal(arrays["param_grads"][name], value)
                with lock:
                    outcomes["ok"] += 1
            own.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert outcomes["ok"] + outcomes["replaced"] == 160 and outcomes["ok"] > 0
        sess.close()


def test_sdk_threads_sharing_a_session_never_get_each_others_gradients() -> None:
    """One SDK Session object used by two threads: A runs forward, then B runs forward, then A
    calls backward(). A's backward names A's forward, which B's replaced: FAILED_PRECONDITION,
    not B's gradients; B's backward gets B's."""
    g = mlp(hidden=4)
    a_batch, b_batch = ({k: v[i::2] for k, v in spiral(4).items()} for i in range(2))
    with serve("127.0.0.1:0") as server, gg.connect(server.address, timeout=20) as client, \
            client.session(g, gg.init_params(g, seed=0)) as sess:
        expected_b = sess.forward_backward(b_batch).grads
        results: dict[str, object] = {}
        a_forwarded, b_forwarded = threading.Event(), threading.Event()

        def a() -> None:
            sess.forward(a_batch)
            a_forwarded.set()
            b_forwarded.wait(10)
            try:
                results["a"] = sess.backward()
            except gg.GradgateError as e:
                results["a"] = e

        def b() -> None:
            a_forwarded.wait(10)
            sess.forward(b_batch)
            b_forwarded.set()
            results["b"] = sess.backward()

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert isinstance(results["a"], gg.GradgateError) and results["a"].code == Code.FAILED_PRECONDITION
    assert "replaced it" in results["a"].message
    for name, value in expected_b.items():
        np.testing.assert_array_equal(results["b"][name], value)


def test_a_session_that_streamed_its_calls_trains_on_a_server_with_one_stream_thread() -> None:
    """--max-workers 2 leaves one RPC thread for streams: the session's own CallStream, open
    after its forward_backward, gives it up for the upload and the Train."""
    g = mlp()
    params = gg.init_params(g, seed=0)
    data = spiral(30)
    with serve("127.0.0.1:0", Config(max_workers=2)) as server, gg.connect(server.address) as client, \
            client.session(g, params) as sess:
        assert np.isfinite(sess.forward_backward(data).loss)  # over its CallStream
        losses = gg.train(sess, data, gg.optim.SGD(0.1), epochs=2, batch_size=10, seed=1, progress=False,
                          on_server=True)
        assert len(losses) == 2 * len(data["y"]) // 10 and losses[-1] < losses[0]
        assert np.isfinite(sess.forward_backward(data).loss)  # and streams its calls again


def test_an_upload_its_client_abandons_frees_its_thread_at_once() -> None:
    """A cancelled upload, or one cut off by a stopping server, ends its handler within a
    quarter second, not after --stream-idle-seconds: the one stream thread of a
    --max-workers 2 server serves the next upload."""
    with serve("127.0.0.1:0", Config(max_workers=2, stream_idle_seconds=30, metrics_port=0)) as server, \
            gg.connect(server.address, call_streams=False, recover_sessions=False) as client:
        sess = client.session(mlp())  # not closed: the server stops under it
        for _ in range(3):
            held, quiet = _hold_upload(server, client, sess.id)
            held.cancel()
            started = time.monotonic()
            wait_for(lambda: _uploaded(sess), timeout=2, what="the thread to be free")  # refused meanwhile
            assert time.monotonic() - started < 2
            quiet.set()
        stuck, quiet = _hold_upload(server, client, sess.id)
        started = time.monotonic()
        server.stop(0.5)
        wait_for(lambda: not any(t.name.startswith("gradgate-rpc") and t.is_alive() and _in_requests(t)
                                 for t in threading.enumerate()), timeout=3, what="the upload's handler to end")
        assert time.monotonic() - started < 3  # the grace, then a quarter second
        stuck.cancel()  # the client's retries would wait for the server for a while
        quiet.set()


def _hold_upload(server: Server, client: gg.Client, session_id: str) -> tuple[grpc.Future, threading.Event]:
    """An UploadData that sends its first chunk, then nothing until the event is set: it holds
    a stream thread of the server. Returns once the server has its first message."""
    received = Scrape.of(server.metrics_address).value("grpc_server_msg_received_total", grpc_method="UploadData")
    first = codec.encode(train_pb2.UploadDataRequest(session_id=session_id, rows=10),
                         columns={"x": np.zeros((1, 2)), "y": np.zeros(1, np.int64)})
    quiet = threading.Event()

    def requests() -> Iterator[bytes]:
        yield first
        quiet.wait(30)

    held = client.stream("UploadData")[0].future(requests())
    wait_for(lambda: Scrape.of(server.metrics_address).value("grpc_server_msg_received_total",
                                                             grpc_method="UploadData") > received,
             what="the held upload's first message")
    return held, quiet


def _uploaded(sess: gg.Session) -> bool:
    try:
        return sess.upload(spiral(4)) > 0
    except gg.GradgateError as e:
        assert e.code == Code.RESOURCE_EXHAUSTED and "streams are open" in e.message
        return False


def _in_requests(thread: threading.Thread) -> bool:
    """Whether ``thread`` is waiting in a stream's Requests (rpc.py) for the client's next message."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "__next__" and "rpc.py" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_upload_and_train_wait_a_moment_for_a_stream_thread() -> None:
    """A server with every stream thread taken refuses an upload or a Train with RESOURCE_EXHAUSTED
    and `gradgate-streams: full`: the SDK tries again for retry_seconds, so gg.train goes ahead
    once the thread is free, here after another client's quiet upload is cancelled."""
    g = mlp()
    data = spiral(30)
    with serve("127.0.0.1:0", Config(max_workers=2, stream_idle_seconds=30, metrics_port=0)) as server, \
            gg.connect(server.address, retry_seconds=5) as client, client.session(g) as sess:
        other = client.session(g)
        held, quiet = _hold_upload(server, client, other.id)  # the one stream thread
        threading.Timer(1.0, held.cancel).start()
        started = time.monotonic()
        losses = gg.train(sess, data, gg.optim.SGD(0.1), epochs=1, batch_size=10, progress=False, on_server=True)
        assert len(losses) == len(data["y"]) // 10 and time.monotonic() - started > 0.9
        refused = Scrape.of(server.metrics_address).value("grpc_server_handled_total", grpc_method="UploadData",
                                                          grpc_code="ResourceExhausted")
        assert refused >= 1  # tried while the thread was taken
        quiet.set()
        # the same for a Train (its data uploaded already)
        held, quiet = _hold_upload(server, client, other.id)
        threading.Timer(1.0, held.cancel).start()
        replies = list(sess.train_stream(gg.optim.SGD(0.1), 10, 1, 0))
        assert replies[-1].sync.done
        assert Scrape.of(server.metrics_address).value("grpc_server_handled_total", grpc_method="Train",
                                                       grpc_code="ResourceExhausted") >= 1
        quiet.set()
        with gg.connect(server.address, retry_seconds=0) as impatient, impatient.session(g) as third:
            held, quiet = _hold_upload(server, client, other.id)
            with pytest.raises(gg.GradgateError) as e:  # no retries: refused at once
                third.upload(data)
            assert e.value.code == Code.RESOURCE_EXHAUSTED and "streams are open" in e.value.message
            held.cancel()
            quiet.set()


def test_ctrl_c_during_training_on_the_server_stops_it_there() -> None:
    """A Ctrl-C while gg.train(on_server=True) waits for the server cancels its Train stream:
    the KeyboardInterrupt comes at once, the server stops training, and the session and the
    client serve the next calls, from this thread and from another."""
    g = mlp()
    data = spiral(30)
    with serve("127.0.0.1:0", Config(metrics_port=0)) as server, gg.connect(server.address, timeout=20) as client, \
            client.session(g, gg.init_params(g, seed=1)) as sess:
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            gg.train(sess, data, gg.optim.SGD(0.1), epochs=100_000, batch_size=10, progress=False, on_server=True)
            time.sleep(10)  # (not reached: 100,000 epochs take minutes)
        timer.join()
        assert time.monotonic() - started < 2.0

        def cancelled() -> float:
            return Scrape.of(server.metrics_address).value("grpc_server_handled_total", grpc_method="Train",
                                                           grpc_code="Canceled")
        wait_for(lambda: cancelled() == 1, timeout=5, what="the Train stream cancelled on the server")
        trained = Scrape.of(server.metrics_address).value("gradgate_examples_processed_total")
        time.sleep(0.3)
        assert Scrape.of(server.metrics_address).value("gradgate_examples_processed_total") == trained  # stopped
        params = sess.get_params()
        loss = sess.forward({k: v[:5] for k, v in data.items()}).loss
        with gg.connect(server.address, timeout=20) as here:
            assert here.session(g, params).forward({k: v[:5] for k, v in data.items()}).loss == loss
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(sess.forward, {k: v[:5] for k, v in data.items()}).result(timeout=10).loss == loss
