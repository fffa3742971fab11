"""The order in which training visits the examples, shared by gg.train and the
server's Train stream, so a run gives the same batches wherever it steps.

Each epoch visits all ``n`` rows in a fresh order drawn from ``seed``, in batches of
``batch_size`` rows (the last one may be smaller).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def step_count(n: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(n / batch_size) if n else 0


def batches(n: int, batch_size: int, epochs: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """The row indices of every step from ``start_step`` on."""
    per_epoch = math.ceil(n / batch_size) if n else 0
    if not per_epoch:
        return
    first_epoch, skip = divmod(start_step, per_epoch)
    for epoch in range(first_epoch, epochs):
        # each epoch's order comes from (seed, epoch) alone, so resuming at any step costs nothing
        order = np.random.default_rng((seed, epoch)).permutation(n)
        for k in range(skip if epoch == first_epoch else 0, per_epoch):
            yield order[k * batch_size:(k + 1) * batch_size]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s random ops (dropout masks): a 64-bit mix of both (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
