"""Observability in one place: the per-RPC interceptor (log line now; metrics to come)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger("gradgate_server.rpc")


class ObserveInterceptor(grpc.ServerInterceptor):
    """One log line per RPC: method, status code, duration, payload bytes, session prefix."""

    def __init__(self, log_format: str = "text"):
        self.json = log_format == "json"

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            response, code = None, grpc.StatusCode.UNKNOWN
            try:
                response = inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._log(method, code, time.perf_counter() - start, request,
                          response.ByteSize() if response is not None else 0)

        return grpc.unary_unary_rpc_method_handler(behavior, handler.request_deserializer,
                                                   handler.response_serializer)

    def _log(self, method: str, code: grpc.StatusCode, seconds: float, request: Any, sent: int) -> None:
        record = {"method": method.rsplit("/", 1)[-1], "code": code.name, "ms": round(seconds * 1e3, 3),
                  "received_bytes": request.ByteSize(), "sent_bytes": sent,
                  "session": getattr(request, "session_id", "")[:8]}
        if self.json:
            log.info(json.dumps(record))
        else:
            log.info(" ".join(f"{k}={v}" for k, v in record.items() if v != ""))
