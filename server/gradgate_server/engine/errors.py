"""Typed errors. Each class is named after the gRPC status it maps to (errors.py
outside the engine does the mapping); the engine itself never imports grpc."""
from __future__ import annotations


class GradgateError(Exception):
    """Base class. ``field`` names the node, tensor or request field at fault."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(GradgateError):
    """Malformed graph, unknown op, shape/dtype mismatch, bad tensor bytes."""


class NotFound(GradgateError):
    """Unknown, closed or expired session."""


class FailedPrecondition(GradgateError):
    """E.g. Backward with no cached forward, or activations evicted."""


class ResourceExhausted(GradgateError):
    """Over a configured limit."""


class DeadlineExceeded(GradgateError):
    """The request deadline passed between ops."""
