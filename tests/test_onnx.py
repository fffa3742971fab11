"""ONNX import: ONNX's own node test cases, whole models against onnxruntime, and models
exported from PyTorch that give PyTorch's loss and gradients.

Needs the onnx extra (onnx, onnxruntime) and, for the export tests, torch==2.13.0 and
onnxscript (the dynamo exporter); .ci/run installs them all."""
from __future__ import annotations

import functools
import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradgate as gg
from gradgate_server.engine import GradgateError, backward, compile_graph, forward

from optional import require

onnx = require("onnx", "pip install 'gradgate[onnx]'")
from gradgate.onnx import CONVERTERS, OnnxImportError  # noqa: E402

# The node test modules of the ops we import: the same cases load_model_tests(kind="node")
# gives for these ops, generated for just them (all 1,900 cases take 18 s to generate).
MODULES = ["gemm", "matmul", "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "exp", "log", "neg", "abs",
           "sqrt", "pow", "clip", "max", "softmax", "logsoftmax", "conv", "maxpool", "averagepool",
           "globalaveragepool", "batch_normalization", "layernormalization", "dropout", "flatten", "reshape",
           "transpose", "concat", "slice", "identity", "constant", "reducemean", "reducesum", "unsqueeze", "squeeze",
           "softmax_cross_entropy_loss"]
# Cases of those ops that we do not claim, each refused with an error naming the op and node.
UNCLAIMED = {
    "element type": "integer, float16 or bfloat16 tensors: the engine computes in float32/float64",
    "must be float32, got int": "integer arithmetic",
    "only 2-D windows": "1-D and 3-D convolution and pooling",
    "ceil_mode=1": "ceil_mode where it changes the output size",
    "dilations are not supported for AveragePool": "dilated average pooling",
    "training_mode input": "Dropout's training_mode input (the session's mode decides)",
    "only a scalar constant exponent": "Pow with a tensor exponent",
    "reduction='mean' without weights": "SoftmaxCrossEntropyLoss with weights, ignore_index or other reductions",
    "needs scores (N, C)": "SoftmaxCrossEntropyLoss over more than 2-D scores",
}


@functools.cache
def node_cases() -> dict[str, list[Any]]:
    node = importlib.import_module("onnx.backend.test.case.node")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            importlib.import_module(f"onnx.backend.test.case.node.{name}")
    cases: dict[str, list[Any]] = {}
    for case in node._NodeTestCases:
        ops = [n.op_type for n in case.model.graph.node]
        if len(ops) == 1 and ops[0] in CONVERTERS:
            cases.setdefault(ops[0], []).append(case)
    return cases


def run_node_case(case: Any) -> None:
    """Import the case's model (inputs after the first as initializers: constants and parameters),
    run it in the engine and compare the first output within the case's tolerances."""
    model = onnx.ModelProto.FromString(case.model.SerializeToString())
    inputs, outputs = case.data_sets[0]
    g = model.graph
    del g.output[1:]  # we claim the first output (Y, or the loss); the others are statistics or masks
    feeds = {}
    for i, (vi, array) in enumerate(zip(list(g.input), inputs)):
        if i == 0:
            feeds[vi.name] = np.asarray(array)
        else:
            tensor = onnx.numpy_helper.from_array(np.asarray(array), vi.name)
            g.initializer.append(tensor)
    op = g.node[0]
    loss = None if op.op_type == "SoftmaxCrossEntropyLoss" else (lambda graph, out: gg.sum(out))
    graph, params, buffers = gg.Graph.from_onnx(model, loss=loss, batch=False)
    plan = compile_graph(graph.to_proto())
    train = any(a.name == "training_mode" and a.i for a in op.attribute)
    tape = forward(plan, feeds, params, buffers, train=train)
    got = tape.loss if loss is None else tape.values[plan.slot[graph.outputs[0].name]]
    np.testing.assert_allclose(got, outputs[0], rtol=case.rtol, atol=case.atol, err_msg=case.name)


@pytest.mark.parametrize("op", sorted(set(CONVERTERS) - {"Shape"}))
def test_onnx_node_cases_agree(op: str) -> None:
    cases = node_cases().get(op, [])
    passed, refused = [], []
    for case in cases:
        try:
            run_node_case(case)
            passed.append(case.name)
        except (OnnxImportError, GradgateError) as e:
            message = str(e)
            reason = next((r for key, r in UNCLAIMED.items() if key in message), None)
            assert reason is not None, f"{case.name}: unexpected refusal: {message}"
            assert "node '" in message or "input '" in message, message  # names the node or input
            refused.append(case.name)
    assert passed, f"no node test case of {op} passed (refused: {refused})"


def test_node_cases_cover_every_converter_but_shape_folding() -> None:
    assert set(CONVERTERS) - set(node_cases()) <= {"Shape"}
    assert sum(len(c) for c in node_cases().values()) > 300


# -- hand-built models ---------------------------------------------------------------------

def make_model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = 17) -> Any:
    h = onnx.helper
    graph = h.make_graph(nodes, "g", inputs, outputs, initializers)
    return h.make_model(graph, opset_imports=[h.make_operatorsetid("", opset)])


def bn_model() -> Any:
    h, T = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    init = [onnx.numpy_helper.from_array(a.astype(np.float32), name) for name, a in [
        ("conv.weight", rng.normal(size=(3, 2, 3, 3))), ("bn1.weight", rng.uniform(0.5, 1.5, 3)),
        ("bn1.bias", rng.normal(size=3)), ("bn1.running_mean", rng.normal(size=3)),
        ("bn1.running_var", rng.uniform(0.5, 2, 3)), ("fc", rng.normal(size=(12, 4))),
        ("shape", np.array([-1, 12]))]]
    init[-1] = onnx.numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")
    nodes = [h.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("BatchNormalization", ["c", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                                "bn1.running_var"], ["b"], epsilon=1e-3),
             h.make_node("Relu", ["b"], ["r"]),
             h.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("Reshape", ["p", "shape"], ["f"]),
             h.make_node("MatMul", ["f", "fc"], ["m"]),
             h.make_node("Dropout", ["m"], ["d"]),
             h.make_node("LogSoftmax", ["d"], ["scores"])]
    return make_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 8, 8])],
                      [h.make_tensor_value_info("scores", T.FLOAT, ["N", 4])], init)


def onnxruntime_run(model: Any, feeds: dict) -> list[np.ndarray]:
    ort = require("onnxruntime", "pip install 'gradgate[onnx]'")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_batchnorm_statistics_become_buffers_and_eval_matches_onnxruntime() -> None:
    model = bn_model()
    graph, params, buffers = gg.Graph.from_onnx(model, loss="mse_loss")
    assert sorted(params) == ["bn1.bias", "bn1.weight", "conv.weight", "fc"]
    assert sorted(buffers) == ["bn1.running_mean", "bn1.running_var"]
    plan = compile_graph(graph.to_proto())
    assert [b.name for b in plan.buffers] == ["bn1.running_mean", "bn1.running_var"]
    x = np.random.default_rng(1).normal(size=(5, 2, 8, 8)).astype(np.float32)
    target = np.zeros((5, 4), np.float32)
    tape = forward(plan, {"x": x, "target": target}, params, buffers, train=False)
    (expect,) = onnxruntime_run(model, {"x": x})
    np.testing.assert_allclose(tape.values[plan.slot[graph.outputs[0].name]], expect, rtol=1e-5, atol=1e-5)
    # train mode: batch statistics, updated buffers, dropout active; backward works
    tape = forward(plan, {"x": x, "target": target}, params, buffers, train=True, seed=1)
    assert set(tape.updates) == set(buffers)
    assert set(backward(plan, tape, plan.params)) == set(params)


def test_unsupported_ops_and_attributes_name_the_op_and_node() -> None:
    h, T = onnx.helper, onnx.TensorProto
    vi = [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])]
    with pytest.raises(OnnxImportError, match="Erf node 'gelu_erf': op 'Erf' is not supported; supported: Abs"):
        gg.Graph.from_onnx(make_model([h.make_node("Erf", ["x"], ["y"], name="gelu_erf")], *vi, []), loss="mse_loss")
    with pytest.raises(OnnxImportError, match="has no loss node: pass loss="):
        gg.Graph.from_onnx(make_model([h.make_node("Relu", ["x"], ["y"])], *vi, []))
    shape_input = [*vi[0], h.make_tensor_value_info("s", T.INT64, [2])]
    with pytest.raises(OnnxImportError, match=r"Reshape node 'y': input shape \('s'\) must be a constant"):
        gg.Graph.from_onnx(make_model([h.make_node("Reshape", ["x", "s"], ["y"])], shape_input, vi[1], []),
                           loss="mse_loss")


def test_softmax_cross_entropy_loss_node_is_the_loss() -> None:
    h, T = onnx.helper, onnx.TensorProto
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w")
    model = make_model([h.make_node("MatMul", ["x", "w"], ["s"]),
                        h.make_node("SoftmaxCrossEntropyLoss", ["s", "labels"], ["loss"])],
                       [h.make_tensor_value_info("x", T.FLOAT, ["N", 4]),
                        h.make_tensor_value_info("labels", T.INT64, ["N"])],
                       [h.make_tensor_value_info("loss", T.FLOAT, [])], [w])
    graph, params, _ = gg.Graph.from_onnx(model)
    assert graph.loss is not None and graph.loss.op == "softmax_cross_entropy"
    x, labels = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32), np.arange(6) % 3
    plan = compile_graph(graph.to_proto())
    (expect,) = onnxruntime_run(model, {"x": x, "labels": labels})
    assert forward(plan, {"x": x, "labels": labels}, params).loss == pytest.approx(float(expect), rel=1e-5)


# -- models exported from PyTorch ----------------------------------------------------------------

def torch_models(torch: Any) -> dict[str, Any]:
    nn = torch.nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

        def forward(self, x: Any) -> Any:
            return self.fc2(torch.tanh(self.fc1(x)))

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1, stride=1)
            self.fc = nn.Linear(6 * 2 * 2, 4)

        def forward(self, x: Any) -> Any:
            h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            h = nn.functional.avg_pool2d(torch.relu(self.conv2(h)), 2)
            return self.fc(h.view(h.size(0), -1))  # Shape/Gather/Concat/Reshape in the legacy export

    torch.manual_seed(0)
    return {"mlp": (MLP().float(), (6,)), "convnet": (ConvNet().float(), (1, 8, 8))}


@pytest.mark.parametrize("name, exporter", [("mlp", "legacy"), ("convnet", "legacy"), ("convnet", "dynamo")])
def test_exported_pytorch_model_gives_pytorchs_loss_and_gradients(tmp_path: Path, name: str, exporter: str) -> None:
    torch = require("torch", "pip install torch==2.13.0")
    if exporter == "dynamo":
        require("onnxscript", "pip install onnxscript")
    module, shape = torch_models(torch)[name]
    path = tmp_path / f"{name}.onnx"
    example = torch.randn(2, *shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["x"], output_names=["scores"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"], output_names=["scores"],
                              dynamic_axes={"x": {0: "batch"}})
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, *shape)), rng.integers(0, 4, 5)

    # forward in float32 against onnxruntime
    graph, params, _ = gg.Graph.from_onnx(path, loss="softmax_cross_entropy", target="y")
    plan = compile_graph(graph.to_proto())
    scores = forward(plan, {"x": x.astype(np.float32), "y": y}, params).values[plan.slot[graph.outputs[0].name]]
    (expect,) = onnxruntime_run(onnx.load(str(path)), {"x": x.astype(np.float32)})
    np.testing.assert_allclose(scores, expect, rtol=1e-5, atol=1e-5)

    # loss and gradients in float64 against PyTorch autograd on the same weights
    graph, params, _ = gg.Graph.from_onnx(path, loss="softmax_cross_entropy", target="y", dtype="float64")
    plan = compile_graph(graph.to_proto())
    tape = forward(plan, {"x": x, "y": y}, params)
    grads = backward(plan, tape, plan.params)
    module = module.double()
    loss = torch.nn.functional.cross_entropy(module(torch.tensor(x)), torch.tensor(y))
    loss.backward()
    assert abs(tape.loss - loss.item()) <= 1e-10 * abs(loss.item())
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    by_value = {k: v for k, v in params.items()}  # legacy exports may rename conv weights (onnx::Conv_*)
    assert len(by_value) == len(torch_grads)
    for k, p in module.named_parameters():
        match = k if k in by_value else next(n for n, v in by_value.items() if v.shape == tuple(p.shape)
                                             and np.array_equal(v, p.detach().numpy()))
        scale = np.abs(torch_grads[k]).max()
        assert np.abs(grads[match] - torch_grads[k]).max() <= 1e-10 * scale, k
