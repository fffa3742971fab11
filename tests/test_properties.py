"""Property tests: the codec round-trips any array; broadcasting gradients unbroadcast right."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradgate import codec
from gradgate_server.engine import backward, compile_graph, forward

from graphs import one_op_graph

DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int32])


@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_codec_round_trips_any_array(a: np.ndarray) -> None:
    b = codec.from_tensor(codec.to_tensor(a))
    assert b.dtype == a.dtype.newbyteorder("<") and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3)), st.integers(1, 7))
def test_codec_rejects_truncated_data(a: np.ndarray, cut: int) -> None:
    t = codec.to_tensor(a)
    t.data = t.data[:-cut]
    with pytest.raises(codec.CodecError, match="bytes"):
        codec.from_tensor(t)


def test_codec_encodes_big_endian_and_strided_input_as_little_endian_c_order() -> None:
    a = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian, Fortran-ordered view
    t = codec.to_tensor(a)
    assert t.data == np.ascontiguousarray(a, "<f8").tobytes()
    np.testing.assert_array_equal(codec.from_tensor(t), a)


@st.composite
def broadcastable_pair(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two shapes that broadcast: each dim of the shorter one is the other's or 1."""
    full = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    tail = full[len(full) - draw(st.integers(0, len(full))):]
    other = tuple(d if draw(st.booleans()) else 1 for d in tail)
    return (full, other) if draw(st.booleans()) else (other, full)


@settings(max_examples=60, deadline=None)
@given(broadcastable_pair(), st.sampled_from(["add", "sub", "mul", "div", "maximum"]), st.integers(0, 2**32 - 1))
def test_broadcast_gradients_have_input_shapes_and_sum_correctly(shapes, op: str, seed: int) -> None:
    """d/dy of sum(weight * op(x, y)) for a broadcast y equals the broadcast gradient summed down."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 2.0, shapes[0])
    y = rng.uniform(2.5, 4.0, shapes[1])  # x < y: no ties for maximum, no division by ~0
    out_shape = np.broadcast_shapes(x.shape, y.shape)
    weight = rng.normal(size=out_shape)
    plan = compile_graph(one_op_graph(op, [x, y], {}, weight))
    grads = backward(plan, forward(plan, {}, {"in0": x, "in1": y}), plan.params)
    local = {"add": (1, 1), "sub": (1, -1), "mul": (y, x), "div": (1 / y, -x / y**2), "maximum": (0, 1)}[op]
    for name, value, d in (("in0", x, local[0]), ("in1", y, local[1])):
        full = np.broadcast_to(weight * d, out_shape)
        expected = full.sum(axis=tuple(range(full.ndim - value.ndim))) if full.ndim > value.ndim else full
        expected = expected.sum(axis=tuple(i for i, n in enumerate(value.shape) if n == 1), keepdims=True)
        assert grads[name].shape == value.shape
        np.testing.assert_allclose(grads[name], expected.reshape(value.shape), rtol=1e-12, atol=1e-12)
