"""Data parallelism: one batch split over several sessions, spread over the replicas.

``client.session(graph, params, shards=N)`` opens N sessions with the same graph and
parameters, each routed to its own replica where it can (see ``_spread``). Every
forward splits the batch into N contiguous shards along axis 0, runs them at once,
and combines what comes back weighted by shard size: shard i of n_i rows out of n
weighs n_i / n when the loss is a batch mean, 1 when it is a batch sum. The combined
loss and gradients are the single-session ones (up to float rounding).

That holds only when the rows of a batch stay independent until the loss averages or
sums them. ``batch_rule`` checks it on the graph before anything runs, and refuses,
naming the node, a graph that mixes rows (a nonlinearity of a batch mean, an op not
known to be row-wise such as batch statistics) or whose loss is neither a batch mean
(plus terms that do not depend on the batch, like L2 penalties) nor a pure batch sum.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from gradgate.codec import attrs_to_dict
from gradgate.errors import GradgateError
from gradgate.gradcheck import GradCheckReport
from gradgate.graph import Graph, TensorSpec
from gradgate.session import ForwardResult, Session, StepResult
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import graph_pb2

if TYPE_CHECKING:
    from gradgate.client import Client

Arrays = Mapping[str, Any]
T = TypeVar("T")
PLACEMENT_TRIES = 16  # routing keys tried per shard to find a replica no other shard uses

# How a value depends on the batch:
CONST = "const"  # not at all (parameters, constants, inputs without a batch dimension)
ROWS = "rows"  # row by row: each row of the output depends on the same row of the inputs only
MEAN = "mean"  # a * (mean over the rows of a row-wise value) + b, a and b batch-independent
SUM = "sum"  # a * (sum over the rows of a row-wise value), nothing added

ROW_WISE_UNARY = {"exp", "log", "sigmoid", "tanh", "relu", "square"}  # nonlinear, elementwise
ROW_WISE_LOSSES = {"softmax_cross_entropy", "svm_loss"}  # mean over the rows of a per-row loss


class ShardingError(ValueError):
    """The graph cannot be split by rows and combined exactly; says which node and why."""


class NotShardable(AttributeError):
    """A Session feature a sharded session does not offer."""


def batch_rule(graph: graph_pb2.Graph, values: Mapping[str, TensorSpec]) -> dict[str, str]:
    """How every value of ``graph`` depends on the batch (CONST, ROWS, MEAN or SUM), given the
    shapes the server inferred (``values``, -1 = batch). A value that cannot be combined from
    shards is absent; ``why(graph, values, name)`` says why."""
    kinds: dict[str, str] = {}
    for name, kind in _kinds(graph, values).items():
        if not kind.startswith("!"):
            kinds[name] = kind
    return kinds


def why(graph: graph_pb2.Graph, values: Mapping[str, TensorSpec], name: str) -> str:
    """Why ``name`` cannot be combined from shards ("" if it can)."""
    kind = _kinds(graph, values).get(name, "")
    return kind[1:] if kind.startswith("!") else ""


def _kinds(graph: graph_pb2.Graph, values: Mapping[str, TensorSpec]) -> dict[str, str]:
    """Name -> kind, or "!reason" for a value whose shards cannot be combined."""
    kinds: dict[str, str] = {p.name: CONST for p in graph.params}
    for v in graph.inputs:
        shape = tuple(v.shape)
        kinds[v.name] = (CONST if -1 not in shape else ROWS if shape.index(-1) == 0 else
                         f"!input {v.name!r} has its batch dimension at axis {shape.index(-1)}; "
                         "a sharded session splits axis 0")
    for node in graph.nodes:  # in topological order
        ins = [kinds[i] for i in node.inputs]
        bad = next((k for k in ins if k.startswith("!")), None)
        kinds[node.name] = bad or _kind(node, ins, [tuple(values[i].shape) for i in node.inputs],
                                        tuple(values[node.name].shape))
    return kinds


def _kind(node: graph_pb2.Node, ins: list[str], shapes: list[tuple[int, ...]], out: tuple[int, ...]) -> str:
    op, kinds = node.op, set(ins)
    mixes = (f"!node {node.name!r} ({op}) mixes the rows of the batch, so its value on a shard is not "
             "its value on the batch; use a plain session")
    if op == "constant" or kinds <= {CONST}:
        return CONST
    if op in ROW_WISE_UNARY or op == "maximum":
        return ROWS if kinds <= {CONST, ROWS} else mixes
    if op in ("neg", "transpose"):
        return ins[0]
    if op == "reshape":
        keeps_rows = ins[0] != ROWS or (shapes[0][:1] == (-1,) and out[:1] == (-1,))
        return ins[0] if keeps_rows else mixes
    if op in ("add", "sub"):
        for kind in (ROWS, MEAN):
            if kinds <= {CONST, kind}:
                return kind
        if kinds == {CONST, SUM}:
            return (f"!node {node.name!r} ({op}) adds a batch-independent term to a sum over the batch: "
                    "summed over the shards, that term would count once per shard; average over the batch "
                    "(mean) instead, or use a plain session")
        return SUM if kinds == {SUM} else mixes
    if op in ("mul", "div"):
        scaled = ins[0] if op == "div" else next(k for k in ins if k != CONST)
        if kinds <= {CONST, ROWS}:
            return ROWS
        if kinds == {CONST, scaled} and (op == "mul" or ins[1] == CONST):
            return scaled  # a batch mean or sum times or over a batch-independent factor
        return mixes
    if op == "matmul":
        (a, b), (sa, sb) = ins, shapes
        if ROWS not in kinds:
            return a if b == CONST else b if a == CONST else mixes
        if (a, b) == (ROWS, CONST) and sa[0] == -1 or (a, b) == (CONST, ROWS) and sb[1] == -1:
            return ROWS  # each row (column) of the batch multiplied on its own
        if (a, b) == (ROWS, ROWS) and sa[1] == -1 and sb[0] == -1:
            return SUM  # contracted over the batch: a sum over rows of outer products
        return mixes
    if op in ("sum", "mean"):
        if ins[0] != ROWS:
            return ins[0]
        attrs = attrs_to_dict(node.attrs)
        axis = attrs.get("axis")
        axes = range(len(shapes[0])) if axis is None else [a % len(shapes[0]) for a in np.atleast_1d(axis)]
        return (SUM if op == "sum" else MEAN) if shapes[0].index(-1) in axes else ROWS
    if op == "l2":
        return SUM if ins[0] == ROWS else mixes
    if op in ROW_WISE_LOSSES:
        return MEAN if ins == [ROWS, ROWS] and shapes[0][0] == -1 else mixes
    return (f"!node {node.name!r}: op {op!r} is not known to keep the rows of a batch independent (batch "
            "statistics such as batchnorm, or random ops, are not), so a sharded session cannot split its "
            "batch; use a plain session")


class ShardedSession:
    """N sessions on one graph that share every batch; the API of a Session
    (``forward``, ``backward``, ``forward_backward``, ``set_params``, ``get_params``,
    ``gradient_check``, ``close``), so ``gg.train`` drives it unchanged."""

    def __init__(self, client: Client, graph: Graph, params: Arrays, shards: int, buffers: Arrays | None = None):
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        self.client, self.graph = client, graph
        self._proto = graph.to_proto()
        # one thread per shard, always the same: a Session's backward names its thread's last forward
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"gradgate-shard{i}") for i in range(shards)]
        first = Session(client, graph, params, buffers)
        self.sessions: list[Session] = [first]
        try:
            self.values: dict[str, TensorSpec] = first.values
            self._kinds = batch_rule(self._proto, self.values)
            self._loss_kind = self._kind(self._proto.loss, "the loss")
            if self._loss_kind == ROWS:  # a scalar cannot be row-wise; a shape rule would have to be wrong
                raise ShardingError(f"the loss {self._proto.loss!r} is not a scalar over the batch")
            for name in self._proto.outputs:  # returned by every forward unless others are named
                self._kind(name, "declared output")
            self.sessions += _spread(client, graph, params, buffers, first, shards)
        except BaseException:
            self.close()
            raise
        self.parameter_count, self.ttl_seconds = first.parameter_count, first.ttl_seconds
        self._weights: list[float] = []  # of the last forward's shards, for backward
        self._rows: list[int] = []

    @property
    def id(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.sessions)

    def _kind(self, name: str, what: str) -> str:
        kind = self._kinds.get(name)
        if kind is None:
            raise ShardingError(f"{what} {name!r} cannot be split over shards: {why(self._proto, self.values, name)}")
        return kind

    def _map(self, f: Callable[..., T], sessions: Sequence[Session], *args: Sequence[Any]) -> list[T]:
        """``f(session, *args)`` for the shards at once, each on its shard's thread; the first
        error is raised once every call is over."""
        calls = [self._threads[i].submit(f, s, *a) for i, (s, *a) in enumerate(zip(sessions, *args))]
        wait(calls)
        return [c.result() for c in calls]

    def _split(self, batch: Arrays) -> list[dict[str, Any]]:
        """Contiguous shards along axis 0 of every batch input (inputs without a batch
        dimension go whole to each shard); sets the weights of this forward."""
        batch = {name: np.asarray(a) for name, a in batch.items()}
        split = [name for name, a in batch.items() if self._kinds.get(name) == ROWS and a.ndim]
        sizes = {name: len(batch[name]) for name in split}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch inputs differ in their number of rows: {sizes}")
        n = next(iter(sizes.values()), 0)
        bounds = np.linspace(0, n, len(self.sessions) + 1).round().astype(int) if n else [0, 0]
        self._rows = [int(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo] or [0]
        shards = [{name: a[lo:hi] if name in split else a for name, a in batch.items()}
                  for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo] or [batch]
        total = sum(self._rows)
        self._weights = [1.0 if self._loss_kind == SUM or not total else r / total for r in self._rows]
        return shards

    def _combine(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        """One output from its shards: rows concatenated, batch means and sums weighted."""
        kind = self._kind(name, "output")
        if kind == ROWS:
            return np.concatenate(parts, axis=tuple(self.values[name].shape).index(-1))
        if kind == CONST:
            return parts[0]
        return _weighted(parts, [1.0] * len(parts) if kind == SUM else [r / sum(self._rows) for r in self._rows])

    def _outputs(self, results: Sequence[ForwardResult | StepResult]) -> dict[str, np.ndarray]:
        return {name: self._combine(name, [r.outputs[name] for r in results]) for name in results[0].outputs}

    def _grads(self, grads: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for name in grads[0]:
            parts = [g[name] for g in grads]
            if self._kinds.get(name) == ROWS:  # an input's rows: each shard's gradient of its own loss, weighted
                out[name] = np.concatenate([w * p for w, p in zip(self._weights, parts)])
            else:
                out[name] = _weighted(parts, self._weights)
        return out

    def forward(self, batch: Arrays, outputs: Sequence[str] | None = None,
                params: Arrays | None = None, *, train: bool = True, seed: int = 0) -> ForwardResult:
        """Set ``params`` (if any), run forward on ``batch`` split over the shards, cache the activations.
        ``train`` and ``seed`` as in Session.forward, the same on every shard."""
        shards = self._split(batch)
        results = self._map(lambda s, b: s.forward(b, outputs, params, train=train, seed=seed),
                            self.sessions[:len(shards)], shards)
        return ForwardResult(float(_weighted([r.loss for r in results], self._weights)), self._outputs(results))

    def backward(self, inputs: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the last forward's loss: every parameter, and the float inputs if ``inputs``."""
        if not self._rows:
            raise GradgateError(grpc.StatusCode.FAILED_PRECONDITION,
                                "backward before any forward on this sharded session")
        return self._grads(self._map(lambda s: s.backward(inputs), self.sessions[:len(self._rows)]))

    def forward_backward(self, batch: Arrays, params: Arrays | None = None,
                         outputs: Sequence[str] | None = None, inputs: bool = False, *, train: bool = True,
                         seed: int = 0) -> StepResult:
        """forward then backward, one round trip per shard, all shards at once."""
        shards = self._split(batch)
        results = self._map(lambda s, b: s.forward_backward(b, params, outputs, inputs, train=train, seed=seed),
                            self.sessions[:len(shards)], shards)
        return StepResult(float(_weighted([r.loss for r in results], self._weights)),
                          self._grads([r.grads for r in results]), self._outputs(results))

    def set_params(self, params: Arrays | None = None, buffers: Arrays | None = None) -> None:
        """Replace any subset of the parameters (and buffers), on every shard."""
        self._map(lambda s: s.set_params(params, buffers), self.sessions)

    def get_params(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named parameters, or all of them (every shard holds the same)."""
        return self.sessions[0].get_params(names)

    def gradient_check(self, batch: Arrays, mode: str = "sparse", params: Arrays | None = None,
                       **settings: Any) -> GradCheckReport:
        """Check the gradients at the whole ``batch``, on the first shard's server (see Session.gradient_check)."""
        return self.sessions[0].gradient_check(batch, mode, params, **settings)

    def close(self) -> None:
        """Close every shard's session."""
        try:
            self._map(lambda s: s.close(), self.sessions)
        finally:
            for thread in self._threads:
                thread.shutdown()

    def __getattr__(self, name: str) -> Any:
        if hasattr(Session, name):
            raise NotShardable(f"a sharded session does not offer {name!r}: it lives in one session on one "
                               "replica; open the session without shards")
        raise AttributeError(name)

    def __enter__(self) -> ShardedSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _weighted(parts: Sequence[Any], weights: Sequence[float]) -> Any:
    out = weights[0] * np.asarray(parts[0])
    for w, p in zip(weights[1:], parts[1:]):
        out = out + w * np.asarray(p)
    return out.astype(np.asarray(parts[0]).dtype, copy=False)


def _spread(client: Client, graph: Graph, params: Arrays, buffers: Arrays | None, first: Session,
            shards: int) -> list[Session]:
    """Sessions for shards 2..N, each on a replica no other shard uses while there are such
    replicas. A routing key shares a replica with a session when a call routed by the key
    finds that session (GetParameters answers instead of NOT_FOUND)."""
    names = [p.name for p in graph.params][:1]  # the smallest probe that still names the session
    sessions = [first]
    crowded = False  # no free replica was found: there are no more
    for _ in range(shards - 1):
        best: tuple[int, str] | None = None
        for _ in range(1 if crowded else PLACEMENT_TRIES):
            key = uuid.uuid4().hex
            shared = sum(_same_replica(client, key, s.id, names) for s in sessions)
            if best is None or shared < best[0]:
                best = (shared, key)
            if shared == 0:
                break
        assert best is not None
        crowded = crowded or best[0] > 0
        sessions.append(Session(client, graph, params, buffers, key=best[1]))
    return sessions[1:]


def _same_replica(client: Client, key: str, session_id: str, names: list[str]) -> bool:
    try:
        client.call("GetParameters", pb.GetParametersRequest(session_id=session_id, names=names), key)
        return True
    except GradgateError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:
            return False
        raise
