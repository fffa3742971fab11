"""Build small graph protos directly (no SDK), for engine and wire tests."""
from __future__ import annotations

from typing import Any

import numpy as np

from gradgate import codec
from gradgate.v1 import graph_pb2


def declare(values: Any, name: str, dtype: str = "float64", shape: tuple = ()) -> None:
    values.add(name=name, dtype=codec.DTYPE_NAMES[dtype], shape=shape)


def node(graph: graph_pb2.Graph, name: str, op: str, *inputs: str, **attrs: Any) -> str:
    n = graph.nodes.add(name=name, op=op, inputs=inputs)
    for key, value in attrs.items():
        codec.value_to_attr(value, n.attrs[key])
    return name


def one_op_graph(op: str, inputs: list[np.ndarray], attrs: dict, weight: np.ndarray) -> graph_pb2.Graph:
    """loss = sum(op(p0, p1, ...) * weight): float inputs are params, integer ones graph inputs."""
    g = graph_pb2.Graph()
    names = []
    for i, a in enumerate(inputs):
        name = f"in{i}"
        declare(g.inputs if a.dtype.kind == "i" else g.params, name, a.dtype.name, a.shape)
        names.append(name)
    node(g, "out", op, *names, **attrs)
    node(g, "weight", "constant", value=weight)
    node(g, "weighted", "mul", "out", "weight")
    g.loss = node(g, "loss", "sum", "weighted")
    return g
