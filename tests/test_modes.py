"""Train/eval modes, seeds and state buffers in the engine (batchnorm, dropout)."""
from __future__ import annotations

import numpy as np
import pytest

from gradgate.v1 import graph_pb2
from gradgate_server.engine import InvalidArgument, backward, check_buffers, compile_graph, forward
from gradgate_server.engine.gradcheck import CheckSettings, gradient_check

from graphs import declare, node

rng = np.random.default_rng(0)


def bn_dropout_net(dtype: str = "float64") -> graph_pb2.Graph:
    """x (N, 3) -> batchnorm "bn1" -> dropout "drop" -> mse against t."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", dtype, (-1, 3))
    declare(g.inputs, "t", dtype, (-1, 3))
    declare(g.params, "gamma", dtype, (3,))
    declare(g.params, "beta", dtype, (3,))
    node(g, "bn1", "batchnorm", "x", "gamma", "beta", momentum=0.8)
    node(g, "drop", "dropout", "bn1", p=0.5)
    g.loss = node(g, "loss", "mse_loss", "drop", "t")
    return g


PARAMS = {"gamma": np.array([1.0, 2.0, 0.5]), "beta": np.array([0.0, 1.0, -1.0])}
BATCH = {"x": rng.normal(size=(8, 3)) * 3 + 1, "t": rng.normal(size=(8, 3))}


def test_plan_describes_the_buffers_with_their_initial_values() -> None:
    plan = compile_graph(bn_dropout_net("float32"))
    assert [(b.name, b.shape, b.dtype.name, b.init) for b in plan.buffers] == [
        ("bn1.running_mean", (3,), "float32", 0.0), ("bn1.running_var", (3,), "float32", 1.0)]
    assert plan.buffers[1].initial().tolist() == [1.0, 1.0, 1.0]


def test_train_forward_returns_updated_statistics_and_never_mutates_its_arguments() -> None:
    plan = compile_graph(bn_dropout_net())
    given = {"bn1.running_mean": np.zeros(3), "bn1.running_var": np.ones(3)}
    tape = forward(plan, BATCH, PARAMS, given, train=True, seed=1)
    x = BATCH["x"]
    np.testing.assert_allclose(tape.updates["bn1.running_mean"], 0.2 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(tape.updates["bn1.running_var"], 0.8 + 0.2 * x.var(axis=0, ddof=1), rtol=1e-12)
    assert given["bn1.running_mean"].tolist() == [0, 0, 0] and given["bn1.running_var"].tolist() == [1, 1, 1]
    # missing buffers take their initial values: the same result
    assert forward(plan, BATCH, PARAMS, train=True, seed=1).loss == tape.loss


def test_eval_mode_uses_running_statistics_turns_dropout_off_and_backward_works() -> None:
    plan = compile_graph(bn_dropout_net())
    stats = {"bn1.running_mean": np.array([1.0, -1.0, 0.0]), "bn1.running_var": np.array([4.0, 1.0, 9.0])}
    tape = forward(plan, BATCH, PARAMS, stats, train=False, seed=1)
    assert tape.updates == {}
    bn = tape.values[plan.slot["bn1"]]
    expect = (BATCH["x"] - stats["bn1.running_mean"]) / np.sqrt(stats["bn1.running_var"] + 1e-5) \
        * PARAMS["gamma"] + PARAMS["beta"]
    np.testing.assert_allclose(bn, expect, rtol=1e-12)
    np.testing.assert_array_equal(tape.values[plan.slot["drop"]], bn)  # dropout is the identity
    grads = backward(plan, tape, [*plan.params, plan.slot["x"]])
    dout = 2 * (bn - BATCH["t"]) / bn.size
    np.testing.assert_allclose(grads["x"], dout * PARAMS["gamma"] / np.sqrt(stats["bn1.running_var"] + 1e-5),
                               rtol=1e-12)
    np.testing.assert_allclose(grads["beta"], dout.sum(axis=0), rtol=1e-12)


def test_dropout_masks_follow_the_seed_and_the_node() -> None:
    g = graph_pb2.Graph()
    declare(g.params, "x", "float64", (200,))
    node(g, "d1", "dropout", "x", p=0.25)
    node(g, "d2", "dropout", "x", p=0.25)
    g.loss = node(g, "loss", "sum", node(g, "both", "add", "d1", "d2"))
    plan = compile_graph(g)
    x = {"x": np.ones(200)}

    def masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
        tape = forward(plan, {}, x, seed=seed)
        return tape.values[plan.slot["d1"]], tape.values[plan.slot["d2"]]

    a1, a2 = masks(3)
    b1, b2 = masks(3)
    c1, _ = masks(4)
    np.testing.assert_array_equal(a1, b1)  # reproducible
    assert set(np.unique(a1)) == {0.0, 1 / 0.75}
    assert 0.1 < np.mean(a1 == 0) < 0.4
    assert not np.array_equal(a1, a2)  # another node, another mask
    assert not np.array_equal(a1, c1)  # another seed, another mask
    # backward uses the forward's mask: the gradient of sum(d1 + d2) is the two masks
    grads = backward(plan, forward(plan, {}, x, seed=3), plan.params)
    np.testing.assert_array_equal(grads["x"], a1 + a2)


@pytest.mark.parametrize("train", [True, False])
def test_gradient_check_holds_masks_and_mode_fixed(train: bool) -> None:
    plan = compile_graph(bn_dropout_net())
    stats = {"bn1.running_mean": np.array([0.5, 0.0, -0.5]), "bn1.running_var": np.array([2.0, 1.0, 3.0])}
    report = gradient_check(plan, BATCH, PARAMS, CheckSettings(mode="full", include_inputs=True),
                            buffers=stats, train=train, seed=11)
    assert report.passed, [t.message for t in report.tensors]
    assert report.loss == forward(plan, BATCH, PARAMS, stats, train=train, seed=11).loss


def test_check_buffers_names_the_bad_buffer() -> None:
    plan = compile_graph(bn_dropout_net())
    check_buffers(plan, {"bn1.running_var": np.ones(3)})
    with pytest.raises(InvalidArgument, match="'bn1.running_avg' is not a state buffer") as e:
        check_buffers(plan, {"bn1.running_avg": np.ones(3)})
    assert e.value.field == "buffers['bn1.running_avg']"
    with pytest.raises(InvalidArgument, match=r"must be float64 \(3,\), got float32 \(2,\)"):
        check_buffers(plan, {"bn1.running_mean": np.ones(2, np.float32)})


def test_buffer_names_may_not_collide_with_values() -> None:
    g = bn_dropout_net()
    declare(g.params, "bn1.running_mean", "float64", (3,))
    with pytest.raises(InvalidArgument, match="'bn1.running_mean' has the name of another value"):
        compile_graph(g)


def test_train_mode_batchnorm_needs_two_values_per_channel() -> None:
    plan = compile_graph(bn_dropout_net())
    one = {k: v[:1] for k, v in BATCH.items()}
    with pytest.raises(InvalidArgument, match="more than one value per channel"):
        forward(plan, one, PARAMS)
    assert np.isfinite(forward(plan, one, PARAMS, train=False).loss)


@pytest.mark.parametrize("inputs, words", [((), "takes 2 to 3 input"), (("x", "w", "b", "b"), "takes 2 to 3")])
def test_optional_inputs_have_bounded_arity(inputs: tuple, words: str) -> None:
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float64", (-1, 1, 4, 4))
    declare(g.params, "w", "float64", (2, 1, 3, 3))
    declare(g.params, "b", "float64", (2,))
    node(g, "c", "conv2d", *inputs)
    g.loss = node(g, "loss", "sum", "c")
    with pytest.raises(InvalidArgument, match=words):
        compile_graph(g)
    g.nodes[0].inputs[:] = ["x", "w"]
    assert compile_graph(g).shapes[-2] == (-1, 2, 2, 2)
