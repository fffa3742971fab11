"""Text a client sends comes back and goes into logs safely (issue 9, point 8): error
messages echo names bounded, log lines escape control characters, an empty session id
is a clear INVALID_ARGUMENT."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest

from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import serve
from gradgate_server.errors import MAX_MESSAGE, bounded

from test_engine import mlp
from test_server_e2e import batch, create, forward_request, violations

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.GradientServiceStub]:
    with serve("127.0.0.1:0") as srv, grpc.insecure_channel(srv.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def error_of(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=10)
    return e.value


@pytest.mark.parametrize("char", ["a", "é", "😀"])
def test_a_10000_character_name_gives_a_clean_invalid_argument(stub, char: str) -> None:
    """Unbounded, the name would be echoed three times in the trailers and the client
    would fail with its own RESOURCE_EXHAUSTED: metadata size exceeds hard limit."""
    g = mlp()
    g.nodes[0].name = char * 10_000
    g.nodes[0].op = "bogus"
    error = error_of(stub.CreateSession, pb.CreateSessionRequest(graph=g))
    assert error.code() == Code.INVALID_ARGUMENT, error
    message = error.details()
    assert len(message.encode()) <= MAX_MESSAGE
    assert message.startswith("node '" + char * 5) and "unknown op 'bogus'; known ops: abs, add, affine," in message
    assert "bytes cut)" in message
    [(field, description)] = violations(error)
    assert field == "graph.nodes[0].op" and "unknown op 'bogus'" in description


def test_many_long_names_are_bounded_too(stub) -> None:
    sid = create(stub)
    names = [f"{i:04d}" + "x" * 60 for i in range(2000)]  # 128 KB of unknown output names
    error = error_of(stub.Forward, forward_request(sid, batch(), outputs=names))
    assert error.code() == Code.INVALID_ARGUMENT
    assert len(error.details().encode()) <= MAX_MESSAGE and error.details().startswith("unknown output(s) ['0000x")
    error = error_of(stub.GetParameters, pb.GetParametersRequest(session_id=sid, names=["n" * 10_000]))
    assert error.code() == Code.INVALID_ARGUMENT and len(error.details()) < 600


def test_bounded_keeps_short_texts_and_cuts_long_words_in_the_middle() -> None:
    assert bounded("node 'x' (add): shapes (2,) and (3,) do not broadcast", 100) == \
        "node 'x' (add): shapes (2,) and (3,) do not broadcast"
    cut = bounded("node '" + "a" * 500 + "b' (add): bad", 1000)
    assert cut.startswith("node 'aaa") and cut.endswith("ab' (add): bad") and len(cut) < 150


def test_a_session_id_with_a_newline_cannot_forge_a_log_line(stub, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gradgate_server.rpc")
    forged = "abc\n2026-01-01 INFO gradgate_server.rpc method=/x code=OK"
    error = error_of(stub.GetParameters, pb.GetParametersRequest(session_id=forged))
    assert error.code() == Code.NOT_FOUND
    [line] = [r.getMessage() for r in caplog.records if "GetParameters" in r.getMessage()]
    assert "\n" not in line and "session=abc\\n2026" in line


def test_an_empty_session_id_is_invalid_argument(stub) -> None:
    for call, request in ((stub.Forward, forward_request("", batch())), (stub.Backward, pb.BackwardRequest()),
                          (stub.ForwardBackward, pb.ForwardBackwardRequest()),
                          (stub.SetParameters, pb.SetParametersRequest()),
                          (stub.GetParameters, pb.GetParametersRequest()),
                          (stub.CloseSession, pb.CloseSessionRequest()),
                          (stub.GradientCheck, pb.GradientCheckRequest(session_id=""))):
        error = error_of(call, request)
        assert error.code() == Code.INVALID_ARGUMENT, (call, error)
        assert "session_id is empty" in error.details() and violations(error)[0][0] == "session_id"
