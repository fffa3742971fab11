"""Arbitrary graphs and batches never crash the engine: every failure is a typed error
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...), never an AttributeError that would
surface as INTERNAL."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradgate import codec
from gradgate.v1 import graph_pb2
from gradgate_server.engine import OPS, GradgateError, backward, compile_graph, forward

NAMES = ["a", "b", "c", "x", "y", "n0", "n1", "n2", "n3"]
ATTR_NAMES = ["axis", "keepdims", "shape", "axes", "value", "margin", "bogus"]
DTYPES = [0, 1, 2, 3, 4, 99]

attr_values = st.one_of(
    st.integers(-3, 5), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
    st.lists(st.integers(-3, 5), max_size=4).map(tuple),
    st.builds(lambda shape, kind: np.zeros(shape, kind), st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from(["f8", "i8", "f4", "i4"])),
)


@st.composite
def graphs(draw: st.DrawFn) -> graph_pb2.Graph:
    """Mostly well-formed graphs (right arity, known names), so that shape rules, attrs,
    forward and backward are reached, with random dtypes, shapes and attributes."""
    g = graph_pb2.Graph()
    names: list[str] = []
    float_dtype = draw(st.sampled_from([1, 2]))
    for kind, candidates, dims in ((g.inputs, ["x", "y"], [-1, 1, 2, 3]), (g.params, ["a", "b", "c"], [1, 2, 3])):
        for name in draw(st.lists(st.sampled_from(candidates), max_size=3, unique=bool(draw(st.integers(0, 9))))):
            dtype = 3 if name == "y" else float_dtype  # labels are integers
            odd = not draw(st.integers(0, 9))  # now and then anything at all
            kind.add(name=name, dtype=draw(st.sampled_from(DTYPES)) if odd else dtype,
                     shape=draw(st.lists(st.integers(-2, 3) if odd else st.sampled_from(dims), max_size=3)))
            names.append(name)
    for i in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from([*OPS, "nope"]))
        arity = len(OPS[op].inputs) if op in OPS and draw(st.integers(0, 9)) else draw(st.integers(0, 3))
        node = g.nodes.add(name=f"n{i}" if draw(st.integers(0, 19)) else draw(st.sampled_from(NAMES)), op=op,
                           inputs=[draw(st.sampled_from(names or NAMES)) for _ in range(arity)])
        keys = [*OPS[op].attrs] if op in OPS else []
        for key in draw(st.lists(st.sampled_from(keys or ATTR_NAMES), max_size=2, unique=True)):
            codec.value_to_attr(draw(attr_values), node.attrs[key])
        names.append(node.name)
    if draw(st.integers(0, 9)):  # usually reduce to a scalar, as a loss must be
        g.nodes.add(name="total", op="sum", inputs=[names[-1]])
        names.append("total")
    g.loss = names[-1] if draw(st.integers(0, 9)) else draw(st.sampled_from(["", *NAMES]))
    return g


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.integers(0, 2**32 - 1))
def test_any_graph_and_batch_fail_only_with_typed_errors(graph: graph_pb2.Graph, seed: int) -> None:
    try:
        plan = compile_graph(graph, max_nodes=100)
    except GradgateError as e:
        event(f"compile: {type(e).__name__} at {e.field.split('[')[0].split('.')[1] if '.' in e.field else e.field}")
        return
    rng = np.random.default_rng(seed)

    def sample(s: int) -> np.ndarray:
        shape = tuple(d if d >= 0 else 2 for d in plan.shapes[s])
        if plan.dtypes[s].kind == "i":
            return rng.integers(0, 3, shape).astype(plan.dtypes[s])
        return rng.normal(size=shape).astype(plan.dtypes[s])

    try:
        tape = forward(plan, {plan.names[s]: sample(s) for s in plan.inputs},
                       {plan.names[s]: sample(s) for s in plan.params})
        backward(plan, tape, [*plan.params, *plan.inputs])
        event("forward and backward ran")
    except GradgateError as e:
        event(f"run: {type(e).__name__}")
