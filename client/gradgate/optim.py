"""Optimizers with their state on the client: ``opt.step(params, grads) -> new params``.

Steps return new arrays and never mutate their arguments (the decoded gradients
are read-only views of the response bytes).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


class SGD:
    """Gradient descent with optional momentum (CS231n form: v = mu*v - lr*g; p += v)."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        new = {}
        for name, p in params.items():
            self.velocity[name] = self.momentum * self.velocity.get(name, 0.0) - self.lr * grads[name]
            new[name] = p + self.velocity[name]
        return new


class Adam:
    """Adam (Kingma & Ba) with bias-corrected moment estimates."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        b1, b2 = self.betas
        self.t += 1
        new = {}
        for name, p in params.items():
            g = grads[name]
            self.m[name] = b1 * self.m.get(name, 0.0) + (1 - b1) * g
            self.v[name] = b2 * self.v.get(name, 0.0) + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1 ** self.t)
            v_hat = self.v[name] / (1 - b2 ** self.t)
            new[name] = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return new
