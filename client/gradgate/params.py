"""Initial parameter values for a graph."""
from __future__ import annotations

import numpy as np

from gradgate.graph import Graph

ONES = {("batchnorm", "gamma"), ("layernorm", "gamma")}  # scales start at 1
ZEROS = {("conv2d", "b"), ("affine", "b"), ("batchnorm", "beta"), ("layernorm", "beta")}
# (op, input) -> the axes of a weight that make its fan-in
FAN_IN = {("conv2d", "w"): slice(1, None),  # (F, C, kh, kw): C * kh * kw
          ("matmul", "b"): slice(-2, -1),  # x @ W with W (..., k, m): k
          ("matmul", "a"): slice(-1, None),  # W @ x: W's last axis
          ("affine", "w"): slice(0, 1)}  # x @ w + b with w (D, M): D
INPUTS = {"conv2d": ("x", "w", "b"), "matmul": ("a", "b"), "affine": ("x", "w", "b"),
          "batchnorm": ("x", "gamma", "beta"), "layernorm": ("x", "gamma", "beta")}


def init_params(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialized weights, zero biases, unit normalization scales, in each parameter's dtype.

    A parameter's role comes from the first node that reads it: a conv2d weight (F, C, kh, kw)
    has fan-in C * kh * kw, the right operand of a matmul (k, m) fan-in k, a batchnorm or
    layernorm gamma starts at 1 and its beta at 0. Any other parameter with two or more
    dimensions is a weight with fan-in ``shape[0]``; the rest start at 0. The scale
    sqrt(2 / fan_in) keeps ReLU activations from shrinking or growing with depth.
    """
    use = _first_use(g)
    rng = np.random.default_rng(seed)
    params = {}
    for p in g.params:
        role = use.get(p.name)
        if role in ONES:
            value = np.ones(p.shape)
        elif role in ZEROS or (role not in FAN_IN and len(p.shape) < 2):
            value = np.zeros(p.shape)
        else:
            fan_in = int(np.prod(p.shape[FAN_IN[role]] if role in FAN_IN else p.shape[:1]))
            value = rng.standard_normal(p.shape) * np.sqrt(2.0 / max(fan_in, 1))
        params[p.name] = value.astype(p.dtype)
    return params


def _first_use(g: Graph) -> dict[str, tuple[str, str]]:
    """Parameter name -> (op, input name) of the first node that reads it."""
    declared = {p.name for p in g.params}
    use: dict[str, tuple[str, str]] = {}
    for node in g.nodes:
        names = INPUTS.get(node.op or "", ())
        for name, value in zip(names, node.inputs):
            if value.op is None and value.name in declared:
                use.setdefault(value.name, (node.op or "", name))
    return use
