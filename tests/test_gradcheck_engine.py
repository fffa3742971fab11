"""engine.gradcheck without the network: downstream recomputation, no writes, modes, non-finite values."""
from __future__ import annotations

import numpy as np
import pytest

from gradgate.v1 import graph_pb2
from gradgate_server.engine import InvalidArgument, compile_graph, forward
from gradgate_server.engine.gradcheck import CheckSettings, downstream, gradient_check, promote

from graphs import declare, node


def deep_mlp(dtype: str = "float64", layers: int = 3) -> graph_pb2.Graph:
    """x (N, 4) -> [tanh(h @ Wi + bi)] * layers -> @ Wout -> softmax loss."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", dtype, (-1, 4))
    declare(g.inputs, "y", "int64", (-1,))
    h = "x"
    for i in range(layers):
        declare(g.params, f"W{i}", dtype, (4, 4))
        declare(g.params, f"b{i}", dtype, (4,))
        h = node(g, f"act{i}", "tanh", node(g, f"pre{i}", "add", node(g, f"xw{i}", "matmul", h, f"W{i}"), f"b{i}"))
    declare(g.params, "Wout", dtype, (4, 3))
    node(g, "half", "constant", value=np.array(0.5))  # a float constant: widened when promoted
    scores = node(g, "scores", "mul", node(g, "logits", "matmul", h, "Wout"), "half")
    g.loss = node(g, "loss", "softmax_cross_entropy", scores, "y")
    return g


def point(dtype: str = "float64", layers: int = 3, n: int = 5) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    params = {f"W{i}": rng.normal(size=(4, 4)) for i in range(layers)}
    params |= {f"b{i}": rng.normal(size=4) for i in range(layers)}
    params["Wout"] = rng.normal(size=(4, 3))
    inputs = {"x": rng.normal(size=(n, 4)), "y": rng.integers(0, 3, n)}
    cast = {k: v.astype(dtype) for k, v in params.items()}
    return {**inputs, "x": inputs["x"].astype(dtype)}, cast


def read_only(arrays: dict) -> dict:
    """Copies that raise if anyone writes into them."""
    out = {k: np.array(v) for k, v in arrays.items()}
    for v in out.values():
        v.setflags(write=False)
    return out


def test_downstream_is_only_what_depends_on_the_slot() -> None:
    plan = compile_graph(deep_mlp())
    assert [s.name for s in downstream(plan, plan.slot["Wout"])] == ["logits", "scores", "loss"]
    assert len(downstream(plan, plan.slot["W0"])) == len(plan.steps) - 1  # all but the constant
    assert [s.name for s in downstream(plan, plan.slot["half"])] == ["scores", "loss"]


@pytest.mark.parametrize("mode", ["full", "sparse", "fast"])
def test_perturbations_recompute_only_downstream_steps(mode: str) -> None:
    plan = compile_graph(deep_mlp())
    inputs, params = point()
    first = gradient_check(plan, inputs, params, CheckSettings(mode=mode, params=("W0",), num_checks=4))
    last = gradient_check(plan, inputs, params, CheckSettings(mode=mode, params=("Wout",), num_checks=4))
    assert first.passed and last.passed
    per_coordinate = {"full": 16, "sparse": 4, "fast": 1}[mode]
    assert first.tensors[0].coordinates_checked == per_coordinate
    assert first.numeric_steps == 2 * per_coordinate * len(downstream(plan, plan.slot["W0"]))
    assert last.numeric_steps == 2 * {"full": 12, "sparse": 4, "fast": 1}[mode] * 3  # logits, scores, loss


def test_check_never_writes_the_arrays_it_is_given() -> None:
    plan = compile_graph(deep_mlp())
    inputs, params = point()
    inputs, params = read_only(inputs), read_only(params)  # a write would raise ValueError
    before = {k: v.copy() for k, v in {**inputs, **params}.items()}
    report = gradient_check(plan, inputs, params, CheckSettings(mode="full", include_inputs=True))
    assert report.passed
    assert {t.name for t in report.tensors} == {*params, "x"}
    for k, v in {**inputs, **params}.items():
        np.testing.assert_array_equal(v, before[k])


def test_float32_plan_is_promoted_with_its_constants() -> None:
    plan32 = compile_graph(deep_mlp("float32"))
    plan64 = promote(plan32)
    assert plan64.dtype == np.float64 and plan32.dtype == np.float32  # the original is untouched
    assert {plan64.dtypes[plan64.slot[n]] for n in ("x", "W0", "half", "loss")} == {np.dtype("float64")}
    assert plan64.dtypes[plan64.slot["y"]] == np.int64
    inputs, params = point("float32")
    tape32 = forward(plan32, inputs, params)
    report = gradient_check(plan32, inputs, params, CheckSettings(mode="full"))
    assert report.passed and max(t.max_rel_error for t in report.tensors) <= 1e-7
    assert report.loss == pytest.approx(tape32.loss, rel=1e-6)  # the same function, in float64
    assert all(v.dtype == np.float32 for v in params.values())


def test_sparse_is_seeded_and_samples_distinct_coordinates() -> None:
    plan = compile_graph(deep_mlp())
    inputs, params = point()

    def sampled(seed: int) -> list:
        report = gradient_check(plan, inputs, params, CheckSettings(num_checks=10, seed=seed, max_worst=10))
        return [sorted(c.index for c in t.worst) for t in report.tensors]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)
    assert all(len(set(idx)) == len(idx) == min(10, size) for idx, size in zip(sampled(3), [16, 4] * 3 + [12]))


def relu_kink_graph() -> graph_pb2.Graph:
    g = graph_pb2.Graph()
    declare(g.params, "w", "float64", (3,))
    g.loss = node(g, "loss", "sum", node(g, "r", "relu", "w"))
    return g


@pytest.mark.parametrize("mode", ["full", "sparse", "fast"])
def test_relu_kink_fails_with_its_large_error(mode: str) -> None:
    plan = compile_graph(relu_kink_graph())
    report = gradient_check(plan, {}, {"w": np.array([0.0, 1.0, -1.0])}, CheckSettings(mode=mode, eps=1e-2))
    (w,) = report.tensors
    assert not report.passed and not w.allclose and not w.non_finite
    assert w.max_rel_error > 0.1 and "'w'" in w.message
    if mode != "fast":
        assert w.worst[0].index == (0,) and w.worst[0].analytic == 0.0
        assert w.worst[0].numeric == pytest.approx(0.5) and w.max_rel_error == pytest.approx(1.0)


def log_graph(op: str = "log") -> graph_pb2.Graph:
    g = graph_pb2.Graph()
    declare(g.params, "w", "float64", (2,))
    declare(g.params, "v", "float64", (2,))
    node(g, "zero", "constant", value=np.zeros(()))
    logw = node(g, "logw", "log", "w")
    top = node(g, "top", "maximum", logw, "zero") if op == "maximum" else logw
    g.loss = node(g, "loss", "sum", node(g, "sum", "add", top, "v"))
    return g


def test_non_finite_forward_fails_every_tensor_naming_it() -> None:
    plan = compile_graph(log_graph())
    report = gradient_check(plan, {}, {"w": np.array([1.0, np.nan]), "v": np.ones(2)}, CheckSettings())
    assert not report.passed
    for t in report.tensors:
        assert t.non_finite and not t.passed and repr(t.name) in t.message
        assert "parameter 'w'" in t.message  # where the NaN first appears


def test_non_finite_numeric_gradient_is_a_failed_verdict() -> None:
    plan = compile_graph(log_graph())  # log(1e-7 - 1e-6) is NaN, though forward and analytic are finite
    report = gradient_check(plan, {}, {"w": np.array([1.0, 1e-7]), "v": np.ones(2)}, CheckSettings(mode="full"))
    w, v = report.tensors
    assert w.non_finite and not w.passed and "numeric gradient of 'w'" in w.message and "[1]" in w.message
    assert w.worst[0].index == (1,) and w.max_abs_error == np.inf and w.max_rel_error == 1.0
    assert v.passed


def test_non_finite_analytic_gradient_is_a_failed_verdict() -> None:
    plan = compile_graph(log_graph("maximum"))  # max(log 0, 0) = 0 is finite; its vjp 0 / 0 is not
    report = gradient_check(plan, {}, {"w": np.array([1.0, 0.0]), "v": np.ones(2)}, CheckSettings(num_checks=1))
    w = report.tensors[0]
    assert w.non_finite and "analytic gradient of 'w'" in w.message and "[1]" in w.message


@pytest.mark.parametrize("settings, field", [
    (CheckSettings(eps=0.0), "settings.eps"),
    (CheckSettings(eps=float("nan")), "settings.eps"),
    (CheckSettings(atol=-1.0), "settings.atol"),
    (CheckSettings(mode="exhaustive"), "settings.mode"),
    (CheckSettings(num_checks=0), "settings.num_checks"),
    (CheckSettings(params=("W9",)), "settings.params"),
])
def test_bad_settings_are_invalid_argument(settings: CheckSettings, field: str) -> None:
    inputs, params = point()
    with pytest.raises(InvalidArgument) as e:
        gradient_check(compile_graph(deep_mlp()), inputs, params, settings)
    assert e.value.field == field
