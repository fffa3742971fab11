"""Work is bounded before it starts (issue 9): every value's element count, the forward's
activation bytes and its FLOPs are known from the static shapes once the batch size is,
and a call over a limit is RESOURCE_EXHAUSTED before anything is allocated. Shapes from
the wire are counted with Python ints, so none overflows into INTERNAL."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradgate as gg
from gradgate import codec
from gradgate.v1 import gradcheck_pb2
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate.v1 import graph_pb2
from gradgate_server import Config, serve
from gradgate_server.engine import DeadlineExceeded, ResourceExhausted, compile_graph, forward
from gradgate_server.engine.cost import Limits, estimate
from gradgate_server.engine.gradcheck import CheckSettings, gradient_check

from graphs import declare, node, one_op_graph
from procs import ServerProcess, memory_of
from test_ops import CASES

Code = grpc.StatusCode
DEFAULTS = Config()


def mlp(sizes: tuple[int, ...] = (784, 256, 10), dtype: str = "float32") -> gg.Graph:
    g = gg.Graph(dtype)
    h, y = g.input("x", (None, sizes[0])), g.input("y", (None,), dtype="int64")
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        h = h @ g.param(f"W{i}", (a, b)) + g.param(f"b{i}", (b,))
        h = gg.relu(h) if i < len(sizes) - 2 else h
    g.set_loss(gg.softmax_cross_entropy(h, y))
    return g


def batch_for(g: gg.Graph, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, g.inputs[0].shape[1])).astype(g.dtype),
            "y": rng.integers(0, 10, n)}


def outer_sum() -> graph_pb2.Graph:
    """The issue's attack: x (N, 1) + transpose(x) is (N, N); times a parameter, summed."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float64", (-1, 1))
    declare(g.params, "p", "float64", ())
    node(g, "xT", "transpose", "x")
    node(g, "outer", "add", "x", "xT")
    node(g, "scaled", "mul", "outer", "p")
    g.loss = node(g, "loss", "sum", "scaled")
    return g


def square_matmul(k: int = 6144) -> graph_pb2.Graph:
    """x (N, 1) times a row of k ones is (N, k); times its transpose, (N, N): 2 N N k FLOPs
    from N floats and a 24 KiB constant."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float32", (-1, 1))
    node(g, "ones", "constant", value=np.ones((1, k), np.float32))
    node(g, "wide", "mul", "x", "ones")
    node(g, "wideT", "transpose", "wide")
    node(g, "product", "matmul", "wide", "wideT")
    g.loss = node(g, "loss", "sum", "product")
    return g


# -- the estimate ------------------------------------------------------------------

def test_estimate_counts_elements_and_flops_exactly() -> None:
    plan = compile_graph(mlp().to_proto())
    cost = estimate(plan, 4096)
    counts = dict(zip(plan.names, cost.elements))
    assert counts["x"] == 4096 * 784 and counts["W0"] == 784 * 256 and counts["y"] == 4096
    matmul_flops = 2 * 4096 * 784 * 256 + 2 * 4096 * 256 * 10
    loss_flops = 6 * 4096 * 10
    elementwise = 4096 * 256 * 2 + 4096 * 10  # + b0, relu, + b1
    assert cost.forward_flops == matmul_flops + loss_flops + elementwise
    assert cost.backward_flops == 2 * cost.forward_flops
    assert estimate(plan, 4096) is cost  # cached per plan and batch size


def test_default_limits_pass_a_784_256_10_step_at_batch_4096() -> None:
    g = mlp()
    cost = estimate(compile_graph(g.to_proto()), 4096)
    assert 3 * cost.forward_flops < DEFAULTS.max_flops / 10  # with room to spare
    with gg.connect() as client, client.session(g, gg.init_params(g, seed=0)) as sess:
        loss, grads = sess.forward_backward(batch_for(g, 4096))
        assert np.isfinite(loss) and grads["W0"].shape == (784, 256)


def _sample_inputs(plan, batch: int, rng) -> tuple[dict, dict]:
    def value(s: int) -> np.ndarray:
        shape = tuple(batch if d == -1 else d for d in plan.shapes[s])
        if plan.dtypes[s].kind == "i":
            return rng.integers(0, 3, shape)
        return rng.normal(size=shape).astype(plan.dtypes[s])
    return ({plan.names[s]: value(s) for s in plan.inputs}, {plan.names[s]: value(s) for s in plan.params})


@pytest.mark.parametrize("op, inputs, attrs, run", CASES)
def test_activation_estimate_bounds_what_the_cache_holds_for_every_op(op: str, inputs: list, attrs: dict,
                                                                      run: dict) -> None:
    """The documented upper bound, against Tape.nbytes, for every registry op (an op whose
    residuals outgrow its largest operand needs a ``cached`` rule in ops.py)."""
    out_shape = compile_graph(one_op_graph(op, inputs, attrs, np.ones(()))).shapes[-4]
    plan = compile_graph(one_op_graph(op, inputs, attrs, np.ones(out_shape)))
    tape = forward(plan, {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "i"},
                   {f"in{i}": a for i, a in enumerate(inputs) if a.dtype.kind == "f"}, **run)
    assert estimate(plan, tape.batch_size).activation_bytes >= tape.nbytes


@pytest.mark.parametrize("sizes,batch", [((784, 256, 10), 1), ((784, 256, 10), 256), ((784, 256, 10), 4096),
                                         ((784, 256, 256, 256, 10), 256)])
def test_activation_estimate_is_within_2_5x_of_the_real_cache_on_mlps(sizes, batch) -> None:
    plan = compile_graph(mlp(sizes, "float64").to_proto())
    tape = forward(plan, *_sample_inputs(plan, batch, np.random.default_rng(0)))
    ratio = estimate(plan, batch).activation_bytes / tape.nbytes
    print(f"\nMLP {sizes} batch {batch}: estimate / Tape.nbytes = {ratio:.2f}")
    assert 1 <= ratio <= 2.5


# -- refusals through a real server ------------------------------------------------

@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.GradientServiceStub]:
    with serve("127.0.0.1:0") as srv, grpc.insecure_channel(srv.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def create(stub, graph: graph_pb2.Graph, params: dict) -> str:
    request = pb.CreateSessionRequest(graph=graph)
    codec.to_tensor_map(params, request.params)
    return stub.CreateSession(request, timeout=10).session_id


def refused(call, request, timeout: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=timeout)
    return e.value


def test_big_matmul_is_refused_by_the_flops_limit(stub) -> None:
    sid = create(stub, square_matmul(), {})
    x = {"x": np.ones((6144, 1), np.float32)}  # 24 KiB
    request = pb.ForwardRequest(session_id=sid)
    codec.to_tensor_map(x, request.inputs)
    assert request.ByteSize() < 25_000
    start = time.perf_counter()
    error = refused(stub.Forward, request, timeout=1)
    took = time.perf_counter() - start
    assert error.code() == Code.RESOURCE_EXHAUSTED, error
    assert "--max-flops" in error.details() and "'product' (matmul" in error.details()
    assert "4.64e+11" in error.details()  # 2 * 6144**3
    print(f"\n(6144, 6144) @ (6144, 6144) refused in {took * 1e3:.1f} ms: {error.details()}")
    # the same graph at a size inside the limits runs, with the exact result
    x = np.arange(1, 65, dtype=np.float32).reshape(64, 1) / 64
    request = pb.ForwardRequest(session_id=sid)
    codec.to_tensor_map({"x": x}, request.inputs)
    assert stub.Forward(request, timeout=10).loss == pytest.approx(6144 * float(x.sum()) ** 2, rel=1e-5)


def test_limits_are_flags_and_config_fields() -> None:
    from gradgate_server.app import parse_args
    _, config = parse_args(["--max-flops", "1000", "--max-tensor-elements", "50", "--cache-bytes", "1024"])
    assert config.limits == Limits(50, 1024, 1000)
    # outer_sum at batch N: N*N elements, 40 N**2 + 24 N + 16 bytes estimated, 3 (3 N**2 + N) FLOPs
    with serve("127.0.0.1:0", config) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = create(stub, outer_sum(), {"p": np.array(1.0)})
        for n, words in ((8, "--max-tensor-elements"), (6, "--cache-bytes"), (4, "OK")):
            request = pb.ForwardBackwardRequest(session_id=sid)
            codec.to_tensor_map({"x": np.ones((n, 1))}, request.inputs)
            if words == "OK":
                assert stub.ForwardBackward(request, timeout=10).loss == 2 * n * n
            else:
                error = refused(stub.ForwardBackward, request)
                assert error.code() == Code.RESOURCE_EXHAUSTED and words in error.details(), error.details()
    _, config = parse_args(["--max-flops", "100"])
    with serve("127.0.0.1:0", config) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = create(stub, outer_sum(), {"p": np.array(1.0)})
        request = pb.ForwardRequest(session_id=sid)
        codec.to_tensor_map({"x": np.ones((5, 1))}, request.inputs)
        assert stub.Forward(request, timeout=10).loss == 50  # 80 FLOPs forward
        request = pb.ForwardBackwardRequest(session_id=sid, inputs=request.inputs)
        error = refused(stub.ForwardBackward, request)  # 240 with backward
        assert error.code() == Code.RESOURCE_EXHAUSTED and "240" in error.details(), error.details()


def test_create_session_refuses_static_shapes_over_the_element_limit(stub) -> None:
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float64", (-1, 2**20))
    declare(g.params, "W", "float64", (2**20, 2**10))  # 2**30 elements: 8 GiB
    node(g, "h", "matmul", "x", "W")
    g.loss = node(g, "loss", "sum", "h")
    error = refused(stub.CreateSession, pb.CreateSessionRequest(graph=g))
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "parameter 'W'" in error.details() and "1073741824 elements" in error.details()


# -- the INTERNAL cases: shapes whose element count overflows int64 ---------

HUGE = [[2**32, 2**32], [3, 6148914691236517206]]


def tensor(shape: list[int], dtype: str = "float64", data: bytes = b"") -> codec.tensor_pb2.Tensor:
    return codec.tensor_pb2.Tensor(dtype=codec.DTYPE_NAMES[dtype], shape=shape, data=data)


def small_graph(param_shape: list[int] | tuple = (2,), input_shape: list[int] | tuple = (-1, 2)) -> graph_pb2.Graph:
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float64", tuple(input_shape))
    declare(g.params, "w", "float64", tuple(param_shape))
    node(g, "xw", "mul", "x", "w")
    g.loss = node(g, "loss", "sum", "xw")
    return g


def huge_requests(stub, shape: list[int]) -> Iterator[tuple[str, object, object]]:
    ok_params = {"w": np.ones(2)}
    yield "CreateSession: declared param", stub.CreateSession, pb.CreateSessionRequest(graph=small_graph(shape))
    yield "CreateSession: declared input", stub.CreateSession, pb.CreateSessionRequest(
        graph=small_graph(input_shape=[-1, *shape]))
    request = pb.CreateSessionRequest(graph=small_graph())
    request.params["w"].CopyFrom(tensor(shape))
    yield "CreateSession: param tensor", stub.CreateSession, request
    g = small_graph()
    c = g.nodes.add(name="c", op="constant")
    c.attrs["value"].tensor.CopyFrom(tensor(shape))
    request = pb.CreateSessionRequest(graph=g)
    codec.to_tensor_map(ok_params, request.params)
    yield "CreateSession: constant value", stub.CreateSession, request
    g = small_graph()
    reshape = g.nodes.add(name="r", op="reshape", inputs=["x"])
    reshape.attrs["shape"].ints.values[:] = [-1, *shape]
    request = pb.CreateSessionRequest(graph=g)
    codec.to_tensor_map(ok_params, request.params)
    yield "CreateSession: reshape target", stub.CreateSession, request
    sid = create(stub, small_graph(), ok_params)
    request = pb.ForwardRequest(session_id=sid)
    request.inputs["x"].CopyFrom(tensor(shape))
    yield "Forward: input tensor", stub.Forward, request
    request = pb.ForwardBackwardRequest(session_id=sid)
    codec.to_tensor_map({"x": np.ones((3, 2))}, request.inputs)
    request.params["w"].CopyFrom(tensor(shape))
    yield "ForwardBackward: param tensor", stub.ForwardBackward, request
    request = pb.SetParametersRequest(session_id=sid)
    request.params["w"].CopyFrom(tensor(shape))
    yield "SetParameters: param tensor", stub.SetParameters, request
    request = pb.GradientCheckRequest(session_id=sid)
    request.inputs["x"].CopyFrom(tensor(shape, "int32"))
    yield "GradientCheck: input tensor", stub.GradientCheck, request
    request = pb.GradientCheckRequest(graph=small_graph(shape))
    yield "GradientCheck: inline graph", stub.GradientCheck, request


@pytest.mark.parametrize("shape", HUGE, ids=["2**32 x 2**32", "3 x 6148914691236517206"])
def test_shapes_that_overflow_int64_are_refused_never_internal(stub, shape: list[int]) -> None:
    assert math.prod(shape) >= 2**64 and int(np.prod(shape)) < 2**20  # numpy wraps: the bug
    seen = []
    for what, call, request in huge_requests(stub, shape):
        error = refused(call, request)
        assert error.code() in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), (what, error)
        seen.append(what)
    assert len(seen) == 10


def test_an_empty_array_numpy_cannot_shape_is_refused() -> None:
    """(0, 2**62) has no elements, but numpy refuses the shape; so does the codec, cleanly."""
    for shape, error in (([0, 2**62], codec.CodecError), ([0, 2**62], codec.TensorTooLarge), ([1] * 33, None)):
        with pytest.raises(codec.CodecError) as e:
            codec.from_tensor(tensor(shape), "t", max_elements=None if error is codec.CodecError else 100)
        if error is not None:
            assert type(e.value) is error
        else:
            assert "at most 32" in str(e.value)


def test_a_batch_of_0_rows_is_invalid_argument_and_an_empty_mean_is_nan_without_warnings() -> None:
    """The issue's 0-row batch is INVALID_ARGUMENT. A graph may declare empty values (ONNX
    models do); the mean of nothing is NaN, reported as a non-finite loss, with no numpy
    warning on the server's stderr."""
    g = mlp((2, 3), "float64")
    with gg.connect() as client, client.session(g) as sess, _no_warnings():
        with pytest.raises(gg.GradgateError) as e:
            sess.forward({"x": np.zeros((0, 2)), "y": np.zeros(0, np.int64)})
    assert e.value.code == Code.INVALID_ARGUMENT and "N must be > 0" in e.value.message
    # in a process of its own: pytest's warning capture would override the engine's filter
    code = ("import numpy as np, gradgate as gg\n"
            "from gradgate_server.engine import compile_graph, forward\n"
            "g = gg.Graph('float64')\n"
            "g.set_loss(gg.mean(g.input('x', (2, 0)) * g.param('w', (0,))))\n"
            "print(forward(compile_graph(g.to_proto()), {'x': np.zeros((2, 0))}, {'w': np.zeros(0)}).loss)\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "client"), str(root / "server")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "nan", result.stderr
    assert result.stderr == ""


class _no_warnings:
    def __enter__(self) -> None:
        import warnings
        self._catch = warnings.catch_warnings(record=True)
        self.log = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
        assert not [w for w in self.log if issubclass(w.category, RuntimeWarning)]


# -- gradient checks -----------------------------------------------------------------

def wide_param_graph(n: int) -> graph_pb2.Graph:
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float32", (-1, n))
    declare(g.params, "W", "float32", (n, n))
    node(g, "h", "matmul", "x", "W")
    g.loss = node(g, "loss", "sum", "h")
    return g


def test_full_gradient_check_of_a_4000x4000_parameter_is_refused_before_it_starts() -> None:
    """The issue's case: 16 M coordinates, 1.8 GB of index tuples before the first deadline check."""
    server = ServerProcess("--max-message-bytes", str(80 * 2**20))
    try:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 80 * 2**20)]) as ch:
            stub = pb_grpc.GradientServiceStub(ch)
            W = np.full((4000, 4000), 1e-3, np.float32)  # 64 MB
            sid = create(stub, wide_param_graph(4000), {"W": W})
            del W
            before = memory_of(server.proc.pid, "VmHWM")
            request = pb.GradientCheckRequest(session_id=sid,
                                              settings=gradcheck_pb2.GradCheckSettings(mode=gradcheck_pb2.GRAD_CHECK_MODE_FULL))
            codec.to_tensor_map({"x": np.ones((2, 4000), np.float32)}, request.inputs)
            start = time.perf_counter()
            error = refused(stub.GradientCheck, request, timeout=30)
            took = time.perf_counter() - start
            assert error.code() == Code.RESOURCE_EXHAUSTED and "this gradient check" in error.details()
            grown = memory_of(server.proc.pid, "VmHWM") - before
            assert grown < 50 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
            # a sparse check of the same parameter fits, and passes
            request.settings.mode = gradcheck_pb2.GRAD_CHECK_MODE_SPARSE
            result = stub.GradientCheck(request, timeout=60).result
            assert result.passed and result.tensors[0].coordinates_checked == 10
            print(f"\nfull check of 4000x4000 refused in {took * 1e3:.1f} ms, peak RSS +{grown / 2**20:.1f} MiB: "
                  f"{error.details()}")
    finally:
        server.close()


def test_gradient_check_stops_at_its_deadline_between_coordinates() -> None:
    """Unbounded by limits (the engine call), a full check of 16 M coordinates stops at its
    deadline within one coordinate, without first building its list of coordinates."""
    import tracemalloc
    plan = compile_graph(wide_param_graph(4000))
    W = np.full((4000, 4000), 1e-3, np.float32)
    x = np.ones((1, 4000), np.float32)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        gradient_check(plan, {"x": x}, {"W": W}, CheckSettings(mode="full"), deadline=time.monotonic() + 0.5)
    took = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the float64 copy of W, its gradient and one number per coordinate: 3 x 128 MB, no tuples
    assert peak < 520 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert took < 10, took  # the list of coordinates alone took longer than this
    with pytest.raises(ResourceExhausted, match="this gradient check"):
        gradient_check(plan, {"x": x}, {"W": W}, CheckSettings(mode="full"), limits=DEFAULTS.limits)


# -- the attack against a server process --------------------------------------

def test_outer_sum_attack_is_refused_before_allocating() -> None:
    """A 188 KB request that would build two (24000, 24000) float64 matrices (4.6 GB each)."""
    server = ServerProcess()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            sid = create(stub, outer_sum(), {"p": np.array(2.0)})
            x = np.random.default_rng(0).normal(size=(24000, 1))
            ok = pb.ForwardRequest(session_id=sid)
            codec.to_tensor_map({"x": x[:100]}, ok.inputs)
            stub.Forward(ok, timeout=10)  # warm: the server has run a forward
            before = memory_of(server.proc.pid, "VmHWM")
            timings = []
            for call, request in ((stub.Forward, pb.ForwardRequest(session_id=sid)),
                                  (stub.ForwardBackward, pb.ForwardBackwardRequest(session_id=sid)),
                                  (stub.GradientCheck, pb.GradientCheckRequest(session_id=sid))):
                codec.to_tensor_map({"x": x}, request.inputs)
                start = time.perf_counter()
                error = refused(call, request, timeout=10)
                timings.append(time.perf_counter() - start)
                assert error.code() == Code.RESOURCE_EXHAUSTED, error
                assert "node 'outer'" in error.details() and "576000000 elements" in error.details()
            after = memory_of(server.proc.pid, "VmHWM")
            assert after - before < 50 * 2**20, f"peak RSS grew from {before >> 20} to {after >> 20} MiB"
            assert stub.Forward(ok, timeout=10).loss == pytest.approx(2 * 2 * 100 * x[:100].sum())
            print(f"\nN=24000 outer sum refused in {', '.join(f'{t * 1e3:.1f}' for t in timings)} ms "
                  f"(Forward, ForwardBackward, GradientCheck); server peak RSS {before / 2**20:.1f} MiB before, "
                  f"{after / 2**20:.1f} MiB after")
    finally:
        server.close()


def test_training_on_the_server_is_bounded_the_same_way() -> None:
    """The outer-sum attack through UploadData and Train: 24000 rows of one float, one step
    over all of them, refused before the step allocates."""
    from gradgate.v1 import train_pb2
    g = gg.Graph("float64")
    x = g.input("x", (None, 1))
    g.set_loss(gg.sum((x + gg.transpose(x)) * g.param("p", ())))
    with gg.connect() as client, client.session(g, {"p": np.array(1.0)}) as sess:
        sess.upload({"x": np.ones((24000, 1))})
        start = train_pb2.TrainStart(session_id=sess.id, optimizer=gg.optim.SGD(0.1).to_proto(), epochs=1)
        call, metadata = client.stream("Train", sess.id)
        before = memory_of(os.getpid(), "VmHWM")
        with pytest.raises(grpc.RpcError) as e:
            list(call(iter([train_pb2.TrainRequest(start=start).SerializeToString()]), metadata=metadata, timeout=30))
        assert e.value.code() == Code.RESOURCE_EXHAUSTED and "node 'xT" not in e.value.details()
        assert "576000000 elements" in e.value.details() and "--max-tensor-elements" in e.value.details()
        assert memory_of(os.getpid(), "VmHWM") - before < 100 * 2**20


# -- windowed ops: the padded input, kernel positions, strides (probe findings 1, 6, 7) --------

def window_graph(op: str, attrs: dict, x_shape: tuple, weight: tuple | None,
                 dtype: str = "float64") -> graph_pb2.Graph:
    """loss = sum(op(x)) for conv2d with ``weight``'s shape, else sum(op(x) * w) with w of shape (1,)."""
    g = graph_pb2.Graph()
    declare(g.inputs, "x", dtype, x_shape)
    declare(g.params, "w", dtype, weight or (1,))
    if op == "conv2d":
        node(g, "c", op, "x", "w", **attrs)
    else:
        node(g, "pooled", op, "x", **attrs)
        node(g, "c", "mul", "pooled", "w")
    g.loss = node(g, "loss", "sum", "c")
    return g


def padded_graph(op: str, p: int, dtype: str = "float32") -> graph_pb2.Graph:
    """A 1x1 image padded by ``p`` on every side: the probe's bypass. conv2d and max_pool2d read
    it with a stride of ``p``, so the output is 3x3 and its centre is the image; avg_pool2d's
    padding must stay under its kernel, so it takes a (p+1)x(p+1) kernel."""
    attrs = {"conv2d": {"padding": p, "stride": p},
             "max_pool2d": {"kernel": 2, "dilation": p, "padding": p, "stride": p},
             "avg_pool2d": {"kernel": p + 1, "padding": p, "stride": p}}[op]
    return window_graph(op, attrs, (-1, 1, 1, 1), (1, 1, 1, 1) if op == "conv2d" else None, dtype)


@pytest.mark.parametrize("op", ["conv2d", "max_pool2d", "avg_pool2d"])
def test_estimate_counts_the_padded_input_of_windowed_ops(op: str) -> None:
    """Elements, cache bytes and FLOPs all see the (N, 1, 2p+1, 2p+1) padded input, though
    the output is tiny: np.pad builds it in the forward, and backward a gradient as large."""
    p, batch = 100, 3
    plan = compile_graph(padded_graph(op, p))
    cost = estimate(plan, batch)
    padded = batch * (2 * p + 1) ** 2
    step = [s.name for s in plan.steps].index("pooled" if op != "conv2d" else "c")
    assert cost.largest_intermediate == (padded, step, "padded input")
    assert cost.step_flops[step] >= padded
    assert cost.activation_bytes >= 4 * padded
    assert max(cost.elements) < 40 * batch  # no value is large: only the intermediate is


def test_padding_bypass_is_refused_before_allocating() -> None:
    """The probe's ~100-byte request: a (N, 1, 1, 1) input padded by 8000 built (N, 1, 16001, 16001)
    twice (4 GB of RSS at N=4, status OK). Now over the element limit it is RESOURCE_EXHAUSTED,
    at CreateSession (batch 1) or at the call's batch size, naming the node."""
    server = ServerProcess()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            for op in ("conv2d", "max_pool2d"):
                start = time.perf_counter()
                error = refused(stub.CreateSession, pb.CreateSessionRequest(graph=padded_graph(op, 8000)))
                assert time.perf_counter() - start < 5
                assert error.code() == Code.RESOURCE_EXHAUSTED, error
                name = "c" if op == "conv2d" else "pooled"
                assert f"node {name!r} ({op}) would build its padded input with 256032001 elements" \
                    in error.details() and "--max-tensor-elements" in error.details(), error.details()
            # padding 2000 fits at batch 1 (4001**2 = 16M elements) and computes the right thing
            sid = create(stub, padded_graph("conv2d", 2000), {"w": np.full((1, 1, 1, 1), 2, np.float32)})
            ok = pb.ForwardBackwardRequest(session_id=sid)
            codec.to_tensor_map({"x": np.full((1, 1, 1, 1), 3, np.float32)}, ok.inputs)
            reply = stub.ForwardBackward(ok, timeout=30)
            assert reply.loss == 6
            assert codec.from_tensor_map(reply.param_grads, "param_grads")["w"].ravel().tolist() == [3]
            before = memory_of(server.proc.pid, "VmHWM")
            # at batch 5 the padded input is 80M elements: refused before np.pad
            request = pb.ForwardBackwardRequest(session_id=sid)
            codec.to_tensor_map({"x": np.ones((5, 1, 1, 1), np.float32)}, request.inputs)
            start = time.perf_counter()
            error = refused(stub.ForwardBackward, request)
            took = time.perf_counter() - start
            assert error.code() == Code.RESOURCE_EXHAUSTED, error
            assert "node 'c' (conv2d) would build its padded input with 80040005 elements at batch size 5" \
                in error.details(), error.details()
            assert took < 5, took
            after = memory_of(server.proc.pid, "VmHWM")
            assert after - before < 50 * 2**20, f"peak RSS grew from {before >> 20} to {after >> 20} MiB"
    finally:
        server.close()


def test_each_kernel_position_costs_a_numpy_pass() -> None:
    """Max pooling and every windowed backward make one numpy pass per kernel position (~7 us each
    however small): a (1, 2**20) window over a 4 MB row took seconds per call at a few MFLOPs
    estimated. Each position now counts as PASS_FLOPS, so that one is over --max-flops."""
    from gradgate_server.engine.ops import PASS_FLOPS
    g = graph_pb2.Graph()
    declare(g.inputs, "x", "float32", (-1, 1, 1, 2**20))
    declare(g.params, "w", "float32", (1,))
    node(g, "pooled", "max_pool2d", "x", kernel=(1, 2**20))
    node(g, "scaled", "mul", "pooled", "w")
    g.loss = node(g, "loss", "sum", "scaled")
    plan = compile_graph(g)
    cost = estimate(plan, 1)
    assert cost.step_flops[0] >= PASS_FLOPS * 2**20
    with pytest.raises(ResourceExhausted, match="the costliest node is 'pooled' \\(max_pool2d"):
        DEFAULTS.limits.check(plan, cost, cost.forward_flops + cost.backward_flops)


def test_max_pool_over_more_than_32768_positions_is_exact() -> None:
    """A 200x200 window (40000 positions) was INTERNAL: its argmax did not fit the int16 it was kept in."""
    g = gg.Graph("float64")
    x = g.input("x", (None, 1, 200, 200))
    scale = g.param("scale", (1,))
    g.set_loss(gg.sum(gg.max_pool2d(x, kernel=200) * scale))
    x = np.random.default_rng(0).normal(size=(2, 1, 200, 200))
    x[1, 0, 199, 198] = 10.0  # the maximum at position 39998
    with serve("127.0.0.1:0") as srv, gg.connect(srv.address) as client, \
            client.session(g, {"scale": np.array([2.0])}) as sess:
        loss, grads = sess.forward_backward({"x": x})
    assert loss == pytest.approx(2 * (x[0].max() + 10.0))
    assert grads["scale"] == pytest.approx([x[0].max() + 10.0])


def test_max_pool_gradient_reaches_a_position_past_32767() -> None:
    from gradgate_server.engine import backward
    g = graph_pb2.Graph()
    declare(g.params, "x", "float64", (1, 1, 200, 200))
    node(g, "pooled", "max_pool2d", "x", kernel=200)
    g.loss = node(g, "loss", "sum", "pooled")
    plan = compile_graph(g)
    x = np.zeros((1, 1, 200, 200))
    x[0, 0, 199, 199] = 1.0  # position 39999
    grads = backward(plan, forward(plan, {}, {"x": x}), plan.params)
    assert grads["x"].sum() == 1 and grads["x"][0, 0, 199, 199] == 1


@pytest.mark.parametrize("op, attrs, weight", [
    ("conv2d", {"stride": 8}, (4, 3, 3, 3)),
    ("conv2d", {"stride": 2**62}, (4, 3, 3, 3)),
    ("conv2d", {"stride": (2**62, 9)}, (4, 3, 3, 3)),
    ("conv2d", {"dilation": 2**62}, (4, 3, 1, 1)),  # a 1x1 kernel fits whatever its dilation
    ("max_pool2d", {"kernel": 3, "stride": 8}, None),
    ("max_pool2d", {"kernel": 3, "stride": 2**62}, None),
    ("avg_pool2d", {"kernel": 3, "stride": (8, 8)}, None),
    ("avg_pool2d", {"kernel": 3, "stride": 2**63 - 1}, None),
])
def test_a_stride_past_the_padded_input_reads_one_window(stub, op, attrs, weight) -> None:
    """stride * row bytes once overflowed as_strided's int64 strides: INTERNAL. Any stride from the
    padded extent up reads the top left window alone, as in PyTorch; a 1x1 kernel's dilation changes nothing."""
    sid = create(stub, window_graph(op, attrs, (-1, 3, 8, 8), weight), {"w": np.ones(weight or (1,))})
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    request = pb.ForwardRequest(session_id=sid)
    codec.to_tensor_map({"x": x}, request.inputs)
    # the top left window; a 1x1 kernel at stride 1 reads every pixel, whatever its dilation
    window = x if "dilation" in attrs else x[:, :, :3, :3]
    expected = {"conv2d": 4 * window.sum(), "max_pool2d": window.max(axis=(2, 3)).sum(),
                "avg_pool2d": window.mean(axis=(2, 3)).sum()}[op]
    assert stub.Forward(request, timeout=10).loss == pytest.approx(expected)
