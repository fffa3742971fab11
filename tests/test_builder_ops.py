"""The SDK builder covers the registry: one function per op, same names and attributes."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import gradgate as gg
from gradgate_server.engine import OPS, compile_graph



@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_a_builder_function_with_its_inputs_and_attributes(op: str) -> None:
    assert op in gg.OPS and op in gg.__all__
    params = inspect.signature(getattr(gg, op)).parameters
    inputs = ["xs"] if OPS[op].variadic else list(OPS[op].inputs)
    assert list(params)[:len(inputs)] == inputs
    for attr, default in OPS[op].attrs.items():
        assert attr in params, f"gg.{op} lacks attribute {attr!r}"
        if not isinstance(default, np.ndarray) and params[attr].default is not inspect.Parameter.empty:
            assert params[attr].default == default, (op, attr)
    assert "name" in params


def convnet(dtype: str = "float64") -> tuple[gg.Graph, gg.Value]:
    g = gg.Graph(dtype)
    x = g.input("x", (None, 1, 8, 8))
    y = g.input("y", (None,), dtype="int64")
    w1, b1 = g.param("w1", (4, 1, 3, 3)), g.param("b1", (4,))
    gamma, beta = g.param("gamma", (4,)), g.param("beta", (4,))
    w2 = g.param("w2", (8, 4, 3, 3))
    fc_w, fc_b = g.param("fc_w", (8 * 2 * 2, 10)), g.param("fc_b", (10,))
    h = gg.max_pool2d(gg.relu(gg.batchnorm(gg.conv2d(x, w1, b1, padding=1), gamma, beta, name="bn1")), kernel=2)
    h = gg.avg_pool2d(gg.relu(gg.conv2d(h, w2, padding=1, stride=(1, 1))), 2)
    h = gg.dropout(gg.flatten(h), p=0.25)
    scores = g.output(gg.affine(h, fc_w, fc_b), name="scores")
    g.set_loss(gg.softmax_cross_entropy(scores, y))
    return g, scores


def test_a_convnet_built_with_the_sdk_compiles_with_the_expected_shapes() -> None:
    g, _ = convnet()
    plan = compile_graph(g.to_proto())
    assert plan.shapes[plan.slot["scores"]] == (-1, 10)
    assert [b.name for b in plan.buffers] == ["bn1.running_mean", "bn1.running_var"]
    conv = next(s for s in plan.steps if s.op.name == "conv2d" and len(s.args) == 2)
    assert conv.attrs["stride"] == (1, 1) and conv.attrs["padding"] == 1


def test_init_params_follows_each_parameters_role() -> None:
    g, _ = convnet()
    params = gg.init_params(g, seed=3)
    assert params["gamma"].tolist() == [1.0] * 4 and params["beta"].tolist() == [0.0] * 4
    assert params["b1"].tolist() == [0.0] * 4 and params["fc_b"].tolist() == [0.0] * 10
    # He scale: sqrt(2 / fan_in), fan_in = C * kh * kw for convolutions, D for affine (D, M)
    for name, fan_in in (("w2", 4 * 9), ("fc_w", 32)):
        assert abs(params[name].std() / np.sqrt(2 / fan_in) - 1) < 0.25, name
    assert params["w1"].dtype == np.float64


def test_a_long_chain_of_floating_values_is_adopted_without_recursion() -> None:
    h = gg.constant(1.0)
    for _ in range(900):
        h = gg.tanh(h)  # no graph yet: every node floats until the loss adopts them
    g = gg.Graph("float64")
    w = g.param("w", ())
    g.set_loss(h * w)
    assert len(g.nodes) == 902
    assert len(compile_graph(g.to_proto()).steps) == 902


def test_operators_pow_and_abs() -> None:
    g = gg.Graph("float64")
    w = g.param("w", (3,))
    loss = g.set_loss(gg.sum(abs(w) + w ** 2))
    assert [n.op for n in g.nodes] == ["abs", "pow", "add", "sum"] and loss.op == "sum"
    assert g.nodes[1].attrs == {"exponent": 2.0}
