"""Write the example gradient-check cases, then check them once to prove the verdicts.

    PYTHONPATH=client:server python examples/gradcheck/generate.py

Writes examples/gradcheck/*.pb (all must pass), json/*.json (the same lecture case,
readable) and failing/*.pb (must fail). Deterministic: same code, same bytes.
Then: ``gradgate gradcheck examples/gradcheck/*.pb`` exits 0 and
``gradgate gradcheck examples/gradcheck/failing/*.pb`` exits 1.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import gradgate as gg
from gradgate.gradcheck import GradCheckCase, make_case, run_case, save_case

HERE = Path(__file__).resolve().parent
ACTIVATIONS: dict[str, Callable[[gg.Value], gg.Value]] = {"sigmoid": gg.sigmoid, "tanh": gg.tanh, "relu": gg.relu}


def lecture_add_mul() -> GradCheckCase:
    """CS231n lecture 4's first circuit: f = (x + y) z at x = -2, y = 5, z = -4."""
    g = gg.Graph(dtype="float64")
    x, y, z = (g.param(name, ()) for name in "xyz")
    g.set_loss((x + y) * z)
    return make_case("lecture_add_mul", g, {"x": -2.0, "y": 5.0, "z": -4.0}, {}, mode="full",
                     description="f = (x + y) z at x=-2, y=5, z=-4: df/dx = df/dy = -4, df/dz = 3")


def lecture_sigmoid_neuron() -> GradCheckCase:
    """The lecture's 2-D neuron f = sigmoid(w0 x0 + w1 x1 + w2), checking w and the input x."""
    g = gg.Graph(dtype="float64")
    x = g.input("x", (2,))
    w, b = g.param("w", (2,)), g.param("b", ())
    g.set_loss(gg.sigmoid(gg.sum(w * x) + b))
    return make_case("lecture_sigmoid_neuron", g, {"w": [2.0, -3.0], "b": -3.0}, {"x": [-1.0, -2.0]},
                     mode="full", include_inputs=True,
                     description="sigmoid(w.x + b) at w=[2,-3], b=-3, x=[-1,-2]: dw=[-0.2,-0.39], dx=[0.39,-0.59]")


def classifier(name: str, dtype: str, hidden: tuple[int, ...], activation: str, loss: str,
               reg: float = 0.0, seed: int = 0, **settings: Any) -> GradCheckCase:
    """An MLP (or a linear classifier, ``hidden=()``) on random data with a softmax or SVM loss."""
    n, features, classes = 8, 4, 3
    rng = np.random.default_rng(seed)
    g = gg.Graph(dtype=dtype)
    x, y = g.input("x", (None, features)), g.input("y", (None,), dtype="int64")
    sizes = (features, *hidden, classes)
    params, h, weights = {}, x, []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), start=1):
        W, b = g.param(f"W{i}", (fan_in, fan_out)), g.param(f"b{i}", (fan_out,))
        params[f"W{i}"] = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"b{i}"] = 0.1 * rng.standard_normal(fan_out)  # non-zero: no ReLU sits on its kink by design
        h = h @ W + b
        weights.append(W)
        if i < len(sizes) - 1:
            h = ACTIVATIONS[activation](h)
    scores = g.output(h, name="scores")
    data_loss = gg.softmax_cross_entropy(scores, y) if loss == "softmax" else gg.svm_loss(scores, y)
    total = data_loss
    for W in weights if reg else []:
        total = total + reg * gg.l2(W)
    g.set_loss(total)
    batch = {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}
    shape = "-".join(map(str, sizes))
    what = f"{activation} MLP {shape}" if hidden else f"linear classifier {shape}"
    description = f"{what}, {loss} loss" + (f" + {reg:g} L2" if reg else "") + f", {dtype}, batch {n}"
    return make_case(name, g, params, batch, description=description, seed=seed, **settings)


def relu_kink() -> GradCheckCase:
    """Must FAIL: hidden unit 0's pre-activation is exactly 0, and eps = 0.01 straddles the kink.

    x W1[:, 0] = 1*2 + 2*(-1) = 0 with b1[0] = 0, so relu'(0) = 0 analytically while the
    centered difference sees half the slope: a real, large error that must not be hidden."""
    g = gg.Graph(dtype="float64")
    x, y = g.input("x", (None, 2)), g.input("y", (None,), dtype="int64")
    W1, b1 = g.param("W1", (2, 3)), g.param("b1", (3,))
    W2, b2 = g.param("W2", (3, 2)), g.param("b2", (2,))
    g.set_loss(gg.softmax_cross_entropy(gg.relu(x @ W1 + b1) @ W2 + b2, y))
    params = {"W1": [[2.0, 0.5, -1.0], [-1.0, 0.5, 1.0]], "b1": [0.0, 0.1, 0.2],
              "W2": [[1.0, -1.0], [0.5, 0.3], [-0.2, 0.4]], "b2": [0.0, 0.0]}
    return make_case("relu_kink", g, params, {"x": [[1.0, 2.0]], "y": [0]}, mode="full", eps=1e-2,
                     description="ReLU evaluated exactly at its kink (pre-activation 0) with eps 1e-2: must fail")


def passing_cases() -> list[GradCheckCase]:
    return [
        lecture_add_mul(),
        lecture_sigmoid_neuron(),
        classifier("mlp_sigmoid_f64", "float64", (6,), "sigmoid", "softmax", mode="full", include_inputs=True),
        classifier("mlp_sigmoid_f32", "float32", (6,), "sigmoid", "softmax", seed=1, mode="sparse"),
        classifier("mlp_tanh_f64", "float64", (6, 5), "tanh", "softmax", seed=2, mode="sparse", num_checks=8),
        classifier("mlp_tanh_f32", "float32", (6,), "tanh", "svm", seed=3, mode="fast"),
        classifier("mlp_relu_f64", "float64", (6, 5), "relu", "softmax", reg=1e-2, seed=4, mode="full"),
        classifier("mlp_relu_f32", "float32", (6,), "relu", "svm", seed=5, mode="sparse", num_checks=5),
        classifier("svm_linear_f64", "float64", (), "none", "svm", reg=1e-3, seed=6, mode="full"),
        classifier("svm_linear_f32", "float32", (), "none", "svm", seed=7, mode="fast", include_inputs=True),
        classifier("softmax_linear_f64", "float64", (), "none", "softmax", reg=1e-3, seed=8, mode="full",
                   include_inputs=True),
        classifier("softmax_linear_f32", "float32", (), "none", "softmax", seed=9, mode="sparse"),
    ]


def main() -> int:
    written: list[tuple[Path, GradCheckCase, bool]] = []
    for case in passing_cases():
        written.append((save_case(case, HERE / f"{case.name}.pb"), case, True))
    (HERE / "json").mkdir(exist_ok=True)
    (HERE / "failing").mkdir(exist_ok=True)
    written.append((save_case(lecture_sigmoid_neuron(), HERE / "json" / "lecture_sigmoid_neuron.json"),
                    lecture_sigmoid_neuron(), True))
    written.append((save_case(relu_kink(), HERE / "failing" / "relu_kink.pb"), relu_kink(), False))

    wrong = []
    with gg.connect() as client:
        for path, case, should_pass in written:
            report = run_case(client, case)
            ok = report.passed == should_pass
            wrong += [] if ok else [path]
            worst = max(t.max_rel_error for t in report.tensors)
            print(f"{'ok   ' if ok else 'WRONG'} {path.relative_to(HERE)}: "
                  f"{'passed' if report.passed else 'failed'}, max rel error {worst:.1e}")
    if wrong:
        print(f"unexpected verdicts: {[str(p) for p in wrong]}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
