"""Toy datasets."""
from __future__ import annotations

import numpy as np


def spiral(n_per_class: int = 100, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The CS231n spiral: ``classes`` arms of ``n_per_class`` 2-D points, not linearly separable.

    Returns X float64 (N, 2) and y int64 (N,). Arm j sweeps radius 0..1 over angles
    4j..4(j+1) radians, with N(0, 0.2) noise on the angle.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes, dtype=np.int64), n_per_class)
    r = np.tile(np.linspace(0.0, 1.0, n_per_class), classes)
    t = 4.0 * (y + r) + 0.2 * rng.standard_normal(len(y))
    return np.stack([r * np.sin(t), r * np.cos(t)], axis=1), y
