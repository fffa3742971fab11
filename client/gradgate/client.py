"""Client: one gRPC channel to a gradgate server, with deadlines and retries."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import Message

from gradgate.codec import decode, encode
from gradgate.errors import from_rpc_error
from gradgate.graph import Graph
from gradgate.memory import tune_malloc
from gradgate.params import init_params
from gradgate.security import TLS, secure_channel
from gradgate.session import Session
from gradgate.v1 import gradient_service_pb2 as pb

# UNAVAILABLE means the call never reached a server (connection refused or reset),
# so even ForwardBackward is safe to retry.
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "gradgate.v1.GradientService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


_SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
# method name -> (full path, response type); requests and responses cross grpc as bytes (gradgate.codec)
_METHODS = {m.name: (f"/{_SERVICE.full_name}/{m.name}", message_factory.GetMessageClass(m.output_type))
            for m in _SERVICE.methods}
Reply = tuple[Any, dict[str, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class OpInfo:
    """One registry op: its input names, attributes (name -> default as text, "" = required), a doc line."""

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, str]
    doc: str


def connect(address: str | None = None, *, timeout: float = 30.0, max_message_bytes: int = 64 * 2**20,
            recover_sessions: bool = True, retry_seconds: float = 10.0, token: str | None = None,
            tls: TLS | bool | None = None) -> Client:
    """Connect to a server at ``address``, or start an embedded one on a free local port.

    ``recover_sessions``: re-create a session the server no longer knows (restarted,
    expired, another replica) from the parameters last sent, instead of raising NOT_FOUND.
    ``retry_seconds``: how long to wait for an unreachable server to come back (a restart)
    before giving up. ``token``: a bearer token sent with every call; ``tls``:
    ``gg.TLS(ca, cert, key)``, or True for the system's root certificates (gradgate.security).
    """
    server = None
    if address is None:
        from gradgate_server import Config, serve  # the only place the SDK touches the server package

        server = serve("127.0.0.1:0", Config(max_message_bytes=max_message_bytes))
        address = server.address
    return Client(address, timeout=timeout, max_message_bytes=max_message_bytes, server=server,
                  recover_sessions=recover_sessions, retry_seconds=retry_seconds, token=token, tls=tls)


class Client:
    """One channel shared by every session; each call gets a ``timeout``-second deadline."""

    def __init__(self, address: str, *, timeout: float = 30.0, max_message_bytes: int = 64 * 2**20,
                 server: Any = None, recover_sessions: bool = True, retry_seconds: float = 10.0,
                 token: str | None = None, tls: TLS | bool | None = None):
        tune_malloc()  # tensors of a megabyte or more: see gradgate.memory
        self.address, self.timeout, self.recover_sessions = address, timeout, recover_sessions
        self.max_message_bytes, self.retry_seconds = max_message_bytes, retry_seconds
        self._server = server  # an embedded server, stopped with the client
        self._channel = secure_channel(address, [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", _SERVICE_CONFIG),
        ], tls, token)
        self._unary = {name: self._channel.unary_unary(path, _registered_method=True)
                       for name, (path, _) in _METHODS.items()}

    def call(self, method: str, request: Message, session_id: str = "", wait_for_ready: bool | None = None,
             **arrays: Mapping[str, Any] | None) -> Reply:
        """Run one unary RPC by name: ``request`` with its tensor maps given as ``arrays``
        (``inputs={"x": x}``); returns the response without its tensor maps, and those
        maps as read-only arrays. ``session_id`` goes into ``x-session-id`` metadata for
        sticky routing."""
        metadata = (("x-session-id", session_id),) if session_id else None
        try:
            data = self._unary[method](encode(request, **arrays), timeout=self.timeout, metadata=metadata,
                                       wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return decode(data, _METHODS[method][1])

    def stream(self, method: str, session_id: str = "", timeout: float | None = None) -> Any:
        """The raw multi-callable of a streaming RPC (requests and responses as bytes), and its metadata."""
        path, _ = _METHODS[method]
        streaming = _SERVICE.methods_by_name[method].server_streaming
        make = self._channel.stream_stream if streaming else self._channel.stream_unary
        return make(path, _registered_method=True), ((("x-session-id", session_id),) if session_id else None)

    def session(self, graph: Graph, params: Mapping[str, np.ndarray] | None = None,
                buffers: Mapping[str, np.ndarray] | None = None) -> Session:
        """Open a session on ``graph``; without ``params``, ``init_params(graph)``. ``buffers``:
        initial state buffers (e.g. batchnorm statistics from an ONNX import); missing ones
        take their op's default."""
        return Session(self, graph, init_params(graph) if params is None else params, buffers)

    def list_ops(self) -> list[OpInfo]:
        response, _ = self.call("ListOps", pb.ListOpsRequest())
        return [OpInfo(op.name, tuple(op.inputs), dict(op.attrs), op.doc) for op in response.ops]

    def close(self) -> None:
        self._channel.close()
        if self._server is not None:
            self._server.stop(None)
            self._server = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
