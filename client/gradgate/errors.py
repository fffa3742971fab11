"""The one exception type of the SDK, built from a gRPC status."""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class GradgateError(Exception):
    """A failed call: the gRPC ``code``, the server's ``message`` and, for
    INVALID_ARGUMENT, the offending fields as ``violations`` [(field, description)]."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 violations: list[tuple[str, str]] | None = None):
        self.code, self.message, self.violations = code, message, violations or []
        super().__init__(str(self))

    def __str__(self) -> str:
        # one line per offending field; a description that only repeats the message is left out
        return "\n  ".join([f"{self.code.name}: {self.message}",
                            *(field if description == self.message else f"{field}: {description}"
                              for field, description in self.violations)])


def from_rpc_error(e: grpc.RpcError) -> GradgateError:
    """Convert a failed call, reading the google.rpc.BadRequest detail if there is one."""
    violations = []
    status = rpc_status.from_call(e)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return GradgateError(e.code(), e.details() or "", violations)
