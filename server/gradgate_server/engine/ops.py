"""The op registry: one entry per gate, forward and vjp side by side.

A gate knows only its local inputs (CS231n lecture 4). ``forward(*inputs, **attrs)``
returns ``(out, residuals)``: the output and the tuple of values backward needs,
kept per node in the session as data. ``vjps[i](g, *residuals)`` turns the
upstream gradient ``g`` (shape of ``out``) into the gradient of input ``i``
(HIPS autograd ``defvjp``: one rule per input, so an input that needs no gradient
costs nothing). Rules may return a broadcast shape; the engine unbroadcasts.
``shape(*input_shapes, **attrs)`` gives the static output shape, with -1 for the
batch dimension, and raises ValueError with a readable reason.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

Shape = tuple[int, ...]
BATCH = -1  # the batch dimension in a static shape


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    forward: Callable[..., tuple[Any, tuple]]
    vjps: tuple[Callable[..., Any] | None, ...]  # None: no gradient (e.g. integer labels)
    shape: Callable[..., Shape]
    doc: str
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # name -> default
    int_inputs: frozenset[str] = frozenset()  # inputs that must be integer (labels)
    float_only: bool = True  # other inputs must be the graph's float dtype; False: any, out = input 0's


OPS: dict[str, OpDef] = {}
REQUIRED = object()  # attr default meaning "must be given"
# What each attribute name may hold, for every op that takes it (checked once, at compile).
ATTR_TYPES: dict[str, tuple[type, ...]] = {
    "axis": (int, tuple),  # an int or a list of ints
    "keepdims": (bool,),
    "shape": (tuple,),
    "axes": (tuple,),
    "value": (np.ndarray,),
    "margin": (float, int),
}


def defop(name: str, inputs: tuple[str, ...], forward: Callable, *vjps: Callable | None,
          shape: Callable[..., Shape], doc: str, attrs: Mapping[str, Any] | None = None,
          int_inputs: tuple[str, ...] = (), float_only: bool = True) -> None:
    assert len(vjps) == len(inputs), name
    assert set(attrs or {}) <= set(ATTR_TYPES), name
    OPS[name] = OpDef(name, inputs, forward, vjps, shape, doc, MappingProxyType(dict(attrs or {})),
                      frozenset(int_inputs), float_only)


# -- shape rules ---------------------------------------------------------------

def fmt(shape: Shape) -> str:
    """(N, 2) for (-1, 2): how shapes appear in error messages."""
    dims = ["N" if d == BATCH else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def broadcast(*shapes: Shape) -> Shape:
    """numpy broadcasting where N (batch) matches only N or 1."""
    ndim = max(map(len, shapes))
    out = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes]):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {' and '.join(map(fmt, shapes))} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def same(x: Shape) -> Shape:
    return x


def scalar(*_: Any, **__: Any) -> Shape:
    return ()


def unbroadcast(g: np.ndarray, shape: Shape) -> np.ndarray:
    """Sum a broadcast gradient back down to an input's shape."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def norm_axes(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    """Sorted, non-negative reduction axes; None = all."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"axis {axis} out of range for {ndim}-D input")
    out = tuple(sorted(a % ndim for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis}")
    return out


def reduce_shape(x: Shape, axis: Any = None, keepdims: bool = False) -> Shape:
    axes = norm_axes(axis, len(x))
    return tuple(1 if i in axes else d for i, d in enumerate(x) if keepdims or i not in axes)


def matmul_shape(a: Shape, b: Shape) -> Shape:
    if len(a) != 2 or len(b) != 2:
        raise ValueError(f"matmul needs 2-D operands, got {fmt(a)} @ {fmt(b)}; reshape vectors to (1, n) or (n, 1)")
    if a[1] != b[0]:
        raise ValueError(f"inner dimensions differ: {fmt(a)} @ {fmt(b)}")
    return (a[0], b[1])


def reshape_shape(x: Shape, shape: tuple[int, ...] = ()) -> Shape:
    shape = tuple(int(d) for d in shape)
    if any(d < BATCH for d in shape) or shape.count(BATCH) > 1:
        raise ValueError(f"bad target shape {list(shape)}: dimensions must be >= 0, at most one -1")
    known_in = int(np.prod([d for d in x if d != BATCH]))
    known_out = int(np.prod([d for d in shape if d != BATCH]))
    if BATCH in x:  # the target's -1 carries the batch dimension
        if BATCH not in shape or known_in != known_out:
            raise ValueError(f"cannot reshape {fmt(x)} to {list(shape)}: keep -1 for the batch and "
                             f"{known_in} other elements")
        return shape
    if BATCH in shape:  # numpy's inferred dimension
        if known_out == 0 or known_in % known_out:
            raise ValueError(f"cannot reshape {fmt(x)} to {list(shape)}")
        return tuple(known_in // known_out if d == BATCH else d for d in shape)
    if known_in != known_out:
        raise ValueError(f"cannot reshape {fmt(x)} ({known_in} elements) to {list(shape)}")
    return shape


def transpose_axes(ndim: int, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(reversed(range(ndim)))
    if sorted(a % ndim if -ndim <= a < ndim else a for a in axes) != list(range(ndim)):
        raise ValueError(f"axes {list(axes)} are not a permutation of {ndim} dimensions")
    return tuple(a % ndim for a in axes)


def transpose_shape(x: Shape, axes: tuple[int, ...] | None = None) -> Shape:
    return tuple(x[a] for a in transpose_axes(len(x), axes))


def loss_shape(scores: Shape, labels: Shape, **_: Any) -> Shape:
    if len(scores) != 2 or len(labels) != 1 or scores[0] != labels[0]:
        raise ValueError(f"needs scores (N, C) and labels (N,), got {fmt(scores)} and {fmt(labels)}")
    return ()


def constant_shape(value: np.ndarray) -> Shape:
    return np.shape(value)


# -- elementwise ---------------------------------------------------------------

defop("add", ("x", "y"), lambda x, y: (x + y, ()),
      lambda g: g,
      lambda g: g,
      shape=broadcast, doc="x + y (broadcasting): distributes the gradient unchanged")

defop("sub", ("x", "y"), lambda x, y: (x - y, ()),
      lambda g: g,
      lambda g: -g,
      shape=broadcast, doc="x - y (broadcasting)")

defop("mul", ("x", "y"), lambda x, y: (x * y, (x, y)),
      lambda g, x, y: g * y,
      lambda g, x, y: g * x,
      shape=broadcast, doc="x * y (broadcasting): each input's gradient is the other input times g")

defop("div", ("x", "y"), lambda x, y: (out := x / y, (y, out)),
      lambda g, y, out: g / y,
      lambda g, y, out: -g * out / y,
      shape=broadcast, doc="x / y (broadcasting)")

defop("maximum", ("x", "y"), lambda x, y: (np.maximum(x, y), (x >= y,)),
      lambda g, x_wins: g * x_wins,
      lambda g, x_wins: g * ~x_wins,
      shape=broadcast, doc="max(x, y) (broadcasting): routes the gradient to the larger input (x on ties)")

defop("neg", ("x",), lambda x: (-x, ()),
      lambda g: -g,
      shape=same, doc="-x")

defop("exp", ("x",), lambda x: (out := np.exp(x), (out,)),
      lambda g, out: g * out,
      shape=same, doc="e**x")

defop("log", ("x",), lambda x: (np.log(x), (x,)),
      lambda g, x: g / x,
      shape=same, doc="natural logarithm")

defop("sigmoid", ("x",), lambda x: (out := 1 / (1 + np.exp(-x)), (out,)),
      lambda g, out: g * out * (1 - out),
      shape=same, doc="1 / (1 + e**-x); local gradient (1 - s) * s")

defop("tanh", ("x",), lambda x: (out := np.tanh(x), (out,)),
      lambda g, out: g * (1 - out * out),
      shape=same, doc="hyperbolic tangent")

defop("relu", ("x",), lambda x: (out := np.maximum(x, 0), (out,)),
      lambda g, out: g * (out > 0),
      shape=same, doc="max(x, 0)")

defop("square", ("x",), lambda x: (x * x, (x,)),
      lambda g, x: 2 * g * x,
      shape=same, doc="x * x")


# -- linear algebra, reductions, structure ---------------------------------------

# np.dot, not @: an outer product such as (784, 1) @ (1, 256) takes a slow non-BLAS path with @.
defop("matmul", ("a", "b"), lambda a, b: (np.dot(a, b), (a, b)),
      lambda g, a, b: np.dot(g, b.T),
      lambda g, a, b: np.dot(a.T, g),
      shape=matmul_shape, doc="matrix product of 2-D a (n, k) and b (k, m)")


def _sum(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> tuple[Any, tuple]:
    axes = norm_axes(axis, x.ndim)
    return np.sum(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims, 1)


def _mean(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> tuple[Any, tuple]:
    axes = norm_axes(axis, x.ndim)
    count = int(np.prod([x.shape[a] for a in axes]))
    return np.mean(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims, count)


def _spread(g: np.ndarray, shape: Shape, axes: tuple[int, ...], keepdims: bool, count: int) -> np.ndarray:
    """Gradient of a sum (count=1) or mean over ``axes``: g copied back along them."""
    g = g if keepdims else np.expand_dims(g, axes)
    return np.broadcast_to(g / count if count != 1 else g, shape)


defop("sum", ("x",), _sum, _spread, attrs={"axis": None, "keepdims": False},
      shape=reduce_shape, float_only=False, doc="sum over axis (None = all), optionally keeping dims")

defop("mean", ("x",), _mean, _spread, attrs={"axis": None, "keepdims": False},
      shape=reduce_shape, doc="mean over axis (None = all), optionally keeping dims")

defop("reshape", ("x",), lambda x, shape: (x.reshape(shape), (x.shape,)),
      lambda g, x_shape: g.reshape(x_shape),
      attrs={"shape": REQUIRED}, shape=reshape_shape, float_only=False,
      doc="reshape to `shape`; -1 stands for the batch dimension")


def _transpose(x: np.ndarray, axes: tuple[int, ...] | None = None) -> tuple[Any, tuple]:
    axes = transpose_axes(x.ndim, axes)
    return np.transpose(x, axes), (np.argsort(axes),)


defop("transpose", ("x",), _transpose,
      lambda g, inverse: np.transpose(g, inverse),
      attrs={"axes": None}, shape=transpose_shape, float_only=False,
      doc="permute dimensions by `axes` (default: reverse them)")

defop("constant", (), lambda value: (value, ()),
      attrs={"value": REQUIRED}, shape=constant_shape, float_only=False,
      doc="a fixed tensor `value`; float values take the graph's float dtype")

defop("l2", ("w",), lambda w: (np.sum(w * w), (w,)),
      lambda g, w: 2 * g * w,
      shape=scalar, doc="sum(w * w), the L2 regularization penalty")


# -- losses (averaged over the batch, as in CS231n) -------------------------------

def _check_labels(labels: np.ndarray, classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")


def _softmax_cross_entropy(scores: np.ndarray, labels: np.ndarray) -> tuple[Any, tuple]:
    n, classes = scores.shape
    _check_labels(labels, classes)
    shifted = scores - scores.max(axis=1, keepdims=True)  # exp cannot overflow
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = np.mean(np.log(total[:, 0]) - shifted[rows, labels])
    dscores = exp / total
    dscores[rows, labels] -= 1
    return loss, (dscores / n,)


defop("softmax_cross_entropy", ("scores", "labels"), _softmax_cross_entropy,
      lambda g, dscores: g * dscores,
      None,
      shape=loss_shape, int_inputs=("labels",),
      doc="mean over the batch of -log softmax(scores)[label]; scores (N, C), labels (N,)")


def _svm_loss(scores: np.ndarray, labels: np.ndarray, margin: float = 1.0) -> tuple[Any, tuple]:
    n, classes = scores.shape
    _check_labels(labels, classes)
    rows = np.arange(n)
    margins = np.maximum(0, scores - scores[rows, labels][:, None] + margin)
    margins[rows, labels] = 0
    active = (margins > 0).astype(scores.dtype)
    active[rows, labels] = -active.sum(axis=1)
    return margins.sum() / n, (active / n,)


defop("svm_loss", ("scores", "labels"), _svm_loss,
      lambda g, dscores: g * dscores,
      None,
      attrs={"margin": 1.0}, shape=loss_shape, int_inputs=("labels",),
      doc="multiclass hinge loss, mean over the batch of sum_j max(0, s_j - s_label + margin)")
