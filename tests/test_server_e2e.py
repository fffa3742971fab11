"""The server over real gRPC on 127.0.0.1, with raw stubs: statuses, messages, state."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate.v1 import graph_pb2
from gradgate_server import Config, serve

from graphs import node
from test_engine import mlp

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server() -> Iterator:
    with serve("127.0.0.1:0", Config(max_nodes=50, max_sessions=20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.GradientServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def create(stub, graph=None, params=None) -> str:
    request = pb.CreateSessionRequest(graph=graph or mlp())
    codec.to_tensor_map(params if params is not None else {"W": np.ones((2, 3)), "b": np.zeros(3)}, request.params)
    return stub.CreateSession(request, timeout=10).session_id


def batch(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"x": rng.normal(size=(n, 2)), "y": rng.integers(0, 3, n)}


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=10)
    return e.value


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(error).details[0].Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


def forward_request(sid: str, data: dict, **kw) -> pb.ForwardRequest:
    request = pb.ForwardRequest(session_id=sid, **kw)
    codec.to_tensor_map(data, request.inputs)
    return request


def test_forward_backward_matches_numpy(stub) -> None:
    W = np.random.default_rng(7).normal(size=(2, 3))
    sid = create(stub, params={"W": W, "b": np.zeros(3)})
    data = batch()
    response = stub.Forward(forward_request(sid, data, outputs=["scores"]), timeout=10)
    scores = data["x"] @ W
    np.testing.assert_allclose(codec.from_tensor(response.outputs["scores"]), scores)
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert response.loss == pytest.approx(-np.log(probs[np.arange(4), data["y"]]).mean(), rel=1e-12)
    grads = stub.Backward(pb.BackwardRequest(session_id=sid, input_grads=True), timeout=10)
    dscores = probs.copy()
    dscores[np.arange(4), data["y"]] -= 1
    dscores /= 4
    np.testing.assert_allclose(codec.from_tensor(grads.param_grads["W"]), data["x"].T @ dscores, rtol=1e-12)
    np.testing.assert_allclose(codec.from_tensor(grads.param_grads["b"]), dscores.sum(0), rtol=1e-12)
    np.testing.assert_allclose(codec.from_tensor(grads.input_grads["x"]), dscores @ W.T, rtol=1e-12)
    assert set(grads.input_grads) == {"x"}  # integer labels have no gradient


@pytest.mark.parametrize("mutate, field", [
    (lambda g: setattr(g.nodes[0], "op", "nope"), "graph.nodes[0].op"),
    (lambda g: g.nodes[0].inputs.append("b"), "graph.nodes[0].inputs"),
    (lambda g: g.nodes[1].inputs.__setitem__(1, "ghost"), "graph.nodes[1].inputs[1]"),
    (lambda g: setattr(g.nodes[1], "name", "xw"), "graph.nodes[1].name"),
    (lambda g: g.nodes[0].inputs.__setitem__(0, "loss"), "graph.nodes[0]"),  # a cycle
    (lambda g: setattr(g, "loss", "scores"), "graph.loss"),
    (lambda g: setattr(g.inputs[1], "dtype", 2), "graph.nodes[2].inputs[1]"),
    (lambda g: g.params[1].shape.__setitem__(0, 4), "graph.nodes[1]"),
])
def test_invalid_graph_is_invalid_argument_with_field_violation(stub, mutate, field: str) -> None:
    g = mlp()
    mutate(g)
    error = rpc_error(stub.CreateSession, pb.CreateSessionRequest(graph=g))
    assert error.code() == Code.INVALID_ARGUMENT
    assert violations(error)[0][0] == field
    assert "Traceback" not in error.details()


def test_bad_parameters_are_named(stub) -> None:
    request = pb.CreateSessionRequest(graph=mlp())
    codec.to_tensor_map({"W": np.ones((2, 3))}, request.params)
    error = rpc_error(stub.CreateSession, request)
    assert error.code() == Code.INVALID_ARGUMENT and "missing parameter(s) ['b']" in error.details()
    codec.to_tensor_map({"b": np.zeros(3, np.float32)}, request.params)
    error = rpc_error(stub.CreateSession, request)
    assert "parameter 'b' must be float64 (3,), got float32 (3,)" in error.details()


def test_wrong_shape_batch(stub) -> None:
    sid = create(stub)
    error = rpc_error(stub.Forward, forward_request(sid, {**batch(), "x": np.ones((4, 5))}))
    assert error.code() == Code.INVALID_ARGUMENT
    assert violations(error)[0][0] == "inputs['x']" and "(N, 2)" in error.details()


def test_garbage_tensor_bytes(stub) -> None:
    sid = create(stub)
    request = forward_request(sid, batch())
    request.inputs["x"].data = b"\x00garbage"
    error = rpc_error(stub.Forward, request)
    assert error.code() == Code.INVALID_ARGUMENT
    assert violations(error)[0][0] == "inputs['x'].data"
    assert "has 8 bytes, but shape [4, 2] of float64 needs 64" in error.details()
    request.inputs["x"].dtype = 99
    assert "unknown dtype enum 99" in rpc_error(stub.Forward, request).details()


def test_a_body_that_is_not_protobuf_is_invalid_argument(server, stub) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/gradgate.v1.GradientService/Forward")
        error = rpc_error(call, b"\xff\xff\xff not protobuf")
    assert error.code() == Code.INVALID_ARGUMENT
    assert "is not a valid gradgate.v1.ForwardRequest message" in error.details()
    create(stub)  # and the server keeps serving


def test_unknown_session_is_not_found(stub) -> None:
    error = rpc_error(stub.Backward, pb.BackwardRequest(session_id="0" * 32))
    assert error.code() == Code.NOT_FOUND and "not found" in error.details()


def test_backward_before_forward_is_failed_precondition(stub) -> None:
    sid = create(stub)
    error = rpc_error(stub.Backward, pb.BackwardRequest(session_id=sid))
    assert error.code() == Code.FAILED_PRECONDITION and "call Forward first" in error.details()


def test_set_parameters_drops_the_cached_forward(stub) -> None:
    sid = create(stub)
    stub.Forward(forward_request(sid, batch()), timeout=10)
    request = pb.SetParametersRequest(session_id=sid)
    codec.to_tensor_map({"b": np.ones(3)}, request.params)
    stub.SetParameters(request, timeout=10)
    error = rpc_error(stub.Backward, pb.BackwardRequest(session_id=sid))
    assert error.code() == Code.FAILED_PRECONDITION
    got = stub.GetParameters(pb.GetParametersRequest(session_id=sid), timeout=10)
    np.testing.assert_array_equal(codec.from_tensor(got.params["b"]), np.ones(3))
    np.testing.assert_array_equal(codec.from_tensor(got.params["W"]), np.ones((2, 3)))


def test_failed_forward_keeps_state(stub) -> None:
    """A bad batch in a ForwardBackward that also sets params changes nothing."""
    sid = create(stub)
    stub.Forward(forward_request(sid, batch()), timeout=10)
    request = pb.ForwardBackwardRequest(session_id=sid)
    codec.to_tensor_map({"W": np.full((2, 3), 7.0)}, request.params)
    codec.to_tensor_map({**batch(), "y": np.array([0, 1, 2, 9])}, request.inputs)
    assert rpc_error(stub.ForwardBackward, request).code() == Code.INVALID_ARGUMENT
    got = stub.GetParameters(pb.GetParametersRequest(session_id=sid, names=["W"]), timeout=10)
    np.testing.assert_array_equal(codec.from_tensor(got.params["W"]), np.ones((2, 3)))
    stub.Backward(pb.BackwardRequest(session_id=sid), timeout=10)  # the earlier forward is still cached


def test_closed_session_is_gone(stub) -> None:
    sid = create(stub)
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
    assert rpc_error(stub.Forward, forward_request(sid, batch())).code() == Code.NOT_FOUND
    assert rpc_error(stub.CloseSession, pb.CloseSessionRequest(session_id=sid)).code() == Code.NOT_FOUND


def test_limits_are_resource_exhausted(stub, server) -> None:
    g = mlp()
    for i in range(60):
        node(g, f"extra{i}", "exp", "loss")
    error = rpc_error(stub.CreateSession, pb.CreateSessionRequest(graph=g))
    assert error.code() == Code.RESOURCE_EXHAUSTED and "limit is 50" in error.details()
    sids = []
    try:
        while len(server.store) < server.config.max_sessions:
            sids.append(create(stub))
        request = pb.CreateSessionRequest(graph=mlp())
        codec.to_tensor_map({"W": np.ones((2, 3)), "b": np.zeros(3)}, request.params)
        assert rpc_error(stub.CreateSession, request).code() == Code.RESOURCE_EXHAUSTED
    finally:
        for sid in sids:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)


def test_message_and_tensor_size_limits() -> None:
    with serve("127.0.0.1:0", Config(max_message_bytes=4096, max_tensor_elements=100)) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = create(stub)
        error = rpc_error(stub.Forward, forward_request(sid, batch(60)))  # 120 elements in x
        assert error.code() == Code.RESOURCE_EXHAUSTED and "has 120 elements; the limit is 100" in error.details()
        error = rpc_error(stub.Forward, forward_request(sid, batch(400)))  # > 4 KiB message
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert stub.Forward(forward_request(sid, batch(10)), timeout=10).loss > 0


def test_running_out_of_memory_is_resource_exhausted(stub) -> None:
    """x.T @ x for 5 Mi values of x needs 200 TiB, more than a 64-bit process can even
    address (128 TiB): refused before it runs by the element limit, and with every limit
    lifted numpy raises MemoryError whatever the overcommit policy."""
    from test_engine import declare

    g = graph_pb2.Graph()
    declare(g.inputs, "x", shape=(1, -1))
    node(g, "xT", "transpose", "x")
    node(g, "outer", "matmul", "xT", "x")
    g.loss = node(g, "loss", "sum", "outer")
    sid = create(stub, graph=g, params={})
    error = rpc_error(stub.Forward, forward_request(sid, {"x": np.ones((1, 5 * 2**20))}))
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "node 'outer'" in error.details() and "--max-tensor-elements" in error.details()
    unlimited = Config(max_tensor_elements=2**62, cache_bytes=2**62, max_flops=2**62)
    with serve("127.0.0.1:0", unlimited) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = create(stub, graph=g, params={})
        error = rpc_error(stub.Forward, forward_request(sid, {"x": np.ones((1, 5 * 2**20))}))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "out of memory" in error.details()


def test_server_keeps_serving_after_errors(stub) -> None:
    for _ in range(3):
        rpc_error(stub.Backward, pb.BackwardRequest(session_id="nope"))
    sid = create(stub)
    assert stub.Forward(forward_request(sid, batch()), timeout=10).loss > 0


def test_list_ops_describes_the_registry(stub) -> None:
    ops = {op.name: op for op in stub.ListOps(pb.ListOpsRequest(), timeout=10).ops}
    assert ops["svm_loss"].inputs == ["scores", "labels"] and ops["svm_loss"].attrs["margin"] == "1.0"
    assert ops["reshape"].attrs["shape"] == ""  # required
    assert all(op.doc for op in ops.values())


def test_concurrent_sessions_get_their_own_results(stub) -> None:
    """8 threads, each with its own session and parameters, 20 steps each."""
    errors: list[str] = []

    def worker(k: int) -> None:
        W = np.full((2, 3), float(k))
        sid = create(stub, params={"W": W, "b": np.zeros(3)})
        data = batch(3 + k)
        for _ in range(20):
            r = stub.Forward(forward_request(sid, data, outputs=["scores"]), timeout=10)
            if not np.allclose(codec.from_tensor(r.outputs["scores"]), data["x"] @ W):
                errors.append(f"session {k} got another session's result")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_calls_on_one_session_are_serialized(stub) -> None:
    """8 threads share one session, each pushing its own W with every step: each loss
    must be the loss of the W that call sent, never another thread's."""
    sid = create(stub)
    data = batch(6)
    errors: list[str] = []

    def expected_loss(W: np.ndarray) -> float:
        scores = data["x"] @ W
        probs = np.exp(scores - scores.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        return float(-np.log(probs[np.arange(6), data["y"]]).mean())

    def worker(k: int) -> None:
        W = np.random.default_rng(k).normal(size=(2, 3))
        for _ in range(15):
            request = pb.ForwardBackwardRequest(session_id=sid)
            codec.to_tensor_map(data, request.inputs)
            codec.to_tensor_map({"W": W}, request.params)
            loss = stub.ForwardBackward(request, timeout=10).loss
            if abs(loss - expected_loss(W)) > 1e-12:
                errors.append(f"thread {k}: loss {loss} is not the loss of its own parameters")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_idle_sessions_expire_after_the_ttl() -> None:
    with serve("127.0.0.1:0", Config(session_ttl_seconds=0.2)) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        sid = create(stub)
        threading.Event().wait(1.5)
        create(stub)  # any call sweeps
        assert rpc_error(stub.Forward, forward_request(sid, batch())).code() == Code.NOT_FOUND


def test_cache_budget_evicts_least_recently_used_activations() -> None:
    with serve("127.0.0.1:0", Config(cache_bytes=3000)) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        first, second = create(stub), create(stub)
        stub.Forward(forward_request(first, batch(20)), timeout=10)
        stub.Forward(forward_request(second, batch(20)), timeout=10)  # pushes the first out
        error = rpc_error(stub.Backward, pb.BackwardRequest(session_id=first))
        assert error.code() == Code.FAILED_PRECONDITION and "evicted" in error.details()
        stub.Backward(pb.BackwardRequest(session_id=second), timeout=10)
        assert srv.store.cache_bytes <= 3000
        error = rpc_error(stub.Forward, forward_request(first, batch(500)))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "cache budget" in error.details()
