"""Server settings: every limit explicit, with the defaults the SDK shares."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB  # same default as gradgate.client


@dataclass(frozen=True)
class Config:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send and receive limit
    max_workers: int = 8  # RPC threads; numpy releases the GIL in BLAS
    session_ttl_seconds: float = 600.0  # idle sessions are forgotten after this
    max_sessions: int = 1024
    cache_bytes: int = 2048 * MiB  # budget for all sessions' cached activations
    max_nodes: int = 10_000  # per graph
    max_tensor_elements: int = 64 * MiB  # per tensor on the wire
    grace_seconds: float = 10.0  # in-flight RPCs may finish this long on shutdown
    log_format: str = "text"  # or "json"
