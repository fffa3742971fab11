"""grpc.health.v1 (Check and Watch) for "" and gradgate.v1.GradientService."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health


class HealthServicer(health.HealthServicer):
    """The stock servicer, plus: when shutdown begins, every open Watch stream gets
    NOT_SERVING and is then ended. Clients doing client-side health checking keep a
    Watch open per backend; left open, those streams would hold the drain for the
    whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: set[Callable[[Any], None]] = set()
        self._watchers_lock = threading.Lock()

    def Watch(self, request: Any, context: grpc.ServicerContext,
              send_response_callback: Callable[[Any], None] | None = None) -> Any:
        if send_response_callback is not None:  # non-blocking mode, the default
            with self._watchers_lock:
                self._watchers.add(send_response_callback)
            context.add_callback(lambda: self._forget(send_response_callback))
        return super().Watch(request, context, send_response_callback)

    def enter_graceful_shutdown(self) -> None:
        super().enter_graceful_shutdown()  # sends NOT_SERVING to every watcher
        with self._watchers_lock:
            watchers, self._watchers = self._watchers, set()
        for send in watchers:
            send(None)  # end the stream with OK

    def _forget(self, send: Callable[[Any], None]) -> None:
        with self._watchers_lock:
            self._watchers.discard(send)
