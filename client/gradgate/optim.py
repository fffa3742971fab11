"""Optimizers: ``opt.step(params, grads) -> new params``.

The same update rules run on the client (``gg.train``) and on the server (the
Train stream rebuilds the optimizer with ``from_proto`` and resumes its state
with ``load_state``), so both loops give the same parameters bit for bit.

Steps return new parameter arrays and never mutate their arguments (decoded
gradients are read-only views of the response bytes); the optimizer updates its
own state arrays in place.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from gradgate.v1 import train_pb2

Arrays = Mapping[str, np.ndarray]
MAX_STEPS = 2**62  # far beyond any run, and room to count on within the wire's int64


class Optimizer(Protocol):
    """What gg.train needs of an optimizer."""

    step_count: int

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]: ...

    def to_proto(self) -> train_pb2.Optimizer: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, step_count: int, slots: Arrays) -> None: ...

    def state_bytes(self, params: Arrays) -> int: ...


class _Slots:
    """Per-parameter state arrays, created on the first step and named "<slot>/<param>" on the wire."""

    SLOTS: tuple[str, ...] = ()
    step_count: int

    def __init__(self) -> None:
        self.step_count = 0
        self.slots: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.SLOTS}

    def _slot(self, slot: str, name: str, like: np.ndarray) -> np.ndarray:
        s = self.slots[slot].get(name)
        if s is None:
            s = self.slots[slot][name] = np.zeros(like.shape, like.dtype)
        return s

    def state(self) -> dict[str, np.ndarray]:
        """The state arrays by wire name, e.g. {"m/W1": ..., "v/W1": ...}."""
        return {f"{slot}/{name}": a for slot, arrays in self.slots.items() for name, a in arrays.items()}

    def load_state(self, step_count: int, slots: Arrays) -> None:
        """Resume from ``state()`` and ``step_count`` (copies, so the optimizer owns its state)."""
        if not 0 <= step_count <= MAX_STEPS:  # a negative count turns Adam's bias correction into NaN
            raise ValueError(f"the optimizer's step count must be in [0, 2**62], got {step_count}")
        self.step_count = int(step_count)
        self.slots = {slot: {} for slot in self.SLOTS}
        for key, a in slots.items():
            slot, _, name = key.partition("/")
            if slot not in self.slots or not name:
                raise ValueError(f"unknown optimizer state {key!r} for {type(self).__name__}; "
                                 f"expected '<slot>/<parameter>' with slot in {list(self.SLOTS)}")
            self.slots[slot][name] = np.array(a)

    def state_bytes(self, params: Arrays) -> int:
        """What the state takes once it covers ``params``."""
        return len(self.SLOTS) * sum(p.nbytes for p in params.values())


class SGD(_Slots):
    """Gradient descent with optional momentum (CS231n form: v = mu*v - lr*g; p += v)."""

    SLOTS = ("velocity",)

    def __init__(self, lr: float, momentum: float = 0.0):
        super().__init__()
        self.lr, self.momentum = _positive("lr", lr), _fraction("momentum", momentum)

    def state_bytes(self, params: Arrays) -> int:
        return super().state_bytes(params) if self.momentum else 0

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        self.step_count += 1
        if not self.momentum:
            return {name: p - self.lr * grads[name] for name, p in params.items()}
        new = {}
        for name, p in params.items():
            v = self._slot("velocity", name, p)
            v *= self.momentum
            v -= self.lr * grads[name]
            new[name] = p + v
        return new

    def to_proto(self) -> train_pb2.Optimizer:
        return train_pb2.Optimizer(sgd=train_pb2.SGD(lr=self.lr, momentum=self.momentum))


class Adam(_Slots):
    """Adam (Kingma & Ba) with bias-corrected moment estimates."""

    SLOTS = ("m", "v")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        self.lr, self.eps = _positive("lr", lr), _positive("eps", eps)
        self.betas = (_fraction("beta1", betas[0]), _fraction("beta2", betas[1]))

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        # p - lr/c1 * m / (sqrt(v)/sqrt(c2) + eps), arranged (as PyTorch does) so that one scratch
        # array per parameter, which becomes the new value, takes every intermediate: 12 passes
        b1, b2 = self.betas
        self.step_count += 1
        correct1, root2 = 1 - b1 ** self.step_count, math.sqrt(1 - b2 ** self.step_count)
        new = {}
        for name, p in params.items():
            g = grads[name]
            m, v = self._slot("m", name, p), self._slot("v", name, p)
            t = np.multiply(g, 1 - b1, dtype=p.dtype)  # the new value takes the parameter's dtype
            m *= b1
            m += t
            np.multiply(g, g, out=t)
            t *= 1 - b2
            v *= b2
            v += t
            np.sqrt(v, out=t)
            t += self.eps * root2
            np.divide(m, t, out=t)
            t *= self.lr * root2 / correct1
            new[name] = np.subtract(p, t, out=t)
        return new

    def to_proto(self) -> train_pb2.Optimizer:
        return train_pb2.Optimizer(adam=train_pb2.Adam(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                                                       eps=self.eps))


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def from_proto(msg: train_pb2.Optimizer) -> SGD | Adam:
    """The optimizer a Train request names; unset Adam fields take the defaults."""
    kind = msg.WhichOneof("kind")
    if kind == "sgd":
        return SGD(msg.sgd.lr, msg.sgd.momentum)
    if kind == "adam":
        a = msg.adam
        return Adam(a.lr, (a.beta1 or 0.9, a.beta2 or 0.999), a.eps or 1e-8)
    raise ValueError("no optimizer given: set sgd or adam")
