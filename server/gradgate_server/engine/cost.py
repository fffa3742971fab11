"""What a call will cost, known before it runs, and the limits it must fit.

Shapes are static up to the batch size, so once the batch size is known every
value's element count, the bytes a forward leaves in the session cache and the
FLOPs are known too (DESIGN.md, Security model). They are counted with Python ints
(``np.prod`` wraps at 2**63) and checked here before anything is allocated, so a
94 KiB request cannot make the server build a (24000, 24000) matrix.

Estimates, documented as such:
- elements: every value's, and every intermediate array an op's ``intermediates`` rule
  names (conv2d's padded input and im2col columns), against the per-tensor limit.
- activations: every value's bytes (views such as reshape counted as copies) plus,
  per node, what its residuals keep besides operands and output: the op's ``cached``
  rule (conv2d's im2col columns and padded input), else as much as its largest operand.
  That bounds what ``Tape.nbytes`` measures for every op of the registry
  (tests/test_limits.py checks each); on MLPs it is 1.5-2x the real size.
- FLOPs: each op's ``flops`` rule (ops.py; default: its output's element count; conv2d
  and the pools add one per padded input element and PASS_FLOPS per kernel position).
  A backward costs twice its forward (a matmul's two vjps are two matmuls).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .compile import Plan, Step
from .errors import ResourceExhausted
from .ops import BATCH, Shape
from .run import check_batch

BACKWARD_FACTOR = 2  # a backward's FLOPs per forward FLOP
# measured: a compiled plan holds ~600 bytes per value, and its 16 cached estimates ~270 more
PLAN_BYTES_PER_VALUE = 1024


def elements(shape: Shape, batch: int = 1) -> int:
    """Element count of ``shape`` with -1 = ``batch``, counting empty dimensions as 1:
    that is what numpy checks against its own limit even for an empty array."""
    return math.prod(batch if d == BATCH else max(d, 1) for d in shape)


def concrete(shape: Shape, batch: int) -> Shape:
    return tuple(batch if d == BATCH else d for d in shape)


@dataclass(frozen=True)
class Cost:
    """One forward of a plan at ``batch``: per slot elements, per step FLOPs, cache bytes.
    (It does not point back at its plan, which caches it: no reference cycle to keep plans alive.)"""

    batch: int
    elements: tuple[int, ...]  # per slot
    step_flops: tuple[int, ...]  # per step, aligned with plan.steps
    activation_bytes: int
    forward_flops: int
    largest: int  # the slot with the most elements
    first_step_slot: int  # step i computes slot first_step_slot + i
    # the largest intermediate array an op builds: (elements, step index, what it is); (0, -1, "") for none
    largest_intermediate: tuple[int, int, str] = (0, -1, "")

    @property
    def backward_flops(self) -> int:
        return BACKWARD_FACTOR * self.forward_flops

    def flops_of(self, steps: Iterable[Step]) -> int:
        """FLOPs of a forward through ``steps`` only (a gradient check's partial recompute)."""
        return sum(self.step_flops[step.out - self.first_step_slot] for step in steps)


def estimate(plan: Plan, batch: int) -> Cost:
    """The cost of one forward of ``plan`` at ``batch``; allocates nothing. Cached per plan
    and batch size: a training loop pays for it once."""
    cost = plan._costs.get(batch)
    if cost is None:
        if len(plan._costs) >= 16:  # a client cycling through batch sizes
            plan._costs.clear()
        cost = plan._costs[batch] = _estimate(plan, batch)
    return cost


def _estimate(plan: Plan, batch: int) -> Cost:
    counts = tuple(elements(shape, batch) for shape in plan.shapes)
    nbytes = [n * dtype.itemsize for n, dtype in zip(counts, plan.dtypes)]
    flops, residuals = [], 0
    intermediate = (0, -1, "")
    for i, step in enumerate(plan.steps):
        ins = [concrete(plan.shapes[a], batch) for a in step.args]
        out = concrete(plan.shapes[step.out], batch)
        rule, keep, builds = step.op.flops, step.op.cached, step.op.intermediates
        flops.append(max(int(rule(out, *ins, **step.attrs)), 0) if rule else math.prod(out))
        residuals += (max(int(keep(out, *ins, **step.attrs)), 0) * plan.dtype.itemsize if keep
                      else max([nbytes[step.out], *(nbytes[a] for a in step.args)]))
        for what, n in (builds(out, *ins, **step.attrs) if builds else {}).items():
            if n > intermediate[0]:
                intermediate = (n, i, what)
    largest = max(range(len(counts)), key=counts.__getitem__)
    return Cost(batch, counts, tuple(flops), sum(nbytes) + residuals, sum(flops), largest,
                plan.n_inputs + plan.n_params, intermediate)


@dataclass(frozen=True)
class Limits:
    """The server's per-call bounds (Config: max_tensor_elements, cache_bytes, max_flops)."""

    max_elements: int  # per value, on the wire or computed
    cache_bytes: int  # what one forward may leave in the activation cache
    max_flops: int  # per call

    def check_static(self, plan: Plan) -> None:
        """At CreateSession: no value is over the element limit even at batch size 1."""
        self._check_elements(plan, estimate(plan, 1))

    def check(self, plan: Plan, cost: Cost, flops: int, call: str = "this call",
              hint: str = "use a smaller batch") -> None:
        """Raise ResourceExhausted, naming the node and the limit, if ``plan``'s ``cost`` with
        ``flops`` in total does not fit."""
        self._check_elements(plan, cost)
        batch = cost.batch
        if cost.activation_bytes > self.cache_bytes:
            big = cost.largest
            raise ResourceExhausted(
                f"{call} would cache about {cost.activation_bytes} bytes of activations at batch size {batch}, "
                f"more than the server's cache budget of {self.cache_bytes} (--cache-bytes); the largest value "
                f"is {plan.names[big]!r} with {cost.elements[big]} elements; use a smaller batch", plan.names[big])
        if flops > self.max_flops:
            i = max(range(len(cost.step_flops)), key=cost.step_flops.__getitem__)  # a plan has >= 1 step
            step = plan.steps[i]
            raise ResourceExhausted(
                f"{call} would take about {flops:.3g} floating-point operations at batch size {batch}, more than "
                f"the per-call limit of {self.max_flops:.3g} (--max-flops); the costliest node is {step.name!r} "
                f"({step.op.name}, {cost.step_flops[i]:.3g} per forward); {hint}", step.name)

    def _check_elements(self, plan: Plan, cost: Cost) -> None:
        s, n = cost.largest, cost.elements[cost.largest]
        if n > self.max_elements:
            kind = "input" if s < plan.n_inputs else "parameter" if s < plan.n_inputs + plan.n_params else "node"
            at = f" at batch size {cost.batch}" if BATCH in plan.shapes[s] else ""
            raise ResourceExhausted(
                f"{kind} {plan.names[s]!r} would have shape {list(concrete(plan.shapes[s], cost.batch))}, "
                f"{n} elements{at}: more than the limit of {self.max_elements} per tensor (--max-tensor-elements)",
                plan.names[s])
        n, i, what = cost.largest_intermediate
        if n > self.max_elements:
            step = plan.steps[i]
            raise ResourceExhausted(
                f"node {step.name!r} ({step.op.name}) would build its {what} with {n} elements at batch size "
                f"{cost.batch}: more than the limit of {self.max_elements} per tensor (--max-tensor-elements)",
                step.name)


def plan_bytes(plan: Plan, graph_bytes: int) -> int:
    """What a compiled plan keeps in memory, estimated: per value, plus twice its graph's
    message size (names and attributes as Python objects). A session counts it as state."""
    return PLAN_BYTES_PER_VALUE * len(plan.names) + 2 * graph_bytes


def admit(plan: Plan, inputs: Mapping[str, np.ndarray], limits: Limits, backward: bool = False) -> Cost:
    """The servicer's check before a Forward (``backward`` False) or a ForwardBackward (True)
    on the batch ``inputs``: raises InvalidArgument for a bad batch, ResourceExhausted over a limit."""
    cost = estimate(plan, check_batch(plan, inputs))
    limits.check(plan, cost, cost.forward_flops + (cost.backward_flops if backward else 0),
                 "this forward and backward" if backward else "this forward")
    return cost
