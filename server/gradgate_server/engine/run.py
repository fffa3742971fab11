"""Forward and backward over a Plan.

Forward computes every node in topological order and keeps its residuals (the
CS231n ``cache``) on a Tape; backward seeds dloss/dloss = 1 and walks the steps in
reverse, multiplying upstream gradients by local ones and accumulating with ``+``
where a value fans out.

A forward runs in train mode (batchnorm uses batch statistics and updates its
running ones, dropout drops) or eval mode. State buffers are read from the given
dict and never written: a train-mode forward returns their new values in
``Tape.updates``, for the caller to commit once the call has succeeded.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .compile import Plan, Step
from .errors import DeadlineExceeded, InvalidArgument
from .ops import BATCH, fmt, unbroadcast

# The mean of an empty value is NaN, reported like any NaN (np.errstate below); numpy also
# warns about it through ``warnings``, which errstate does not cover, onto the server's stderr.
warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)


@dataclass
class Tape:
    """One forward pass: every slot's value and every step's residuals."""

    values: list[np.ndarray]
    residuals: list[tuple]
    loss: float
    batch_size: int
    updates: dict[str, np.ndarray] = field(default_factory=dict)  # new buffer values (train mode)
    train: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes of array memory held, each buffer once (views count their base): the cache size."""
        buffers = {}
        for a in [*self.values, *(r for res in self.residuals for r in res)]:
            if isinstance(a, (np.ndarray, np.generic)):
                while isinstance(getattr(a, "base", None), np.ndarray):
                    a = a.base
                buffers[id(a)] = a.nbytes
        return sum(buffers.values())


def check_params(plan: Plan, params: Mapping[str, np.ndarray], field: str = "params",
                 complete: bool = True) -> None:
    """Every name a declared parameter with its exact dtype and shape."""
    declared = {plan.names[s]: s for s in plan.params}
    for name, value in params.items():
        s = declared.get(name)
        if s is None:
            raise InvalidArgument(f"{name!r} is not a parameter of the graph; parameters: {sorted(declared)}",
                                  f"{field}[{name!r}]")
        if value.dtype != plan.dtypes[s] or value.shape != plan.shapes[s]:
            raise InvalidArgument(f"parameter {name!r} must be {plan.dtypes[s].name} {fmt(plan.shapes[s])}, "
                                  f"got {value.dtype.name} {fmt(value.shape)}", f"{field}[{name!r}]")
    missing = sorted(set(declared) - set(params)) if complete else []
    if missing:
        raise InvalidArgument(f"missing parameter(s) {missing}", field)


def check_batch(plan: Plan, inputs: Mapping[str, np.ndarray], field: str = "inputs") -> int:
    """Every declared input present with its dtype and shape; returns the batch size."""
    batch = None
    for s in plan.inputs:
        name, want = plan.names[s], plan.shapes[s]
        value = inputs.get(name)
        if value is None:
            raise InvalidArgument(f"missing input {name!r}", f"{field}[{name!r}]")
        if value.dtype != plan.dtypes[s]:
            raise InvalidArgument(f"input {name!r} must be {plan.dtypes[s].name}, got {value.dtype.name}",
                                  f"{field}[{name!r}]")
        if len(value.shape) != len(want) or any(w not in (BATCH, d) for w, d in zip(want, value.shape)):
            raise InvalidArgument(f"input {name!r} must have shape {fmt(want)} (N = batch size), "
                                  f"got {fmt(value.shape)}", f"{field}[{name!r}]")
        for n in {d for w, d in zip(want, value.shape) if w == BATCH}:
            if n == 0 or batch not in (None, n):
                raise InvalidArgument(f"input {name!r} has batch size {n}, but " +
                                      ("N must be > 0" if n == 0 else f"other inputs have {batch}"),
                                      f"{field}[{name!r}]")
            batch = n
    extra = sorted(set(inputs) - {plan.names[s] for s in plan.inputs})
    if extra:
        raise InvalidArgument(f"unknown input(s) {extra}; the graph declares "
                              f"{[plan.names[s] for s in plan.inputs]}", field)
    return batch or 1


def check_buffers(plan: Plan, buffers: Mapping[str, np.ndarray], field: str = "buffers") -> None:
    """Every name a state buffer of the graph with its exact dtype and shape (any subset)."""
    declared = {b.name: b for b in plan.buffers}
    for name, value in buffers.items():
        b = declared.get(name)
        if b is None:
            known = sorted(declared) if declared else "none (the graph has no stateful ops)"
            raise InvalidArgument(f"{name!r} is not a state buffer of the graph; buffers: {known}",
                                  f"{field}[{name!r}]")
        if value.dtype != b.dtype or value.shape != b.shape:
            raise InvalidArgument(f"buffer {name!r} must be {b.dtype.name} {fmt(b.shape)}, "
                                  f"got {value.dtype.name} {fmt(value.shape)}", f"{field}[{name!r}]")


@dataclass
class State:
    """What a pass needs besides values: the mode, the random seed, the buffers (read only)
    and the new buffer values it computes."""

    train: bool = True
    seed: int = 0
    buffers: Mapping[str, np.ndarray] = field(default_factory=dict)
    updates: dict[str, np.ndarray] = field(default_factory=dict)

    def call(self, step: Step, args: list) -> tuple:
        """Run a step whose op takes the mode, random numbers or buffers."""
        op, kwargs = step.op, dict(step.attrs)
        if op.train:
            kwargs["train"] = self.train
        if op.random:
            kwargs["rng"] = np.random.default_rng([self.seed, step.key]) if self.train else None
        if not step.buffers:
            return op.forward(*args, **kwargs)
        for local, name in step.buffers:
            kwargs[local] = self.buffers[name]
        out, res, new = op.forward(*args, **kwargs)
        for local, name in step.buffers:
            if local in new:
                self.updates[name] = new[local]
        return out, res


# Optional per-step hook: called with (op name, seconds) after each step (the server times
# a sample of its calls' ops with it).
OnStep = Callable[[str, float], None]


class Watch:
    """When a pass must stop: once ``deadline`` (on time.monotonic's clock) has passed, or once
    ``alive()`` says its caller is gone (asked at most every ``every`` seconds: a call that
    takes microseconds never asks). ``check`` raises DeadlineExceeded naming the node."""

    __slots__ = ("deadline", "alive", "every", "_next", "due")

    def __init__(self, deadline: float | None = None, alive: Callable[[], bool] | None = None,
                 every: float = 0.005):
        self.deadline, self.alive, self.every = deadline, alive, every
        self._next = time.monotonic() + every
        self._set_due()

    def _set_due(self) -> None:
        # the first time check() has anything to do: passes compare the clock with it, a call costs more
        self.due = min(math.inf if self.deadline is None else self.deadline,
                       math.inf if self.alive is None else self._next)

    @classmethod
    def of(cls, deadline: Watch | float | None) -> Watch | None:
        return deadline if deadline is None or isinstance(deadline, Watch) else cls(deadline)

    def check(self, node: str) -> None:
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise DeadlineExceeded(f"deadline passed before node {node!r}", node)
        if self.alive is not None and now > self._next:
            self._next = now + self.every
            self._set_due()
            if not self.alive():
                raise DeadlineExceeded(f"the call ended (cancelled, past its deadline or cut off by shutdown) "
                                       f"before node {node!r}", node)


def forward(plan: Plan, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
            buffers: Mapping[str, np.ndarray] | None = None, *, train: bool = True, seed: int = 0,
            deadline: Watch | float | None = None, on_step: OnStep | None = None, batch: int = 0) -> Tape:
    """Run every step; ``inputs`` must pass check_batch, ``params`` check_params and
    ``buffers`` check_buffers (missing ones take their initial values).

    ``train`` selects the mode; ``seed`` (with each node's name) seeds random ops, so
    the same seed gives the same dropout masks. New buffer values are in ``tape.updates``.
    ``batch``: the batch size check_batch returned, when the caller has run it already."""
    batch = batch or check_batch(plan, inputs)
    values: list = [None] * len(plan.names)
    for s in plan.inputs:
        values[s] = inputs[plan.names[s]]
    for s in plan.params:
        values[s] = params[plan.names[s]]
    state = State(train, seed, full_buffers(plan, buffers))
    residuals = run_steps(plan, values, plan.steps, deadline, on_step, state)
    return Tape(values, residuals, float(values[plan.loss]), batch, state.updates, train)


def full_buffers(plan: Plan, buffers: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Every buffer of the plan: the given value, else its initial one."""
    buffers = buffers or {}
    return {b.name: buffers[b.name] if b.name in buffers else b.initial() for b in plan.buffers}


def run_steps(plan: Plan, values: list, steps: Iterable[Step], deadline: Watch | float | None = None,
              on_step: OnStep | None = None, state: State | None = None) -> list[tuple]:
    """Compute ``steps`` in order into ``values``; return their residuals."""
    state = state or State(buffers=full_buffers(plan, None))
    watch = Watch.of(deadline)
    due = math.inf if watch is None else watch.due
    residuals = []
    with np.errstate(all="ignore"):  # NaN/Inf are reported as values, not warnings
        for step in steps:
            if time.monotonic() > due:
                watch.check(step.name)  # type: ignore[union-attr]  # due is finite: there is a watch
                due = watch.due  # type: ignore[union-attr]
            start = time.perf_counter() if on_step is not None else 0.0
            try:
                args = [values[a] for a in step.args]
                if step.op.train or step.buffers:
                    out, res = state.call(step, args)
                else:
                    out, res = step.op.forward(*args, **step.attrs)
            # data-dependent, e.g. labels out of range; OverflowError: a number from the request too large
            # for numpy that compile let through (it should not: that is a bug, but not an INTERNAL one)
            except (ValueError, IndexError, TypeError, OverflowError) as e:
                raise InvalidArgument(f"node {step.name!r} ({step.op.name}): {e}", step.name) from None
            if on_step is not None:
                on_step(step.op.name, time.perf_counter() - start)
            values[step.out] = out
            residuals.append(res)
    return residuals


def backward(plan: Plan, tape: Tape, wrt: Iterable[int], deadline: Watch | float | None = None,
             on_step: OnStep | None = None) -> dict[str, np.ndarray]:
    """Gradients of the loss with respect to the slots ``wrt``, by name.

    A slot the loss does not depend on gets zeros."""
    wrt = frozenset(wrt)
    grads: list = [None] * len(plan.names)
    grads[plan.loss] = np.ones((), plan.dtype)
    values, residuals = tape.values, tape.residuals
    watch = Watch.of(deadline)
    due = math.inf if watch is None else watch.due
    with np.errstate(all="ignore"):
        for i, step, pairs in plan.backward_steps(wrt):
            g = grads[step.out]
            if g is None:
                continue
            if time.monotonic() > due:
                watch.check(step.name)  # type: ignore[union-attr]
                due = watch.due  # type: ignore[union-attr]
            start = time.perf_counter() if on_step is not None else 0.0
            res = residuals[i]
            for arg, vjp in pairs:
                gi = vjp(g, *res)
                shape = values[arg].shape
                if gi.shape != shape:
                    gi = unbroadcast(gi, shape)
                before = grads[arg]
                grads[arg] = gi if before is None else before + gi
            if on_step is not None:
                on_step(step.op.name, time.perf_counter() - start)
    return {plan.names[s]: np.zeros_like(values[s], plan.dtype) if grads[s] is None
            else np.asarray(grads[s], plan.dtype) for s in wrt}
