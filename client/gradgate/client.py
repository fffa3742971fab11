"""Client: one gRPC channel to a gradgate server, with deadlines and retries."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from gradgate.errors import from_rpc_error
from gradgate.graph import Graph
from gradgate.memory import tune_malloc
from gradgate.params import init_params
from gradgate.session import Session
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc

# UNAVAILABLE means the call never reached a server (connection refused or reset),
# so even ForwardBackward is safe to retry.
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "gradgate.v1.GradientService"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


@dataclass(frozen=True)
class OpInfo:
    """One registry op: its input names, attributes (name -> default as text, "" = required), a doc line."""

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, str]
    doc: str


def connect(address: str | None = None, *, timeout: float = 30.0, max_message_bytes: int = 64 * 2**20,
            recover_sessions: bool = True) -> Client:
    """Connect to a server at ``address``, or start an embedded one on a free local port.

    ``recover_sessions``: re-create a session the server no longer knows (restarted,
    expired, another replica) from the parameters last sent, instead of raising NOT_FOUND.
    """
    tune_malloc()  # tensors of a megabyte or more: see gradgate.memory
    server = None
    if address is None:
        from gradgate_server import Config, serve  # the only place the SDK touches the server package

        server = serve("127.0.0.1:0", Config(max_message_bytes=max_message_bytes))
        address = server.address
    return Client(address, timeout=timeout, max_message_bytes=max_message_bytes, server=server,
                  recover_sessions=recover_sessions)


class Client:
    """One channel shared by every session; each call gets a ``timeout``-second deadline."""

    def __init__(self, address: str, *, timeout: float = 30.0, max_message_bytes: int = 64 * 2**20,
                 server: Any = None, recover_sessions: bool = True):
        self.address, self.timeout, self.recover_sessions = address, timeout, recover_sessions
        self._server = server  # an embedded server, stopped with the client
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", _SERVICE_CONFIG),
        ])
        self._stub = gradient_service_pb2_grpc.GradientServiceStub(self._channel)

    def call(self, method: str, request: Message, session_id: str = "") -> Any:
        """Run one RPC by name; ``session_id`` goes into ``x-session-id`` metadata for sticky routing."""
        metadata = [("x-session-id", session_id)] if session_id else None
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def session(self, graph: Graph, params: Mapping[str, np.ndarray] | None = None) -> Session:
        """Open a session on ``graph``; without ``params``, ``init_params(graph)``."""
        return Session(self, graph, init_params(graph) if params is None else params)

    def list_ops(self) -> list[OpInfo]:
        response = self.call("ListOps", pb.ListOpsRequest())
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
