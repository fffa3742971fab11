"""Gradient checking: analytic gradients (backward) against centered differences.

The lecture's point: numeric gradients are slow and approximate, analytic ones fast
and exact but easy to get wrong, so check one against the other. Everything runs
here, in float64, with no round trip per coordinate. One base forward is kept; a
perturbation of tensor ``x`` copies the base values list and recomputes only the
steps downstream of ``x`` (the nodes upstream are reused). Arrays that the caller
owns (session parameters, request tensors, the base forward's values) are never
written: the perturbed tensor is a private copy.

Modes: ``full`` (every coordinate), ``sparse`` (seeded random coordinates per
tensor, CS231n ``grad_check_sparse``), ``fast`` (one random direction per tensor,
torch.autograd.gradcheck's fast mode).

The forward's mode, seed and buffers hold for every perturbation: dropout masks
come from (seed, node), so they stay fixed while coordinates move, and buffer
updates of the perturbed passes are dropped.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .compile import FLOATS, Plan, Step
from .cost import Cost, Limits, estimate
from .errors import DeadlineExceeded, InvalidArgument
from .run import State, Tape, Watch, backward, check_batch, forward, full_buffers, run_steps

MODES = ("sparse", "full", "fast")
F64 = np.dtype("<f8")


@dataclass(frozen=True)
class CheckSettings:
    mode: str = "sparse"
    eps: float = 1e-6
    atol: float = 1e-5
    rtol: float = 1e-3
    num_checks: int = 10  # sparse: coordinates per tensor
    seed: int = 0
    params: tuple[str, ...] = ()  # empty = all
    include_inputs: bool = False  # also check the float inputs
    max_worst: int = 5

    def validate(self) -> None:
        def bad(field: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"gradient check setting {field}: {why}", f"settings.{field}")
        if self.mode not in MODES:
            raise bad("mode", f"unknown mode {self.mode!r}; use one of {list(MODES)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise bad("eps", f"must be a finite number > 0, got {self.eps}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, f"must be a finite number >= 0, got {value}")
        if self.num_checks < 1:
            raise bad("num_checks", f"must be >= 1, got {self.num_checks}")
        if self.max_worst < 0:
            raise bad("max_worst", f"must be >= 0, got {self.max_worst}")
        if self.seed < 0:
            raise bad("seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Coordinate:
    index: tuple[int, ...]  # () in fast mode: a direction, not a coordinate
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float


@dataclass(frozen=True)
class TensorCheck:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    coordinates_checked: int
    max_rel_error: float
    max_abs_error: float
    allclose: bool
    worst: tuple[Coordinate, ...]
    non_finite: bool = False
    message: str = ""  # why it failed, naming the tensor

    @property
    def passed(self) -> bool:
        return self.allclose and not self.non_finite


@dataclass(frozen=True)
class CheckReport:
    tensors: tuple[TensorCheck, ...]
    loss: float
    settings: CheckSettings
    numeric_steps: int  # op evaluations spent on the numeric side

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)


def promote(plan: Plan) -> Plan:
    """The same plan computing in float64 (a float32 session is checked in float64).

    Float constants were cast to the graph dtype at compile time; they are widened
    from there, so the check sees exactly the function the session computes."""
    if plan.dtype == F64:
        return plan
    steps = tuple(dataclasses.replace(s, attrs={**s.attrs, "value": s.attrs["value"].astype(F64)})
                  if s.op.name == "constant" and s.attrs["value"].dtype.kind == "f" else s
                  for s in plan.steps)
    return dataclasses.replace(plan, dtype=F64, dtypes=tuple(F64 if d in FLOATS else d for d in plan.dtypes),
                               steps=steps, buffers=tuple(dataclasses.replace(b, dtype=F64) for b in plan.buffers),
                               _masks={}, _backward={}, _costs={})


def downstream(plan: Plan, slot: int) -> tuple[Step, ...]:
    """The steps that depend on ``slot``, in order: all a perturbation of it must recompute."""
    reached = {slot}
    steps = []
    for step in plan.steps:
        if reached.intersection(step.args):
            reached.add(step.out)
            steps.append(step)
    return tuple(steps)


def gradient_check(plan: Plan, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
                   settings: CheckSettings = CheckSettings(), deadline: Watch | float | None = None,
                   on_step: Callable[[str, float], None] | None = None, *,
                   buffers: Mapping[str, np.ndarray] | None = None, train: bool = True,
                   seed: int = 0, limits: Limits | None = None) -> CheckReport:
    """Check ``plan``'s gradients at (``inputs``, ``params``), which must pass check_batch
    and check_params for ``plan`` (``buffers`` check_buffers), in mode ``train`` with
    random ops seeded by ``seed``. Runs in float64; reads the given arrays, never writes them.
    With ``limits``, a check that would not fit them raises ResourceExhausted before it starts.

    Non-finite values fail the tensor with a message naming it; they never raise."""
    settings.validate()
    batch = check_batch(plan, inputs)
    plan = promote(plan)
    slots = _selected(plan, settings)
    if limits is not None:
        cost = estimate(plan, batch)
        limits.check(plan, cost, cost.forward_flops + cost.backward_flops + _numeric_flops(plan, cost, slots, settings),
                     "this gradient check", "check fewer coordinates (sparse or fast mode) or use a smaller batch")
    inputs = {k: _widen(v) for k, v in inputs.items()}
    params = {k: _widen(v) for k, v in params.items()}
    buffers = {k: _widen(v) for k, v in full_buffers(plan, buffers).items()}
    tape = forward(plan, inputs, params, buffers, train=train, seed=seed, deadline=deadline, on_step=on_step,
                   batch=batch)
    if not math.isfinite(tape.loss):
        where = _first_non_finite(plan, tape)
        return CheckReport(tuple(_unchecked(plan, tape, s, f"cannot check {plan.names[s]!r}: the forward loss is "
                                                     f"{tape.loss} ({where})") for s in slots),
                           tape.loss, settings, 0)
    grads = backward(plan, tape, slots, deadline, on_step)
    checker = _Checker(plan, tape, settings, deadline, on_step, State(train, seed, buffers))
    tensors = tuple(checker.check(s, grads[plan.names[s]]) for s in slots)
    return CheckReport(tensors, tape.loss, settings, checker.numeric_steps)


def _numeric_flops(plan: Plan, cost: Cost, slots: list[int], s: CheckSettings) -> int:
    """Two partial forwards per checked coordinate (fast mode: per tensor)."""
    def coordinates(n: int) -> int:
        return n if s.mode == "full" else min(s.num_checks, n) if s.mode == "sparse" else 1
    return sum(2 * coordinates(cost.elements[slot]) * cost.flops_of(downstream(plan, slot)) for slot in slots)


def _widen(a: np.ndarray) -> np.ndarray:
    return a.astype(F64) if a.dtype in FLOATS and a.dtype != F64 else a


def _selected(plan: Plan, settings: CheckSettings) -> list[int]:
    params = {plan.names[s]: s for s in plan.params}
    unknown = [n for n in settings.params if n not in params]
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {unknown} to check; parameters: {sorted(params)}",
                              "settings.params")
    slots = [params[n] for n in dict.fromkeys(settings.params)] if settings.params else list(plan.params)
    if settings.include_inputs:
        slots += [s for s in plan.inputs if plan.dtypes[s] == F64]
    if not slots:
        raise InvalidArgument("nothing to check: the graph has no parameters"
                              + ("" if settings.include_inputs else "; set include_inputs to check the inputs"),
                              "settings.params")
    return slots


def _first_non_finite(plan: Plan, tape: Tape) -> str:
    """Where NaN/Inf first appears, in slot (topological) order."""
    for s, v in enumerate(tape.values):
        if plan.dtypes[s] == F64 and not np.all(np.isfinite(v)):
            kind = "input" if s in plan.inputs else "parameter" if s in plan.params else "node"
            return f"first non-finite value: {kind} {plan.names[s]!r}"
    return "no value before the loss is non-finite"


def _unchecked(plan: Plan, tape: Tape, slot: int, message: str) -> TensorCheck:
    return TensorCheck(plan.names[slot], slot in plan.inputs, tuple(np.shape(tape.values[slot])), 0, 1.0,
                       math.inf, False, (), True, message)


class _Checker:
    """Numeric gradients of one base point, tensor by tensor."""

    def __init__(self, plan: Plan, tape: Tape, settings: CheckSettings, deadline: Watch | float | None,
                 on_step: Callable[[str, float], None] | None, state: State):
        self.plan, self.tape, self.settings, self.state = plan, tape, settings, state
        self.watch, self.on_step = Watch.of(deadline), on_step
        self.numeric_steps = 0

    def _loss_at(self, slot: int, x: np.ndarray, steps: tuple[Step, ...]) -> float:
        values = list(self.tape.values)  # a new list: the base values are shared, never written
        values[slot] = x
        run_steps(self.plan, values, steps, self.watch, self.on_step, self.state)
        self.numeric_steps += len(steps)
        return float(values[self.plan.loss])

    def check(self, slot: int, grad: np.ndarray) -> TensorCheck:
        s, name = self.settings, self.plan.names[slot]
        x0 = self.tape.values[slot]
        steps = downstream(self.plan, slot)
        rng = np.random.default_rng([s.seed, slot])  # per tensor: independent of which others are checked
        if s.mode == "fast":
            u = rng.standard_normal(x0.shape)
            u /= max(float(np.linalg.norm(u)), 1e-300)
            plus = self._loss_at(slot, x0 + s.eps * u, steps)
            minus = self._loss_at(slot, x0 - s.eps * u, steps)
            analytic = np.array([np.vdot(grad, u)])
            numeric = np.array([(plus - minus) / (2 * s.eps)])
        else:
            # flat indices, lazily in full mode: never a list of every coordinate (16 M tuples = 1.8 GB)
            flat = (range(x0.size) if s.mode == "full" else
                    np.sort(rng.choice(x0.size, size=min(s.num_checks, x0.size), replace=False)))
            x = np.array(x0, dtype=F64, copy=True)  # private: perturbed in place, coordinate by coordinate
            xf = x.reshape(-1)  # a view of x
            numeric = np.empty(len(flat))
            for k, f in enumerate(flat):
                if self.watch is not None:  # between coordinates too: one may need no step at all
                    try:
                        self.watch.check(name)
                    except DeadlineExceeded as e:
                        raise DeadlineExceeded(f"{e.message} (checking {name!r}: {k} of {len(flat)} coordinates "
                                               "done)", name) from None
                orig = xf[f]
                xf[f] = orig + s.eps
                plus = self._loss_at(slot, x, steps)
                xf[f] = orig - s.eps
                minus = self._loss_at(slot, x, steps)
                xf[f] = orig
                numeric[k] = (plus - minus) / (2 * s.eps)
            analytic = np.asarray(grad, F64).reshape(-1)
            analytic = analytic if s.mode == "full" else analytic[flat]
        index = (lambda k: ()) if s.mode == "fast" else (
            lambda k: tuple(int(i) for i in np.unravel_index(flat[k], x0.shape)))
        return self._verdict(slot, name, grad, index, analytic, numeric)

    def _verdict(self, slot: int, name: str, grad: np.ndarray, index: Callable[[int], tuple[int, ...]],
                 analytic: np.ndarray, numeric: np.ndarray) -> TensorCheck:
        """``index(k)``: the coordinate of the k-th checked value."""
        s = self.settings
        with np.errstate(all="ignore"):
            finite = np.isfinite(analytic) & np.isfinite(numeric)
            abs_err = np.where(finite, np.abs(analytic - numeric), np.inf)
            rel_err = np.where(finite, abs_err / np.maximum(1e-8, np.abs(analytic) + np.abs(numeric)), 1.0)
            tolerance = s.atol + s.rtol * np.abs(numeric)
            close = finite & (abs_err <= tolerance)
            # how far outside the tolerance: > 1 fails; the worst coordinates come first
            excess = np.where(finite, abs_err / np.where(tolerance > 0, tolerance, 1e-300), np.inf)
        order = np.lexsort((-rel_err, -excess))
        coords = [Coordinate(index(int(k)), float(analytic[k]), float(numeric[k]), float(abs_err[k]),
                             float(rel_err[k])) for k in order[:max(s.max_worst, 1)]]
        message = ""
        bad_analytic = ~np.isfinite(grad)
        if bad_analytic.any():  # anywhere in the tensor: it is free to look
            first = tuple(int(i) for i in np.argwhere(bad_analytic)[0])
            message = (f"analytic gradient of {name!r} has {int(bad_analytic.sum())} non-finite value(s), "
                       f"the first {grad[first]} at {list(first)}")
        elif not finite.all():
            k = int(np.argmin(finite))
            where = "along a random direction" if s.mode == "fast" else f"at {list(index(k))}"
            message = (f"numeric gradient of {name!r} is {numeric[k]} {where}: the loss is not finite at "
                       f"{name} +- eps")
        elif not close.all():
            w = coords[0]
            where = "along a random direction" if s.mode == "fast" else f"at {list(w.index)}"
            message = (f"{name!r}: {int((~close).sum())} of {len(analytic)} checked coordinate(s) outside "
                       f"atol + rtol * |numeric|; worst {where}: analytic {w.analytic:.6g}, "
                       f"numeric {w.numeric:.6g}, rel error {w.rel_error:.3g}")
        return TensorCheck(name, slot in self.plan.inputs, tuple(int(d) for d in grad.shape), len(analytic),
                           float(rel_err.max(initial=0.0)), float(abs_err.max(initial=0.0)), bool(close.all()),
                           tuple(coords[:s.max_worst]), bool(bad_analytic.any() or not finite.all()), message)
