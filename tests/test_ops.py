"""Every registry op, gradient-checked numerically in float64 (centered differences).

Parametrized over OPS itself: an op added without a sample here fails
test_every_op_has_a_sample, so no op escapes the check.
"""
from __future__ import annotations

import numpy as np
import pytest

from gradgate_server.engine import OPS, backward, compile_graph, forward

from graphs import one_op_graph

rng = np.random.default_rng(0)


def away_from_zero(*shape: int) -> np.ndarray:
    """Values with |x| >= 0.2, so kinks (relu at 0) sit far from x +- eps."""
    x = rng.uniform(0.2, 2.0, shape)
    return x * rng.choice([-1.0, 1.0], shape)


def positive(*shape: int) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape)


def labels(n: int, classes: int) -> np.ndarray:
    return rng.integers(0, classes, n).astype(np.int64)


def apart(*shape: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y with |x - y| >= 0.2 everywhere (the max gate's kink)."""
    y = rng.normal(size=shape)
    return y + away_from_zero(*shape), y


# op -> list of (inputs, attrs); broadcasting shapes exercise unbroadcast in backward.
SAMPLES: dict[str, list[tuple[list[np.ndarray], dict]]] = {
    "add": [([rng.normal(size=(3, 4)), rng.normal(size=(4,))], {}),
            ([rng.normal(size=(3, 1)), rng.normal(size=(1, 4))], {})],
    "sub": [([rng.normal(size=(3, 4)), rng.normal(size=(3, 1))], {}),
            ([rng.normal(size=()), rng.normal(size=(2, 3))], {})],
    "mul": [([rng.normal(size=(3, 4)), rng.normal(size=(4,))], {}),
            ([rng.normal(size=(2, 1, 3)), rng.normal(size=(4, 1))], {})],
    "div": [([rng.normal(size=(3, 4)), positive(3, 4)], {}),
            ([rng.normal(size=(3, 4)), -positive(4)], {})],
    "maximum": [(list(apart(3, 4)), {}), ([away_from_zero(3, 4), np.zeros(())], {})],
    "neg": [([rng.normal(size=(2, 3))], {})],
    "exp": [([rng.normal(size=(2, 3))], {})],
    "log": [([positive(2, 3)], {})],
    "sigmoid": [([rng.normal(size=(2, 3))], {})],
    "tanh": [([rng.normal(size=(2, 3))], {})],
    "relu": [([away_from_zero(3, 4)], {})],
    "square": [([rng.normal(size=(2, 3))], {})],
    "matmul": [([rng.normal(size=(3, 4)), rng.normal(size=(4, 5))], {}),
               ([rng.normal(size=(4, 1)), rng.normal(size=(1, 3))], {})],  # outer product
    "sum": [([rng.normal(size=(2, 3, 4))], {}), ([rng.normal(size=(2, 3, 4))], {"axis": 1}),
            ([rng.normal(size=(2, 3, 4))], {"axis": (0, 2), "keepdims": True})],
    "mean": [([rng.normal(size=(2, 3, 4))], {}), ([rng.normal(size=(2, 3, 4))], {"axis": -1}),
             ([rng.normal(size=(2, 3, 4))], {"axis": (0, 1), "keepdims": True})],
    "reshape": [([rng.normal(size=(2, 3, 4))], {"shape": (6, 4)}),
                ([rng.normal(size=(2, 6))], {"shape": (3, -1)})],
    "transpose": [([rng.normal(size=(2, 3))], {}), ([rng.normal(size=(2, 3, 4))], {"axes": (1, 2, 0)})],
    "constant": [([], {"value": rng.normal(size=(2, 3))})],
    "l2": [([rng.normal(size=(3, 4))], {})],
    "softmax_cross_entropy": [([rng.normal(size=(5, 3)), labels(5, 3)], {})],
    "svm_loss": [([rng.normal(size=(5, 4)) * 3, labels(5, 4)], {}),
                 ([rng.normal(size=(5, 4)) * 3, labels(5, 4)], {"margin": 0.5})],
}
CASES = [pytest.param(op, inputs, attrs, id=f"{op}-{i}")
         for op, cases in SAMPLES.items() for i, (inputs, attrs) in enumerate(cases)]


def rel_error(a: np.ndarray, n: np.ndarray) -> float:
    """CS231n: |a - n| / max(1e-8, |a| + |n|), worst coordinate."""
    return float(np.max(np.abs(a - n) / np.maximum(1e-8, np.abs(a) + np.abs(n)), initial=0.0))


def test_every_op_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(OPS)


@pytest.mark.parametrize("op, inputs, attrs", CASES)
def test_gradient_matches_centered_differences(op: str, inputs: list, attrs: dict) -> None:
    out_shape = compile_graph(one_op_graph(op, inputs, attrs, np.ones(()))).shapes[-4]
    weight = rng.normal(size=out_shape)  # a random upstream gradient, not just ones
    plan = compile_graph(one_op_graph(op, inputs, attrs, weight))
    batch = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "i"}
    params = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "f"}
    analytic = backward(plan, forward(plan, batch, params), plan.params)

    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            shifted = []
            for sign in (1, -1):
                p = value.copy()
                p[idx] += sign * eps
                shifted.append(forward(plan, batch, {**params, name: p}).loss)
            numeric[idx] = (shifted[0] - shifted[1]) / (2 * eps)
        assert analytic[name].shape == value.shape
        assert analytic[name].dtype == np.float64
        assert rel_error(analytic[name], numeric) <= 1e-7, (name, analytic[name], numeric)
