"""Modes, seeds and state buffers end to end: a batchnorm + dropout net through a real server."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import gradgate as gg
from gradgate_server.engine import compile_graph, forward


def net() -> gg.Graph:
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 2, 4, 4)), g.input("y", (None,), dtype="int64")
    w, gamma, beta = g.param("w", (3, 2, 3, 3)), g.param("gamma", (3,)), g.param("beta", (3,))
    fc, fc_b = g.param("fc", (12, 3)), g.param("fc_b", (3,))
    h = gg.max_pool2d(gg.relu(gg.batchnorm(gg.conv2d(x, w, padding=1), gamma, beta, name="bn1")), 2)
    scores = g.output(gg.affine(gg.dropout(gg.flatten(h), p=0.5, name="drop"), fc, fc_b), name="scores")
    g.set_loss(gg.softmax_cross_entropy(scores, y))
    return g


@pytest.fixture(scope="module")
def client() -> Iterator[gg.Client]:
    with gg.connect() as c:
        yield c


rng = np.random.default_rng(0)
BATCH = {"x": rng.normal(size=(6, 2, 4, 4)) * 2 + 1, "y": rng.integers(0, 3, 6)}


def test_train_and_eval_modes_seeds_and_buffers_over_grpc(client: gg.Client) -> None:
    g = net()
    params = gg.init_params(g, seed=1)
    plan = compile_graph(g.to_proto())
    with client.session(g, params) as sess:
        assert sorted(sess.buffer_specs) == ["bn1.running_mean", "bn1.running_var"]
        assert sess.buffer_specs["bn1.running_var"].shape == (3,)
        initial = sess.get_buffers()
        assert initial["bn1.running_mean"].tolist() == [0, 0, 0] and initial["bn1.running_var"].tolist() == [1, 1, 1]

        # train mode: the seed fixes the dropout masks; the step updates the running statistics
        a = sess.forward_backward(BATCH, seed=7)
        b = sess.forward_backward(BATCH, seed=7)
        c = sess.forward_backward(BATCH, seed=8)
        assert a.loss == b.loss and a.loss != c.loss
        np.testing.assert_array_equal(a.grads["w"], b.grads["w"])
        local = forward(plan, BATCH, params, train=True, seed=7)
        assert a.loss == pytest.approx(local.loss, rel=1e-12)
        stats = sess.get_buffers()
        # three train steps from the defaults: the server kept each step's update
        expect = local.updates
        for _ in range(2):
            expect = forward(plan, BATCH, params, expect, train=True, seed=7).updates
        np.testing.assert_allclose(stats["bn1.running_mean"], expect["bn1.running_mean"], rtol=1e-12)
        np.testing.assert_allclose(stats["bn1.running_var"], expect["bn1.running_var"], rtol=1e-12)

        # eval mode: running statistics, no dropout, nothing updated; backward works
        ev = sess.forward(BATCH, train=False)
        local_eval = forward(plan, BATCH, params, stats, train=False)
        assert ev.loss == pytest.approx(local_eval.loss, rel=1e-12)
        np.testing.assert_allclose(ev.outputs["scores"], local_eval.values[plan.slot["scores"]], rtol=1e-12)
        assert set(sess.backward()) == set(params)
        assert sess.forward(BATCH, train=False, seed=123).loss == ev.loss  # no randomness in eval mode
        np.testing.assert_array_equal(sess.get_buffers()["bn1.running_var"], stats["bn1.running_var"])

        # buffers can be set, and unknown names are named in the error
        sess.set_params(buffers={"bn1.running_mean": np.ones(3)})
        assert sess.get_buffers(["bn1.running_mean"])["bn1.running_mean"].tolist() == [1, 1, 1]
        with pytest.raises(gg.GradgateError) as e:
            sess.get_params(["bn1.running_avg"])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "bn1.running_var" in e.value.message
        with pytest.raises(gg.GradgateError) as e:
            sess.set_params(buffers={"bn1.running_var": np.ones(4)})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "bn1.running_var" in e.value.message


def test_initial_buffers_are_taken_from_create_session(client: gg.Client) -> None:
    g = net()
    stats = {"bn1.running_mean": np.array([1.0, 2.0, 3.0]), "bn1.running_var": np.array([4.0, 5.0, 6.0])}
    with client.session(g, gg.init_params(g), buffers=stats) as sess:
        got = sess.get_buffers()
        assert got["bn1.running_mean"].tolist() == [1, 2, 3] and got["bn1.running_var"].tolist() == [4, 5, 6]
    with pytest.raises(gg.GradgateError) as e:
        client.session(g, gg.init_params(g), buffers={"bn2.running_mean": np.zeros(3)})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'bn2.running_mean'" in e.value.message


@pytest.mark.parametrize("train", [True, False])
def test_gradient_check_over_grpc_in_both_modes_with_the_session_buffers(client: gg.Client, train: bool) -> None:
    g = net()
    stats = {"bn1.running_mean": np.array([0.5, 0.0, -0.5]), "bn1.running_var": np.array([2.0, 1.0, 3.0])}
    with client.session(g, gg.init_params(g, seed=2), buffers=stats) as sess:
        report = sess.gradient_check(BATCH, mode="sparse", train=train, forward_seed=3, num_checks=5)
        assert report.passed, report
        local = forward(compile_graph(g.to_proto()), BATCH, gg.init_params(g, seed=2), stats, train=train, seed=3)
        assert report.loss == pytest.approx(local.loss, rel=1e-12)


def test_server_side_training_draws_the_client_loops_masks_and_keeps_buffers(client: gg.Client) -> None:
    g = net()
    data = {"x": rng.normal(size=(24, 2, 4, 4)), "y": rng.integers(0, 3, 24)}
    runs = []
    for on_server in (False, True):
        with client.session(g, gg.init_params(g, seed=5)) as sess:
            losses = gg.train(sess, data, gg.optim.SGD(0.05, momentum=0.9), epochs=3, batch_size=8, seed=9,
                              progress=False, on_server=on_server)
            runs.append((losses, sess.get_buffers(), sess.get_params()))
    (client_losses, client_stats, client_params), (server_losses, server_stats, server_params) = runs
    np.testing.assert_allclose(server_losses, client_losses, rtol=1e-12)
    assert len(set(np.round(client_losses, 12))) == len(client_losses)  # masks differ from step to step
    for name in client_stats:
        np.testing.assert_allclose(server_stats[name], client_stats[name], rtol=1e-12)
    assert not np.allclose(client_stats["bn1.running_var"], 1.0)  # nine train steps moved them
    for name in client_params:
        np.testing.assert_allclose(server_params[name], client_params[name], rtol=1e-10)
