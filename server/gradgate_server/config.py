"""Server settings: every limit explicit, with the defaults the SDK shares."""
from __future__ import annotations

from dataclasses import dataclass, field

from .engine.cost import Limits

MiB = 2**20
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB  # same default as gradgate.client


@dataclass(frozen=True)
class Config:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send and receive limit
    max_workers: int = field(default=8, metadata={
        "help": "RPC threads (numpy releases the GIL in BLAS); open streams (CallStream, UploadData, Train) "
                "hold at most --max-workers - 1 of them (1: no stream at all), so unary calls always find one, "
                "and a stream that finds none free is refused with RESOURCE_EXHAUSTED"})
    max_connection_age_seconds: float = field(default=0.0, metadata={
        "help": "close client connections after this long (gracefully: calls in flight finish), so "
                "proxyless clients on dns:/// re-resolve and find new replicas; 0 = never"})
    session_ttl_seconds: float = 600.0  # idle sessions are forgotten after this
    max_sessions: int = 1024
    cache_bytes: int = 2048 * MiB  # budget for all sessions' cached activations
    state_bytes: int = field(default=4096 * MiB, metadata={
        "help": "budget for all sessions' parameters, buffers, uploaded datasets, training optimizer state and "
                "compiled graphs (estimated: 1 KiB a value plus twice the graph's message)"})
    session_bytes: int = field(default=1024 * MiB, metadata={
        "help": "the same, per session"})
    stream_idle_seconds: float = field(default=60.0, metadata={
        "help": "a stream (UploadData, the start of Train, CallStream) waits this long at most for the "
                "client's next message, then ends (DEADLINE_EXCEEDED; CANCELLED for CallStream), so a "
                "quiet client does not hold an RPC thread"})
    max_call_streams: int = field(default=4, metadata={
        "help": "CallStream streams open at once (the SDK's fast road for a session's calls; more "
                "clients fall back to unary calls); each holds one of the RPC threads streams share "
                "(--max-workers) while open; 0 = none"})
    shared_memory: bool = field(default=True, metadata={
        "help": "lend a CallStream from a client on this host, running as the same user, a shared-memory region "
                "and two pipes (Linux) that carry its calls and answers instead of gRPC's messages; each region "
                "takes at most --max-message-bytes of memory, for as long as its stream is open"})
    max_nodes: int = 10_000  # per graph
    max_tensor_elements: int = field(default=64 * MiB, metadata={
        "help": "elements per tensor, on the wire and computed (every value of a forward, checked before it runs)"})
    max_flops: int = field(default=100 * 10**9, metadata={
        "help": "estimated floating-point operations per call (a 784-256-10 MLP step at batch 4096 takes 5e9); "
                "more is RESOURCE_EXHAUSTED before anything runs"})
    grace_seconds: float = field(default=10.0, metadata={
        "help": "on SIGTERM/SIGINT, in-flight calls may finish for this long before they are cancelled"})
    log_format: str = field(default="text", metadata={"choices": ("text", "json"),
                                                      "help": "stderr logs: text, or one JSON object per line"})
    # Off for embedded servers (tests, the SDK) so they open no extra port; on in the CLI.
    metrics_port: int = field(default=-1, metadata={"cli_default": 9464, "help": "Prometheus /metrics port "
                                                    "on the same host as gRPC; 0 = any free port, -1 = off"})
    op_timing_every: int = field(default=16, metadata={
        "help": "time the ops of one call in this many for gradgate_op_compute_seconds (1 = every call, 0 = off)"})
    # 0 = leave BLAS alone (embedded servers share the caller's process); the CLI sizes it.
    blas_threads: int = field(default=0, metadata={"cli_default": -1, "help": "BLAS threads per call; -1 = "
                                                   "cores // max-workers (at least 1), so concurrent calls do not "
                                                   "oversubscribe the cores; 0 = leave as is"})
    cpus: str = field(default="", metadata={
        "help": "CPUs to run the whole server process on, e.g. 0 or 0-3 (Linux): gRPC's hand-offs between "
                "its threads stay on warm caches, which makes small calls faster; gradgate-replicas gives each "
                "replica one; empty = any"})
    reflection: bool = field(default=False, metadata={"help": "serve gRPC server reflection (for grpcurl)"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate (chain) file: serve TLS, with --tls-key"})
    tls_key: str = field(default="", metadata={"help": "PEM private key file of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA file: require client certificates it signed (mutual TLS); without --auth-tokens the "
                "certificate's subject is the principal that owns sessions"})
    auth_tokens: str = field(default="", metadata={
        "help": "Kubernetes static-token CSV file (token,user[,uid[,groups]]): every call but health must send "
                "'authorization: Bearer <token>'; the user owns the sessions it creates"})

    @property
    def limits(self) -> Limits:
        """The per-call bounds checked before a call runs (engine/cost.py)."""
        return Limits(self.max_tensor_elements, self.cache_bytes, self.max_flops)
