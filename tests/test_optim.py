"""Optimizer updates against hand-computed values, two steps each."""
import numpy as np
import pytest

from gradgate import optim

P = {"w": np.array([1.0, -2.0])}
G1 = {"w": np.array([0.5, 1.0])}
G2 = {"w": np.array([-1.0, 2.0])}


def two_steps(opt):
    p1 = opt.step(P, G1)
    return p1, opt.step(p1, G2)


def test_sgd():
    p1, p2 = two_steps(optim.SGD(lr=0.1))
    np.testing.assert_allclose(p1["w"], [0.95, -2.1])
    np.testing.assert_allclose(p2["w"], [1.05, -2.3])


def test_sgd_momentum():
    p1, p2 = two_steps(optim.SGD(lr=0.1, momentum=0.9))
    # v1 = -0.1*g1 = [-0.05, -0.1]; v2 = 0.9*v1 - 0.1*g2 = [0.055, -0.29]
    np.testing.assert_allclose(p1["w"], [0.95, -2.1])
    np.testing.assert_allclose(p2["w"], [1.005, -2.39])


def test_adam():
    p1, p2 = two_steps(optim.Adam(lr=0.1, betas=(0.9, 0.999), eps=1e-8))
    # step 1: m_hat = g1, v_hat = g1^2, so the step is lr * sign(g1)
    np.testing.assert_allclose(p1["w"], [0.9, -2.1], rtol=1e-7)
    # step 2 by hand: m = 0.9*0.1*g1 + 0.1*g2 = [-0.055, 0.29], m_hat = m / 0.19;
    # v = 0.999*0.001*g1^2 + 0.001*g2^2 = [0.00124975, 0.004999], v_hat = v / 0.001999;
    # step = 0.1 * m_hat / sqrt(v_hat) = [-0.0366104, 0.0965182]
    np.testing.assert_allclose(p2["w"], [0.9366104, -2.1965182], rtol=1e-7)


@pytest.mark.parametrize("opt", [optim.SGD(0.1, momentum=0.9), optim.Adam(0.1)])
def test_step_keeps_inputs_and_float32(opt):
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.full(3, 0.5, np.float32)}
    grads["w"].flags.writeable = False  # like decoded gradients
    new = opt.step(params, grads)
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(params["w"], np.ones(3))
    assert new["w"] is not params["w"]
    assert opt.step(params, {"w": np.full(3, 0.5)})["w"].dtype == np.float32  # float64 gradients too


@pytest.mark.parametrize("make, message", [
    (lambda: optim.SGD(lr=0), "lr must be a finite number > 0"),
    (lambda: optim.SGD(lr=float("inf")), "lr must be a finite number > 0"),
    (lambda: optim.SGD(lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda: optim.Adam(lr=float("nan")), "lr must be a finite number > 0"),
    (lambda: optim.Adam(betas=(0.9, 1.5)), r"beta2 must be in \[0, 1\)"),
    (lambda: optim.Adam(eps=0), "eps must be a finite number > 0"),
])
def test_settings_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_state_round_trips_through_proto_and_load_state():
    opt = optim.Adam(0.1)
    p1 = opt.step(P, G1)
    again = optim.from_proto(opt.to_proto())
    again.load_state(opt.step_count, opt.state())
    np.testing.assert_array_equal(again.step(p1, G2)["w"], opt.step(p1, G2)["w"])
    with pytest.raises(ValueError, match="unknown optimizer state 'velocity/w' for Adam"):
        again.load_state(1, {"velocity/w": np.zeros(2)})
