"""The one mapping from typed errors to gRPC status (see DESIGN.md, Errors).

A client's mistake gets its own status and a message naming the culprit, with a
google.rpc.BadRequest field violation for INVALID_ARGUMENT. Anything else is
logged here with its traceback and answered INTERNAL without one.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradgate.codec import CodecError, TensorTooLarge

from .engine import (DeadlineExceeded, FailedPrecondition, GradgateError, InvalidArgument, NotFound,
                     ResourceExhausted)

log = logging.getLogger("gradgate_server")

STATUS: dict[type, grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    TensorTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def to_status(error: GradgateError | CodecError) -> grpc.Status:
    code = STATUS[type(error)]
    message = error.message if isinstance(error, GradgateError) else str(error)
    status = status_pb2.Status(code=code.value[0], message=message)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=getattr(error, "description", message))
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


class Unparsable:
    """A request body that is not a valid message of the method's request type.

    grpc would answer a failed parse with INTERNAL; it is the client's mistake, so the
    deserializer hands this on and the ErrorInterceptor answers INVALID_ARGUMENT."""

    session_id = ""  # read by the per-RPC log line

    def __init__(self, data: bytes, error: Exception):
        self.data, self.error = data, error

    def ByteSize(self) -> int:
        return len(self.data)


def lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser may raise
            return Unparsable(data, e)
    return parse


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by unary handlers into statuses."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request body ({len(request.data)} bytes) is not a valid request message "
                              f"for {details.method}: {request.error}")
            try:
                return inner(request, context)
            except (GradgateError, CodecError) as e:
                context.abort_with_status(to_status(e))
            except MemoryError:
                log.warning("out of memory in %s", details.method)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this "
                                                                  "request; send smaller batches")
            except Exception:
                incident = uuid.uuid4().hex[:12]
                log.exception("internal error %s in %s", incident, details.method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal server error {incident}; "
                                                        "the server log has the details")

        return grpc.unary_unary_rpc_method_handler(behavior, lenient(handler.request_deserializer),
                                                   handler.response_serializer)
