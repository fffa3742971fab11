"""Graph builder: declare inputs and parameters, combine them with ops, get a proto.

A ``Value`` is a handle to one value of the graph: a declared input or parameter, or
the output of a node. Nodes hold references to their input Values, and names are
read only in ``to_proto``, so a node can be renamed after it is used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradgate.codec import attrs_to_dict, dtype_code, dtype_of, value_to_attr
from gradgate.v1 import graph_pb2

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (-1 = batch dimension) and dtype name of a value."""

    name: str
    shape: Shape
    dtype: str


class Value:
    """A value of a graph; combine Values with + - * / @, unary - and python scalars."""

    # numpy must hand `array + value` to Value.__radd__ instead of looping over the array
    __array_ufunc__ = None

    def __init__(self, graph: Graph | None, name: str | None, op: str | None = None,
                 inputs: tuple[Value, ...] = (), attrs: Mapping[str, Any] | None = None,
                 shape: Shape | None = None, dtype: str | None = None):
        self.graph, self.op = graph, op
        self.name: str = name or ""  # "" until a graph adopts the value and names it
        self.inputs, self.attrs = inputs, dict(attrs or {})
        self.shape, self.dtype = shape, dtype  # declared inputs and params only

    @property
    def spec(self) -> TensorSpec:
        """Name, shape and dtype of a declared input or parameter."""
        if self.shape is None or self.dtype is None:
            raise ValueError(f"{self!r} is a node, not a declared input or parameter")
        return TensorSpec(self.name, self.shape, self.dtype)

    def __repr__(self) -> str:
        return f"Value({self.name!r}, op={self.op!r})"

    def __add__(self, other: Any) -> Value: return _node("add", self, other)
    def __radd__(self, other: Any) -> Value: return _node("add", other, self)
    def __sub__(self, other: Any) -> Value: return _node("sub", self, other)
    def __rsub__(self, other: Any) -> Value: return _node("sub", other, self)
    def __mul__(self, other: Any) -> Value: return _node("mul", self, other)
    def __rmul__(self, other: Any) -> Value: return _node("mul", other, self)
    def __truediv__(self, other: Any) -> Value: return _node("div", self, other)
    def __rtruediv__(self, other: Any) -> Value: return _node("div", other, self)
    def __matmul__(self, other: Any) -> Value: return _node("matmul", self, other)
    def __rmatmul__(self, other: Any) -> Value: return _node("matmul", other, self)
    def __neg__(self) -> Value: return _node("neg", self)
    def __abs__(self) -> Value: return _node("abs", self)

    def __pow__(self, exponent: float) -> Value:
        """``x ** 2``: a constant exponent (the pow op)."""
        return pow(self, exponent)


class Graph:
    """A graph under construction; all float inputs and params share ``dtype``."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = np.dtype(dtype).name
        self._inputs: list[Value] = []
        self._params: list[Value] = []
        self._nodes: list[Value] = []  # in creation order, which is a topological order
        self._outputs: list[Value] = []
        self.loss: Value | None = None

    def input(self, name: str, shape: Iterable[int | None], dtype: str | None = None) -> Value:
        """Declare a batch input; ``None`` in ``shape`` marks the batch dimension."""
        return self._declare(self._inputs, name, shape, dtype)

    def param(self, name: str, shape: Iterable[int], dtype: str | None = None) -> Value:
        """Declare a parameter: the server holds it and returns its gradient."""
        return self._declare(self._params, name, shape, dtype)

    def _declare(self, values: list[Value], name: str, shape: Iterable[int | None],
                 dtype: str | None) -> Value:
        v = Value(self, name, shape=_dims(shape), dtype=np.dtype(dtype or self.dtype).name)
        values.append(v)
        return v

    def set_loss(self, v: Value) -> Value:
        """Make ``v`` (a scalar) the value whose gradient Backward computes."""
        self._adopt(v)
        self.loss = v
        return v

    def output(self, v: Value, name: str | None = None) -> Value:
        """Return ``v`` from Forward by default, renamed to ``name`` if given."""
        self._adopt(v)
        if name is not None:
            v.name = name
        self._outputs.append(v)
        return v

    @property
    def inputs(self) -> list[TensorSpec]:
        return [v.spec for v in self._inputs]

    @property
    def params(self) -> list[TensorSpec]:
        return [v.spec for v in self._params]

    @property
    def nodes(self) -> list[Value]:
        return list(self._nodes)

    @property
    def outputs(self) -> list[Value]:
        return list(self._outputs)

    def _adopt(self, v: Value) -> None:
        """Add ``v`` and the nodes it depends on, if they were built without a graph,
        inputs first (an explicit stack: a chain of thousands of ops is fine)."""
        stack = [(v, False)]
        while stack:
            u, inputs_done = stack.pop()
            if u.graph is self:
                continue
            if u.graph is not None:
                raise ValueError(f"{u.name!r} belongs to another graph")
            if inputs_done:
                u.graph = self
                u.name = u.name or f"{u.op}_{len(self._nodes)}"
                self._nodes.append(u)
            else:
                stack.append((u, True))
                stack.extend((i, False) for i in reversed(u.inputs))

    def to_proto(self) -> graph_pb2.Graph:
        msg = graph_pb2.Graph(loss=self.loss.name if self.loss else "",
                              outputs=[v.name for v in self._outputs])
        for values, infos in ((self._inputs, msg.inputs), (self._params, msg.params)):
            for v in values:
                infos.add(name=v.name, dtype=dtype_code(v.dtype), shape=v.shape)
        for v in self._nodes:
            node = msg.nodes.add(name=v.name, op=v.op, inputs=[i.name for i in v.inputs])
            for key, attr in v.attrs.items():
                value_to_attr(attr, node.attrs[key])
        return msg

    @staticmethod
    def from_onnx(model: Any, loss: Any = None, *, target: str = "target", batch: bool = True,
                  dtype: str | None = None) -> Any:
        """Import an ONNX model: ``graph, params, buffers = gg.Graph.from_onnx("net.onnx", loss="mse_loss")``.

        Needs ``pip install 'gradgate[onnx]'``; see gradgate.onnx.from_onnx for the arguments."""
        from gradgate.onnx import from_onnx  # onnx is an optional dependency
        return from_onnx(model, loss, target=target, batch=batch, dtype=dtype)

    @classmethod
    def from_proto(cls, msg: graph_pb2.Graph) -> Graph:
        """Rebuild a graph; ``Graph.from_proto(m).to_proto() == m``."""
        floats = [info.dtype for info in (*msg.inputs, *msg.params)
                  if dtype_of(info.dtype).kind == "f"]
        g = cls(dtype_of(floats[0]).name if floats else "float32")
        for info in msg.inputs:
            g.input(info.name, info.shape, dtype_of(info.dtype).name)
        for info in msg.params:
            g.param(info.name, info.shape, dtype_of(info.dtype).name)
        values = {v.name: v for v in (*g._inputs, *g._params)}
        for node in msg.nodes:
            values[node.name] = Value(g, node.name, node.op, attrs=attrs_to_dict(node.attrs))
            g._nodes.append(values[node.name])
        # inputs are resolved after all nodes exist, so any node order is accepted
        for node, v in zip(msg.nodes, g._nodes):
            v.inputs = tuple(_lookup(values, name, f"node {node.name!r}") for name in node.inputs)
        g._outputs = [_lookup(values, name, "graph outputs") for name in msg.outputs]
        g.loss = _lookup(values, msg.loss, "graph loss") if msg.loss else None
        return g


def _dims(shape: Iterable[int | None]) -> Shape:
    return tuple(-1 if d is None else int(d) for d in shape)


def _lookup(values: Mapping[str, Value], name: str, where: str) -> Value:
    try:
        return values[name]
    except KeyError:
        raise ValueError(f"{where} refers to unknown value {name!r}") from None


def _node(op: str, *inputs: Any, name: str | None = None, **attrs: Any) -> Value:
    """Add an ``op`` node on ``inputs`` (python numbers become constants); ``None`` attrs are left out."""
    values = tuple(x if isinstance(x, Value) else constant(x) for x in inputs)
    v = Value(None, name, op, values, {k: a for k, a in attrs.items() if a is not None})
    graph = next((x.graph for x in values if x.graph is not None), None)
    if graph is not None:  # otherwise v floats until it is used with a graph's value
        graph._adopt(v)
    return v


def _axes(axis: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if axis is None:
        return None
    return tuple(int(a) for a in axis) if isinstance(axis, Iterable) else (int(axis),)


def _ints(value: int | Iterable[int] | None) -> int | tuple[int, ...] | None:
    """An int stays an int (e.g. stride=2); a sequence becomes a tuple (stride=(2, 1))."""
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def constant(value: Any, name: str | None = None) -> Value:
    """A constant; python numbers and lists are float64, which the server casts to the graph dtype."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float64)
    return _node("constant", name=name, value=array)


def relu(x: Value, name: str | None = None) -> Value:
    return _node("relu", x, name=name)


def sigmoid(x: Value, name: str | None = None) -> Value:
    return _node("sigmoid", x, name=name)


def tanh(x: Value, name: str | None = None) -> Value:
    return _node("tanh", x, name=name)


def exp(x: Value, name: str | None = None) -> Value:
    return _node("exp", x, name=name)


def log(x: Value, name: str | None = None) -> Value:
    return _node("log", x, name=name)


def square(x: Value, name: str | None = None) -> Value:
    return _node("square", x, name=name)


def maximum(x: Value | float, y: Value | float, name: str | None = None) -> Value:
    """Elementwise max, the lecture's max gate: the gradient goes to the larger input."""
    return _node("maximum", x, y, name=name)


def sum(x: Value, axis: int | Iterable[int] | None = None, keepdims: bool = False,
        name: str | None = None) -> Value:
    return _node("sum", x, name=name, axis=_axes(axis), keepdims=keepdims)


def mean(x: Value, axis: int | Iterable[int] | None = None, keepdims: bool = False,
         name: str | None = None) -> Value:
    return _node("mean", x, name=name, axis=_axes(axis), keepdims=keepdims)


def reshape(x: Value, shape: Iterable[int | None], name: str | None = None) -> Value:
    """Reshape; -1 (or None) is the batch dimension or the size to infer."""
    return _node("reshape", x, name=name, shape=_dims(shape))


def transpose(x: Value, axes: Iterable[int] | None = None, name: str | None = None) -> Value:
    """Permute the axes; ``None`` reverses them."""
    return _node("transpose", x, name=name, axes=_axes(axes))


def softmax_cross_entropy(scores: Value, labels: Value, name: str | None = None) -> Value:
    """Mean softmax cross-entropy of (N, C) scores against int64 (N,) labels."""
    return _node("softmax_cross_entropy", scores, labels, name=name)


def svm_loss(scores: Value, labels: Value, margin: float = 1.0, name: str | None = None) -> Value:
    """Mean multiclass hinge loss of (N, C) scores against int64 (N,) labels."""
    return _node("svm_loss", scores, labels, name=name, margin=float(margin))


def l2(w: Value, name: str | None = None) -> Value:
    """sum(w * w), for weight decay."""
    return _node("l2", w, name=name)


# -- the rest of the registry, one function per op (same names and attributes as ListOps) --------

def add(x: Value | float, y: Value | float, name: str | None = None) -> Value:
    """x + y, broadcasting."""
    return _node("add", x, y, name=name)


def sub(x: Value | float, y: Value | float, name: str | None = None) -> Value:
    """x - y, broadcasting."""
    return _node("sub", x, y, name=name)


def mul(x: Value | float, y: Value | float, name: str | None = None) -> Value:
    """x * y, broadcasting."""
    return _node("mul", x, y, name=name)


def div(x: Value | float, y: Value | float, name: str | None = None) -> Value:
    """x / y, broadcasting."""
    return _node("div", x, y, name=name)


def neg(x: Value, name: str | None = None) -> Value:
    return _node("neg", x, name=name)


def matmul(a: Value, b: Value, name: str | None = None) -> Value:
    """``a @ b`` with numpy's rules: (..., n, k) @ (..., k, m), leading axes broadcast, 1-D promoted."""
    return _node("matmul", a, b, name=name)


def affine(x: Value, w: Value, b: Value, name: str | None = None) -> Value:
    """A fully connected layer, x @ w + b: x (..., D), w (D, M), b (M,)."""
    return _node("affine", x, w, b, name=name)


def conv2d(x: Value, w: Value, b: Value | None = None, stride: int | Iterable[int] = 1,
           padding: int | Iterable[int] = 0, dilation: int | Iterable[int] = 1, groups: int = 1,
           name: str | None = None) -> Value:
    """2-D convolution of NCHW ``x`` (N, C, H, W) with ``w`` (F, C/groups, kh, kw) and optional bias (F,).

    ``padding``: p, (ph, pw) or (top, left, bottom, right); ``stride``, ``dilation``: s or (sh, sw)."""
    inputs = (x, w) if b is None else (x, w, b)
    return _node("conv2d", *inputs, name=name, stride=_ints(stride), padding=_ints(padding),
                 dilation=_ints(dilation), groups=int(groups))


def max_pool2d(x: Value, kernel: int | Iterable[int] = 2, stride: int | Iterable[int] | None = None,
               padding: int | Iterable[int] = 0, dilation: int | Iterable[int] = 1,
               name: str | None = None) -> Value:
    """Max over ``kernel`` windows of NCHW ``x``; ``stride`` None = ``kernel``."""
    return _node("max_pool2d", x, name=name, kernel=_ints(kernel), stride=_ints(stride), padding=_ints(padding),
                 dilation=_ints(dilation))


def avg_pool2d(x: Value, kernel: int | Iterable[int] = 2, stride: int | Iterable[int] | None = None,
               padding: int | Iterable[int] = 0, count_include_pad: bool = True, name: str | None = None) -> Value:
    """Mean over ``kernel`` windows of NCHW ``x``; ``stride`` None = ``kernel``; ``count_include_pad``:
    padded zeros count in the divisor (PyTorch's default)."""
    return _node("avg_pool2d", x, name=name, kernel=_ints(kernel), stride=_ints(stride), padding=_ints(padding),
                 count_include_pad=bool(count_include_pad))


def batchnorm(x: Value, gamma: Value, beta: Value, momentum: float = 0.9, eps: float = 1e-5,
              name: str | None = None) -> Value:
    """Batch normalization per channel (axis 1) of (N, C) or (N, C, H, W) ``x``.

    Keeps running statistics as session buffers "<name>.running_mean" / "<name>.running_var":
    train mode updates them (``running = momentum * running + (1 - momentum) * batch``, PyTorch's
    momentum 0.1), eval mode normalizes with them. Name the node to name its buffers."""
    return _node("batchnorm", x, gamma, beta, name=name, momentum=float(momentum), eps=float(eps))


def layernorm(x: Value, gamma: Value, beta: Value, eps: float = 1e-5, axis: int = -1,
              name: str | None = None) -> Value:
    """Layer normalization over the dimensions from ``axis`` (default the last); gamma, beta of their shape."""
    return _node("layernorm", x, gamma, beta, name=name, eps=float(eps), axis=int(axis))


def dropout(x: Value, p: float = 0.5, name: str | None = None) -> Value:
    """Inverted dropout in train mode (masks from the batch's seed and the node); identity in eval mode."""
    return _node("dropout", x, name=name, p=float(p))


def softmax(x: Value, axis: int = -1, name: str | None = None) -> Value:
    return _node("softmax", x, name=name, axis=int(axis))


def log_softmax(x: Value, axis: int = -1, name: str | None = None) -> Value:
    return _node("log_softmax", x, name=name, axis=int(axis))


def flatten(x: Value, axis: int = 1, name: str | None = None) -> Value:
    """To 2-D: (N, C, H, W) -> (N, C*H*W) at axis 1 (ONNX Flatten)."""
    return _node("flatten", x, name=name, axis=int(axis))


def concat(xs: Iterable[Value], axis: int = -1, name: str | None = None) -> Value:
    """Join values along ``axis``; the other dimensions must match."""
    return _node("concat", *xs, name=name, axis=int(axis))


def slice(x: Value, starts: Iterable[int], ends: Iterable[int], axes: Iterable[int] | None = None,
          steps: Iterable[int] | None = None, name: str | None = None) -> Value:
    """``x[starts:ends:steps]`` along ``axes`` (default the first len(starts) axes), Python/ONNX semantics."""
    return _node("slice", x, name=name, starts=_axes(starts), ends=_axes(ends), axes=_axes(axes),
                 steps=_axes(steps))


def clip(x: Value, min: float | None = None, max: float | None = None, name: str | None = None) -> Value:
    """x limited to [min, max]; None leaves that side open."""
    return _node("clip", x, name=name, min=_float(min), max=_float(max))


def abs(x: Value, name: str | None = None) -> Value:
    return _node("abs", x, name=name)


def pow(x: Value, exponent: float, name: str | None = None) -> Value:
    """x ** exponent for a constant exponent."""
    return _node("pow", x, name=name, exponent=float(exponent))


def sqrt(x: Value, name: str | None = None) -> Value:
    return _node("sqrt", x, name=name)


def mse_loss(pred: Value, target: Value, name: str | None = None) -> Value:
    """Mean of (pred - target)**2 over all elements."""
    return _node("mse_loss", pred, target, name=name)


def bce_with_logits(logits: Value, target: Value, name: str | None = None) -> Value:
    """Mean binary cross-entropy of sigmoid(logits) against targets in [0, 1]."""
    return _node("bce_with_logits", logits, target, name=name)
