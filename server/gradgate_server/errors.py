"""The one mapping from typed errors to gRPC status (see DESIGN.md, Errors).

A client's mistake gets its own status and a message naming the culprit, with a
google.rpc.BadRequest field violation for INVALID_ARGUMENT. Anything else is
logged here with its traceback and answered INTERNAL without one. Messages echo
names the client sent, so every text is bounded here: the status travels in the
response trailers, which clients refuse beyond 8-16 KiB.
"""
from __future__ import annotations

import logging
import re
import uuid

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradgate.codec import CodecError, TensorTooLarge

from .auth import Unauthenticated
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
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
# UTF-8 bytes; the message travels twice (grpc-message, percent-encoded, and in the details)
MAX_MESSAGE, MAX_DESCRIPTION, MAX_FIELD, MAX_WORD = 1024, 512, 256, 100
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_WORD + 1))


def bounded(text: str, limit: int) -> str:
    """``text`` with each long word (a name the client sent) cut in its middle, then the whole
    cut to ``limit`` UTF-8 bytes, keeping its start and end."""
    return _cut(_LONG_WORD.sub(lambda m: _cut(m.group(), MAX_WORD), text), limit)


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    keep = limit - 24  # room for the marker
    head, tail = data[:keep * 3 // 4], data[len(data) - keep // 4:]
    return (head.decode(errors="ignore") + f"…({len(data) - len(head) - len(tail)} bytes cut)…"
            + tail.decode(errors="ignore"))


def to_status(error: GradgateError | CodecError) -> grpc.Status:
    code = STATUS[type(error)]
    message = bounded(error.message if isinstance(error, GradgateError) else str(error), MAX_MESSAGE)
    status = status_pb2.Status(code=code.value[0], message=message)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=bounded(error.field, MAX_FIELD),
            description=bounded(getattr(error, "description", message), MAX_DESCRIPTION))
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


def status_of(error: BaseException, method: str) -> grpc.Status:
    """The status a call that raised ``error`` answers with. A server bug is logged here,
    with its traceback, under an incident id the client sees instead."""
    if isinstance(error, (GradgateError, CodecError)):
        return to_status(error)
    if isinstance(error, MemoryError):
        log.warning("out of memory in %s", method)
        return _plain(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "the server ran out of memory for this request; send smaller batches")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, method, exc_info=error)
    return _plain(grpc.StatusCode.INTERNAL, f"internal server error {incident}; the server log has the details")


def _plain(code: grpc.StatusCode, message: str) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message))
