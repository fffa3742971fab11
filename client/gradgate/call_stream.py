"""A session's calls over one long-lived stream (``CallStream``).

gRPC spends about a quarter of a millisecond setting up each unary call, a third of a
small ForwardBackward. A session sends its Forward, Backward, ForwardBackward,
SetParameters and GetParameters calls over one bidirectional stream instead, opened on
its first call; each request is a StreamCall holding the unary request, answered by a
StreamAnswer holding exactly the unary response. The stream is only a faster road: a
call it cannot carry goes unary, with the channel's retries (another thread is using the
stream, the server has no stream slot free or predates CallStream, the call fits the
message limit only unary, the stream broke before the answer). A call's error (a status of
DESIGN.md's error mapping) is raised and ends the stream; the next call opens another.
With a server on this host the stream borrows a shared-memory region and two pipes at its
first call, which then carry its calls and answers instead of its messages
(gradgate.shared_memory); anything that interrupts a call ends the stream, so no later
call can meet its answer.
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from gradgate.codec import CodecError, decode_within, pieces_within
from gradgate.errors import GradgateError, from_rpc_error
from gradgate.shared_memory import ENDED, SUPPORTED, Pipes, Region, size_for
from gradgate.transport import DirectStream, ThreadedStream
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.watchdog import Watchdog

if TYPE_CHECKING:
    from gradgate.client import Client

_SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
_BY_REQUEST = {m.input_type: m.name for m in _SERVICE.methods if not m.client_streaming}
# unary method -> the number of the StreamCall field (and of the StreamAnswer one) that holds it
CARRIED = {_BY_REQUEST[f.message_type]: f.number for f in pb.StreamCall.DESCRIPTOR.oneofs[0].fields
           if f.message_type in _BY_REQUEST}
_ANSWERS = {f.name: f.number for f in pb.StreamAnswer.DESCRIPTOR.oneofs[0].fields}
_IN_REGION = bytes([_ANSWERS["in_region"] << 3 | 2])  # the first byte of an answer left in the shared region
STREAMS_FULL = "gradgate-streams"  # trailing metadata of a stream the server refused for want of a slot or thread
T = TypeVar("T")
IDLE_SECONDS = 20.0  # a stream unused this long is ended (its server thread freed), well before a server's limit (60 s)
REFUSED_SECONDS = 5.0  # after a refusal, calls go unary this long before a stream is tried again
# the codes a server answers a call with (DESIGN.md, Errors); anything else ends the stream for
# another reason (UNAVAILABLE or INTERNAL from a broken connection, CANCELLED, UNIMPLEMENTED)
ANSWERS = frozenset((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED))
# per-call deadlines: the wait for a stream's next message takes no timeout
_DEADLINES = Watchdog(0.02, "gradgate-call-deadlines")
_IDLE = Watchdog(0.25, "gradgate-stream-idle")  # pauses streams unused for IDLE_SECONDS


class CallStream:
    """The calls of one session (routed by ``session_key``): ``call(method, request, arrays,
    deadline)`` returns the decoded answer, or None when the call should be sent unary
    instead, by the same ``deadline`` (on time.monotonic's clock)."""

    def __init__(self, client: Client, session_key: str):
        self._client, self._key = client, session_key
        self._lock = threading.Lock()
        self._stream: DirectStream | ThreadedStream | None = None
        self._ends: weakref.finalize | None = None  # abandons the stream if this is dropped without close
        self._closed = False
        self._refused_until = 0.0
        self._calls = 0
        self._expired = -1  # the number of the call whose deadline passed
        self._idle_key = weakref.ref(self)  # the idle watchdog holds no reference to the stream
        self._on_idle = _pause(self._idle_key)
        self._region: Region | None = None  # the stream's shared memory (gradgate.shared_memory)
        self._pipes: Pipes | None = None  # and the pipes that signal its calls and answers
        self._signalled = False  # the server knows: calls and answers go through the pipes
        self._biggest = 0  # the biggest call or answer yet
        self._shared = client.shared_memory and SUPPORTED  # False once a server lends no region
        self._most = client.max_message_bytes  # the biggest region the server lends

    def call(self, method: str, request: Message, arrays: dict[str, Any], deadline: float
             ) -> tuple[Any, dict[str, dict[str, np.ndarray]]] | None:
        number = CARRIED[method]
        if self._closed or not self._lock.acquire(blocking=False):  # another thread's call is on the stream
            return None
        try:
            if self._closed:
                return None
            pieces = pieces_within(number, request, **arrays)
            if pieces.nbytes > self._client.max_message_bytes:  # a StreamCall is a few bytes longer than
                return None  # the unary request, which may fit
            try:
                if not self._share(pieces.nbytes, deadline):
                    return None
                region = self._region
                if region is not None and pieces.nbytes <= region.size:
                    handshake = self._pipes is not None and not self._signalled  # from this call on: the pipes
                    data, length = region.write(pieces, signal=handshake), pieces.nbytes
                else:  # the server answers a call that came on the stream itself there too
                    data, region, length = b"".join(pieces.parts), None, 0
                answer = self._send(method, data, deadline, length)
                if region is not None and answer is not None and answer[:1] == _IN_REGION:
                    answer = self._from_region(method, pb.StreamAnswer.FromString(answer).in_region.length)
                if answer is not None and len(answer) > self._client.max_message_bytes:  # as gRPC would refuse it
                    raise GradgateError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"the answer to {method} took {len(answer)} bytes, more than this "
                                        f"client's max_message_bytes ({self._client.max_message_bytes})")
            except BaseException:  # an error, or an interrupt (Ctrl-C): whatever was under way on the stream
                self._end(time.monotonic())  # ends with it, so no later call reads its answer
                raise
            self._biggest = max(self._biggest, len(answer or b""))
        finally:
            self._lock.release()
        if answer is None:
            return None
        try:
            name, response, got = decode_within(answer, pb.StreamAnswer)
        except CodecError as e:
            raise GradgateError(grpc.StatusCode.INTERNAL, f"the server's answer to {method}: {e}") from None
        if _ANSWERS.get(name) != number:
            raise GradgateError(grpc.StatusCode.INTERNAL, f"the server answered a {method} call on its "
                                                          f"CallStream with {name or 'nothing'}")
        return response, got

    def close(self, until: float) -> None:
        """For good (its session is closing): end the stream once a call in progress on it, another
        thread's, has its answer, waiting until ``until`` at most; calls after this go unary."""
        self._closed = True
        if self._lock.acquire(timeout=max(until - time.monotonic(), 0.0)):  # else it ends when idle
            try:
                self._end(until)
            finally:
                self._lock.release()

    def pause(self) -> None:
        """End the stream between calls, so the server thread it holds serves another stream
        (the session's UploadData and Train); the next call opens another. A call in progress,
        another thread's, keeps it open."""
        if self._lock.acquire(blocking=False):
            try:
                self._end(time.monotonic() + 1.0)
            finally:
                self._lock.release()

    def _share(self, size: int, deadline: float) -> bool:
        """Before a call of ``size`` bytes to a server on this host: ask it for a shared-memory
        region (and pipes to signal through) at the stream's first call, and for a bigger
        region when a call or answer has outgrown it (each answer costs one round trip).
        False if the stream broke or was refused meanwhile: that call goes unary."""
        self._biggest = max(self._biggest, size)
        if not self._shared or (
                self._region is not None and (self._biggest <= self._region.size or self._region.size >= self._most)):
            return True
        if not self._client.on_this_host:
            self._shared = False
            return True
        asked = size_for(self._biggest, self._most)
        ask = pb.StreamCall(open_region=pb.SharedRegionRequest(size=asked, signal=True))
        try:
            answer = self._send("open_region", ask.SerializeToString(), deadline)
        except GradgateError as e:  # a server that predates regions: the call goes on, over a new stream
            if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self._shared = False
            return True
        if answer is None:
            return False
        self._close_region()
        lent = pb.StreamAnswer.FromString(answer).region
        self._region = Region.mapped(lent)
        if self._region is None:  # none lent (the server closed its pipes too), or not ours to map
            self._close_pipes()
            self._shared = False
            if lent.size:  # lent, but in another PID namespace: give it back
                give_back = pb.StreamCall(open_region=pb.SharedRegionRequest(size=0))
                return self._send("open_region", give_back.SerializeToString(), deadline) is not None
            return True
        if self._pipes is None:
            self._pipes = Pipes.opened(lent)
        if self._region.size < asked:  # as big as the server's message limit
            self._most = self._region.size
        return True

    def _from_region(self, method: str, length: int) -> bytes:
        answer = self._region.read(length) if self._region is not None else None
        if answer is None:
            raise GradgateError(grpc.StatusCode.INTERNAL, f"the server answered {method} with a length "
                                                          "outside its shared-memory region")
        return answer

    def _close_pipes(self) -> None:
        if self._pipes is not None:
            self._pipes.close()
            self._pipes, self._signalled = None, False

    def _close_region(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None

    def _end(self, until: float) -> None:
        """End the stream, and wait until ``until`` at most for the server to end it too: grpc
        cancels a call whose object is dropped before. The next call opens another."""
        _IDLE.disarm(self._idle_key)
        self._close_region()  # the server's end with its stream
        self._close_pipes()
        stream, key = self._stream, (self, "end")
        if stream is None or self._ends is None:
            return
        self._ends.detach()
        self._stream = self._ends = None
        stream.put(None)
        _DEADLINES.arm(key, until - time.monotonic(), stream.cancel)
        try:
            for _ in stream:
                pass
        except (grpc.RpcError, ValueError):  # it had ended with an error already, took too long, or was
            pass  # interrupted in grpc's own code (ValueError: "Internal gRPC call error")
        finally:
            _DEADLINES.disarm(key)

    def _open(self) -> None:
        self._stream = self._client.open_stream("CallStream", self._key)
        self._ends = weakref.finalize(self, self._stream.abandon)
        self._ends.atexit = False  # at exit another thread may still be in a call on it; the process ends it

    def _send(self, method: str, data: bytes, deadline: float, length: int = 0) -> bytes | None:
        """Send ``data`` (a StreamCall) and return the answer (a StreamAnswer), or None when the
        call should go unary instead. Signalled, a call in the region (``length`` bytes) goes as
        that length through the pipe, and an answer in the region comes back read out of it."""
        if self._stream is None:
            if time.monotonic() < self._refused_until:
                return None
            self._open()
        stream = self._stream
        assert stream is not None
        self._calls += 1
        number = self._calls
        pipes = self._pipes
        if pipes is None or not (self._signalled or length):
            stream.put(data)
            return self._receive(method, number, deadline)
        if not self._signalled:  # this call says so (in_region.signal), on the stream
            stream.put(data)
            self._signalled = True
        elif not pipes.send(length):  # the server has ended the stream between calls: not sent, so unary
            self._end(deadline)
            return None
        elif not length:  # too big for the region: on the stream
            stream.put(data)
        got = pipes.wait(deadline)
        if got is None:
            self._expire(number)
            self._end(time.monotonic() + 1.0)
            raise GradgateError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{method} had no answer within {self._client.timeout:g} s")
        if got == ENDED:  # the server, or its end, ended the stream: so does this side (nginx holds the
            stream.put(None)  # reset of a stream whose replica died until the client's side stirs)
        if got <= 0:  # the answer, or the stream's end, is on the stream
            return self._receive(method, number, deadline)
        answer = self._from_region(method, got)
        _IDLE.arm(self._idle_key, IDLE_SECONDS, self._on_idle)
        return answer

    def _receive(self, method: str, number: int, deadline: float) -> bytes | None:
        """The stream's next message: the answer to call ``number``, or None if the stream ended
        or broke without it (the call goes unary); a call's error is raised."""
        assert self._stream is not None
        _DEADLINES.arm((self, number), deadline - time.monotonic(), lambda: self._expire(number))
        try:
            answer = next(self._stream)
        except grpc.RpcError as e:
            self._end(min(deadline, time.monotonic() + 1.0))
            if self._expired == number:
                raise GradgateError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"{method} had no answer within {self._client.timeout:g} s") from None
            if refused(e):
                self._refused_until = time.monotonic() + REFUSED_SECONDS
                return None
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                self._refused_until = math.inf  # a server older than CallStream: unary calls for good
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
        _IDLE.arm(self._idle_key, IDLE_SECONDS, self._on_idle)
        return answer

    def _expire(self, number: int) -> None:
        stream = self._stream
        if number == self._calls and stream is not None:
            self._expired = number
            stream.cancel()


def refused(error: grpc.RpcError) -> bool:
    """Whether the server refused a stream for want of a stream slot or thread (it may take
    one a moment later)."""
    return any(k == STREAMS_FULL for k, _ in error.trailing_metadata() or ())  # type: ignore[attr-defined]


def when_free(open_stream: Callable[[], T], retry_seconds: float) -> T:
    """``open_stream()``, tried again while the server refuses the stream for want of a stream
    thread, for ``retry_seconds`` at most, waiting 0.1 s, then twice as long each time (1 s at most)."""
    give_up, wait = time.monotonic() + retry_seconds, 0.1
    while True:
        try:
            return open_stream()
        except grpc.RpcError as e:
            if not refused(e) or time.monotonic() + wait > give_up:
                raise
        time.sleep(wait)
        wait = min(2 * wait, 1.0)


def _pause(ref: weakref.ref[CallStream]) -> Callable[[], None]:
    def expire() -> None:
        stream = ref()
        if stream is not None:
            stream.pause()
    return expire
