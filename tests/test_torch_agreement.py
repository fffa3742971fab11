"""Loss and gradients equal PyTorch autograd's, in float64, to a relative error <= 1e-10:
every registry op (on the gradient-check samples) and whole networks (MLPs with each
activation and loss, a convnet, a net with batchnorm and dropout in both modes).

PyTorch is test-only: ``pip install torch==2.13.0`` (.ci/run installs it)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import gradgate as gg
from gradgate_server.engine import Plan, Tape, backward, compile_graph, forward

from graphs import one_op_graph
from optional import require
from test_ops import CASES

TOL = 1e-10


@pytest.fixture(scope="module")
def torch() -> Iterator[Any]:
    torch = require("torch", "pip install torch==2.13.0")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(previous)


def rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Worst difference relative to the largest magnitude of the reference."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs), initial=0.0) / max(np.max(np.abs(theirs), initial=0.0), 1e-300))


def _pads(p: Any) -> tuple[int, int, int, int]:
    p = (p,) * 4 if isinstance(p, int) else tuple(p)
    return p * 2 if len(p) == 2 else p  # type: ignore[return-value]


def torch_op(torch: Any, op: str) -> Callable[..., Any]:
    """The PyTorch function equal to registry op ``op`` (inputs as tensors, attributes as keywords)."""
    F = torch.nn.functional

    def conv2d(x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
               groups: int = 1) -> Any:
        t, l, bottom, r = _pads(padding)
        return F.conv2d(F.pad(x, (l, r, t, bottom)), w, b, stride, 0, dilation, groups)

    def batchnorm(x: Any, gamma: Any, beta: Any, momentum: float = 0.9, eps: float = 1e-5, *, train: bool = True,
                  buffers: dict | None = None, **_: Any) -> Any:
        c = x.shape[1]
        buffers = buffers or {}
        mean = torch.tensor(buffers.get("out.running_mean", np.zeros(c)))
        var = torch.tensor(buffers.get("out.running_var", np.ones(c)))
        return F.batch_norm(x, mean, var, gamma, beta, training=train, momentum=1 - momentum, eps=eps)

    def take(x: Any, starts: tuple, ends: tuple, axes: tuple | None = None, steps: tuple | None = None) -> Any:
        axes = axes or tuple(range(len(starts)))
        for a, s, e, st in zip(axes, starts, ends, steps or (1,) * len(starts)):
            index = np.arange(x.shape[a])[slice(s, e, st)].copy()
            x = torch.index_select(x, a, torch.tensor(index, dtype=torch.long))
        return x

    def reduce(fn: Callable) -> Callable:
        def run(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
            return fn(x) if axis is None else fn(x, dim=axis, keepdim=keepdims)
        return run

    table: dict[str, Callable[..., Any]] = {
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "maximum": torch.maximum,
        "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "relu": torch.relu, "square": torch.square, "matmul": torch.matmul, "abs": torch.abs, "sqrt": torch.sqrt,
        "affine": lambda x, w, b: x @ w + b,
        "sum": reduce(torch.sum), "mean": reduce(torch.mean),
        "reshape": lambda x, shape: x.reshape(shape),
        "transpose": lambda x, axes=None: x.permute(axes or tuple(reversed(range(x.dim())))),
        "constant": lambda value: torch.tensor(value),
        "l2": lambda w: (w * w).sum(),
        "softmax_cross_entropy": lambda s, y: F.cross_entropy(s, y),
        "svm_loss": lambda s, y, margin=1.0: F.multi_margin_loss(s, y, margin=margin) * s.shape[1],  # torch / C
        "conv2d": conv2d,
        "max_pool2d": lambda x, kernel=2, stride=None, padding=0, dilation=1: F.max_pool2d(
            x, kernel, stride or kernel, padding, dilation),
        "avg_pool2d": lambda x, kernel=2, stride=None, padding=0, count_include_pad=True: F.avg_pool2d(
            x, kernel, stride or kernel, padding, count_include_pad=count_include_pad),
        "batchnorm": batchnorm,
        "layernorm": lambda x, g, b, eps=1e-5, axis=-1: F.layer_norm(x, x.shape[axis % x.dim():], g, b, eps),
        "softmax": lambda x, axis=-1: F.softmax(x, dim=axis),
        "log_softmax": lambda x, axis=-1: F.log_softmax(x, dim=axis),
        "flatten": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:axis + x.dim() if axis < 0 else axis])), -1),
        "concat": lambda *xs, axis=-1: torch.cat(xs, dim=axis),
        "slice": take,
        "clip": lambda x, min=None, max=None: torch.clamp(x, min, max),
        "pow": lambda x, exponent: torch.pow(x, exponent),
        "mse_loss": F.mse_loss,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
    }
    return table[op]


@pytest.mark.parametrize("op, inputs, attrs, run", CASES)
def test_op_agrees_with_pytorch(torch: Any, op: str, inputs: list, attrs: dict, run: dict) -> None:
    out_shape = compile_graph(one_op_graph(op, inputs, attrs, np.ones(()))).shapes[-4]
    weight = np.random.default_rng(1).normal(size=out_shape)
    plan = compile_graph(one_op_graph(op, inputs, attrs, weight), dtype=np.float64)  # float64 even for constant
    batch = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "i"}
    params = {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "f"}
    tape = forward(plan, batch, params, **run)
    grads = backward(plan, tape, plan.params)

    tensors = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in inputs]
    if op == "dropout":  # the same mask: the one the engine drew (the op's residual)
        scaled = tape.residuals[0][0]
        out = tensors[0] if scaled is None else tensors[0] * torch.tensor(scaled)
    elif op == "batchnorm":
        out = torch_op(torch, op)(*tensors, **attrs, **run)
    else:
        out = torch_op(torch, op)(*tensors, **attrs)
    loss = (out * torch.tensor(weight)).sum()
    assert rel(tape.values[plan.slot["out"]], out.detach().numpy()) <= TOL
    assert abs(tape.loss - loss.item()) <= TOL * max(abs(loss.item()), 1.0)
    if any(t.requires_grad for t in tensors):
        loss.backward()
        for i, t in enumerate(tensors):
            if t.requires_grad:
                assert rel(grads[f"in{i}"], t.grad.numpy()) <= TOL, (op, i)


# -- whole networks ---------------------------------------------------------------------

def engine_step(g: gg.Graph, params: dict, batch: dict, **run: Any) -> tuple[Plan, Tape, dict]:
    plan = compile_graph(g.to_proto())
    tape = forward(plan, batch, params, **run)
    return plan, tape, backward(plan, tape, plan.params)


def assert_agrees(tape: Tape, grads: dict, loss: Any, tensors: dict) -> None:
    loss.backward()
    assert abs(tape.loss - loss.item()) <= TOL * abs(loss.item())
    for name, t in tensors.items():
        assert rel(grads[name], t.grad.numpy()) <= TOL, name


LOSSES = ["softmax_cross_entropy", "svm_loss", "mse_loss", "bce_with_logits"]


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_mlp_agrees_with_pytorch(torch: Any, activation: str, loss_name: str) -> None:
    rng = np.random.default_rng(0)
    g = gg.Graph("float64")
    x = g.input("x", (None, 5))
    classes = loss_name in ("softmax_cross_entropy", "svm_loss")
    y = g.input("y", (None,) if classes else (None, 3), dtype="int64" if classes else None)
    w1, b1, w2, b2 = g.param("w1", (5, 8)), g.param("b1", (8,)), g.param("w2", (8, 3)), g.param("b2", (3,))
    scores = gg.affine(getattr(gg, activation)(x @ w1 + b1), w2, b2)
    g.set_loss(getattr(gg, loss_name)(scores, y) + 1e-3 * gg.l2(w1))
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in gg.init_params(g, seed=1).items()}
    batch = {"x": rng.normal(size=(6, 5)),
             "y": rng.integers(0, 3, 6) if classes else rng.uniform(size=(6, 3))}
    _, tape, grads = engine_step(g, params, batch)

    F = torch.nn.functional
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    X, Y = torch.tensor(batch["x"]), torch.tensor(batch["y"])
    s = getattr(torch, activation)(X @ t["w1"] + t["b1"]) @ t["w2"] + t["b2"]
    data_loss = {"softmax_cross_entropy": lambda: F.cross_entropy(s, Y),
                 "svm_loss": lambda: F.multi_margin_loss(s, Y) * 3,
                 "mse_loss": lambda: F.mse_loss(s, Y),
                 "bce_with_logits": lambda: F.binary_cross_entropy_with_logits(s, Y)}[loss_name]()
    assert_agrees(tape, grads, data_loss + 1e-3 * (t["w1"] ** 2).sum(), t)


def test_convnet_agrees_with_pytorch(torch: Any) -> None:
    rng = np.random.default_rng(0)
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 1, 8, 8)), g.input("y", (None,), dtype="int64")
    p = {name: g.param(name, shape) for name, shape in [
        ("c1", (4, 1, 3, 3)), ("c1b", (4,)), ("c2", (6, 4, 3, 3)), ("c2b", (6,)), ("fc", (24, 10)), ("fcb", (10,))]}
    h = gg.max_pool2d(gg.relu(gg.conv2d(x, p["c1"], p["c1b"], padding=1)), 2)
    h = gg.avg_pool2d(gg.relu(gg.conv2d(h, p["c2"], p["c2b"], padding=1, stride=2)), kernel=3, stride=1, padding=1)
    g.set_loss(gg.softmax_cross_entropy(gg.affine(gg.flatten(h), p["fc"], p["fcb"]), y))
    params = gg.init_params(g, seed=2)
    params.update(c1b=rng.normal(size=4) * 0.1, c2b=rng.normal(size=6) * 0.1)
    batch = {"x": rng.normal(size=(5, 1, 8, 8)), "y": rng.integers(0, 10, 5)}
    _, tape, grads = engine_step(g, params, batch)

    F = torch.nn.functional
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(batch["x"]), t["c1"], t["c1b"], padding=1)), 2)
    h = F.avg_pool2d(F.relu(F.conv2d(h, t["c2"], t["c2b"], padding=1, stride=2)), 3, 1, 1)
    loss = F.cross_entropy(torch.flatten(h, 1) @ t["fc"] + t["fcb"], torch.tensor(batch["y"]))
    assert_agrees(tape, grads, loss, t)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_dropout_net_agrees_with_pytorch_in_both_modes(torch: Any, train: bool) -> None:
    rng = np.random.default_rng(0)
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 2, 5, 5)), g.input("y", (None,), dtype="int64")
    w, gamma, beta = g.param("w", (3, 2, 3, 3)), g.param("gamma", (3,)), g.param("beta", (3,))
    w2, b2, lg, lb = g.param("w2", (27, 4)), g.param("b2", (4,)), g.param("lg", (27,)), g.param("lb", (27,))
    h = gg.relu(gg.batchnorm(gg.conv2d(x, w), gamma, beta, momentum=0.8, name="bn"))
    h = gg.dropout(gg.layernorm(gg.flatten(h), lg, lb), p=0.4, name="drop")
    g.set_loss(gg.softmax_cross_entropy(gg.affine(h, w2, b2), y))
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in gg.init_params(g, seed=4).items()}
    stats = {"bn.running_mean": rng.normal(size=3), "bn.running_var": rng.uniform(0.5, 2, 3)}
    batch = {"x": rng.normal(size=(4, 2, 5, 5)), "y": rng.integers(0, 4, 4)}
    plan, tape, grads = engine_step(g, params, batch, buffers=stats, train=train, seed=5)

    F = torch.nn.functional
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    mean, var = torch.tensor(stats["bn.running_mean"]), torch.tensor(stats["bn.running_var"])
    h = F.relu(F.batch_norm(F.conv2d(torch.tensor(batch["x"]), t["w"]), mean, var, t["gamma"], t["beta"],
                            training=train, momentum=0.2))
    h = F.layer_norm(torch.flatten(h, 1), (27,), t["lg"], t["lb"])
    drop = next(i for i, s in enumerate(plan.steps) if s.name == "drop")
    if train:  # the engine's mask (a function of the seed and the node), applied in torch
        mask = tape.residuals[drop][0]
        assert 0 < np.mean(mask == 0) < 1
        h = h * torch.tensor(mask)
    else:
        assert tape.residuals[drop] == (None,)
    loss = F.cross_entropy(h @ t["w2"] + t["b2"], torch.tensor(batch["y"]))
    assert_agrees(tape, grads, loss, t)
    if train:  # torch updated its running statistics in place
        assert rel(tape.updates["bn.running_mean"], mean.numpy()) <= TOL
        assert rel(tape.updates["bn.running_var"], var.numpy()) <= TOL
    else:
        assert tape.updates == {}
