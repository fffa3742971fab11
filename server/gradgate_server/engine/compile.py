"""Graph message -> Plan: validate everything once, so a step does no checking.

Slots number every value: declared inputs, then parameters, then nodes in Kahn
topological order. A Plan is immutable apart from its gradient-mask cache. State
buffers (batchnorm's running statistics) are named "<node>.<buffer>" and described
by the plan; their values live with the session, outside it.
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradgate.codec import MAX_NDIM, CodecError, attrs_to_dict, dtype_of
from gradgate.v1 import graph_pb2

from .errors import InvalidArgument, ResourceExhausted
from .ops import ATTR_TYPES, BATCH, OPS, REQUIRED, OpDef, Shape, fmt

FLOATS = (np.dtype("<f4"), np.dtype("<f8"))


@dataclass(frozen=True)
class Step:
    name: str
    op: OpDef
    args: tuple[int, ...]  # input slots
    out: int  # output slot
    attrs: dict[str, Any]
    vjps: tuple[Callable[..., Any] | None, ...]  # one per arg (a variadic op's rule bound to each index)
    buffers: tuple[tuple[str, str], ...] = ()  # (the op's buffer name, the plan's "<node>.<buffer>")
    key: int = 0  # stable per node name: with the batch's seed, it seeds the node's random numbers


@dataclass(frozen=True)
class Buffer:
    """A state buffer: ``name`` is "<node>.<buffer>"; ``init`` fills its initial value."""

    name: str
    shape: Shape
    dtype: np.dtype
    init: float

    def initial(self) -> np.ndarray:
        return np.full(self.shape, self.init, self.dtype)


@dataclass
class Plan:
    dtype: np.dtype  # the graph's float dtype
    names: tuple[str, ...]  # slot -> value name
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[Shape, ...]  # static, -1 = batch
    n_inputs: int
    n_params: int
    steps: tuple[Step, ...]
    loss: int
    outputs: tuple[str, ...]
    slot: dict[str, int]
    buffers: tuple[Buffer, ...] = ()
    _masks: dict[frozenset[int], tuple[tuple[bool, ...], ...]] = field(default_factory=dict, repr=False)
    _backward: dict[frozenset[int], tuple] = field(default_factory=dict, repr=False)  # see backward_steps
    _costs: dict[int, Any] = field(default_factory=dict, repr=False)  # batch size -> cost.Cost

    @property
    def inputs(self) -> range:
        return range(self.n_inputs)

    @property
    def params(self) -> range:
        return range(self.n_inputs, self.n_inputs + self.n_params)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(self.shapes[s]) for s in self.params)

    def grad_masks(self, wrt: frozenset[int]) -> tuple[tuple[bool, ...], ...]:
        """Per step, per input: does that input lead back to a slot in ``wrt``?

        Backward skips every other vjp (e.g. the first layer's input gradient)."""
        masks = self._masks.get(wrt)
        if masks is None:
            reaches = [s in wrt for s in range(len(self.names))]
            for step in self.steps:
                reaches[step.out] = any(reaches[a] for a in step.args)
            masks = tuple(tuple(reaches[a] and vjp is not None for a, vjp in zip(step.args, step.vjps))
                          for step in self.steps)
            self._masks[wrt] = masks
        return masks

    def backward_steps(self, wrt: frozenset[int]) -> tuple[tuple[int, Step, tuple[tuple[int, Callable], ...]], ...]:
        """Backward's work for the gradients of ``wrt``, in reverse order: (step index, step, its
        (input slot, vjp) pairs that lead back to ``wrt``); steps with no such pair are left out."""
        work = self._backward.get(wrt)
        if work is None:
            work = self._backward[wrt] = tuple(
                (i, step, tuple((a, vjp) for a, vjp, wanted in zip(step.args, step.vjps, mask) if wanted))
                for i, (step, mask) in reversed(list(enumerate(zip(self.steps, self.grad_masks(wrt)))))
                if any(mask))
        return work


def _error(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, field=field)


def _declared(values: Any, kind: str, allow_batch: bool, float_dtype: np.dtype | None
              ) -> tuple[list[str], list[np.dtype], list[Shape]]:
    names, dtypes, shapes = [], [], []
    for i, v in enumerate(values):
        where = f"graph.{kind}[{i}]"
        if not v.name:
            raise _error(f"{kind[:-1]} #{i} has no name", where)
        try:
            dtype = dtype_of(v.dtype, f"{where}.dtype")
        except CodecError as e:
            raise _error(f"{kind[:-1]} {v.name!r}: {e.description}", e.field) from None
        shape = tuple(v.shape)
        if len(shape) > MAX_NDIM:
            raise _error(f"{kind[:-1]} {v.name!r} has {len(shape)} dimensions; at most {MAX_NDIM} are supported",
                         f"{where}.shape")
        # sizes are checked against the limits later (cost.py)
        if any(d < BATCH for d in shape) or (not allow_batch and BATCH in shape):
            hint = "-1 (batch) is allowed for inputs only" if BATCH in shape else "dimensions must be >= 0"
            raise _error(f"{kind[:-1]} {v.name!r} has shape {list(shape)}: {hint}", f"{where}.shape")
        if float_dtype is not None and dtype in FLOATS:
            dtype = float_dtype
        names.append(v.name)
        dtypes.append(dtype)
        shapes.append(shape)
    return names, dtypes, shapes


def _float_dtype(graph: graph_pb2.Graph) -> np.dtype:
    declared = {codec_dtype for v in [*graph.inputs, *graph.params]
                if (codec_dtype := _safe_dtype(v.dtype)) in FLOATS}
    if len(declared) > 1:
        raise _error("graph mixes float32 and float64 inputs/params; use one float dtype per graph",
                     "graph.params")
    return declared.pop() if declared else FLOATS[0]


def _safe_dtype(code: int) -> np.dtype | None:
    try:
        return dtype_of(code)
    except CodecError:
        return None


def _attrs(op: OpDef, node: graph_pb2.Node, where: str, float_dtype: np.dtype) -> dict[str, Any]:
    try:
        given = attrs_to_dict(node.attrs, f"{where}.attrs")
    except CodecError as e:
        raise _error(f"node {node.name!r}: {e}", e.field) from None
    unknown = sorted(set(given) - set(op.attrs))
    if unknown:
        raise _error(f"node {node.name!r} ({op.name}): unknown attribute(s) {unknown}; "
                     f"{op.name} takes {sorted(op.attrs) or 'none'}", f"{where}.attrs")
    for key, value in given.items():
        if not isinstance(value, ATTR_TYPES[key]) or (isinstance(value, bool) and bool not in ATTR_TYPES[key]):
            want = " or ".join("list of ints" if t is tuple else "tensor" if t is np.ndarray else t.__name__
                               for t in ATTR_TYPES[key])
            raise _error(f"node {node.name!r} ({op.name}): attribute {key!r} must be {want}, "
                         f"got {type(value).__name__}", f"{where}.attrs[{key!r}]")
    attrs = {**op.attrs, **given}
    missing = [k for k, v in attrs.items() if v is REQUIRED]
    if missing:
        raise _error(f"node {node.name!r} ({op.name}): missing attribute(s) {missing}", f"{where}.attrs")
    value = attrs.get("value")
    if isinstance(value, np.ndarray):  # constants: floats follow the graph, ints are int64
        attrs["value"] = value.astype(float_dtype if value.dtype.kind == "f" else np.int64)
    return attrs


def compile_graph(graph: graph_pb2.Graph, dtype: Any = None, max_nodes: int | None = None) -> Plan:
    """Validate ``graph`` and order it into a Plan.

    ``dtype`` overrides the graph's float dtype (a gradient check promotes float32
    to float64). Every problem raises InvalidArgument naming the node or field.
    """
    if max_nodes is not None and len(graph.nodes) > max_nodes:
        raise ResourceExhausted(f"graph has {len(graph.nodes)} nodes; the limit is {max_nodes}", "graph.nodes")
    float_dtype = np.dtype(dtype).newbyteorder("<") if dtype is not None else _float_dtype(graph)
    names, dtypes, shapes = _declared(graph.inputs, "inputs", True, float_dtype if dtype else None)
    p_names, p_dtypes, p_shapes = _declared(graph.params, "params", False, float_dtype if dtype else None)
    names += p_names
    dtypes += p_dtypes
    shapes += p_shapes

    known: set[str] = set()
    for i, name in enumerate(names):
        if name in known:
            raise _error(f"duplicate name {name!r}", "graph.params" if i >= len(graph.inputs) else "graph.inputs")
        known.add(name)
    for i, node in enumerate(graph.nodes):
        if not node.name:
            raise _error(f"node #{i} ({node.op}) has no name", f"graph.nodes[{i}].name")
        if node.name in known:
            raise _error(f"duplicate name {node.name!r} (node #{i})", f"graph.nodes[{i}].name")
        known.add(node.name)

    ops: list[OpDef] = []
    for i, node in enumerate(graph.nodes):
        where = f"graph.nodes[{i}]"
        op = OPS.get(node.op)
        if op is None:
            raise _error(f"node {node.name!r}: unknown op {node.op!r}; known ops: {', '.join(sorted(OPS))}",
                         f"{where}.op")
        if op.variadic and not node.inputs:
            raise _error(f"node {node.name!r} ({op.name}) takes one or more inputs, got none", f"{where}.inputs")
        if not op.variadic and not len(op.inputs) - op.optional <= len(node.inputs) <= len(op.inputs):
            count = (f"{len(op.inputs) - op.optional} to {len(op.inputs)}" if op.optional else len(op.inputs))
            raise _error(f"node {node.name!r} ({op.name}) takes {count} input(s) "
                         f"{list(op.inputs)}, got {len(node.inputs)}", f"{where}.inputs")
        for j, inp in enumerate(node.inputs):
            if inp not in known:
                raise _error(f"node {node.name!r}: input {inp!r} is not a declared input, parameter or node",
                             f"{where}.inputs[{j}]")
        ops.append(op)

    order = _topological_order(graph)
    slot = {name: s for s, name in enumerate(names)}
    steps = []
    buffers: list[Buffer] = []
    for i in order:
        node, op = graph.nodes[i], ops[i]
        where = f"graph.nodes[{i}]"
        attrs = _attrs(op, node, where, float_dtype)
        args = tuple(slot[inp] for inp in node.inputs)
        in_names = op.inputs * len(args) if op.variadic else op.inputs
        for j, (arg, in_name) in enumerate(zip(args, in_names)):
            got = dtypes[arg]
            ok = got.kind == "i" if in_name in op.int_inputs else (got == float_dtype or not op.float_only)
            if not ok:
                want = "an integer dtype" if in_name in op.int_inputs else float_dtype.name
                raise _error(f"node {node.name!r} ({op.name}): input {in_name!r} must be {want}, "
                             f"got {got.name} from {names[arg]!r}", f"{where}.inputs[{j}]")
        try:
            shape = tuple(int(d) for d in op.shape(*(shapes[a] for a in args), **attrs))
        except (ValueError, TypeError) as e:
            given = ", ".join(f"{names[a]} {fmt(shapes[a])}" for a in args)
            raise _error(f"node {node.name!r} ({op.name}): {e} [inputs: {given}]", where) from None
        if op.name == "constant":
            out_dtype = attrs["value"].dtype
        elif op.float_only:
            out_dtype = float_dtype
        else:
            out_dtype = dtypes[args[0]]
        step_buffers = []
        if op.buffers is not None:
            for local, (buffer_shape, init) in op.buffers(*(shapes[a] for a in args), **attrs).items():
                full = f"{node.name}.{local}"
                if full in known:
                    raise _error(f"node {node.name!r} ({op.name}): its state buffer {full!r} has the name "
                                 "of another value; rename one", f"{where}.name")
                known.add(full)
                buffers.append(Buffer(full, tuple(buffer_shape), float_dtype, init))
                step_buffers.append((local, full))
        vjps = _bind(op.vjps[0], len(args)) if op.variadic else op.vjps
        slot[node.name] = len(names)
        steps.append(Step(node.name, op, args, len(names), attrs, vjps[:len(args)], tuple(step_buffers),
                          _key(node.name) if op.random else 0))
        names.append(node.name)
        dtypes.append(np.dtype(out_dtype))
        shapes.append(shape)

    if graph.loss not in slot:
        raise _error(f"loss {graph.loss!r} is not a node of the graph" if graph.loss else "graph.loss is not set",
                     "graph.loss")
    loss = slot[graph.loss]
    if shapes[loss] != () or dtypes[loss] != float_dtype:
        raise _error(f"loss {graph.loss!r} must be a {float_dtype.name} scalar, got {dtypes[loss].name} "
                     f"{fmt(shapes[loss])}; reduce it with sum or mean", "graph.loss")
    for j, out in enumerate(graph.outputs):
        if out not in slot:
            raise _error(f"output {out!r} is not a value of the graph", f"graph.outputs[{j}]")
    return Plan(float_dtype, tuple(names), tuple(dtypes), tuple(shapes), len(graph.inputs),
                len(graph.params), tuple(steps), loss, tuple(graph.outputs), slot, tuple(buffers))


def _bind(vjp: Callable[..., Any] | None, count: int) -> tuple[Callable[..., Any] | None, ...]:
    """A variadic op's rule vjp(i, g, *residuals), bound to each input index."""
    return tuple(None if vjp is None else functools.partial(vjp, i) for i in range(count))


def _key(name: str) -> int:
    """64 bits from the node name: random ops differ per node and stay put when the graph is edited."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _topological_order(graph: graph_pb2.Graph) -> list[int]:
    """Kahn's algorithm over node -> node edges; a leftover node is on a cycle."""
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    users: list[list[int]] = [[] for _ in graph.nodes]
    pending = [0] * len(graph.nodes)
    for i, node in enumerate(graph.nodes):
        for inp in node.inputs:
            if inp in index:
                users[index[inp]].append(i)
                pending[i] += 1
    ready = deque(i for i, n in enumerate(pending) if n == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) < len(graph.nodes):
        stuck = [graph.nodes[i].name for i, n in enumerate(pending) if n > 0]
        first = index[stuck[0]]
        raise _error(f"graph has a cycle through node(s) {stuck}", f"graph.nodes[{first}]")
    return order
