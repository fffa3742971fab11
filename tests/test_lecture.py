"""The backprop lecture's worked examples (CS231n lecture 4), through a real server.

(The circuit f = (x + y) * z is in test_sdk_e2e.py.)
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import gradgate as gg
from gradgate_server import serve


@pytest.fixture(scope="module")
def client() -> Iterator[gg.Client]:
    with serve("127.0.0.1:0") as server, gg.connect(server.address, timeout=10.0) as c:
        yield c


def test_sigmoid_neuron(client: gg.Client) -> None:
    """f(w, x) = 1 / (1 + exp(-(w0*x0 + w1*x1 + w2))) at w = [2, -3, -3], x = [-1, -2].

    The dot product is 1, f = sigmoid(1) = 0.73 and the sigmoid gate's local gradient
    is (1 - f) * f = 0.20, which the mul gates pass on: dw = [-0.20, -0.39, 0.20],
    dx = [0.39, -0.59] (the lecture's rounded values).
    """
    g = gg.Graph(dtype="float64")
    w0, w1, w2 = (g.param(f"w{i}", ()) for i in range(3))
    x0, x1 = (g.input(f"x{i}", ()) for i in range(2))
    g.set_loss(1 / (1 + gg.exp(-(w0 * x0 + w1 * x1 + w2))))
    w, x = [2.0, -3.0, -3.0], [-1.0, -2.0]
    f = 1 / (1 + np.exp(-1.0))
    local = (1 - f) * f
    with client.session(g, {f"w{i}": np.array(v) for i, v in enumerate(w)}) as sess:
        assert sess.forward({"x0": np.array(x[0]), "x1": np.array(x[1])}).loss == pytest.approx(f, abs=1e-15)
        grads = sess.backward(inputs=True)
    expected = {"w0": x[0] * local, "w1": x[1] * local, "w2": local, "x0": w[0] * local, "x1": w[1] * local}
    assert grads.keys() == expected.keys()
    for name, value in expected.items():
        assert float(grads[name]) == pytest.approx(value, abs=1e-15), name
    assert [round(float(grads[n]), 2) for n in ("w0", "w1", "w2", "x0", "x1")] == [-0.2, -0.39, 0.2, 0.39, -0.59]


def test_three_layer_sigmoid_network_forward_matches_numpy(client: gg.Client) -> None:
    """The lecture's forward pass: h1 = f(W1 x + b1), h2 = f(W2 h1 + b2), out = W3 h2 + b3."""
    rng = np.random.default_rng(4)
    params = {"W1": rng.normal(size=(4, 3)), "b1": rng.normal(size=(4, 1)),
              "W2": rng.normal(size=(4, 4)), "b2": rng.normal(size=(4, 1)),
              "W3": rng.normal(size=(1, 4)), "b3": rng.normal(size=(1, 1))}
    x = rng.normal(size=(3, 1))

    g = gg.Graph(dtype="float64")
    xv = g.input("x", (3, 1))
    p = {name: g.param(name, value.shape) for name, value in params.items()}
    h1 = g.output(gg.sigmoid(p["W1"] @ xv + p["b1"]), "h1")
    h2 = g.output(gg.sigmoid(p["W2"] @ h1 + p["b2"]), "h2")
    out = g.output(p["W3"] @ h2 + p["b3"], "out")
    g.set_loss(gg.sum(out))

    f = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731  (the lecture's own code)
    np_h1 = f(np.dot(params["W1"], x) + params["b1"])
    np_h2 = f(np.dot(params["W2"], np_h1) + params["b2"])
    np_out = np.dot(params["W3"], np_h2) + params["b3"]

    with client.session(g, params) as sess:
        result = sess.forward({"x": x})
        grads = sess.backward()
    np.testing.assert_allclose(result.outputs["h1"], np_h1, rtol=1e-14)
    np.testing.assert_allclose(result.outputs["h2"], np_h2, rtol=1e-14)
    np.testing.assert_allclose(result.outputs["out"], np_out, rtol=1e-14)
    assert result.loss == pytest.approx(float(np_out[0, 0]), rel=1e-14)
    # backward by hand, gate by gate, in reverse order
    d_h2 = params["W3"].T  # dout/dh2
    d_z2 = d_h2 * np_h2 * (1 - np_h2)
    d_h1 = params["W2"].T @ d_z2
    d_z1 = d_h1 * np_h1 * (1 - np_h1)
    np.testing.assert_allclose(grads["W3"], np_h2.T, rtol=1e-13)
    np.testing.assert_allclose(grads["b3"], [[1.0]])
    np.testing.assert_allclose(grads["W2"], d_z2 @ np_h1.T, rtol=1e-13)
    np.testing.assert_allclose(grads["b2"], d_z2, rtol=1e-13)
    np.testing.assert_allclose(grads["W1"], d_z1 @ x.T, rtol=1e-13)
    np.testing.assert_allclose(grads["b1"], d_z1, rtol=1e-13)


def test_max_gate_routes_the_gradient_to_the_larger_input(client: gg.Client) -> None:
    """The lecture's gradient router: d max(x, y) goes to the larger input only."""
    g = gg.Graph(dtype="float64")
    x, y, z = (g.param(n, ()) for n in "xyz")
    g.set_loss(gg.maximum(x, y) * z)
    with client.session(g, {"x": np.array(4.0), "y": np.array(-1.0), "z": np.array(2.0)}) as sess:
        loss, grads = sess.forward_backward({})
    assert loss == 8.0
    assert {k: float(v) for k, v in grads.items()} == {"x": 2.0, "y": 0.0, "z": 4.0}
