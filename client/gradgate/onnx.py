"""ONNX import: ``gg.Graph.from_onnx(model, loss=...)`` (``pip install gradgate[onnx]``).

An ONNX model is an inference graph; gradgate needs a graph with a loss. The import maps
every node onto registry ops, turns float initializers into parameters (their values are
the initial parameters), BatchNormalization's mean and variance initializers into state
buffers, graph inputs into inputs (dimension 0 is the batch dimension), and adds the loss
the caller names (or the model's own SoftmaxCrossEntropyLoss). Shape arithmetic
(Shape, Gather, Concat, ... on constants) is folded at import time. Anything else is an
``OnnxImportError`` naming the op and the node.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np

from gradgate import graph as gg
from gradgate.graph import Graph, Value

BATCH = -(2**62)  # the batch dimension inside folded shape tensors (ONNX's -1 means "infer")
_SYMBOL = "gradgate_batch"
LOSSES = ("softmax_cross_entropy", "svm_loss", "mse_loss", "bce_with_logits")
Loss = Union[str, Callable[[Graph, Value], Value], None]


class OnnxImportError(ValueError):
    """The model uses something gradgate cannot import; the message names the op and node."""


class Imported(NamedTuple):
    """``graph, params, buffers = gg.Graph.from_onnx(...)``."""

    graph: Graph
    params: dict[str, np.ndarray]  # the initializers, as initial parameter values
    buffers: dict[str, np.ndarray]  # BatchNormalization statistics, as initial buffer values


def from_onnx(model: Any, loss: Loss = None, *, target: str = "target", batch: bool = True,
              dtype: str | None = None) -> Imported:
    """Import an ONNX model (a ModelProto, a path, or the serialized bytes).

    ``loss``: "softmax_cross_entropy", "svm_loss", "mse_loss", "bce_with_logits" on the
    model's first output against a new input ``target`` (int64 labels (N,) for the first two,
    the output's shape for the others); a callable ``(graph, output) -> loss value``; or None
    to use the model's SoftmaxCrossEntropyLoss node. ``batch``: dimension 0 of every graph
    input is the batch dimension (-1); False keeps the declared shapes. ``dtype``: the
    graph's float dtype (default: the model's).
    """
    try:
        import onnx
        from onnx import numpy_helper, shape_inference
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImportError("ONNX import needs the onnx package: pip install 'gradgate[onnx]'") from None
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    elif isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    model = _with_batch_symbol(model, batch)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help, not a must: shapes it cannot give are errors later
        inferred = model
    importer = _Importer(model, _shapes(inferred.graph), numpy_helper, dtype, batch, target)
    return importer.run(loss)


def _with_batch_symbol(model: Any, batch: bool) -> Any:
    """A copy whose graph inputs carry the batch symbol in dimension 0 (for shape inference)."""
    import onnx
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if batch:
        initializers = {t.name for t in model.graph.initializer}
        symbols = set()  # the exporter's own name for the batch ("N", "batch_size", ...) means ours
        for vi in model.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if vi.name not in initializers and len(dims) > 0:
                if dims[0].dim_param:
                    symbols.add(dims[0].dim_param)
                dims[0].Clear()
                dims[0].dim_param = _SYMBOL
        for vi in [*model.graph.value_info, *model.graph.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in symbols:
                    d.dim_param = _SYMBOL
    return model


def _shapes(graph: Any) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> static dims: -1 for the batch symbol, None for unknown."""
    out = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(-1 if d.dim_param == _SYMBOL else d.dim_value if d.HasField("dim_value") else None
                                 for d in t.shape.dim)
    return out


FLOAT_TYPES = {1: "float32", 11: "float64"}  # ONNX TensorProto.FLOAT, DOUBLE
INT_TYPES = {7: "int64", 6: "int32"}


@dataclass
class _Node:
    """One ONNX node being converted: its attributes and helpers that name it in errors."""

    proto: Any
    attrs: dict[str, Any]
    imp: _Importer

    @property
    def where(self) -> str:
        return f"{self.proto.op_type} node {self.proto.name or self.proto.output[0]!r}"

    def fail(self, why: str) -> OnnxImportError:
        return OnnxImportError(f"{self.where}: {why}")

    def input(self, i: int) -> Value:
        return self.imp.value(self.proto.input[i], self)

    def has(self, i: int) -> bool:
        return len(self.proto.input) > i and self.proto.input[i] != ""

    def const(self, i: int, what: str) -> np.ndarray:
        name = self.proto.input[i]
        for arrays in (self.imp.consts, self.imp.float_inits):
            if name in arrays:
                return arrays[name]
        raise self.fail(f"input {what} ({name!r}) must be a constant (an initializer or Constant node)")

    def shape(self, i: int = 0, output: bool = False) -> tuple[int, ...]:
        """Static shape of input (or output) i (-1 = batch); an error if shape inference could not tell."""
        name = (self.proto.output if output else self.proto.input)[i]
        dims = self.imp.dims(name)
        if dims is None or None in dims:
            raise self.fail(f"needs the static shape of {name!r}, which shape inference could not determine")
        return dims  # type: ignore[return-value]

    def out_name(self, i: int = 0) -> str:
        return self.proto.output[i]


@dataclass
class _Importer:
    model: Any
    shapes: dict[str, tuple[int | None, ...]]
    numpy_helper: Any
    dtype: str | None
    batch: bool
    target: str
    values: dict[str, Value] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    float_inits: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    loss: Value | None = None

    @property
    def opset(self) -> int:
        return max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=1)

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        """Static shape of a tensor: initializers exactly, others from shape inference."""
        for arrays in (self.float_inits, self.consts):
            if name in arrays:
                return arrays[name].shape
        return self.shapes.get(name)

    def run(self, loss: Loss) -> Imported:
        g = self.graph = Graph(self.dtype or self._model_dtype())
        for t in self.model.graph.initializer:
            array = self.numpy_helper.to_array(t)
            (self.float_inits if array.dtype.kind == "f" else self.consts)[t.name] = array
            self.names.add(t.name)
        for vi in self.model.graph.input:
            if vi.name in self.float_inits or vi.name in self.consts:
                continue
            self._declare_input(vi)
        for proto in self.model.graph.node:
            node = _Node(proto, {a.name: _attr(a) for a in proto.attribute}, self)
            convert = CONVERTERS.get(proto.op_type) if proto.domain in ("", "ai.onnx") else None
            if proto.domain in ("", "ai.onnx") and _foldable(node):
                continue
            if convert is None:
                raise OnnxImportError(f"{node.where}: op {proto.op_type!r}"
                                      f"{' of domain ' + repr(proto.domain) if proto.domain else ''} is not supported; "
                                      f"supported: {', '.join(sorted(CONVERTERS))}")
            outputs = convert(node)
            used = [o for o in proto.output[len(outputs):] if o and self._used(o)]
            if used:
                raise node.fail(f"output {used[0]!r} is not supported (only the first output can be used)")
            for name, value in zip(proto.output, outputs):
                self.values[name] = value
        outs = [self.value(o.name, None) for o in self.model.graph.output]
        for v in outs:
            if v is not self.loss:
                g.output(v)
        g.set_loss(self._loss(loss, [v for v in outs if v is not self.loss]))
        return Imported(g, self.params, self.buffers)

    def _model_dtype(self) -> str:
        for vi in self.model.graph.input:
            kind = FLOAT_TYPES.get(vi.type.tensor_type.elem_type)
            if kind:
                return kind
        return "float32"

    def _declare_input(self, vi: Any) -> None:
        t = vi.type.tensor_type
        kind = FLOAT_TYPES.get(t.elem_type) or INT_TYPES.get(t.elem_type)
        if kind is None:
            raise OnnxImportError(f"graph input {vi.name!r}: element type {t.elem_type} is not supported "
                                  "(float, double, int64, int32)")
        dims = self.shapes.get(vi.name)
        if dims is None or None in dims:
            raise OnnxImportError(f"graph input {vi.name!r} has a dynamic dimension other than the batch "
                                  f"(dimension 0) or no shape: {list(dims or ())}")
        self.values[vi.name] = self.graph.input(vi.name, dims, None if kind in FLOAT_TYPES.values() else kind)
        self.names.add(vi.name)

    def _used(self, name: str) -> bool:
        return any(name in n.input for n in self.model.graph.node) or \
            any(name == o.name for o in self.model.graph.output)

    def value(self, name: str, node: _Node | None) -> Value:
        """The Value for an ONNX tensor name: a node output, an input, a parameter or a constant."""
        v = self.values.get(name)
        if v is not None:
            return v
        if name in self.float_inits:
            array = self.float_inits[name]
            v = self.values[name] = self.graph.param(name, array.shape)
            self.params[name] = array.astype(self.graph.dtype)
            return v
        if name in self.consts:
            array = self.consts[name]
            if array.dtype.kind != "f" and (array == BATCH).any():
                raise OnnxImportError(f"{node.where if node else 'graph'}: {name!r} holds the batch size, "
                                      "which is only known at run time")
            v = self.values[name] = gg.constant(array.astype(np.float64) if array.dtype.kind in "fb" else array,
                                                name=self.fresh(name))
            return v
        raise OnnxImportError(f"{node.where if node else 'graph output'}: unknown tensor {name!r}")

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def named(self, value: Value, node: _Node) -> Value:
        """Name a node's result after its ONNX output (names are unique in ONNX)."""
        value.name = self.fresh(node.out_name())
        return value

    def _loss(self, loss: Loss, outputs: list[Value]) -> Value:
        if self.loss is not None:
            if loss is not None:
                raise OnnxImportError("the model has its own SoftmaxCrossEntropyLoss; pass loss=None")
            return self.loss
        if loss is None:
            raise OnnxImportError("the model has no loss node: pass loss= one of "
                                  f"{', '.join(LOSSES)} or a function (graph, output) -> loss")
        if not outputs:
            raise OnnxImportError("the model has no output to put a loss on")
        out = outputs[0]
        if callable(loss):
            return loss(self.graph, out)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)} or a function")
        if loss in ("softmax_cross_entropy", "svm_loss"):
            y = self.graph.input(self.target, (-1,) if self.batch else self._output_dims(out)[:1], "int64")
        else:
            y = self.graph.input(self.target, self._output_dims(out))
        return getattr(gg, loss)(out, y, name=self.fresh("loss"))

    def _output_dims(self, out: Value) -> tuple[int, ...]:
        for o in self.model.graph.output:
            if self.values.get(o.name) is out:
                dims = self.shapes.get(o.name)
                if dims is not None and None not in dims:
                    return dims  # type: ignore[return-value]
        raise OnnxImportError("cannot tell the shape of the model's output to declare the loss target")


def _attr(a: Any) -> Any:
    from onnx import helper
    value = helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value


# -- folding shape arithmetic on constants ----------------------------------------------------

def _foldable(node: _Node) -> bool:
    """Compute a node whose inputs are all constants (e.g. Shape -> Gather -> Concat -> Reshape) now."""
    imp, proto = node.imp, node.proto
    if proto.op_type == "Shape":
        dims = node.shape(0)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        imp.consts[proto.output[0]] = np.array([BATCH if d == -1 else d for d in dims][start:end], np.int64)
        return True
    if proto.op_type == "Constant":
        imp.consts[proto.output[0]] = _constant(node)
        return True
    present = [i for i in proto.input if i]
    if proto.op_type not in FOLD or not present or any(i not in imp.consts for i in present):
        return False
    args = [imp.consts[i] if i else None for i in proto.input]
    imp.consts[proto.output[0]] = np.asarray(FOLD[proto.op_type](args, node.attrs))
    return True


def _constant(node: _Node) -> np.ndarray:
    a = node.attrs
    if "value" in a:
        return node.imp.numpy_helper.to_array(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dtype)
    raise node.fail(f"only tensor, float and int values are supported, got {sorted(a)}")


def _axes_arg(args: list, attrs: dict, i: int = 1) -> list[int] | None:
    if len(args) > i and args[i] is not None:
        return [int(v) for v in args[i]]
    return attrs.get("axes")


FOLD: dict[str, Callable[[list, dict], Any]] = {
    "Identity": lambda a, _: a[0],
    "Cast": lambda a, _: a[0],  # shape tensors stay int64 here; floats are cast when used
    "Gather": lambda a, at: np.take(a[0], a[1], axis=at.get("axis", 0)),
    "Unsqueeze": lambda a, at: np.expand_dims(a[0], tuple(_axes_arg(a, at) or ())),
    "Squeeze": lambda a, at: np.squeeze(a[0], tuple(_axes_arg(a, at) or ())) if _axes_arg(a, at) else np.squeeze(a[0]),
    "Concat": lambda a, at: np.concatenate([x for x in a if x is not None], axis=at["axis"]),
    "Slice": lambda a, _: _fold_slice(a),
}


def _fold_slice(a: list) -> np.ndarray:
    x, starts, ends = a[0], a[1], a[2]
    axes = a[3] if len(a) > 3 and a[3] is not None else range(len(starts))
    steps = a[4] if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for ax, s, e, st in zip(axes, starts, ends, steps):
        index[int(ax)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


# -- converters: ONNX node -> gradgate values (one per ONNX output used) --------------------------

Converter = Callable[[_Node], Sequence[Value]]


def _unary(op: Callable[..., Value]) -> Converter:
    return lambda n: [n.imp.named(op(n.input(0)), n)]


def _binary(op: str) -> Converter:
    return lambda n: [n.imp.named(gg._node(op, n.input(0), n.input(1)), n)]


def _gemm(n: _Node) -> Sequence[Value]:
    a, b = n.input(0), n.input(1)
    alpha, beta = n.attrs.get("alpha", 1.0), n.attrs.get("beta", 1.0)
    if n.attrs.get("transA", 0):
        a = gg.transpose(a, name=n.imp.fresh(n.out_name() + "/A^T"))
    if n.attrs.get("transB", 0):
        b = gg.transpose(b, name=n.imp.fresh(n.out_name() + "/B^T"))
    c = n.input(2) if n.has(2) else None
    c_shape = n.imp.dims(n.proto.input[2]) if c is not None else None
    b_shape = n.imp.dims(n.proto.input[1]) or (None, None)
    m = b_shape[0] if n.attrs.get("transB", 0) else b_shape[1]
    if c is not None and alpha == 1 and beta == 1 and c_shape == (m,) and not n.attrs.get("transA", 0):
        return [n.imp.named(gg.affine(a, b, c), n)]
    out = gg.matmul(a, b)
    if alpha != 1:
        out = out * float(alpha)
    if c is not None:
        out = out + (c if beta == 1 else float(beta) * c)
    return [n.imp.named(out, n)]


def _pads(n: _Node, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """ONNX pads / auto_pad -> (top, left, bottom, right)."""
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = n.attrs.get("pads", [0, 0, 0, 0])
        return tuple(int(p) for p in pads)
    if auto == "VALID":
        return (0, 0, 0, 0)
    size = n.shape(0)[2:]
    begin, end = [], []
    for i in range(2):
        out = -(-size[i] // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i], 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return (*begin, *end)


def _spatial(n: _Node, kernel: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if len(kernel) != 2:
        raise n.fail(f"only 2-D windows (NCHW inputs) are supported, got a {len(kernel)}-D kernel")
    strides = tuple(n.attrs.get("strides", (1, 1)))
    dilations = tuple(n.attrs.get("dilations", (1, 1)))
    return strides, dilations, _pads(n, kernel, strides, dilations)


def _conv(n: _Node) -> Sequence[Value]:
    kernel = n.attrs.get("kernel_shape") or n.shape(1)[2:]
    strides, dilations, pads = _spatial(n, kernel)
    bias = n.input(2) if n.has(2) else None
    return [n.imp.named(gg.conv2d(n.input(0), n.input(1), bias, stride=strides, padding=pads, dilation=dilations,
                                  groups=n.attrs.get("group", 1)), n)]


def _pool(n: _Node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    kernel = tuple(n.attrs["kernel_shape"])
    strides, dilations, pads = _spatial(n, kernel)
    if n.attrs.get("ceil_mode", 0):
        size = n.shape(0)[2:]
        for i in range(2):
            span = size[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1
            if span % strides[i]:
                raise n.fail("ceil_mode=1 is not supported where it changes the output size")
    return kernel, strides, dilations, pads


def _max_pool(n: _Node) -> Sequence[Value]:
    kernel, strides, dilations, pads = _pool(n)
    return [n.imp.named(gg.max_pool2d(n.input(0), kernel, strides, pads, dilations), n)]


def _avg_pool(n: _Node) -> Sequence[Value]:
    kernel, strides, dilations, pads = _pool(n)
    if any(d != 1 for d in dilations):
        raise n.fail("dilations are not supported for AveragePool")
    return [n.imp.named(gg.avg_pool2d(n.input(0), kernel, strides, pads,
                                      count_include_pad=bool(n.attrs.get("count_include_pad", 0))), n)]


def _batchnorm(n: _Node) -> Sequence[Value]:
    imp = n.imp
    mean_name, var_name = n.proto.input[3], n.proto.input[4]
    if mean_name not in imp.float_inits or var_name not in imp.float_inits:
        raise n.fail("the running mean and variance must be initializers (they become state buffers)")
    # name the node after PyTorch's "<module>.running_mean" so the buffers keep their state_dict names
    base = mean_name[:-len(".running_mean")] if mean_name.endswith(".running_mean") else n.out_name()
    name = imp.fresh(base)
    out = gg.batchnorm(n.input(0), n.input(1), n.input(2), momentum=n.attrs.get("momentum", 0.9),
                       eps=n.attrs.get("epsilon", 1e-5), name=name)
    imp.buffers[f"{name}.running_mean"] = imp.float_inits[mean_name].astype(imp.graph.dtype)
    imp.buffers[f"{name}.running_var"] = imp.float_inits[var_name].astype(imp.graph.dtype)
    return [out]


def _layernorm(n: _Node) -> Sequence[Value]:
    axis = n.attrs.get("axis", -1)
    if n.has(2):
        beta = n.input(2)
    else:
        x_shape = n.shape(0)
        beta = gg.constant(np.zeros(x_shape[axis % len(x_shape):]), name=n.imp.fresh(n.out_name() + "/B"))
    return [n.imp.named(gg.layernorm(n.input(0), n.input(1), beta, eps=n.attrs.get("epsilon", 1e-5),
                                     axis=axis), n)]


def _softmax(op: Callable[..., Value]) -> Converter:
    def convert(n: _Node) -> Sequence[Value]:
        opset = n.imp.opset
        axis = n.attrs.get("axis", -1 if opset >= 13 else 1)
        x = n.input(0)
        rank = len(n.imp.dims(n.proto.input[0]) or ())
        if opset >= 13 or axis % max(rank, 1) == rank - 1:
            return [n.imp.named(op(x, axis=axis), n)]
        # before opset 13: over all dimensions from axis, as if flattened to 2-D
        shape = n.shape(0)
        flat = op(gg.flatten(x, axis=axis, name=n.imp.fresh(n.out_name() + "/flat")), axis=-1,
                  name=n.imp.fresh(n.out_name() + "/2d"))
        return [n.imp.named(gg.reshape(flat, shape), n)]
    return convert


def _reshape(n: _Node) -> Sequence[Value]:
    target = [int(d) for d in n.const(1, "shape")]
    x_shape = n.shape(0)
    if not n.attrs.get("allowzero", 0):  # 0 copies the input's dimension
        target = [(BATCH if x_shape[i] == -1 else x_shape[i]) if d == 0 else d for i, d in enumerate(target)]
    if BATCH in target:  # the batch dimension is named: resolve ONNX's -1 from the static sizes
        known_in = math.prod(d for d in x_shape if d != -1)
        known_out = math.prod(d for d in target if d not in (-1, BATCH))
        target = [known_in // max(known_out, 1) if d == -1 else -1 if d == BATCH else d for d in target]
    return [n.imp.named(gg.reshape(n.input(0), target), n)]


def _concat(n: _Node) -> Sequence[Value]:
    return [n.imp.named(gg.concat([n.imp.value(i, n) for i in n.proto.input if i], axis=n.attrs["axis"]), n)]


def _dropout(n: _Node) -> Sequence[Value]:
    ratio = float(n.const(1, "ratio")) if n.has(1) else n.attrs.get("ratio", 0.5)
    if n.has(2):
        raise n.fail("a training_mode input is not supported: the session's train/eval mode decides")
    return [n.imp.named(gg.dropout(n.input(0), p=ratio), n)]


def _identity(n: _Node) -> Sequence[Value]:
    return [n.input(0)]


def _pow(n: _Node) -> Sequence[Value]:
    exponent = n.const(1, "exponent (Y)")
    if exponent.size != 1:
        raise n.fail("only a scalar constant exponent is supported")
    return [n.imp.named(gg.pow(n.input(0), float(exponent.reshape(()))), n)]


def _clip(n: _Node) -> Sequence[Value]:
    low = float(n.const(1, "min")) if n.has(1) else n.attrs.get("min")
    high = float(n.const(2, "max")) if n.has(2) else n.attrs.get("max")
    return [n.imp.named(gg.clip(n.input(0), low, high), n)]


def _max(n: _Node) -> Sequence[Value]:
    inputs = [n.imp.value(i, n) for i in n.proto.input if i]
    out = inputs[0]
    for other in inputs[1:]:
        out = gg.maximum(out, other)
    return [n.imp.named(out, n) if len(inputs) > 1 else out]


def _reduce(op: Callable[..., Value]) -> Converter:
    def convert(n: _Node) -> Sequence[Value]:
        axes = [int(a) for a in n.const(1, "axes")] if n.has(1) else n.attrs.get("axes")
        if not axes and n.attrs.get("noop_with_empty_axes", 0):
            return [n.input(0)]
        return [n.imp.named(op(n.input(0), axis=axes or None, keepdims=bool(n.attrs.get("keepdims", 1))), n)]
    return convert


def _slice(n: _Node) -> Sequence[Value]:
    if n.imp.opset < 10:
        starts, ends, axes, steps = n.attrs["starts"], n.attrs["ends"], n.attrs.get("axes"), None
    else:
        starts, ends = n.const(1, "starts"), n.const(2, "ends")
        axes = n.const(3, "axes") if n.has(3) else None
        steps = n.const(4, "steps") if n.has(4) else None
    def ints(v: Any) -> list[int] | None:
        return None if v is None else [int(x) for x in v]
    return [n.imp.named(gg.slice(n.input(0), [int(x) for x in starts], [int(x) for x in ends], ints(axes),
                                 ints(steps)), n)]


def _constants_only(n: _Node) -> Sequence[Value]:
    raise n.fail("supported only on constants (shape arithmetic folded at import), not on computed values")


def _softmax_cross_entropy(n: _Node) -> Sequence[Value]:
    if n.has(2) or n.attrs.get("reduction", "mean") != "mean" or "ignore_index" in n.attrs:
        raise n.fail("only reduction='mean' without weights or ignore_index is supported")
    loss = gg.softmax_cross_entropy(n.input(0), n.input(1), name=n.imp.fresh(n.out_name()))
    n.imp.loss = loss
    return [loss]


CONVERTERS: dict[str, Converter] = {
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "MatMul": _binary("matmul"), "Gemm": _gemm,
    "Relu": _unary(gg.relu), "Sigmoid": _unary(gg.sigmoid), "Tanh": _unary(gg.tanh), "Exp": _unary(gg.exp),
    "Log": _unary(gg.log), "Neg": _unary(gg.neg), "Abs": _unary(gg.abs), "Sqrt": _unary(gg.sqrt),
    "Pow": _pow, "Clip": _clip, "Max": _max,
    "Softmax": _softmax(gg.softmax), "LogSoftmax": _softmax(gg.log_softmax),
    "Conv": _conv, "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda n: [n.imp.named(gg.mean(n.input(0), axis=(2, 3), keepdims=True), n)],
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm, "Dropout": _dropout,
    "Flatten": lambda n: [n.imp.named(gg.flatten(n.input(0), axis=n.attrs.get("axis", 1)), n)],
    "Reshape": _reshape,
    "Transpose": lambda n: [n.imp.named(gg.transpose(n.input(0), n.attrs.get("perm")), n)],
    "Concat": _concat, "Slice": _slice, "Identity": _identity,
    "ReduceMean": _reduce(gg.mean), "ReduceSum": _reduce(gg.sum),
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy,
    "Unsqueeze": lambda n: [n.imp.named(gg.reshape(n.input(0), n.shape(0, output=True)), n)],
    "Squeeze": lambda n: [n.imp.named(gg.reshape(n.input(0), n.shape(0, output=True)), n)],
    # shape arithmetic, folded at import time (see _foldable): also Gather and Cast of constants
    "Constant": _constants_only, "Shape": _constants_only,
}
