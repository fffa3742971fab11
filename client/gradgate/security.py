"""Channel security for ``gg.connect``: TLS, mutual TLS and a bearer token.

``gg.connect("host:50051", tls=gg.TLS(ca="ca.pem"), token="...")`` verifies the server
with ``ca`` and sends ``authorization: Bearer <token>`` with every call;
``gg.TLS(ca=..., cert="client.pem", key="client.key")`` adds a client certificate
(mutual TLS); ``tls=True`` verifies the server with the system's root certificates.
"""
from __future__ import annotations

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
    """A channel to ``address``: TLS when ``tls`` is set. The caller sends ``bearer(token)``
    with every call (its streams too, which grpc's interceptors would not reach: gradgate.transport)."""
    if tls:
        settings = tls if isinstance(tls, TLS) else TLS()
        if settings.server_name:
            options = [*options, ("grpc.ssl_target_name_override", settings.server_name)]
        return grpc.secure_channel(address, settings.credentials(), options=options)
    if token and not on_this_host(address):
        log.warning("sending a bearer token to %s without TLS: anyone on the path can read it", address)
    return grpc.insecure_channel(address, options=options)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``token``: ``authorization: Bearer <token>``; none without one."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def on_this_host(address: str) -> bool:
    """Whether every server ``address`` names (host:port, a comma-separated list of them, or
    an ipv4:, ipv6:, dns: or unix: target) is on this host: a loopback IP address,
    ``localhost``, or a unix socket (other names are not looked up). Only such a server is
    asked for a shared-memory region (so no server elsewhere can point the SDK at a file of
    this machine), and a token sent in plaintext anywhere else is warned of."""
    return all(_local(target.strip()) for target in address.split(","))


def _local(target: str) -> bool:
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme):].rsplit("/", 1)[-1]  # dns://authority/host:port
    host, colon, port = target.rpartition(":")
    if not colon or "]" in port:  # no port, or a bare IPv6 address
        host = target
    return is_loopback(host)  # no name is looked up (that could take longer than the call may)
