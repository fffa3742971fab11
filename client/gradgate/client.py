"""Client: one gRPC channel to one gradgate server or to many replicas, with deadlines and retries.

Several replicas (a list of addresses, or a ``dns:`` name with several records) share
one channel with gRPC's ``ring_hash`` load balancing keyed on the ``x-session-id``
header (gRFC A76): every call of a session carries the session's routing key, so it
lands on the replica that holds the session's activations, and when a replica goes
away only the sessions it held move (their next call finds them missing and the
Session re-creates itself there). DESIGN.md, Scale-out.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import Message

from gradgate.call_stream import CallStream
from gradgate.codec import decode, encode
from gradgate.errors import GradgateError, from_rpc_error
from gradgate.graph import Graph
from gradgate.memory import tune_malloc
from gradgate.params import init_params
from gradgate.security import TLS, bearer, on_this_host, secure_channel
from gradgate.session import Session
from gradgate.transport import DirectStream, Method, ThreadedStream, open_stream, unary
from gradgate.v1 import gradient_service_pb2 as pb

if TYPE_CHECKING:
    from gradgate.sharded import ShardedSession

KEEPALIVE_MS = 2000  # a PING's interval; gradgate servers allow twice as many (gradgate_server.app)
_SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
SERVICE = _SERVICE.full_name
# method name -> (full path, response type); requests and responses cross grpc as bytes (gradgate.codec)
_METHODS = {m.name: (f"/{_SERVICE.full_name}/{m.name}", message_factory.GetMessageClass(m.output_type))
            for m in _SERVICE.methods}
Reply = tuple[Any, dict[str, dict[str, np.ndarray]]]
Arrays = Mapping[str, np.ndarray]
ROUTING_HEADER = "x-session-id"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRY_SECONDS = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
# grpcio (C-core) ignores ring_hash's "requestHashHeader" unless this is true when the
# service config is parsed, which is when the channel is created (ring_hash.cc,
# XdsRingHashSetRequestHashKeyEnabled). Once grpcio drops the flag the field is always
# read, and the variable is ignored.
RING_HASH_FLAG = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class OpInfo:
    """One registry op: its input names, attributes (name -> default as text, "" = required), a doc line."""

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, str]
    doc: str


def connect(address: str | Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT,
            retry_seconds: float = DEFAULT_RETRY_SECONDS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
            recover_sessions: bool = True, token: str | None = None,
            tls: TLS | bool | None = None, call_streams: bool = True, shared_memory: bool = True) -> Client:
    """Connect to a server, to several replicas, or start an embedded server on a free local port.

    ``address``: ``"host:port"`` (one server, or a proxy such as nginx in front of replicas);
    a list of them or one comma-separated string (replicas, balanced by the SDK: sessions stick
    to one replica); a gRPC URI such as ``"dns:///gradgate.ns.svc:50051"`` (every address the
    name resolves to, e.g. a Kubernetes headless Service, balanced the same way); None (an
    embedded server). ``timeout``: seconds allowed for each call. ``retry_seconds``: how long a
    call that cannot reach a server (restarting, stopping, gone) keeps being re-sent before it
    fails with UNAVAILABLE (at most half of ``timeout``), and an upload or Train the server has
    no stream thread for is tried again before it fails with RESOURCE_EXHAUSTED; 0 turns
    retries off.
    ``recover_sessions``: re-create a session the server no longer knows (restarted, expired,
    another replica) from the parameters last sent, instead of raising NOT_FOUND. ``token``: a
    bearer token sent with every call; ``tls``: ``gg.TLS(ca, cert, key)``, or True for the
    system's root certificates (gradgate.security). ``call_streams``: send each session's
    calls (forward, backward, forward_backward, set_params, get_params) over one stream, a
    quarter of a millisecond faster per call
    (gradgate.call_stream); False sends every call unary. ``shared_memory``: with a server on
    this host, running as the same user, copy a stream's calls and answers through memory both
    processes map, announced through pipes, instead of gRPC's transport
    (gradgate.shared_memory); False keeps them on the stream.
    """
    server = None
    if address is None:
        from gradgate_server import Config, serve  # the only place the SDK touches the server package

        server = serve("127.0.0.1:0", Config(max_message_bytes=max_message_bytes))
        address = server.address
    return Client(address, timeout=timeout, retry_seconds=retry_seconds, max_message_bytes=max_message_bytes,
                  server=server, recover_sessions=recover_sessions, token=token, tls=tls,
                  call_streams=call_streams, shared_memory=shared_memory)


def channel_target(address: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for ``address`` and whether it names several replicas to balance over.

    A list of host:port becomes one ``ipv4:``/``ipv6:`` URI, gRPC's resolver for a fixed set
    of addresses (host names are resolved once, here); ``dns:``, ``ipv4:`` and ``ipv6:`` URIs
    are balanced as given; a single host:port is a plain channel.
    """
    addresses = [a.strip() for a in address.split(",")] if isinstance(address, str) else list(address)
    if not addresses or not all(addresses):
        raise ValueError(f"no server address in {address!r}")
    if len(addresses) == 1:
        return addresses[0], addresses[0].startswith(_URI_SCHEMES)
    resolved = [_resolve(a) for a in addresses]
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(family in r for r in resolved):
            endpoints = dict.fromkeys(r[family] for r in resolved)  # one endpoint per server, in order
            return f"{scheme}:{','.join(endpoints)}", True
    raise ValueError(f"the servers {addresses} do not all have IPv4 or all IPv6 addresses; "
                     "give IP addresses of one family or a dns:/// name")


def _resolve(address: str) -> dict[int, str]:
    """host:port -> {address family: "ip:port" (IPv6 in brackets)} for its first address of each family."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"server address {address!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve server {address!r}: {e.strerror}") from None
    found: dict[int, str] = {}
    for family, _, _, _, sockaddr in infos:
        ip = str(ipaddress.ip_address(sockaddr[0]))
        found.setdefault(family, f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return found


def service_config(balanced: bool, retry_seconds: float) -> str:
    """The channel's service config: ring_hash on the routing header, and gRPC's retry policy.

    UNAVAILABLE means the call was not answered by a live server (connection refused or reset,
    a replica stopping), so every call is safe to re-send: a replica that lost the session
    answers NOT_FOUND and the Session re-creates it. gRPC allows 5 attempts; the 4 backoffs
    b, 2b, 4b, 8b (+-20% jitter) add up to ``retry_seconds``.
    """
    config: dict[str, Any] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"ring_hash_experimental": {"requestHashHeader": ROUTING_HEADER}}]
    if retry_seconds > 0:
        first = retry_seconds / 15
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": f"{first:.6f}s", "maxBackoff": f"{8 * first:.6f}s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return json.dumps(config)


class Client:
    """One channel shared by every session; each call gets a ``timeout``-second deadline."""

    def __init__(self, address: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 server: Any = None, recover_sessions: bool = True, token: str | None = None,
                 tls: TLS | bool | None = None, call_streams: bool = True, shared_memory: bool = True):
        tune_malloc()  # tensors of a megabyte or more: see gradgate.memory
        if timeout <= 0 or retry_seconds < 0:
            raise ValueError(f"timeout must be > 0 and retry_seconds >= 0, got {timeout} and {retry_seconds}")
        target, self.balanced = channel_target(address)
        self.address = address if isinstance(address, str) else ",".join(address)
        self.timeout, self.retry_seconds, self.recover_sessions = timeout, retry_seconds, recover_sessions
        self.call_streams, self.shared_memory = call_streams, shared_memory
        self._server = server  # an embedded server, stopped with the client
        if self.balanced:
            os.environ[RING_HASH_FLAG] = "true"  # before the channel parses its service config
        self._channel = secure_channel(target, [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # retries stop in time for the call to fail with UNAVAILABLE (and why) before its deadline
            ("grpc.service_config", service_config(self.balanced, min(retry_seconds, timeout / 2))),
            ("grpc.service_config_disable_resolution", 1),  # ours, not one from a DNS TXT record
            # gRPC keeps a request for re-sending only up to this size (default 256 KiB)
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            # reconnect to a restarted replica within about a second
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # a PING every 2 s while calls are open (servers allow one a second): a dead connection
            # fails its calls within keepalive_timeout, and nginx 1.22, which holds the reset of a
            # stream whose replica died until its client's connection stirs, sends it then
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
        ], tls, token)
        self.max_message_bytes = max_message_bytes
        self.closed = False
        self._bearer = bearer(token)
        self._methods = {name: Method(self._channel, path) for name, (path, _) in _METHODS.items()}

    @functools.cached_property
    def on_this_host(self) -> bool:
        """Whether every server this client talks to is on this host (gradgate.shared_memory)."""
        return on_this_host(self.address)

    def call(self, method: str, request: Message, session_key: str = "", wait_for_ready: bool | None = None,
             stream: CallStream | None = None, deadline: float | None = None,
             **arrays: Mapping[str, Any] | None) -> Reply:
        """Run one unary RPC by name: ``request`` with its tensor maps given as ``arrays``
        (``inputs={"x": x}``); returns the response without its tensor maps, and those
        maps as read-only arrays. ``session_key`` goes into the ``x-session-id`` header that
        routes the call to its session's replica. ``stream``: send it there if it can carry it.
        ``deadline`` (time.monotonic's clock): when it must be answered, by default ``timeout``
        seconds from now (one for the call, whichever way it goes)."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        try:
            got = stream.call(method, request, arrays, deadline) if stream is not None else None
            if got is not None:
                return got
            answer = unary(self._methods[method], encode(request, **arrays),
                           max(deadline - time.monotonic(), 0.001), self._metadata(session_key), wait_for_ready)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!"
            if self.closed:
                raise self._closed(method) from None
            raise
        return decode(answer, _METHODS[method][1])

    def stream(self, method: str, session_key: str = "") -> Any:
        """grpcio's raw multi-callable of a streaming RPC (requests and responses as bytes),
        and its metadata: for a caller that drives the stream's messages itself."""
        path, _ = _METHODS[method]
        streaming = _SERVICE.methods_by_name[method].server_streaming
        make = self._channel.stream_stream if streaming else self._channel.stream_unary
        return make(path, _registered_method=True), self._metadata(session_key)

    def open_stream(self, method: str, session_key: str = "",
                    timeout: float | None = None) -> DirectStream | ThreadedStream:
        """A stream of raw bytes to ``method`` (gradgate.transport), routed by ``session_key``,
        within ``timeout`` seconds (None: no deadline)."""
        if self.closed:  # grpc would raise a bare ValueError: Cannot invoke RPC on closed channel!
            raise self._closed(method)
        return open_stream(self._methods[method], self._metadata(session_key), timeout)

    @staticmethod
    def _closed(method: str) -> GradgateError:
        return GradgateError(grpc.StatusCode.CANCELLED, f"{method}: this client is closed (Client.close(), "
                                                        "or the end of its with block)")

    def _metadata(self, session_key: str) -> tuple[tuple[str, str], ...]:
        """The ``x-session-id`` header that routes a call to its session's replica, and the token."""
        return ((ROUTING_HEADER, session_key), *self._bearer) if session_key else self._bearer

    @overload
    def session(self, graph: Graph, params: Arrays | None = None, buffers: Arrays | None = None) -> Session: ...
    @overload
    def session(self, graph: Graph, params: Arrays | None = None, buffers: Arrays | None = None, *,
                shards: int) -> Session | ShardedSession: ...

    def session(self, graph: Graph, params: Arrays | None = None, buffers: Arrays | None = None, *,
                shards: int = 1) -> Session | ShardedSession:
        """Open a session on ``graph``; without ``params``, ``init_params(graph)``. ``buffers``:
        initial state buffers (e.g. batchnorm statistics from an ONNX import); missing ones
        take their op's default.

        ``shards`` > 1: a data-parallel session that splits every batch over that many sessions,
        spread over the replicas (gradgate.sharded).
        """
        params = init_params(graph) if params is None else params
        if shards == 1:
            return Session(self, graph, params, buffers)
        from gradgate.sharded import ShardedSession

        return ShardedSession(self, graph, params, shards, buffers)

    def list_ops(self) -> list[OpInfo]:
        response, _ = self.call("ListOps", pb.ListOpsRequest())
        return [OpInfo(op.name, tuple(op.inputs), dict(op.attrs), op.doc) for op in response.ops]

    def close(self) -> None:
        self.closed = True
        self._channel.close()
        if self._server is not None:
            self._server.stop(None)
            self._server = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
