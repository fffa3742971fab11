"""The op registry: one entry per gate, forward and vjp side by side.

A gate knows only its local inputs (CS231n lecture 4). ``forward(*inputs, **attrs)``
returns ``(out, residuals)``: the output and the tuple of values backward needs,
kept per node in the session as data. ``vjps[i](g, *residuals)`` turns the
upstream gradient ``g`` (shape of ``out``) into the gradient of input ``i``
(HIPS autograd ``defvjp``: one rule per input, so an input that needs no gradient
costs nothing). Rules may return a broadcast shape; the engine unbroadcasts.
``shape(*input_shapes, **attrs)`` gives the static output shape, with -1 for the
batch dimension, and raises ValueError with a readable reason (it also validates
the attributes, once, at compile time).

Some gates need more than their inputs: ``train`` ops get ``train=`` (batchnorm,
dropout), ``random`` ops get ``rng=`` (a numpy Generator seeded from the batch's
seed and the node, so a run is reproducible; None in eval mode), and ops with
state ``buffers`` (batchnorm's running statistics) get each buffer by name and
return ``(out, residuals, new_buffers)``.

Optional rules say what a node will cost before it runs (engine/cost.py), from
``(out_shape, *input_shapes, **attrs)`` with the batch size filled in: ``flops``
(default: the output's element count); ``cached``, the elements its residuals keep
besides its operands and output (default: as many as its largest operand), plus any
large temporary of its forward (conv2d's padded input); ``intermediates``, the element
count of each array it builds besides its output, by what it is ({"padded input": n}),
each held to the per-tensor element limit like a value.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
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
    forward: Callable[..., tuple]  # (out, residuals), or (out, residuals, new buffers) with buffers
    vjps: tuple[Callable[..., Any] | None, ...]  # None: no gradient (e.g. integer labels)
    shape: Callable[..., Shape]
    doc: str
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # name -> default
    int_inputs: frozenset[str] = frozenset()  # inputs that must be integer (labels)
    float_only: bool = True  # other inputs must be the graph's float dtype; False: any, out = input 0's
    optional: int = 0  # how many trailing inputs may be left out (conv2d's bias)
    variadic: bool = False  # one or more inputs, all called inputs[0]; vjps[0](i, g, *res) for input i
    train: bool = False  # forward takes train= (the session's mode)
    random: bool = False  # forward takes rng= (np.random.Generator in train mode, else None)
    # state: (*input shapes, **attrs) -> {buffer: (shape, initial fill value)}; forward takes each
    # buffer by name and returns (out, residuals, {buffer: new value}) (empty when nothing changes)
    buffers: Callable[..., dict[str, tuple[Shape, float]]] | None = None
    flops: Callable[..., int] | None = None  # see the module doc
    cached: Callable[..., int] | None = None
    intermediates: Callable[..., dict[str, int]] | None = None


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
    "stride": (int, tuple),  # an int, or one per spatial dimension
    "padding": (int, tuple),  # an int, (height, width) or (top, left, bottom, right)
    "dilation": (int, tuple),
    "kernel": (int, tuple),
    "groups": (int,),
    "count_include_pad": (bool,),
    "momentum": (float, int),
    "eps": (float, int),
    "p": (float, int),
    "exponent": (float, int),
    "min": (float, int),
    "max": (float, int),
    "starts": (tuple,),
    "ends": (tuple,),
    "steps": (tuple,),
}


def defop(name: str, inputs: tuple[str, ...], forward: Callable, *vjps: Callable | None,
          shape: Callable[..., Shape], doc: str, attrs: Mapping[str, Any] | None = None,
          int_inputs: tuple[str, ...] = (), float_only: bool = True, **more: Any) -> None:
    assert len(vjps) == len(inputs), name
    assert set(attrs or {}) <= set(ATTR_TYPES), name
    OPS[name] = OpDef(name, inputs, forward, vjps, shape, doc, MappingProxyType(dict(attrs or {})),
                      frozenset(int_inputs), float_only, **more)


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
    """numpy matmul: 1-D operands are promoted (and the added axis dropped), leading axes broadcast."""
    if not a or not b:
        raise ValueError(f"matmul needs operands with at least one dimension, got {fmt(a)} @ {fmt(b)}")
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    if BATCH in (a2[-1], b2[-2]) or a2[-1] != b2[-2]:
        raise ValueError(f"inner dimensions differ: {fmt(a)} @ {fmt(b)}")
    out = (*broadcast(a2[:-2], b2[:-2]), a2[-2], b2[-1])
    return out[:len(out) - 2] + (() if len(a) == 1 else out[-2:-1]) + (() if len(b) == 1 else out[-1:])


def reshape_shape(x: Shape, shape: tuple[int, ...] = ()) -> Shape:
    shape = tuple(int(d) for d in shape)
    if any(d < BATCH for d in shape) or shape.count(BATCH) > 1:
        raise ValueError(f"bad target shape {list(shape)}: dimensions must be >= 0, at most one -1")
    known_in = math.prod(d for d in x if d != BATCH)  # Python ints: np.prod wraps at 2**63
    known_out = math.prod(d for d in shape if d != BATCH)
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


def per_element(k: int, of: int = 0) -> Callable[..., int]:
    """A rule: k per element of input ``of`` (reductions, losses, normalizations)."""
    return lambda out, *ins, **_: k * math.prod(ins[of])


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

def _matmul(a: np.ndarray, b: np.ndarray) -> tuple[Any, tuple]:
    # np.dot, not @, for 2-D: an outer product such as (784, 1) @ (1, 256) takes a slow non-BLAS path with @
    return (np.dot(a, b) if a.ndim == b.ndim == 2 else np.matmul(a, b)), (a, b)


def _promoted(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operands and gradient with numpy's 1-D promotions made explicit: a (..., n, k), b (..., k, m), g (..., n, m)."""
    if b.ndim == 1:  # restore the output's m axis first, then its n axis
        b, g = b[:, None], g[..., None]
    if a.ndim == 1:
        a, g = a[None, :], g[..., None, :]
    return g, a, b


def _matmul_da(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == b.ndim == 2:
        return np.dot(g, b.T)
    g2, a2, b2 = _promoted(g, a, b)
    da = np.matmul(g2, np.swapaxes(b2, -1, -2))
    return unbroadcast(da, a2.shape).reshape(a.shape)


def _matmul_db(g: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == b.ndim == 2:
        return np.dot(a.T, g)
    g2, a2, b2 = _promoted(g, a, b)
    if b2.ndim == 2:  # shared weights under a stack of rows: one GEMM, not a batch of them summed
        return np.dot(_rows(a2).T, _rows(g2)).reshape(b.shape)
    db = np.matmul(np.swapaxes(a2, -1, -2), g2)
    return unbroadcast(db, b2.shape).reshape(b.shape)


defop("matmul", ("a", "b"), _matmul, _matmul_da, _matmul_db,
      shape=matmul_shape, flops=lambda out, a, b: 2 * math.prod(out) * a[-1],
      doc="matrix product with numpy's rules: (..., n, k) @ (..., k, m), leading axes "
                              "broadcast, 1-D operands promoted")


def affine_shape(x: Shape, w: Shape, b: Shape) -> Shape:
    if len(x) < 1 or len(w) != 2 or b != w[1:] or x[-1] != w[0]:
        raise ValueError(f"needs x (..., D), w (D, M), b (M,), got {fmt(x)}, {fmt(w)}, {fmt(b)}")
    return (*x[:-1], w[1])


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., k) -> (rows, k) (explicit sizes: -1 is ambiguous for empty arrays)."""
    return a if a.ndim == 2 else a.reshape(int(np.prod(a.shape[:-1])), a.shape[-1])


def _affine(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[Any, tuple]:
    x2 = _rows(x)
    out = np.dot(x2, w)
    out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), (x2, w, x.shape)


defop("affine", ("x", "w", "b"), _affine,
      lambda g, x2, w, x_shape: np.dot(_rows(g), w.T).reshape(x_shape),
      lambda g, x2, w, x_shape: np.dot(x2.T, _rows(g)),
      lambda g, x2, w, x_shape: _rows(g).sum(axis=0),
      shape=affine_shape, flops=lambda out, x, w, b: 2 * math.prod(out) * w[0],
      doc="x @ w + b: a fully connected layer; x (..., D), w (D, M), b (M,)")


def _sum(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> tuple[Any, tuple]:
    axes = norm_axes(axis, x.ndim)
    out = np.add.reduce(x, axis=axes, keepdims=bool(keepdims))  # type: ignore[call-overload]  # np.sum minus wrappers
    return out, (x.shape, axes, keepdims, 1)


def _mean(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> tuple[Any, tuple]:
    axes = norm_axes(axis, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    return np.mean(x, axis=axes, keepdims=keepdims), (x.shape, axes, keepdims, count)


def _spread(g: np.ndarray, shape: Shape, axes: tuple[int, ...], keepdims: bool, count: int) -> np.ndarray:
    """Gradient of a sum (count=1) or mean over ``axes``: g copied back along them."""
    if count != 1:
        g = g / count
    if g.ndim == 0:  # a full reduction, the usual loss: np.full is several times cheaper than broadcasting
        return np.full(shape, g, g.dtype)
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else d for i, d in enumerate(shape)))
    return np.broadcast_to(g, shape)


defop("sum", ("x",), _sum, _spread, attrs={"axis": None, "keepdims": False},
      shape=reduce_shape, float_only=False, flops=per_element(1), doc="sum over axis (None = all), optionally keeping dims")

defop("mean", ("x",), _mean, _spread, attrs={"axis": None, "keepdims": False},
      shape=reduce_shape, flops=per_element(1), doc="mean over axis (None = all), optionally keeping dims")

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
      shape=scalar, flops=per_element(2), doc="sum(w * w), the L2 regularization penalty")


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
      shape=loss_shape, int_inputs=("labels",), flops=per_element(6),
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
      attrs={"margin": 1.0}, shape=loss_shape, int_inputs=("labels",), flops=per_element(5),
      doc="multiclass hinge loss, mean over the batch of sum_j max(0, s_j - s_label + margin)")


# -- more elementwise ------------------------------------------------------------

defop("abs", ("x",), lambda x: (np.abs(x), (x,)),
      lambda g, x: g * np.sign(x),
      shape=same, doc="|x|; gradient sign(x) (0 at 0)")

defop("sqrt", ("x",), lambda x: (out := np.sqrt(x), (out,)),
      lambda g, out: g / (2 * out),
      shape=same, doc="square root")


def pow_shape(x: Shape, exponent: float) -> Shape:
    if not np.isfinite(exponent):
        raise ValueError(f"exponent must be finite, got {exponent}")
    return x


def _pow_dx(g: np.ndarray, x: np.ndarray, exponent: float) -> np.ndarray:
    if exponent == 0:
        return np.zeros_like(g)
    return g * exponent * x ** (exponent - 1)


defop("pow", ("x",), lambda x, exponent: (x ** exponent, (x, exponent)), _pow_dx,
      attrs={"exponent": REQUIRED}, shape=pow_shape, doc="x ** exponent for a constant exponent")


def clip_shape(x: Shape, min: float | None = None, max: float | None = None) -> Shape:
    if any(v is not None and np.isnan(v) for v in (min, max)):
        raise ValueError("min and max must not be NaN")
    return x


def _clip(x: np.ndarray, min: float | None = None, max: float | None = None) -> tuple[Any, tuple]:
    inside = np.ones(x.shape, bool)
    if min is not None:
        inside &= x >= min
    if max is not None:
        inside &= x <= max
    out = x if min is None and max is None else np.clip(x, min, max)
    return out, (inside,)


defop("clip", ("x",), _clip,
      lambda g, inside: g * inside,
      attrs={"min": None, "max": None}, shape=clip_shape,
      doc="x limited to [min, max] (None = unbounded); the gradient passes where min <= x <= max")


# -- softmax ----------------------------------------------------------------------

def axis_shape(x: Shape, axis: Any = -1) -> Shape:
    if not isinstance(axis, int):
        raise ValueError(f"axis must be one int, got {axis}")
    norm_axes(axis, len(x))
    return x


def _softmax(x: np.ndarray, axis: int = -1) -> tuple[Any, tuple]:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    out = e / e.sum(axis=axis, keepdims=True)
    return out, (out, axis)


def _log_softmax(x: np.ndarray, axis: int = -1) -> tuple[Any, tuple]:
    shifted = x - x.max(axis=axis, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return out, (out, axis)


defop("softmax", ("x",), _softmax,
      lambda g, out, axis: out * (g - (g * out).sum(axis=axis, keepdims=True)),
      attrs={"axis": -1}, shape=axis_shape, flops=per_element(5), doc="exp(x) / sum(exp(x)) along axis")

defop("log_softmax", ("x",), _log_softmax,
      lambda g, out, axis: g - np.exp(out) * g.sum(axis=axis, keepdims=True),
      attrs={"axis": -1}, shape=axis_shape, flops=per_element(5),
      doc="x - log(sum(exp(x))) along axis (stable)")


# -- structure ----------------------------------------------------------------------

def flatten_shape(x: Shape, axis: int = 1) -> Shape:
    if not isinstance(axis, int) or not -len(x) <= axis <= len(x):
        raise ValueError(f"axis must be an int in [{-len(x)}, {len(x)}], got {axis}")
    axis = axis + len(x) if axis < 0 else axis
    head, tail = x[:axis], x[axis:]
    if BATCH in tail or (BATCH in head and math.prod(d for d in head if d != BATCH) != 1):
        raise ValueError(f"flattening {fmt(x)} at axis {axis} would merge the batch dimension with others")
    return (BATCH if BATCH in head else math.prod(head), math.prod(tail))


def _flatten(x: np.ndarray, axis: int = 1) -> tuple[Any, tuple]:
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))), (x.shape,)


defop("flatten", ("x",), _flatten,
      lambda g, x_shape: g.reshape(x_shape),
      attrs={"axis": 1}, shape=flatten_shape, float_only=False,
      doc="2-D (prod of dims before axis, prod of the rest): (N, C, H, W) -> (N, C*H*W) at axis 1")


def concat_shape(*xs: Shape, axis: Any = -1) -> Shape:
    if not isinstance(axis, int):
        raise ValueError(f"axis must be one int, got {axis}")
    ndim = len(xs[0])
    if any(len(x) != ndim for x in xs) or ndim == 0:
        raise ValueError(f"inputs must have the same number (>= 1) of dimensions, got {', '.join(map(fmt, xs))}")
    (a,) = norm_axes(axis, ndim)
    for x in xs:
        if x[a] == BATCH or any(d != e for i, (d, e) in enumerate(zip(x, xs[0])) if i != a):
            raise ValueError(f"cannot concatenate {', '.join(map(fmt, xs))} along axis {axis}: other dimensions "
                             "must match and the batch dimension cannot be joined")
    return (*xs[0][:a], sum(x[a] for x in xs), *xs[0][a + 1:])


def _concat(*xs: np.ndarray, axis: int = -1) -> tuple[Any, tuple]:
    a = axis % xs[0].ndim
    return np.concatenate(xs, axis=a), (a, np.cumsum([0, *(x.shape[a] for x in xs)]))


def _concat_dx(i: int, g: np.ndarray, a: int, bounds: np.ndarray) -> np.ndarray:
    return g[(slice(None),) * a + (slice(bounds[i], bounds[i + 1]),)]


defop("concat", ("xs",), _concat, _concat_dx,
      attrs={"axis": -1}, shape=concat_shape, variadic=True,
      doc="join one or more inputs along axis; the others must match")


def _slices(shape: Shape, starts: tuple[int, ...], ends: tuple[int, ...], axes: tuple[int, ...] | None,
            steps: tuple[int, ...] | None) -> tuple[slice, ...]:
    """Python/ONNX slicing: negative indices count from the end, out-of-range ones are clamped."""
    axes = tuple(range(len(starts))) if axes is None else axes
    steps = (1,) * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("starts, ends, axes and steps must have the same length")
    if 0 in steps:
        raise ValueError("steps must not be 0")
    if any(not -len(shape) <= a < len(shape) for a in axes):
        raise ValueError(f"axes {list(axes)} out of range for {len(shape)}-D input")
    if len({a % len(shape) for a in axes}) != len(axes):
        raise ValueError(f"repeated axis in {list(axes)}")
    index = [slice(None)] * len(shape)
    for a, start, end, step in zip(axes, starts, ends, steps):
        index[a % len(shape)] = slice(start, end, step)
    return tuple(index)


def slice_shape(x: Shape, starts: tuple[int, ...] = (), ends: tuple[int, ...] = (),
                axes: tuple[int, ...] | None = None, steps: tuple[int, ...] | None = None) -> Shape:
    out = []
    for d, s in zip(x, _slices(x, starts, ends, axes, steps)):
        if d == BATCH:
            if s != slice(None) and s.indices(2**62) != (0, 2**62, 1):
                raise ValueError("cannot slice the batch dimension")
            out.append(BATCH)
        else:
            out.append(len(range(*s.indices(d))))
    return tuple(out)


def _slice(x: np.ndarray, starts: tuple[int, ...], ends: tuple[int, ...], axes: tuple[int, ...] | None = None,
           steps: tuple[int, ...] | None = None) -> tuple[Any, tuple]:
    index = _slices(x.shape, starts, ends, axes, steps)
    return x[index], (x.shape, x.dtype, index)


def _slice_dx(g: np.ndarray, x_shape: Shape, dtype: np.dtype, index: tuple[slice, ...]) -> np.ndarray:
    dx = np.zeros(x_shape, g.dtype)
    dx[index] = g
    return dx


defop("slice", ("x",), _slice, _slice_dx,
      attrs={"starts": REQUIRED, "ends": REQUIRED, "axes": None, "steps": None}, shape=slice_shape,
      float_only=False, doc="x[starts:ends:steps] along axes (default the first len(starts)), as in Python/ONNX")


# -- convolution and pooling (NCHW), vectorised with stride tricks -----------------------

def _pair(value: Any, name: str, low: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < low for v in pair):
        raise ValueError(f"{name} must be an int >= {low} or two of them, got {value}")
    return pair  # type: ignore[return-value]


def _pads(padding: Any) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from p, (ph, pw) or (top, left, bottom, right) (ONNX's order)."""
    pads = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    if len(pads) == 2:
        pads = pads * 2
    if len(pads) != 4 or any(not isinstance(p, int) or p < 0 for p in pads):
        raise ValueError(f"padding must be an int >= 0, (height, width) or (top, left, bottom, right), got {padding}")
    return pads  # type: ignore[return-value]


@dataclass(frozen=True)
class Window:
    """Where a (kh, kw) window with stride, dilation and padding goes over an (H, W) image."""

    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pads: tuple[int, int, int, int]
    ho: int
    wo: int

    @classmethod
    def of(cls, x: Shape, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Window:
        if len(x) != 4 or BATCH in x[1:]:
            raise ValueError(f"needs an NCHW input (N, C, H, W) with static C, H, W, got {fmt(x)}")
        (kh, kw), (dh, dw) = _pair(kernel, "kernel", 1), _pair(dilation, "dilation", 1)
        (sh, sw), pads = _pair(stride, "stride", 1), _pads(padding)
        hp, wp = x[2] + pads[0] + pads[2], x[3] + pads[1] + pads[3]
        ho = (hp - dh * (kh - 1) - 1) // sh + 1
        wo = (wp - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"a {kh}x{kw} window (dilation {dh}x{dw}) does not fit the padded {x[2]}x{x[3]} input")
        # A stride (or a 1-wide kernel's dilation) past the padded extent gives the same output as the
        # extent itself (as in PyTorch); taken as given, a huge one overflows the strided view's byte strides.
        sh, sw, dh, dw = min(sh, hp), min(sw, wp), min(dh, hp), min(dw, wp)
        return cls(kh, kw, sh, sw, dh, dw, pads, ho, wo)

    @property
    def positions(self) -> int:
        """Kernel positions: backward (and max pooling's forward) makes one numpy pass per position."""
        return self.kh * self.kw

    def padded_elements(self, x: Shape) -> int:
        """Elements of the padded input (N, C, H + pads, W + pads): np.pad's copy in the forward
        (with padding) and the backward's zeroed gradient (always)."""
        t, l, b, r = self.pads
        return x[0] * x[1] * (x[2] + t + b) * (x[3] + l + r)

    def pad(self, x: np.ndarray, fill: float = 0.0) -> np.ndarray:
        t, l, b, r = self.pads
        if not (t or l or b or r):
            return x
        return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=fill)

    def view(self, xp: np.ndarray) -> np.ndarray:
        """(N, C, kh, kw, Ho, Wo): every window of the padded input, a strided view (no copy).
        Element [n, c, i, j] is the (Ho, Wo) image that kernel position (i, j) sees."""
        n, c = xp.shape[:2]
        s = xp.strides
        return np.lib.stride_tricks.as_strided(
            xp, (n, c, self.kh, self.kw, self.ho, self.wo),
            (s[0], s[1], s[2] * self.dh, s[3] * self.dw, s[2] * self.sh, s[3] * self.sw), writeable=False)

    def offsets(self) -> Iterable[tuple[int, int, tuple[slice, slice]]]:
        """Per kernel position (i, j): the strided (H, W) slice of the padded input it reads.
        Backward loops over these kh*kw positions (not over pixels) to scatter gradients."""
        for i in range(self.kh):
            for j in range(self.kw):
                yield i, j, (slice(i * self.dh, i * self.dh + self.sh * (self.ho - 1) + 1, self.sh),
                             slice(j * self.dw, j * self.dw + self.sw * (self.wo - 1) + 1, self.sw))

    def crop(self, dxp: np.ndarray) -> np.ndarray:
        t, l, b, r = self.pads
        return dxp[:, :, t:dxp.shape[2] - b, l:dxp.shape[3] - r]


def conv2d_shape(x: Shape, w: Shape, b: Shape | None = None, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1) -> Shape:
    if len(w) != 4:
        raise ValueError(f"weights must be (F, C/groups, kh, kw), got {fmt(w)}")
    if groups < 1 or len(x) != 4 or x[1] % groups or w[0] % groups or w[1] * groups != x[1]:
        raise ValueError(f"input {fmt(x)} and weights {fmt(w)} do not match with groups={groups}: "
                         "want x (N, C, H, W), w (F, C/groups, kh, kw), F divisible by groups")
    if b is not None and b != (w[0],):
        raise ValueError(f"bias must be ({w[0]},), got {fmt(b)}")
    win = Window.of(x, w[2:], stride, padding, dilation)
    return (x[0], w[0], win.ho, win.wo)


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: int = 1) -> tuple[Any, tuple]:
    win = Window.of(x.shape, w.shape[2:], stride, padding, dilation)
    n, f = x.shape[0], w.shape[0]
    # im2col, one copy: per image a (C*kh*kw, Ho*Wo) matrix, so one GEMM per image gives NCHW directly
    cols = win.view(win.pad(x)).reshape(n, groups, x.shape[1] // groups * win.kh * win.kw, win.ho * win.wo)
    out = np.matmul(w.reshape(groups, f // groups, cols.shape[2]), cols)  # (N, G, F/G, Ho*Wo)
    out = out.reshape(n, f, win.ho, win.wo)
    if b is not None:
        out += b[:, None, None]
    return out, (cols, w, x.shape, win)


def _conv2d_dx(g: np.ndarray, cols: np.ndarray, w: np.ndarray, x_shape: Shape, win: Window) -> np.ndarray:
    n, c = x_shape[:2]
    groups, k = cols.shape[1], cols.shape[2]
    g4 = g.reshape(n, groups, g.shape[1] // groups, win.ho * win.wo)
    dcols = np.matmul(w.reshape(groups, w.shape[0] // groups, k).transpose(0, 2, 1), g4)  # (N, G, C/G*kh*kw, Ho*Wo)
    dcols = dcols.reshape(n, c, win.kh, win.kw, win.ho, win.wo)
    t, l, b, r = win.pads
    dxp = np.zeros((n, c, x_shape[2] + t + b, x_shape[3] + l + r), g.dtype)
    for i, j, where in win.offsets():  # col2im: kh*kw strided adds, not a loop over pixels
        dxp[(slice(None), slice(None), *where)] += dcols[:, :, i, j]
    return win.crop(dxp)


def _conv2d_dw(g: np.ndarray, cols: np.ndarray, w: np.ndarray, x_shape: Shape, win: Window) -> np.ndarray:
    n, groups = cols.shape[:2]
    g4 = g.reshape(n, groups, g.shape[1] // groups, win.ho * win.wo)
    if groups == 1:  # one GEMM over the whole batch
        return np.tensordot(g4[:, 0], cols[:, 0], axes=([0, 2], [0, 2])).reshape(w.shape)
    return np.matmul(g4, cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(w.shape)


# Cost rules of the windowed ops (engine/cost.py). Besides its arithmetic, each touches every element of
# the padded input once (np.pad's copy, backward's zeroed gradient), and makes one numpy pass per kernel
# position (backward's scatter, max pooling's forward): ~7 us of overhead each, however small.
PASS_FLOPS = 100_000  # one pass's overhead, as long as 1e5 FLOPs of matmul


def _window_flops(win: Window, x: Shape) -> int:
    return win.padded_elements(x) + PASS_FLOPS * win.positions


def _padded_copy(win: Window, x: Shape) -> int:
    """Elements of the forward's np.pad copy: none without padding (Window.pad returns x itself)."""
    return win.padded_elements(x) if any(win.pads) else 0


def _conv2d_window(x: Shape, w: Shape, stride: Any = 1, padding: Any = 0, dilation: Any = 1, **_: Any) -> Window:
    return Window.of(x, w[2:], stride, padding, dilation)


def _im2col_elements(out: Shape, x: Shape, win: Window) -> int:
    return out[0] * x[1] * win.positions * out[2] * out[3]


def _conv2d_flops(out: Shape, x: Shape, w: Shape, *b: Shape, **attrs: Any) -> int:
    win = _conv2d_window(x, w, **attrs)
    return 2 * math.prod(out) * w[1] * win.positions + _window_flops(win, x)


def _conv2d_cached(out: Shape, x: Shape, w: Shape, *b: Shape, **attrs: Any) -> int:
    win = _conv2d_window(x, w, **attrs)
    return _im2col_elements(out, x, win) + _padded_copy(win, x)


def _conv2d_intermediates(out: Shape, x: Shape, w: Shape, *b: Shape, **attrs: Any) -> dict[str, int]:
    win = _conv2d_window(x, w, **attrs)
    return {"padded input": win.padded_elements(x), "im2col columns": _im2col_elements(out, x, win)}


defop("conv2d", ("x", "w", "b"), _conv2d, _conv2d_dx, _conv2d_dw,
      lambda g, *_: g.sum(axis=(0, 2, 3)),
      attrs={"stride": 1, "padding": 0, "dilation": 1, "groups": 1}, shape=conv2d_shape, optional=1,
      flops=_conv2d_flops, cached=_conv2d_cached, intermediates=_conv2d_intermediates,
      doc="2-D convolution (cross-correlation), NCHW: x (N, C, H, W), w (F, C/groups, kh, kw), optional b (F,)")


def _pool_window(x: Shape, kernel: Any = 2, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 **_: Any) -> Window:
    return Window.of(x, kernel, kernel if stride is None else stride, padding, dilation)


def pool_shape(x: Shape, **attrs: Any) -> Shape:
    win = _pool_window(x, **attrs)
    if max(win.pads[0], win.pads[2]) >= win.dh * (win.kh - 1) + 1 or \
            max(win.pads[1], win.pads[3]) >= win.dw * (win.kw - 1) + 1:
        raise ValueError(f"padding {win.pads} must be smaller than the (dilated) window, so that every "
                         "window overlaps the input")
    return (x[0], x[1], win.ho, win.wo)


def _pool_flops(out: Shape, x: Shape, **attrs: Any) -> int:
    win = _pool_window(x, **attrs)
    return math.prod(out) * win.positions + _window_flops(win, x)


def _pool_cached(out: Shape, x: Shape, **attrs: Any) -> int:
    """Residuals as large as the output at most (the argmax, the divisors), and the padded copy."""
    return math.prod(out) + _padded_copy(_pool_window(x, **attrs), x)


def _pool_intermediates(out: Shape, x: Shape, **attrs: Any) -> dict[str, int]:
    return {"padded input": _pool_window(x, **attrs).padded_elements(x)}


def _max_pool2d(x: np.ndarray, kernel: Any = 2, stride: Any = None, padding: Any = 0,
                dilation: Any = 1) -> tuple[Any, tuple]:
    win = _pool_window(x.shape, kernel, stride, padding, dilation)
    windows = win.view(win.pad(x, -np.inf))
    out = np.array(windows[:, :, 0, 0])
    # which kernel position holds the maximum, in the smallest unsigned type that numbers them all
    # (a fixed int16 overflowed past 32768 positions, e.g. a 200x200 window)
    arg = np.zeros(out.shape, np.min_scalar_type(win.positions - 1))
    for i, j, _ in win.offsets():  # kh*kw vectorized passes; the first maximum wins, as in PyTorch
        if i or j:
            v = windows[:, :, i, j]
            better = v > out
            better |= v != v  # NaN propagates
            np.copyto(out, v, where=better)
            arg[better] = i * win.kw + j
    return out, (arg, x.shape, win)


def _max_pool2d_dx(g: np.ndarray, arg: np.ndarray, x_shape: Shape, win: Window) -> np.ndarray:
    t, l, b, r = win.pads
    dxp = np.zeros((*x_shape[:2], x_shape[2] + t + b, x_shape[3] + l + r), g.dtype)
    for i, j, where in win.offsets():
        dxp[(slice(None), slice(None), *where)] += g * (arg == i * win.kw + j)
    return win.crop(dxp)


defop("max_pool2d", ("x",), _max_pool2d, _max_pool2d_dx,
      attrs={"kernel": 2, "stride": None, "padding": 0, "dilation": 1}, shape=pool_shape,
      flops=_pool_flops, cached=_pool_cached, intermediates=_pool_intermediates,
      doc="max over (kernel) windows of NCHW x; stride None = kernel; the gradient goes to each window's maximum")


def _avg_pool2d(x: np.ndarray, kernel: Any = 2, stride: Any = None, padding: Any = 0,
                count_include_pad: bool = True) -> tuple[Any, tuple]:
    win = _pool_window(x.shape, kernel, stride, padding)
    total = win.view(win.pad(x)).sum(axis=(2, 3))
    if count_include_pad or not any(win.pads):
        count: Any = win.kh * win.kw
    else:  # count only the real pixels of each window
        count = win.view(win.pad(np.ones((1, 1, *x.shape[2:]), x.dtype))).sum(axis=(2, 3))
    return total / count, (count, x.shape, win)


def _avg_pool2d_dx(g: np.ndarray, count: Any, x_shape: Shape, win: Window) -> np.ndarray:
    t, l, b, r = win.pads
    dxp = np.zeros((*x_shape[:2], x_shape[2] + t + b, x_shape[3] + l + r), g.dtype)
    share = g / count
    for _, _, where in win.offsets():
        dxp[(slice(None), slice(None), *where)] += share
    return win.crop(dxp)


defop("avg_pool2d", ("x",), _avg_pool2d, _avg_pool2d_dx,
      attrs={"kernel": 2, "stride": None, "padding": 0, "count_include_pad": True}, shape=pool_shape,
      flops=_pool_flops, cached=_pool_cached, intermediates=_pool_intermediates,
      doc="mean over (kernel) windows of NCHW x; stride None = kernel; count_include_pad: padding counts in "
          "the divisor (PyTorch's default; ONNX's is False)")


# -- normalization and dropout ------------------------------------------------------

def _channel_axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def batchnorm_shape(x: Shape, gamma: Shape, beta: Shape, momentum: float = 0.9, eps: float = 1e-5) -> Shape:
    if len(x) < 2 or x[1] == BATCH or gamma != (x[1],) or beta != (x[1],):
        raise ValueError(f"needs x (N, C, ...), gamma (C,), beta (C,), got {fmt(x)}, {fmt(gamma)}, {fmt(beta)}")
    if not 0 <= momentum <= 1 or not eps > 0:
        raise ValueError(f"needs 0 <= momentum <= 1 and eps > 0, got momentum={momentum}, eps={eps}")
    return x


def _batchnorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, running_mean: np.ndarray,
               running_var: np.ndarray, train: bool, momentum: float = 0.9, eps: float = 1e-5
               ) -> tuple[Any, tuple, dict[str, np.ndarray]]:
    axes = _channel_axes(x.ndim)
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    updates = {}
    if train:
        count = x.size // x.shape[1]
        if count < 2:
            raise ValueError(f"train mode needs more than one value per channel, got input {fmt(x.shape)}")
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        updates = {"running_mean": momentum * running_mean + (1 - momentum) * mean,  # PyTorch's momentum 0.1
                   "running_var": momentum * running_var + (1 - momentum) * var * (count / (count - 1))}
    else:
        mean, var = running_mean, running_var
    inv_std = (1 / np.sqrt(var + eps)).reshape(per_channel)
    xhat = (x - mean.reshape(per_channel)) * inv_std
    out = xhat * gamma.reshape(per_channel) + beta.reshape(per_channel)
    return out, (xhat, inv_std, gamma.reshape(per_channel), axes, train), updates


def _batchnorm_dx(g: np.ndarray, xhat: np.ndarray, inv_std: np.ndarray, gamma: np.ndarray,
                  axes: tuple[int, ...], train: bool) -> np.ndarray:
    dxhat = g * gamma
    if not train:  # running statistics are constants
        return dxhat * inv_std
    return inv_std * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                      - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


defop("batchnorm", ("x", "gamma", "beta"), _batchnorm, _batchnorm_dx,
      lambda g, xhat, inv_std, gamma, axes, train: (g * xhat).sum(axis=axes),
      lambda g, xhat, inv_std, gamma, axes, train: g.sum(axis=axes),
      attrs={"momentum": 0.9, "eps": 1e-5}, shape=batchnorm_shape, train=True, flops=per_element(8),
      buffers=lambda x, *_, **__: {"running_mean": ((x[1],), 0.0), "running_var": ((x[1],), 1.0)},
      doc="batch normalization per channel (axis 1) over the batch and spatial axes; train mode updates "
          "running = momentum * running + (1 - momentum) * batch (unbiased variance), eval mode uses them")


def layernorm_shape(x: Shape, gamma: Shape, beta: Shape, eps: float = 1e-5, axis: Any = -1) -> Shape:
    if not isinstance(axis, int) or not -len(x) <= axis < len(x):
        raise ValueError(f"axis must be an int in [{-len(x)}, {len(x)}), got {axis}")
    normalized = x[axis % len(x):]
    if BATCH in normalized or gamma != normalized or beta != normalized:
        raise ValueError(f"gamma and beta must have the normalized shape {fmt(normalized)} (the batch "
                         f"dimension cannot be normalized over), got {fmt(gamma)} and {fmt(beta)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return x


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5,
               axis: int = -1) -> tuple[Any, tuple]:
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * inv_std
    return xhat * gamma + beta, (xhat, inv_std, gamma, axes)


def _layernorm_dx(g: np.ndarray, xhat: np.ndarray, inv_std: np.ndarray, gamma: np.ndarray,
                  axes: tuple[int, ...]) -> np.ndarray:
    dxhat = g * gamma
    return inv_std * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                      - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


defop("layernorm", ("x", "gamma", "beta"), _layernorm, _layernorm_dx,
      lambda g, xhat, *_: g * xhat,
      lambda g, *_: g,
      attrs={"eps": 1e-5, "axis": -1}, shape=layernorm_shape, flops=per_element(8),
      cached=lambda out, x, *_, **__: 2 * math.prod(x),  # xhat, and 1/std per normalized group
      doc="layer normalization over the dimensions from axis (default the last); gamma, beta of that shape")


def dropout_shape(x: Shape, p: float = 0.5) -> Shape:
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return x


def _dropout(x: np.ndarray, p: float = 0.5, *, train: bool, rng: np.random.Generator | None
             ) -> tuple[Any, tuple]:
    if not train or p == 0:
        return x, (None,)
    keep = rng.random(x.shape) >= p  # type: ignore[union-attr]  # a Generator in train mode
    scaled = keep * (1 / (1 - p)) if p < 1 else np.zeros(x.shape)
    scaled = scaled.astype(x.dtype)
    return x * scaled, (scaled,)


defop("dropout", ("x",), _dropout,
      lambda g, scaled: g if scaled is None else g * scaled,
      attrs={"p": 0.5}, shape=dropout_shape, train=True, random=True,
      doc="inverted dropout in train mode: zero each element with probability p, scale the rest by "
          "1/(1-p); the mask comes from the batch's seed and the node name; identity in eval mode")


# -- more losses (means over all elements, as PyTorch's reduction="mean") ------------------

def pair_loss_shape(a: Shape, b: Shape) -> Shape:
    if a != b:
        raise ValueError(f"needs two inputs of the same shape, got {fmt(a)} and {fmt(b)}")
    return ()


def _mse_loss(pred: np.ndarray, target: np.ndarray) -> tuple[Any, tuple]:
    diff = pred - target
    return np.mean(diff * diff), (diff * (2 / max(diff.size, 1)),)


defop("mse_loss", ("pred", "target"), _mse_loss,
      lambda g, d: g * d,
      lambda g, d: -g * d,
      shape=pair_loss_shape, flops=per_element(3), doc="mean of (pred - target)**2 over all elements")


def _bce_with_logits(logits: np.ndarray, target: np.ndarray) -> tuple[Any, tuple]:
    e = np.exp(-np.abs(logits))  # never overflows
    loss = np.mean(np.maximum(logits, 0) - logits * target + np.log1p(e))
    sigmoid = np.where(logits >= 0, 1, e) / (1 + e)
    n = max(logits.size, 1)
    return loss, ((sigmoid - target) / n, logits / n)


defop("bce_with_logits", ("logits", "target"), _bce_with_logits,
      lambda g, dlogits, dtarget: g * dlogits,
      lambda g, dlogits, dtarget: -g * dtarget,
      shape=pair_loss_shape, flops=per_element(8), cached=per_element(2),
      doc="mean binary cross-entropy of sigmoid(logits) against targets in [0, 1], "
          "computed stably from the logits")
