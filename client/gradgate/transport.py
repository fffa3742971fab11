"""How the SDK's calls travel: each run by its caller's own thread, with Ctrl-C held back.

grpcio's stream calls hand every message between three Python threads on the client (the
caller, the one that reads the request iterator, the channel's poller), each waking the next
and taking the GIL in turn: over loopback that was about a quarter of a small call's time.
grpcio's blocking unary calls avoid that by polling a completion queue of the call's own
from the calling thread (``segregated_call``); ``DirectStream`` does the same for a stream.

grpc's bookkeeping around that wait is Python code under the channel's lock: a Ctrl-C
(KeyboardInterrupt) raised inside it left that lock taken for good, so every later call of
every thread hung (within two interrupts of a loop of unary calls). Every call here runs
``holding_interrupts``: a Ctrl-C cancels the call, so the wait ends at once, and is raised
once grpc is done. ``unary`` is grpcio's blocking unary call made that way; the SDK's
streams (CallStream, UploadData, Train) are ``open_stream``'s.

``segregated_call`` is grpcio's internal API (``grpc._cython.cygrpc``, as in grpcio 1.85):
where its signature differs, ``unary`` makes grpcio's public unary call, without the hold
(so a Ctrl-C can hang the client as before), and ``open_stream`` gives a ``ThreadedStream``,
grpcio's public stream-stream call with the same methods (the tests run every CallStream
test on both, and fail if the direct one is not in use with the grpcio installed).
"""
from __future__ import annotations

import inspect
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

try:  # signal's own functions, without its enum conversions: 0.25 µs a swap instead of 3
    import _signal as signals
except ImportError:  # pragma: no cover - not CPython
    signals = signal  # type: ignore[misc]
SIGINT = int(signal.SIGINT)

try:
    from grpc._cython import cygrpc

    DIRECT = {"registered_call_handle", "operationses_and_tags"} <= set(
        inspect.signature(cygrpc.Channel.segregated_call).parameters)
except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - another grpcio
    DIRECT = False

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_START, _SEND, _RECEIVE, _STATUS = "start", "send", "receive", "status"
Metadata = Sequence[tuple[str, str]] | None
T = TypeVar("T")
S = TypeVar("S")


class Method:
    """The method at ``path`` (``/package.Service/Method``) of ``channel``, registered with grpc
    at once, as grpcio's multi-callables are: registering one on a closed channel crashes."""

    def __init__(self, channel: grpc.Channel, path: str):
        self.channel, self.path = channel, path
        register = getattr(getattr(channel, "_channel", None), "get_registered_call_handle", None)
        self.handle = register(path.encode()) if register else None


def unary(method: Method, request: bytes, timeout: float, metadata: Metadata,
          wait_for_ready: bool | None = None) -> bytes:
    """grpcio's blocking unary call of ``method``, raw bytes each way; a failed call raises a
    grpc.RpcError."""
    if not DIRECT:
        return method.channel.unary_unary(method.path, _registered_method=True)(
            request, timeout=timeout, metadata=metadata, wait_for_ready=wait_for_ready)
    operations = (cygrpc.SendInitialMetadataOperation(metadata, _flags(wait_for_ready)),
                  cygrpc.SendMessageOperation(request, 0), cygrpc.SendCloseFromClientOperation(0),
                  cygrpc.ReceiveInitialMetadataOperation(0), cygrpc.ReceiveMessageOperation(0),
                  cygrpc.ReceiveStatusOnClientOperation(0))
    call = _Call(method, metadata, timeout, ((operations, _STATUS),))
    *_, message, status = call.take()[1].batch_operations
    if status.code() != cygrpc.StatusCode.ok:
        raise _ended(status)
    return message.message()


def open_stream(method: Method, metadata: Metadata, timeout: float | None = None) -> DirectStream | ThreadedStream:
    """A bidirectional stream of raw bytes to ``method``, within ``timeout`` seconds (None: no
    deadline)."""
    return DirectStream(method, metadata, timeout) if DIRECT else ThreadedStream(method, metadata, timeout)


def _flags(wait_for_ready: bool | None) -> int:
    """The initial metadata's flags, as grpcio sets them for ``wait_for_ready``."""
    if wait_for_ready is None:
        return 0
    explicit = cygrpc.InitialMetadataFlags.wait_for_ready_explicitly_set
    return explicit | cygrpc.InitialMetadataFlags.wait_for_ready if wait_for_ready else explicit


def holding_interrupts(cancel: Callable[[], None], work: Callable[[], T]) -> T:
    """``work()``, with a Ctrl-C held back until it is done: the Ctrl-C cancels the call, so
    a wait ends at once, and is raised as KeyboardInterrupt after. grpc's bookkeeping is
    Python code, under the channel's lock: a KeyboardInterrupt raised inside it can leave
    that lock taken for good (every other thread's call hangs) or an event taken but not
    counted. Only on the main thread with Python's own SIGINT handler (which raises
    KeyboardInterrupt); any other handler is left alone."""
    if threading.get_ident() != threading.main_thread().ident or \
            signals.getsignal(SIGINT) is not signal.default_int_handler:
        return work()
    came: list[bool] = []

    def held(signum: int, frame: Any) -> None:
        came.append(True)
        cancel()
    signals.signal(SIGINT, held)
    try:
        return work()
    finally:
        signals.signal(SIGINT, signal.default_int_handler)
        if came:
            raise KeyboardInterrupt


class Ended(grpc.RpcError):
    """A call's or a stream's end with a status other than OK, read as grpc's own call errors are."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def _ended(status: Any) -> Ended:
    """The status a ReceiveStatusOnClientOperation received."""
    return Ended(_CODES.get(status.code(), grpc.StatusCode.UNKNOWN), status.details() or "",
                 tuple(status.trailing_metadata() or ()))


class _Abandoned:
    """``with stream:`` abandons the stream if the block raises (an error, a Ctrl-C)."""

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None:
            self.abandon()  # type: ignore[attr-defined]


class _Call:
    """A grpc call whose events its caller takes from the call's own queue (``take``), started
    with ``operations`` ((operations, tag) pairs). grpc frees the call and its queue with the
    last event of the batches started, so ``_pending`` counts those: waiting on a freed queue
    would never return. ``cancel()`` may come from any thread, the rest from one at a time."""

    def __init__(self, method: Method, metadata: Metadata, timeout: float | None, operations: tuple):
        self._call: Any = None
        self._pending = 0
        self._cancelled = False
        deadline = None if timeout is None else time.time() + timeout

        def make() -> None:  # grpc takes the channel's lock for it: a Ctrl-C waits, and cancels the call
            self._call = method.channel._channel.segregated_call(  # type: ignore[attr-defined]
                cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS, method.path.encode(), None, deadline,
                metadata, None, operations, None, method.handle)
            self._pending = len(operations)
            if self._cancelled:
                self.cancel()
        try:
            holding_interrupts(self.cancel, make)
        except KeyboardInterrupt:
            self.abandon()
            raise

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel(cygrpc.StatusCode.cancelled, "Cancelled by the client")

    def abandon(self) -> None:
        """Cancel, and take the events left, so grpc frees the call now."""
        self.cancel()
        while self._pending:
            self._take()

    def take(self) -> tuple[str, Any]:
        """The call's next event (its tag and the event), waited for with Ctrl-C held back."""
        return holding_interrupts(self.cancel, self._take)

    def _take(self) -> tuple[str, Any]:
        try:
            event = self._call.next_event()
        except BaseException:  # raised by a signal handler (not a held Ctrl-C) anywhere in grpc's code:
            self.cancel()  # the server's end goes now; the queue, which grpc may have freed, is left alone
            self._pending = 0
            raise
        self._pending -= 1
        return event.tag, event


class DirectStream(_Call, _Abandoned):
    """``put(message)`` sends a message (None: no more), ``next(stream)`` waits for the next
    one from the server: StopIteration once the server ended the stream with OK, ``Ended``
    (a grpc.RpcError) with any other status. ``cancel()`` may come from any thread, the rest
    from one thread at a time. ``abandon()`` cancels and lets grpc free the call at once."""

    def __init__(self, method: Method, metadata: Metadata, timeout: float | None = None):
        self._sending = False
        self._closed = False  # no more messages from this side
        self._status: Ended | None = None  # how the stream ended (OK too), once it has
        super().__init__(method, metadata, timeout, (
            ((cygrpc.SendInitialMetadataOperation(metadata, 0),), _START),
            ((cygrpc.ReceiveInitialMetadataOperation(0),), _START),
            ((cygrpc.ReceiveStatusOnClientOperation(0),), _STATUS)))

    def put(self, message: bytes | None) -> None:
        holding_interrupts(self.cancel, lambda: self._put(message))

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return holding_interrupts(self.cancel, self._next)

    def _put(self, message: bytes | None) -> None:
        if self._closed or self._status is not None:
            return
        while self._sending:  # a call carries one message at a time each way
            self._take()
        if message is None:
            self._closed = True
            self._start((cygrpc.SendCloseFromClientOperation(0),), _SEND)
        else:
            self._sending = self._start((cygrpc.SendMessageOperation(message, 0),), _SEND)

    def _next(self) -> bytes:
        if self._status is None and self._start((cygrpc.ReceiveMessageOperation(0),), _RECEIVE):
            while True:
                tag, event = self._take()
                if tag == _RECEIVE:
                    message = event.batch_operations[0].message()
                    if message is not None:
                        return message
                    break  # the server has ended the stream: its status follows
        while self._status is None and self._pending:
            self._take()
        if self._status is None or self._status.code() == grpc.StatusCode.OK:
            raise StopIteration
        raise self._status

    def _start(self, operations: tuple, tag: str) -> bool:
        if not self._call.operate(operations, tag):  # the call is over
            return False
        self._pending += 1
        return True

    def _take(self) -> tuple[str, Any]:
        try:
            tag, event = super()._take()
        except BaseException:
            self._sending = False
            self._status = self._status or Ended(grpc.StatusCode.CANCELLED, "interrupted", ())
            raise
        if tag == _SEND:
            self._sending = False
        elif tag == _STATUS:
            self._status = _ended(event.batch_operations[0])
        return tag, event


class ThreadedStream(_Abandoned):
    """The same stream as grpcio's public stream-stream call, with grpcio's threads."""

    def __init__(self, method: Method, metadata: Metadata, timeout: float | None = None):
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._call = method.channel.stream_stream(method.path, _registered_method=True)(
            self._requests(), timeout=timeout, metadata=metadata)

    def put(self, message: bytes | None) -> None:
        self._inbox.put(message)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return holding_interrupts(self.cancel, lambda: next(self._call))

    def cancel(self) -> None:
        self._call.cancel()

    def abandon(self) -> None:  # grpc's threads end it
        self._inbox.put(None)

    def _requests(self) -> Iterator[bytes]:
        """What grpc sends: the messages put, until None or until the call is over."""
        while True:
            try:
                message = self._inbox.get(timeout=1.0)
            except queue.Empty:
                if self._call.done():
                    return
                continue
            if message is None:
                return
            yield message
