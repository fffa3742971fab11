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


def distinct(*shape: int) -> np.ndarray:
    """Values at least 0.1 apart, so a max over a window never ties within x +- eps."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1.0


def buffers(node: str, channels: int) -> dict[str, np.ndarray]:
    return {f"{node}.running_mean": rng.normal(size=channels), f"{node}.running_var": positive(channels)}


# op -> list of (inputs, attrs) or (inputs, attrs, forward keywords: train, seed, buffers);
# broadcasting shapes exercise unbroadcast in backward. The op's node is called "out".
SAMPLES: dict[str, list[tuple]] = {
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
               ([rng.normal(size=(4, 1)), rng.normal(size=(1, 3))], {}),  # outer product
               ([rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5))], {}),  # shared weights
               ([rng.normal(size=(2, 1, 3, 4)), rng.normal(size=(3, 4, 2))], {}),  # broadcast batch axes
               ([rng.normal(size=(4,)), rng.normal(size=(2, 4, 3))], {}),  # 1-D promoted
               ([rng.normal(size=(2, 3, 4)), rng.normal(size=(4,))], {}),
               ([rng.normal(size=(4,)), rng.normal(size=(4,))], {})],
    "affine": [([rng.normal(size=(3, 4)), rng.normal(size=(4, 5)), rng.normal(size=(5,))], {}),
               ([rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 2)), rng.normal(size=(2,))], {})],
    "conv2d": [([rng.normal(size=(2, 3, 5, 5)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4,))],
                {"padding": 1}),
               ([rng.normal(size=(1, 2, 6, 5)), rng.normal(size=(3, 2, 3, 2))], {"stride": (2, 1), "padding": (1, 0)}),
               ([rng.normal(size=(1, 2, 7, 6)), rng.normal(size=(2, 2, 2, 3)), rng.normal(size=(2,))],
                {"stride": 2, "dilation": (2, 1), "padding": (0, 1, 1, 2)}),
               ([rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(6, 2, 3, 3)), rng.normal(size=(6,))],
                {"groups": 2, "padding": 1}),
               # padding larger than the image: a 1x1 kernel's im2col columns are a view of the padded input
               ([rng.normal(size=(2, 1, 2, 2)), rng.normal(size=(3, 1, 1, 1))], {"padding": (3, 2)})],
    "max_pool2d": [([distinct(2, 2, 4, 4)], {}),
                   ([distinct(1, 2, 5, 5)], {"kernel": 3, "stride": 2, "padding": 1}),
                   ([distinct(1, 1, 6, 5)], {"kernel": (2, 3), "stride": 1, "dilation": (2, 1)}),
                   # padded on every side by as much as the image (PyTorch allows up to half the kernel)
                   ([distinct(2, 1, 2, 2)], {"kernel": 5, "padding": 2, "stride": 1})],
    "avg_pool2d": [([rng.normal(size=(2, 2, 4, 4))], {}),
                   ([rng.normal(size=(1, 2, 5, 5))], {"kernel": 3, "stride": 2, "padding": 1}),
                   ([rng.normal(size=(1, 2, 5, 4))], {"kernel": 3, "stride": (2, 1), "padding": 1,
                                                      "count_include_pad": False})],
    "batchnorm": [([rng.normal(size=(4, 3)), positive(3), rng.normal(size=(3,))], {}),
                  ([rng.normal(size=(2, 3, 2, 2)), positive(3), rng.normal(size=(3,))], {"momentum": 0.5}),
                  ([rng.normal(size=(2, 3, 2, 2)), positive(3), rng.normal(size=(3,))], {"eps": 1e-3},
                   {"train": False, "buffers": buffers("out", 3)})],
    "layernorm": [([rng.normal(size=(3, 4)), positive(4), rng.normal(size=(4,))], {}),
                  ([rng.normal(size=(2, 3, 4)), positive(3, 4), rng.normal(size=(3, 4))], {"axis": -2, "eps": 1e-3})],
    "dropout": [([rng.normal(size=(4, 5))], {"p": 0.3}, {"seed": 7}),
                ([rng.normal(size=(4, 5))], {}, {"train": False})],
    "softmax": [([rng.normal(size=(3, 4))], {}), ([rng.normal(size=(3, 4, 2))], {"axis": 1})],
    "log_softmax": [([rng.normal(size=(3, 4))], {}), ([rng.normal(size=(3, 4))], {"axis": 0})],
    "flatten": [([rng.normal(size=(2, 3, 2))], {}), ([rng.normal(size=(2, 3, 2))], {"axis": -1})],
    "concat": [([rng.normal(size=(2, 3)), rng.normal(size=(2, 2))], {"axis": 1}),
               ([rng.normal(size=(1, 2)), rng.normal(size=(2, 2)), rng.normal(size=(3, 2))], {"axis": 0})],
    "slice": [([rng.normal(size=(4, 5))], {"starts": (1, 0), "ends": (3, -1)}),
              ([rng.normal(size=(3, 6))], {"starts": (-1,), "ends": (-100,), "axes": (1,), "steps": (-2,)})],
    "clip": [([np.array([[-1.5, -0.7, 0.4], [0.8, 1.3, -0.2]])], {"min": -0.5, "max": 1.0}),
             ([away_from_zero(3, 4)], {"min": 0.0})],
    "abs": [([away_from_zero(3, 4)], {})],
    "sqrt": [([positive(3, 4)], {})],
    "pow": [([positive(3, 4)], {"exponent": 2.5}), ([rng.normal(size=(3,))], {"exponent": 3}),
            ([rng.normal(size=(3,))], {"exponent": 0})],
    "mse_loss": [([rng.normal(size=(3, 4)), rng.normal(size=(3, 4))], {})],
    "bce_with_logits": [([rng.normal(size=(3, 4)) * 3, rng.uniform(size=(3, 4))], {})],
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
CASES = [pytest.param(op, case[0], case[1], case[2] if len(case) > 2 else {}, id=f"{op}-{i}")
         for op, cases in SAMPLES.items() for i, case in enumerate(cases)]


def rel_error(a: np.ndarray, n: np.ndarray) -> float:
    """CS231n: |a - n| / max(1e-8, |a| + |n|), worst coordinate."""
    return float(np.max(np.abs(a - n) / np.maximum(1e-8, np.abs(a) + np.abs(n)), initial=0.0))


def test_every_op_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(OPS)


@pytest.mark.parametrize("op, inputs, attrs, run", CASES)
def test_gradient_matches_centered_differences(op: str, inputs: list, attrs: dict, run: dict) -> None:
    out_shape = compile_graph(one_op_graph(op, inputs, attrs, np.ones(()))).shapes[-4]
    weight = rng.normal(size=out_shape)  # a random upstream gradient, not just ones
    plan = compile_graph(one_op_graph(op, inputs, attrs, weight))
    batch = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "i"}
    params = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "f"}
    analytic = backward(plan, forward(plan, batch, params, **run), plan.params)

    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            shifted = []
            for sign in (1, -1):
                p = value.copy()
                p[idx] += sign * eps
                shifted.append(forward(plan, batch, {**params, name: p}, **run).loss)
            numeric[idx] = (shifted[0] - shifted[1]) / (2 * eps)
        assert analytic[name].shape == value.shape
        assert analytic[name].dtype == np.float64
        # rounding makes the differences noisy by ~1e-9 of the gradient's scale: tiny entries get that slack
        off = np.abs(analytic[name] - numeric) > 1e-8 * max(1.0, float(np.abs(numeric).max(initial=0)))
        assert rel_error(analytic[name][off], numeric[off]) <= 1e-7, (name, analytic[name], numeric)
