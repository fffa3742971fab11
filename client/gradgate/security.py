"""Channel security for ``gg.connect``: TLS, mutual TLS and a bearer token.

``gg.connect("host:50051", tls=gg.TLS(ca="ca.pem"), token="...")`` verifies the server
with ``ca`` and sends ``authorization: Bearer <token>`` with every call;
``gg.TLS(ca=..., cert="client.pem", key="client.key")`` adds a client certificate
(mutual TLS); ``tls=True`` verifies the server with the system's root certificates.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

log = logging.getLogger("gradgate")

PEM = Union[str, Path, bytes]  # a file path, or the PEM bytes themselves


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, bracketed or not, or ``localhost``) is this machine's
    loopback; names are not looked up."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (loopback only from Python 3.13 on)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@dataclass(frozen=True)
class TLS:
    """``ca`` verifies the server (None: the system's roots); ``cert`` and ``key`` are the
    client's certificate for mutual TLS; ``server_name`` is the name to verify when it
    differs from the address's host."""

    ca: PEM | None = None
    cert: PEM | None = None
    key: PEM | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: give both cert and key for a client certificate, or neither")
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca), private_key=_pem(self.key),
                                            certificate_chain=_pem(self.cert))


def _pem(value: PEM | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def secure_channel(address: str, options: list[tuple[str, Any]], tls: TLS | bool | None = None,
                   token: str | None = None) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls`` is set, and ``token`` on every call."""
    if tls:
        settings = tls if isinstance(tls, TLS) else TLS()
        if settings.server_name:
            options = [*options, ("grpc.ssl_target_name_override", settings.server_name)]
        channel = grpc.secure_channel(address, settings.credentials(), options=options)
    else:
        if token and not _is_local(address):
            log.warning("sending a bearer token to %s without TLS: anyone on the path can read it", address)
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def _is_local(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("unix:")


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call, streaming ones too."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._header], d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)
