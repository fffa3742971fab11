"""serve(): the one place that wires config, sessions, service and interceptors."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc

from gradgate.memory import tune_malloc
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc

from .config import Config
from .errors import ErrorInterceptor
from .metrics import ObserveInterceptor
from .service import GradientService
from .sessions import SessionStore

log = logging.getLogger("gradgate_server")


class Server:
    """A running gradgate server; ``address`` is host:port with the bound port."""

    def __init__(self, server: grpc.Server, address: str, store: SessionStore, config: Config):
        self._server = server
        self.address = address
        self.store = store
        self.config = config

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls; let in-flight ones finish for ``grace`` seconds."""
        self._server.stop(grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def serve(address: str = "127.0.0.1:0", config: Config | None = None) -> Server:
    """Start a server on ``address`` (port 0 picks a free one) and return it running."""
    config = config or Config()
    tune_malloc()  # megabyte messages: reuse heap buffers instead of page-faulting fresh mmaps
    store = SessionStore(config.session_ttl_seconds, config.max_sessions, config.cache_bytes)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    # Outermost first: observe sees the status that the error mapping produced.
    server = grpc.server(futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="gradgate-rpc"),
                         interceptors=[ObserveInterceptor(config.log_format), ErrorInterceptor()],
                         options=options)
    pb_grpc.add_GradientServiceServicer_to_server(GradientService(store, config), server)
    host = address.rsplit(":", 1)[0]
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return Server(server, f"{host}:{port}", store, config)


def parse_args(argv: list[str] | None) -> tuple[str, Config]:
    p = argparse.ArgumentParser(prog="gradgate-server", description="gradgate gradient-computation gRPC server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 or [::] for all)")
    p.add_argument("--port", type=int, default=50051, help="port (0 = pick a free one)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"default {getattr(defaults, f.name)}")
    args = vars(p.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    return f"{host}:{port}", Config(**args)


def main(argv: list[str] | None = None) -> int:
    address, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    server = serve(address, config)
    log.info("gradgate server listening on %s", server.address)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping, grace %.1fs", signum, config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(config.grace_seconds)
    log.info("stopped")
    return 0
