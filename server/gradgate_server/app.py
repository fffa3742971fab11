"""serve(): the one place that wires config, sessions, service, health, metrics and interceptors."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import logging
import math
import signal
import threading
import time
from concurrent import futures

import grpc
import prometheus_client
import threadpoolctl
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import gradgate
from gradgate.client import KEEPALIVE_MS
from gradgate.memory import release_memory, tune_malloc
from gradgate.security import is_loopback
from gradgate.v1 import gradient_service_pb2

from . import auth, cpus
from .config import Config
from .health import HealthServicer
from .logs import configure_logging
from .metrics import Metrics
from .rpc import Observed, Streams, gradient_service_handlers
from .service import GradientService
from .sessions import SessionStore

log = logging.getLogger("gradgate_server")

SERVICE_NAME = gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name


def version() -> str:
    try:
        return importlib.metadata.version("gradgate")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return getattr(gradgate, "__version__", "unknown")


class Server:
    """A running gradgate server; ``address`` is host:port with the bound port,
    ``metrics_address`` host:port of /metrics (None when off)."""

    def __init__(self, server: grpc.Server, address: str, store: SessionStore, config: Config,
                 health_servicer: HealthServicer, metrics: Metrics, metrics_address: str | None = None,
                 health_pool: futures.ThreadPoolExecutor | None = None, streams: Streams | None = None):
        self._server = server
        self.address = address
        self.store = store
        self.config = config
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_address = metrics_address
        self._health_pool = health_pool
        self._streams = streams
        self._stopped = threading.Event()
        # Expire idle sessions even when no call arrives, so memory and metrics stay true.
        threading.Thread(target=self._sweep, name="gradgate-sweeper", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish for ``grace``
        seconds (then cancel them), and close the metrics endpoint."""
        self.health.enter_graceful_shutdown()
        if self._streams is not None:
            self._streams.stop()
        self._server.stop(grace).wait()
        self._stopped.set()
        self.metrics.stop_http()
        if self._health_pool is not None:
            self._health_pool.shutdown(wait=False)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def _sweep(self) -> None:
        """Expire idle sessions, and hand memory that sessions gave back to the OS: when 16 MiB
        of it piles up, and again once a sweep finds nothing more given back (memory still in
        use at the first release, by a call finishing say, has been freed by then)."""
        given_back = 0
        while not self._stopped.wait(min(1.0, max(0.05, self.config.session_ttl_seconds))):
            freed = self.store.sweep()
            given_back += freed
            if given_back > 16 * 2**20 or (given_back and not freed):
                gc.collect()  # reference cycles (an error's traceback, say) may still hold arrays
                release_memory()
                given_back = 1 if freed else 0  # released mid-activity: once more when it settles

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def serve(address: str = "127.0.0.1:0", config: Config | None = None) -> Server:
    """Start a server on ``address`` (port 0 picks a free one) and return it running."""
    config = config or Config()
    credentials = auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    authenticator = auth.authenticator(config.auth_tokens, config.tls_client_ca)
    tune_malloc()  # megabyte messages: reuse heap buffers instead of page-faulting fresh mmaps
    if config.cpus:  # before grpc starts its threads, which then run there too
        cpus.pin(config.cpus)
    if config.blas_threads:
        limit_blas(config.blas_threads, config.max_workers)
    metrics = Metrics(version(), config.cache_bytes)
    store = SessionStore(config.session_ttl_seconds, config.max_sessions, config.cache_bytes,
                         config.state_bytes, config.session_bytes, on_event=metrics.session_event)
    metrics.watch_store(store)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0),
               # the SDK pings while it has calls open: grpc's default (one ping in 5 min) would
               # end its connection with "too many pings"
               ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)]
    if config.max_connection_age_seconds > 0:
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]
    server = grpc.server(futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="gradgate-rpc"),
                         options=options)
    # Each open stream holds an RPC thread: one at least stays for unary calls. When connections
    # age out, a CallStream older than half the grace ends between calls, before its connection
    # is cut, so no call is cut after it ran.
    streams = Streams(config.max_workers - 1, config.max_call_streams, config.stream_idle_seconds,
                      config.grace_seconds / 2 if config.max_connection_age_seconds > 0 else math.inf,
                      config.shared_memory)
    handlers = gradient_service_handlers(GradientService(store, config, metrics), metrics,
                                         config.max_message_bytes, config.max_tensor_elements, authenticator,
                                         streams)
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # Health answers from threads of its own, so it never waits behind compute.
    health_pool = futures.ThreadPoolExecutor(2, thread_name_prefix="gradgate-health")
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, Observed(server, metrics, health_pool))
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            Observed(server, metrics))
    host = address.rsplit(":", 1)[0]
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    metrics_address = None
    if config.metrics_port >= 0:
        metrics_address = f"{host}:{metrics.serve_http(host, config.metrics_port)}"
    server.start()
    return Server(server, f"{host}:{port}", store, config, health_servicer, metrics, metrics_address, health_pool,
                  streams)


def limit_blas(threads: int, max_workers: int) -> int:
    """Size BLAS's thread pool for a server that runs up to ``max_workers`` calls at once:
    ``threads``, or with -1 cores // max_workers (at least 1), counting the cores this process
    may run on (--cpus, a container's cpuset). Returns the size set."""
    if threads < 0:
        threads = max(1, len(cpus.available()) // max_workers)
    threadpoolctl.threadpool_limits(threads, user_api="blas")
    return threads


def parse_args(argv: list[str] | None) -> tuple[str, Config]:
    p = argparse.ArgumentParser(prog="gradgate-server", description="gradgate gradient-computation gRPC server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 or [::] for all)")
    p.add_argument("--port", type=int, default=50051, help="port (0 = pick a free one)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = f.metadata.get("cli_default", getattr(defaults, f.name))
        flag, text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} (default {default})".lstrip()
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"), help=text)
    args = vars(p.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    return f"{host}:{port}", Config(**args)


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # before any thread starts: each thread keeps the malloc arena it first used
    address, config = parse_args(argv)
    configure_logging(config.log_format)
    # *_created series double the series count for little use; process-wide, so only in the CLI.
    prometheus_client.disable_created_metrics()
    try:
        server = serve(address, config)
    except (OSError, ValueError) as e:  # unreadable certificates or token file, a port in use
        log.error("cannot start: %s", e)
        return 2
    metrics_url = f"http://{server.metrics_address}/metrics" if server.metrics_address else "off"
    security = auth.describe(config.tls_cert, config.tls_client_ca, config.auth_tokens)
    log.info("gradgate server listening on %s, metrics %s; %s", server.address, metrics_url, security,
             extra={"fields": {"event": "listening", "address": server.address, "security": security,
                               "metrics_address": server.metrics_address, "version": version()}})
    if not (config.auth_tokens or config.tls_client_ca):
        host = server.address.rsplit(":", 1)[0]
        if is_loopback(host):
            log.info("no authentication (--auth-tokens, --tls-client-ca): listening on loopback only")
        else:
            log.warning("no authentication (--auth-tokens, --tls-client-ca) on %s: anyone who can reach it "
                        "can use, read and close any session whose id they learn", host)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if not stopping.is_set():
            log.info("%s: health NOT_SERVING, refusing new calls, draining in-flight calls for up to %gs",
                     signal.Signals(signum).name, config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    start = time.monotonic()
    server.stop(config.grace_seconds)
    log.info("stopped after draining for %.2fs", time.monotonic() - start)
    return 0
