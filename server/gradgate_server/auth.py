"""Who is calling: TLS credentials, bearer tokens, and the principal of every call.

Identity, in this order:
- ``--auth-tokens FILE``: every call sends ``authorization: Bearer <token>``; the file
  is Kubernetes' static-token CSV, ``token,user[,uid[,"group1,group2"]]``, and the
  principal is the token's user.
- else ``--tls-client-ca``: mutual TLS (the handshake already refused clients without a
  certificate signed by that CA); the principal is the certificate's subject.
- else nobody is authenticated: every call is the anonymous principal "".

An Authenticator vets every GradientService call in one place, rpc.py's envelope, before
the request is decoded (grpc.health.v1 and reflection do not go through it: they touch no
session), and puts the call's principal in a contextvar that SessionStore reads. grpc runs
each call in a contextvars.Context of its own (grpc/_server.py: ``state.context.run``), on
one pool thread for unary and streaming handlers alike, so the value is the call's own.
"""
from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .engine import GradgateError


@dataclass(frozen=True)
class Principal:
    name: str  # owns sessions: the token's user, or the client certificate's subject
    uid: str = ""
    groups: tuple[str, ...] = ()


ANONYMOUS = Principal("")
_current: ContextVar[Principal] = ContextVar("gradgate_principal", default=ANONYMOUS)


def principal() -> str:
    """The name of the calling principal ("" without authentication); for the servicer."""
    return _current.get().name


def _digest(token: str) -> bytes:
    # looked up by hash, so a lookup's timing says nothing about the tokens held
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str | Path) -> dict[bytes, Principal]:
    """Parse a Kubernetes static-token CSV file; raises ValueError naming the bad line."""
    tokens: dict[bytes, Principal] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            row = [cell.strip() for cell in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) < 2 or not row[0] or not row[1] or len(row) > 4:
                raise ValueError(f"{path}, line {line}: expected token,user[,uid[,groups]]")
            key = _digest(row[0])
            if key in tokens:
                raise ValueError(f"{path}, line {line}: duplicate token")
            groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
            tokens[key] = Principal(row[1], row[2] if len(row) > 2 else "", groups)
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


class Unauthenticated(GradgateError):
    """Missing or bad credentials (UNAUTHENTICATED)."""


class Authenticator:
    """Metadata and peer certificate -> Principal."""

    def __init__(self, tokens: Mapping[bytes, Principal] | None = None, client_certificates: bool = False):
        self.tokens, self.client_certificates = tokens, client_certificates

    def __call__(self, context: grpc.ServicerContext) -> None:
        """Authenticate the call of ``context`` and make its principal the current one;
        raises Unauthenticated."""
        _current.set(self.authenticate(context.invocation_metadata(), context.auth_context()))

    def authenticate(self, metadata: Any, auth_context: Mapping[str, Any]) -> Principal:
        if self.tokens is not None:
            header = next((v for k, v in metadata or () if k == "authorization"), None)
            if header is None:
                raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>' metadata", "authorization")
            scheme, _, token = str(header).strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'", "authorization")
            found = self.tokens.get(_digest(token.strip()))
            if found is None:
                raise Unauthenticated("unknown bearer token", "authorization")
            return found
        if self.client_certificates:
            subject = (auth_context.get("x509_subject") or auth_context.get("x509_common_name") or [b""])[0]
            if not subject:  # the handshake requires a certificate; this would be a server bug
                raise Unauthenticated("no client certificate", "authorization")
            return Principal(subject.decode(errors="replace"))
        return ANONYMOUS


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS with ``cert`` and ``key`` (PEM files); with ``client_ca``, mutual TLS. None: plaintext."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_server_credentials([(_read(key), _read(cert))],
                                       root_certificates=_read(client_ca) if client_ca else None,
                                       require_client_auth=bool(client_ca))


def authenticator(auth_tokens: str, client_ca: str) -> Authenticator | None:
    """From the flags; None without authentication (every call is the anonymous principal)."""
    if not (auth_tokens or client_ca):
        return None
    return Authenticator(load_tokens(auth_tokens) if auth_tokens else None, bool(client_ca))


def describe(tls_cert: str, tls_client_ca: str, auth_tokens: str) -> str:
    """For the startup log: transport and identity, from the flags."""
    transport = ("mutual TLS" if tls_client_ca else "TLS") if tls_cert else "plaintext"
    who = ("bearer tokens" if auth_tokens else "client certificates" if tls_client_ca else
           "none (every client is trusted)")
    return f"transport {transport}, authentication {who}"
