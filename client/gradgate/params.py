"""Initial parameter values for a graph."""
from __future__ import annotations

import numpy as np

from gradgate.graph import Graph


def init_params(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialized weights (ndim >= 2) and zero biases, in each parameter's dtype.

    Weights are used as ``x @ W``, so the fan-in is ``shape[0]``; the scale
    sqrt(2 / fan_in) keeps ReLU activations from shrinking or growing with depth.
    """
    rng = np.random.default_rng(seed)
    return {p.name: (rng.standard_normal(p.shape) * np.sqrt(2.0 / p.shape[0]) if len(p.shape) >= 2
                     else np.zeros(p.shape)).astype(p.dtype)
            for p in g.params}
