"""Engine behaviour without the network: compile validation, fan-out, dtypes, batch."""
from __future__ import annotations

import time

import numpy as np
import pytest

from gradgate.v1 import graph_pb2
from gradgate_server.engine import (DeadlineExceeded, InvalidArgument, ResourceExhausted, backward, compile_graph,
                                    forward)

from graphs import declare, node


def mlp(dtype: str = "float64") -> graph_pb2.Graph:
    """x (N, 2) -> relu(x @ W + b) -> scores (N, 3) -> softmax loss with labels y (N,)."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", dtype, (-1, 2))
    declare(g.inputs, "y", "int64", (-1,))
    declare(g.params, "W", dtype, (2, 3))
    declare(g.params, "b", dtype, (3,))
    node(g, "xw", "matmul", "x", "W")
    node(g, "scores", "add", "xw", "b")
    g.loss = node(g, "loss", "softmax_cross_entropy", "scores", "y")
    return g


def invalid(graph: graph_pb2.Graph) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as e:
        compile_graph(graph)
    return e.value


def test_plan_orders_nodes_topologically_and_infers_shapes() -> None:
    g = mlp()
    g.nodes.reverse()  # declared out of order on purpose
    plan = compile_graph(g)
    assert [s.name for s in plan.steps] == ["xw", "scores", "loss"]
    assert plan.shapes[plan.slot["scores"]] == (-1, 3)
    assert plan.shapes[plan.slot["loss"]] == ()
    assert plan.parameter_count == 2 * 3 + 3


@pytest.mark.parametrize("mutate, field, words", [
    (lambda g: setattr(g.nodes[0], "op", "matmull"), "graph.nodes[0].op", ["'xw'", "unknown op 'matmull'"]),
    (lambda g: g.nodes[0].inputs.append("b"), "graph.nodes[0].inputs", ["'xw'", "takes 2 input"]),
    (lambda g: g.nodes[1].inputs.__setitem__(1, "bias"), "graph.nodes[1].inputs[1]", ["'scores'", "'bias'"]),
    (lambda g: setattr(g.nodes[1], "name", "xw"), "graph.nodes[1].name", ["duplicate name 'xw'"]),
    (lambda g: setattr(g.params[1], "name", "W"), "graph.params", ["duplicate name 'W'"]),
    (lambda g: setattr(g, "loss", "scores"), "graph.loss", ["'scores'", "scalar", "(N, 3)"]),
    (lambda g: setattr(g, "loss", "nope"), "graph.loss", ["'nope'"]),
    (lambda g: g.params[1].shape.__setitem__(0, 4), "graph.nodes[1]", ["'scores'", "(N, 3) and (4,)"]),
    (lambda g: g.params[0].shape.__setitem__(0, 5), "graph.nodes[0]", ["'xw'", "inner dimensions"]),
    (lambda g: setattr(g.inputs[1], "dtype", 2), "graph.nodes[2].inputs[1]", ["'loss'", "'labels'", "integer"]),
    (lambda g: setattr(g.params[1], "dtype", 1), "graph.params", ["mixes float32 and float64"]),
    (lambda g: g.params[0].shape.__setitem__(0, -1), "graph.params[0].shape", ["'W'", "inputs only"]),
    (lambda g: g.outputs.append("ghost"), "graph.outputs[0]", ["'ghost'"]),
])
def test_invalid_graphs_name_the_culprit(mutate, field: str, words: list[str]) -> None:
    g = mlp()
    mutate(g)
    error = invalid(g)
    assert error.field == field
    for word in words:
        assert word in error.message


def test_cycle_is_reported_with_its_nodes() -> None:
    g = graph_pb2.Graph()
    declare(g.params, "p")
    node(g, "a", "add", "p", "c")
    node(g, "b", "exp", "a")
    node(g, "c", "exp", "b")
    g.loss = node(g, "loss", "sum", "c")
    error = invalid(g)
    assert "cycle" in error.message and "'a'" in error.message and "'c'" in error.message


def test_attribute_errors() -> None:
    g = graph_pb2.Graph()
    declare(g.params, "p", shape=(2, 3))
    node(g, "r", "reshape", "p")
    g.loss = node(g, "loss", "sum", "r")
    assert "missing attribute(s) ['shape']" in invalid(g).message
    g.nodes[0].op = "transpose"
    node(g, "t", "transpose", "p", axis=1)
    assert "unknown attribute(s) ['axis']" in invalid(g).message


def test_node_limit_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match="3 nodes; the limit is 2"):
        compile_graph(mlp(), max_nodes=2)


def test_fan_out_accumulates_gradients() -> None:
    """f = x*x + x: the value x feeds three gate inputs, df/dx = 2x + 1."""
    g = graph_pb2.Graph()
    declare(g.params, "x")
    node(g, "xx", "mul", "x", "x")
    g.loss = node(g, "f", "add", "xx", "x")
    plan = compile_graph(g)
    grads = backward(plan, forward(plan, {}, {"x": np.array(3.0)}), plan.params)
    assert grads["x"] == 7.0


def test_parameter_unused_by_the_loss_gets_zero_gradient() -> None:
    g = mlp()
    declare(g.params, "unused", shape=(2,))
    plan = compile_graph(g)
    params = {"W": np.ones((2, 3)), "b": np.zeros(3), "unused": np.ones(2)}
    grads = backward(plan, forward(plan, {"x": np.ones((4, 2)), "y": np.zeros(4, np.int64)}, params), plan.params)
    np.testing.assert_array_equal(grads["unused"], np.zeros(2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_dtype_is_kept_end_to_end(dtype: str) -> None:
    g = mlp(dtype)
    node(g, "penalty", "l2", "W")
    node(g, "scaled", "mul", "penalty", "half")
    node(g, "half", "constant", value=np.array(0.5))  # a float64 constant follows the graph
    node(g, "total", "add", "loss", "scaled")
    g.loss = "total"
    plan = compile_graph(g)
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(5, 2)).astype(dtype), "y": np.array([0, 1, 2, 0, 1])}
    params = {"W": rng.normal(size=(2, 3)).astype(dtype), "b": np.zeros(3, dtype)}
    tape = forward(plan, batch, params)
    assert all(v.dtype == dtype for v in tape.values if v.dtype.kind == "f")
    grads = backward(plan, tape, [*plan.params, *plan.inputs][:3])
    assert {k: v.dtype.name for k, v in grads.items()} == {"W": dtype, "b": dtype, "x": dtype}


def test_float32_graph_promotes_to_float64_on_request() -> None:
    plan = compile_graph(mlp("float32"), dtype="float64")
    assert plan.dtype == np.float64 and plan.dtypes[plan.slot["W"]] == np.float64


def test_batch_dimension_is_checked_at_run_time() -> None:
    plan = compile_graph(mlp())
    params = {"W": np.ones((2, 3)), "b": np.zeros(3)}
    good = {"x": np.ones((4, 2)), "y": np.zeros(4, np.int64)}
    assert forward(plan, good, params).batch_size == 4
    for batch, words in [
        ({**good, "y": np.zeros(5, np.int64)}, ["'y'", "batch size 5", "other inputs have 4"]),
        ({**good, "x": np.ones((4, 3))}, ["'x'", "(N, 2)", "(4, 3)"]),
        ({**good, "x": np.ones((4, 2), np.float32)}, ["'x'", "float64", "float32"]),
        ({"x": good["x"]}, ["missing input 'y'"]),
        ({**good, "z": good["x"]}, ["unknown input(s) ['z']"]),
        ({"x": np.ones((0, 2)), "y": np.zeros(0, np.int64)}, ["batch size 0", "N must be > 0"]),
        ({**good, "y": np.array([0, 1, 2, 3])}, ["'loss'", "labels must lie in [0, 3)"]),
    ]:
        with pytest.raises(InvalidArgument) as e:
            forward(plan, batch, params)
        for word in words:
            assert word in e.value.message


def test_passed_deadline_stops_between_ops() -> None:
    plan = compile_graph(mlp())
    batch = {"x": np.ones((4, 2)), "y": np.zeros(4, np.int64)}
    with pytest.raises(DeadlineExceeded, match="'xw'"):
        forward(plan, batch, {"W": np.ones((2, 3)), "b": np.zeros(3)}, deadline=time.monotonic() - 1)


def test_backward_skips_input_gradient_unless_asked() -> None:
    plan = compile_graph(mlp())
    masks = plan.grad_masks(frozenset(plan.params))
    assert masks[0] == (False, True)  # xw = x @ W: no dx when only params are wanted
    assert plan.grad_masks(frozenset([*plan.params, *plan.inputs]))[0] == (True, True)
