"""Data parallelism: ``client.session(graph, params, shards=N)`` over real replicas gives
the single-session loss and gradients (float64: relative difference <= 1e-12), trains
like a plain session, and refuses, with a clear message, graphs whose shards cannot be
combined exactly."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import gradgate as gg
from gradgate.sharded import CONST, MEAN, ROWS, SUM, NotShardable, ShardedSession, ShardingError, batch_rule, why
from gradgate.graph import TensorSpec
from gradgate.v1 import graph_pb2
from gradgate_server import serve

from cluster import replicas, rpc_sessions
from obs import wait_for

X, Y = gg.spiral(n_per_class=34, seed=3)  # 102 rows: shards of 34 / 26+25+... are uneven
BATCH = {"x": X[:101], "y": Y[:101]}


def net(loss: str = "mean") -> gg.Graph:
    """The two-layer net in float64; loss: the batch mean (+ L2), or a batch sum."""
    g = gg.Graph("float64")
    x = g.input("x", (None, 2))
    y = g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (2, 16)), g.param("b1", (16,))
    W2, b2 = g.param("W2", (16, 3)), g.param("b2", (3,))
    h = g.output(gg.tanh(x @ W1 + b1), name="hidden")
    scores = g.output(h @ W2 + b2, name="scores")
    if loss == "mean":
        g.set_loss(gg.softmax_cross_entropy(scores, y) + 1e-3 * (gg.l2(W1) + gg.l2(W2)))
    else:  # sum over the rows of a per-row squared score
        g.set_loss(gg.sum(gg.square(scores)) * 0.01)
    return g


def assert_close(got: dict, expected: dict, rtol: float = 1e-12) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        e, a = np.asarray(expected[name]), np.asarray(got[name])
        assert a.shape == e.shape and a.dtype == e.dtype, name
        scale = max(float(np.abs(e).max()), 1e-300)
        assert float(np.abs(a - e).max()) <= rtol * scale, f"{name}: {np.abs(a - e).max() / scale:.2e}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[list]:
    with replicas(3) as reps:
        yield reps


def test_shards_give_the_single_session_gradients_over_real_replicas(cluster) -> None:
    g = net()
    params = gg.init_params(g, seed=1)
    with gg.connect([r.address for r in cluster], timeout=20) as client:
        plain = client.session(g, params)
        step = plain.forward_backward(BATCH, inputs=True)
        for shards in (2, 3, 4):
            with client.session(g, params, shards=shards) as sess:
                assert isinstance(sess, ShardedSession) and len(sess.sessions) == shards
                got = sess.forward_backward(BATCH, inputs=True)
                assert got.loss == pytest.approx(step.loss, rel=1e-12, abs=0)
                assert_close(got.grads, step.grads)  # parameters, and x's gradient row by row
                assert_close(got.outputs, step.outputs)  # scores and hidden: rows put back in order
                # forward then backward, separately
                assert sess.forward(BATCH).loss == pytest.approx(step.loss, rel=1e-12, abs=0)
                assert_close(sess.backward(), {k: v for k, v in step.grads.items() if k != "x"})
        # a batch sum: the shards' losses and gradients add up
        g_sum = net("sum")
        expected = client.session(g_sum, params).forward_backward(BATCH)
        with client.session(g_sum, params, shards=3) as sess:
            got = sess.forward_backward(BATCH)
            assert got.loss == pytest.approx(expected.loss, rel=1e-12, abs=0)
            assert_close(got.grads, expected.grads)
        # fewer rows than shards: the empty shards sit out
        tiny = {"x": X[:2], "y": Y[:2]}
        with client.session(g, params, shards=4) as sess:
            assert_close(sess.forward_backward(tiny).grads, plain.forward_backward(tiny).grads)


def test_shards_are_spread_over_the_replicas(cluster) -> None:
    g = net()
    with gg.connect([r.address for r in cluster], timeout=20) as client:
        for _ in range(3):
            with client.session(g, shards=2) as sess:
                def holders() -> list:
                    found = [[r for r in cluster if s.id[:8] in rpc_sessions(r, "CreateSession")]
                             for s in sess.sessions]
                    return found if all(len(f) == 1 for f in found) else []
                a, b = wait_for(holders, what="the shards' log lines")
                assert a != b  # two shards, two different replicas (of three)


def test_train_with_shards_matches_a_plain_session() -> None:
    g = net()
    servers = [serve("127.0.0.1:0") for _ in range(2)]
    try:
        with gg.connect([s.address for s in servers], timeout=20) as client:
            results = []
            for shards in (1, 2):
                with client.session(g, gg.init_params(g, seed=5), shards=shards) as sess:
                    losses = gg.train(sess, BATCH, gg.optim.Adam(lr=0.01), epochs=5, batch_size=33, progress=False)
                    results.append((losses, sess.get_params()))
            with client.session(g, shards=2) as sess:  # training on the server lives in one session
                with pytest.raises(NotShardable, match="'upload'.*without shards"):
                    gg.train(sess, BATCH, gg.optim.SGD(lr=0.1), on_server=True, progress=False)
        (plain_losses, plain), (sharded_losses, sharded) = results
        np.testing.assert_allclose(sharded_losses, plain_losses, rtol=1e-10)
        assert_close(sharded, plain, rtol=1e-9)
        assert plain_losses[-1] < plain_losses[0]
    finally:
        for s in servers:
            s.stop(0)


def refused(loss_of) -> str:
    g = gg.Graph("float64")
    x = g.input("x", (None, 3))
    W = g.param("W", (3, 2))
    g.set_loss(loss_of(x, W))
    with serve("127.0.0.1:0") as server, gg.connect(server.address) as client:
        with pytest.raises(ShardingError) as e:
            client.session(g, shards=2)
        assert len(server.store) == 0  # the probe session was closed again
    return str(e.value)


def test_graphs_whose_shards_cannot_be_combined_are_refused() -> None:
    message = refused(lambda x, W: gg.square(gg.mean(x @ W)))  # nonlinear in a batch mean
    assert "mixes the rows of the batch" in message and "'square'" not in message
    message = refused(lambda x, W: gg.mean(gg.square(x - gg.mean(x, axis=0)) @ W))  # batch statistics
    assert "mixes the rows" in message
    message = refused(lambda x, W: gg.sum(x @ W) + gg.l2(W))  # a sum plus a batch-independent term
    assert "once per shard" in message
    message = refused(lambda x, W: gg.mean(x @ W) + gg.sum(x @ W))  # a mean plus a sum
    assert "mixes" in message
    # an output that mixes rows: refused when declared, or when named in a forward
    g = gg.Graph("float64")
    x = g.input("x", (None, 3))
    W = g.param("W", (3, 2))
    centered = x - gg.mean(x, axis=0)
    centered.name = "centered"
    g.set_loss(gg.mean(x @ W))  # centered feeds nothing
    with serve("127.0.0.1:0") as server, gg.connect(server.address) as client:
        sess = client.session(g, shards=2)
        with pytest.raises(ShardingError, match="centered"):
            sess.forward({"x": np.ones((4, 3))}, outputs=["centered"])
        with pytest.raises(NotShardable, match="without shards"):
            sess._call  # a Session internal: one session on one replica
        assert not hasattr(sess, "upload_data_that_does_not_exist")
        g.output(centered)
        with pytest.raises(ShardingError, match="declared output 'centered'"):
            client.session(g, shards=2)


def test_batch_rule_on_ops_it_does_not_know() -> None:
    g = graph_pb2.Graph()
    g.inputs.add(name="x", shape=[-1, 4])
    g.params.add(name="gamma", shape=[4])
    g.nodes.add(name="bn", op="batchnorm", inputs=["x", "gamma"])
    g.nodes.add(name="loss", op="mean", inputs=["bn"])
    g.loss = "loss"
    values = {n: TensorSpec(n, s, "float64") for n, s in
              (("x", (-1, 4)), ("gamma", (4,)), ("bn", (-1, 4)), ("loss", ()))}
    kinds = batch_rule(g, values)
    assert kinds == {"x": ROWS, "gamma": CONST}
    assert "'batchnorm' is not known to keep the rows of a batch independent" in why(g, values, "loss")


def test_batch_rule_kinds() -> None:
    g = net().to_proto()
    with serve("127.0.0.1:0") as server, gg.connect(server.address) as client:
        values = client.session(net()).values
    kinds = batch_rule(g, values)
    assert kinds["x"] == kinds["hidden"] == kinds["scores"] == ROWS
    assert kinds["W1"] == CONST and kinds[g.loss] == MEAN
    g_sum = net("sum").to_proto()
    with serve("127.0.0.1:0") as server, gg.connect(server.address) as client:
        values = client.session(net("sum")).values
    assert batch_rule(g_sum, values)[g_sum.loss] == SUM
