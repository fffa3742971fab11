"""The SDK against a real server over gRPC on 127.0.0.1."""
import time

import grpc
import numpy as np
import pytest
from gradgate_server import Config, serve

import gradgate as gg
from gradgate.cli import main, two_layer_net


@pytest.fixture(scope="module")
def client():
    server = serve("127.0.0.1:0")
    with gg.connect(server.address, timeout=10.0) as c:
        yield c
    server.stop(None)


def lecture_graph() -> gg.Graph:
    """f = (x + y) * z with x, y, z scalar float64 parameters."""
    g = gg.Graph(dtype="float64")
    x, y, z = (g.param(name, ()) for name in "xyz")
    g.set_loss((x + y) * z)
    return g


LECTURE_POINT = {"x": np.array(-2.0), "y": np.array(5.0), "z": np.array(-4.0)}


def test_lecture_example_gradients(client):
    with client.session(lecture_graph(), LECTURE_POINT) as sess:
        assert sess.parameter_count == 3
        assert sess.forward({}).loss == -12.0
        grads = sess.backward()
    assert {k: float(v) for k, v in grads.items()} == {"x": -4.0, "y": -4.0, "z": 3.0}
    assert all(v.dtype == np.float64 for v in grads.values())


def test_forward_backward_sets_params(client):
    with client.session(lecture_graph(), LECTURE_POINT) as sess:
        loss, grads = sess.forward_backward({}, params={"x": 1, "z": 2})  # python ints are cast to float64
        assert loss == 12.0  # (1 + 5) * 2
        assert {k: float(v) for k, v in grads.items()} == {"x": 2.0, "y": 2.0, "z": 6.0}
        assert {k: float(v) for k, v in sess.get_params().items()} == {"x": 1.0, "y": 5.0, "z": 2.0}
        assert list(sess.get_params(["z"])) == ["z"]


def test_input_gradients_and_outputs(client):
    g = gg.Graph(dtype="float64")
    x = g.input("x", (None, 2))
    w = g.param("w", (2, 1))
    g.set_loss(gg.sum(g.output(x @ w, name="xw")))
    X = np.array([[1.0, 2.0], [3.0, 4.0]])
    with client.session(g, {"w": np.array([[10.0], [20.0]])}) as sess:
        assert sess.values["xw"] == gg.TensorSpec("xw", (-1, 1), "float64")
        step = sess.forward_backward({"x": X}, inputs=True)
        np.testing.assert_array_equal(step.outputs["xw"], [[50.0], [110.0]])
        np.testing.assert_array_equal(step.grads["w"], [[4.0], [6.0]])
        np.testing.assert_array_equal(step.grads["x"], [[10.0, 20.0], [10.0, 20.0]])
        # arrays viewing a received message are aligned in memory (gradgate.codec.ALIGN)
        assert all(a.ctypes.data % 16 == 0 for a in (*step.grads.values(), *step.outputs.values()))
        assert "x" not in sess.backward()


def test_train_spiral(client):
    X, y = gg.spiral(seed=0)
    g = two_layer_net()
    with client.session(g, gg.init_params(g, seed=0)) as sess:
        losses = gg.train(sess, {"x": X, "y": y}, gg.optim.Adam(lr=0.03), epochs=300, progress=False)
        scores = sess.forward({"x": X, "y": y}).outputs["scores"]
    assert len(losses) == 300
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(scores.argmax(axis=1) == y) >= 0.95


def test_train_minibatches_push_final_params(client):
    X, y = gg.spiral(n_per_class=20, seed=1)
    g = two_layer_net()
    with client.session(g) as sess:
        before = sess.get_params()
        losses = gg.train(sess, {"x": X, "y": y}, gg.optim.SGD(lr=0.5), epochs=3, batch_size=25, progress=False)
        after = sess.get_params()
    assert len(losses) == 3 * 3  # 60 examples in batches of 25, 25, 10
    assert not np.array_equal(before["W1"], after["W1"])


def test_closed_session_is_not_found(client):
    sess = client.session(lecture_graph(), LECTURE_POINT)
    sess.close()
    sess.close()  # closing twice is harmless
    with pytest.raises(gg.GradgateError) as e:
        sess.forward({})
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_leaving_a_session_the_server_expired_keeps_the_original_error():
    """An expired session's close is quiet, so the with-block's own error surfaces."""
    from gradgate_server import Config

    with serve("127.0.0.1:0", Config(session_ttl_seconds=0.05)) as server, \
            gg.connect(server.address, recover_sessions=False) as c:
        with pytest.raises(gg.GradgateError) as e:
            with c.session(lecture_graph(), LECTURE_POINT) as sess:
                deadline = time.monotonic() + 10
                while len(server.store) and time.monotonic() < deadline:  # the sweeper expires it
                    time.sleep(0.05)
                sess.forward({})
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "idle for more than" in e.value.message


def test_invalid_graph_reports_violations(client):
    g = gg.Graph()
    g.set_loss(gg.relu(g.param("w", (2, 2))) @ g.param("v", (3, 3)))
    with pytest.raises(gg.GradgateError) as e:
        client.session(g)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.violations and "matmul_1" in str(e.value)


def test_backward_before_forward(client):
    with client.session(lecture_graph(), LECTURE_POINT) as sess, pytest.raises(gg.GradgateError) as e:
        sess.backward()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_list_ops(client):
    ops = {op.name: op for op in client.list_ops()}
    assert {"add", "matmul", "softmax_cross_entropy", "svm_loss", "l2", "constant"} <= set(ops)
    assert ops["matmul"].inputs == ("a", "b")
    assert "margin" in ops["svm_loss"].attrs


def test_unreachable_server_raises_gradgate_error():
    with gg.connect("127.0.0.1:1", timeout=2.0) as c, pytest.raises(gg.GradgateError) as e:
        c.list_ops()
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_embedded_server_and_cli(capsys):
    with gg.connect() as c:
        assert c.list_ops()
    assert main(["ops"]) == 0
    assert "softmax_cross_entropy" in capsys.readouterr().out


def test_calls_ride_over_connections_the_server_ages_out() -> None:
    """--max-connection-age-seconds closes connections gracefully (so dns:/// clients re-resolve):
    calls made across many such closes all succeed."""
    g = gg.Graph()
    x = g.input("x", (None, 2))
    g.set_loss(gg.sum(x @ g.param("W", (2, 1))))
    with serve("127.0.0.1:0", Config(max_connection_age_seconds=0.2, grace_seconds=1)) as server, \
            gg.connect(server.address, timeout=10) as client, client.session(g, {"W": np.ones((2, 1))}) as sess:
        deadline = time.monotonic() + 1.5
        calls = 0
        while time.monotonic() < deadline:
            assert sess.forward({"x": np.ones((2, 2), np.float32)}).loss == 4.0
            calls += 1
    assert calls > 50
