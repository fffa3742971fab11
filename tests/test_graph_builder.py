"""The graph builder, without a server: protos, operators, constants, names."""
import numpy as np
import pytest

import gradgate as gg
from gradgate.codec import attrs_to_dict, from_tensor
from gradgate.v1 import graph_pb2


def nodes(g: gg.Graph) -> dict[str, graph_pb2.Node]:
    return {n.name: n for n in g.to_proto().nodes}


def two_layer() -> gg.Graph:
    g = gg.Graph()
    x = g.input("x", (None, 2))
    y = g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (2, 100)), g.param("b1", (100,))
    W2, b2 = g.param("W2", (100, 3)), g.param("b2", (3,))
    scores = g.output(gg.relu(x @ W1 + b1) @ W2 + b2, name="scores")
    g.set_loss(gg.softmax_cross_entropy(scores, y) + 1e-3 * (gg.l2(W1) + gg.l2(W2)))
    return g


def test_to_proto_from_proto_round_trip():
    g = two_layer()
    x = g._inputs[0]
    g.output(gg.sum(gg.transpose(gg.reshape(x, (None, 1, 2)), (0, 2, 1)), axis=1, keepdims=True), "t")
    g.output(gg.mean(gg.svm_loss(gg.constant(np.eye(3)), g._inputs[1], margin=0.5)), "svm")
    g.output(gg.maximum(gg.sigmoid(x), gg.tanh(gg.exp(gg.log(gg.square(-x))))), "m")
    msg = g.to_proto()
    assert gg.Graph.from_proto(msg).to_proto() == msg
    assert graph_pb2.Graph.FromString(msg.SerializeToString()) == msg


def test_from_proto_accepts_any_node_order():
    msg = two_layer().to_proto()
    msg.nodes.reverse()
    assert gg.Graph.from_proto(msg).to_proto() == msg


def test_from_proto_names_an_unknown_input():
    msg = two_layer().to_proto()
    msg.nodes[0].inputs[0] = "nope"
    with pytest.raises(ValueError, match="'nope'"):
        gg.Graph.from_proto(msg)


def test_declared_values():
    g = gg.Graph(dtype="float64")
    g.input("x", (None, 2))
    g.input("y", (None,), dtype="int64")
    g.param("W", (2, 3))
    msg = g.to_proto()
    assert g.inputs == [gg.TensorSpec("x", (-1, 2), "float64"), gg.TensorSpec("y", (-1,), "int64")]
    assert g.params == [gg.TensorSpec("W", (2, 3), "float64")]
    assert list(msg.inputs[0].shape) == [-1, 2]
    assert gg.Graph.from_proto(msg).dtype == "float64"


@pytest.mark.parametrize("build, op, inputs", [
    (lambda a, b: a + b, "add", ["a", "b"]),
    (lambda a, b: a - b, "sub", ["a", "b"]),
    (lambda a, b: a * b, "mul", ["a", "b"]),
    (lambda a, b: a / b, "div", ["a", "b"]),
    (lambda a, b: a @ b, "matmul", ["a", "b"]),
    (lambda a, b: -a, "neg", ["a"]),
    (lambda a, b: gg.maximum(b, a), "maximum", ["b", "a"]),
    (lambda a, b: gg.relu(a), "relu", ["a"]),
    (lambda a, b: gg.l2(b), "l2", ["b"]),
])
def test_operators_make_the_right_node(build, op, inputs):
    g = gg.Graph()
    v = build(g.param("a", (2, 2)), g.param("b", (2, 2)))
    node = g.to_proto().nodes[-1]
    assert (node.op, list(node.inputs), node.name) == (op, inputs, v.name)


@pytest.mark.parametrize("build, op, const_first", [
    (lambda a: a + 2, "add", False),
    (lambda a: 2 + a, "add", True),
    (lambda a: a - 2, "sub", False),
    (lambda a: 2 - a, "sub", True),
    (lambda a: 2 * a, "mul", True),
    (lambda a: a / 2, "div", False),
    (lambda a: 2 / a, "div", True),
    (lambda a: np.float32(2) * a, "mul", True),
])
def test_python_scalars_become_float64_constants(build, op, const_first):
    g = gg.Graph()
    build(g.param("a", ()))
    const, node = g.to_proto().nodes
    assert const.op == "constant" and node.op == op
    assert list(node.inputs) == ([const.name, "a"] if const_first else ["a", const.name])
    value = from_tensor(const.attrs["value"].tensor)
    assert value.dtype == np.float64 and value.shape == () and value == 2.0


def test_numpy_array_on_the_left_makes_one_constant():
    g = gg.Graph()
    np.ones((2, 2)) @ g.param("a", (2, 2))
    const, node = g.to_proto().nodes
    assert node.op == "matmul"
    np.testing.assert_array_equal(from_tensor(const.attrs["value"].tensor), np.ones((2, 2)))


def test_attrs():
    g = gg.Graph()
    x = g.input("x", (None, 3, 4))
    gg.sum(x, axis=1, name="s1")
    gg.mean(x, axis=(1, 2), keepdims=True, name="m")
    gg.sum(x, name="s_all")
    gg.reshape(x, (None, 12), name="r")
    gg.transpose(x, name="t")
    gg.svm_loss(x, x, name="svm")
    attrs = {name: attrs_to_dict(n.attrs) for name, n in nodes(g).items()}
    assert attrs == {"s1": {"axis": (1,), "keepdims": False}, "m": {"axis": (1, 2), "keepdims": True},
                     "s_all": {"keepdims": False}, "r": {"shape": (-1, 12)}, "t": {}, "svm": {"margin": 1.0}}


def test_auto_names_and_renaming_after_use():
    g = gg.Graph()
    a = g.param("a", (2, 2))
    h = a @ a
    assert h.name == "matmul_0"
    loss = g.set_loss(gg.sum(h))
    g.output(h, name="hidden")
    msg = g.to_proto()
    assert [n.name for n in msg.nodes] == ["hidden", "sum_1"]
    assert list(msg.nodes[1].inputs) == ["hidden"]
    assert (msg.loss, list(msg.outputs)) == (loss.name, ["hidden"])


def test_explicit_name():
    g = gg.Graph()
    h = gg.tanh(g.param("a", (2,)), name="act")
    assert h.name == "act" and g.to_proto().nodes[0].name == "act"


def test_constant_without_graph_joins_on_use():
    c = gg.exp(gg.constant([1.0, 2.0]))
    assert c.graph is None
    g = gg.Graph()
    g.set_loss(gg.sum(g.param("a", (2,)) * c))
    assert [n.op for n in g.to_proto().nodes] == ["constant", "exp", "mul", "sum"]
    msg = g.to_proto()
    assert gg.Graph.from_proto(msg).to_proto() == msg


def test_values_of_two_graphs_do_not_mix():
    a, b = gg.Graph().param("a", ()), gg.Graph().param("b", ())
    with pytest.raises(ValueError, match="another graph"):
        a + b


def test_init_params():
    g = two_layer()
    p = gg.init_params(g, seed=1)
    assert {k: (v.shape, v.dtype) for k, v in p.items()} == {
        "W1": ((2, 100), np.float32), "b1": ((100,), np.float32),
        "W2": ((100, 3), np.float32), "b2": ((3,), np.float32)}
    assert not p["b1"].any() and not p["b2"].any()
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(p["W1"], rng.standard_normal((2, 100)) * np.sqrt(2 / 2), rtol=1e-6)
    np.testing.assert_allclose(p["W2"], rng.standard_normal((100, 3)) * np.sqrt(2 / 100), rtol=1e-6)
    np.testing.assert_array_equal(gg.init_params(g, seed=1)["W1"], p["W1"])
