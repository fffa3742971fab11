"""A session's calls of one unary method over one long-lived stream (``<Method>Stream``).

gRPC spends about a quarter of a millisecond setting up each unary call, a third of a
small ForwardBackward. A session calling forward_backward in a loop sends the calls over
one bidirectional stream instead, opened on its first call and answered exactly as the
unary calls would be. The stream is only a faster road: a call it cannot carry goes unary,
with the channel's retries (another thread is using the stream, the server has no stream
slot free, the stream broke before the answer). A call's error (a status of DESIGN.md's
error mapping) is raised and ends the stream; the next call opens another.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from gradgate.errors import GradgateError, from_rpc_error
from gradgate.watchdog import Watchdog

if TYPE_CHECKING:
    from gradgate.client import Client

STREAMS_FULL = "gradgate-streams"  # trailing metadata of a stream the server refused for want of a slot
IDLE_SECONDS = 20.0  # a stream unused this long is closed, well before a server's idle limit (60 s) ends it
REFUSED_SECONDS = 5.0  # after a refusal, calls go unary this long before a stream is tried again
# the codes a server answers a call with (DESIGN.md, Errors); anything else ends the stream for
# another reason (UNAVAILABLE or INTERNAL from a broken connection, CANCELLED, UNIMPLEMENTED)
ANSWERS = frozenset((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED))
# per-call deadlines: the wait for a stream's next message takes no timeout
_DEADLINES = Watchdog(0.02, "gradgate-call-deadlines")


class CallStream:
    """Calls of ``method`` for one session (routed by ``session_key``): ``call(data, deadline)``
    returns the answer's bytes, or None when the call should be sent unary instead, by the same
    ``deadline`` (on time.monotonic's clock)."""

    def __init__(self, client: Client, method: str, session_key: str):
        self._client, self._method, self._key = client, method, session_key
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue | None = None
        self._responses: Any = None  # grpc's call object: an iterator of the answers
        self._ends: weakref.finalize | None = None
        self._closed = False
        self._used = 0.0  # time.monotonic() of the last answer
        self._refused_until = 0.0
        self._calls = 0
        self._expired = -1  # the number of the call whose deadline passed

    def call(self, data: bytes, deadline: float) -> bytes | None:
        if self._closed or not self._lock.acquire(blocking=False):  # another thread's call is on the stream
            return None
        try:
            return None if self._closed else self._send(data, deadline)
        finally:
            self._lock.release()

    def close(self) -> None:
        """For good (its session is closing): end the stream once a call in progress on it, another
        thread's, has its answer; calls after this go unary."""
        self._closed = True
        if self._lock.acquire(timeout=self._client.timeout + 1):  # that call's deadline ends it before
            try:
                self._end(time.monotonic() + self._client.timeout)
            finally:
                self._lock.release()

    def _end(self, until: float) -> None:
        """End the stream, and wait until ``until`` at most for the server to end it too: grpc
        cancels a call whose object is dropped before. The next call opens another."""
        if self._ends is None:
            return
        self._ends()  # puts the None that ends the requests
        responses, key = self._responses, (self, "end")
        self._requests = self._responses = self._ends = None
        _DEADLINES.arm(key, until - time.monotonic(), responses.cancel)
        try:
            for _ in responses:
                pass
        except grpc.RpcError:  # it had ended with an error already, or took too long
            pass
        finally:
            _DEADLINES.disarm(key)

    def _open(self) -> None:
        self._requests, cell = queue.SimpleQueue(), []  # type: ignore[var-annotated]
        multi, metadata = self._client.stream(self._method, self._key)
        self._responses = multi(_requests(self._requests, cell), metadata=metadata)
        cell.append(self._responses)
        self._ends = weakref.finalize(self, self._requests.put, None)  # also when dropped without close

    def _send(self, data: bytes, deadline: float) -> bytes | None:
        now = time.monotonic()
        if self._responses is not None and now - self._used > IDLE_SECONDS:
            self._end(min(deadline, now + 1.0))
        if self._responses is None:
            if now < self._refused_until:
                return None
            self._open()
        assert self._requests is not None
        self._calls += 1
        number = self._calls
        self._requests.put(data)
        _DEADLINES.arm((self, number), deadline - time.monotonic(), lambda: self._expire(number))
        try:
            answer = next(self._responses)
        except grpc.RpcError as e:
            self._end(min(deadline, time.monotonic() + 1.0))
            if self._expired == number:
                raise GradgateError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"{self._method} had no answer within {self._client.timeout:g} s") from None
            if any(k == STREAMS_FULL for k, _ in e.trailing_metadata() or ()):  # type: ignore[attr-defined]
                self._refused_until = time.monotonic() + REFUSED_SECONDS
                return None
            if e.code() in ANSWERS:  # type: ignore[attr-defined]
                raise from_rpc_error(e) from None
            # The stream broke (a server killed, a network cut) or predates the server: sent
            # again unary, as gRPC's retry policy re-sends a unary call that met UNAVAILABLE. The
            # server itself ends a stream only between calls (idle, aged, stopping): below.
            return None
        except StopIteration:  # the server ended the stream without reading this request
            self._end(deadline)
            return None
        finally:
            _DEADLINES.disarm((self, number))
        self._used = time.monotonic()
        return answer

    def _expire(self, number: int) -> None:
        responses = self._responses
        if number == self._calls and responses is not None:
            self._expired = number
            responses.cancel()


def _requests(inbox: queue.SimpleQueue, cell: list) -> Iterator[bytes]:
    """What grpc sends on the stream: ``inbox``'s items until None, or until the call is over."""
    while True:
        try:
            data = inbox.get(timeout=1.0)
        except queue.Empty:
            if cell and cell[0].done():
                return
            continue
        if data is None:
            return
        yield data
