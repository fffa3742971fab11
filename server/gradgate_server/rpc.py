"""The envelope of every RPC, built once per method when the server starts.

GradientService methods take and return raw bytes at the grpc level: ``codec``
decodes each request (tensor maps as zero-copy arrays) into a ``Call`` for the
servicer, whose reply is already encoded, so message sizes are ``len()`` of bytes at
hand. Around it, in one wrapper: the status mapping (``errors.status_of``) and the
per-RPC metrics and access log (``metrics``). Streams hand their handler ``Requests``,
whose waits for the client's next message are bounded. Stock servicers (health, reflection)
register through ``Observed``, which wraps their handlers the same way, once, instead
of an interceptor that would run on every call.
"""
from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  registers its exit hook now, before ours
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import Message

from gradgate.call_stream import CARRIED, STREAMS_FULL
from gradgate.codec import decode, decode_within, encode, encode_within
from gradgate.watchdog import Watchdog
from gradgate.v1 import gradient_service_pb2
from gradgate.v1.gradient_service_pb2 import StreamCall

from .engine import DeadlineExceeded, InvalidArgument, ResourceExhausted, Watch
from .errors import status_of
from .metrics import Metrics, RpcRecord
from .shared_memory import Lane, local

SERVICE = gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"]
CALL_STREAM = "CallStream"  # carries the unary calls in CARRIED (gradgate.call_stream)


class Call:
    """One decoded request: ``msg`` without its tensor maps, ``arrays[field][name]`` for those,
    and the grpc ``context``. ``reply`` encodes the answer and checks it fits."""

    __slots__ = ("msg", "arrays", "context", "max_message_bytes", "within", "session_id", "_watch")

    def __init__(self, msg: Any, arrays: dict[str, dict[str, np.ndarray]], context: grpc.ServicerContext,
                 max_message_bytes: int, within: int = 0):
        self.msg, self.arrays, self.context, self.max_message_bytes = msg, arrays, context, max_message_bytes
        self.within = within  # the reply's field number in a StreamAnswer, for a call of a CallStream
        self.session_id: str = getattr(msg, "session_id", "")  # for the access log; CreateSession sets it
        self._watch: Watch | None = None

    @property
    def watch(self) -> Watch:
        """When the engine must stop computing for this call: its deadline, or the client gone."""
        if self._watch is None:
            remaining = self.context.time_remaining()
            self._watch = Watch(None if remaining is None else time.monotonic() + remaining, self.context.is_active)
        return self._watch

    def reply(self, message: Message, **arrays: Mapping[str, Any] | None) -> bytes:
        """``message`` with its tensor maps, encoded. Raises ResourceExhausted (before the
        caller commits anything) when it would not fit in a message."""
        data = encode_within(self.within, message, **arrays) if self.within else encode(message, **arrays)
        if len(data) > self.max_message_bytes:
            if self.within and len(encode(message, **arrays)) <= self.max_message_bytes:
                raise Unanswered(f"the answer fits a unary message ({self.max_message_bytes} bytes at most) but "
                                 "not a StreamAnswer: the call is sent unary")
            raise ResourceExhausted(f"the response would take {len(data)} bytes, more than the message limit of "
                                    f"{self.max_message_bytes}; request fewer outputs or smaller batches",
                                    "outputs")
        return data


class Unanswered(Exception):
    """A CallStream call's answer fits the message limit only as the unary call's response
    (a StreamAnswer is a few bytes longer): the stream ends unanswered, before anything is
    committed, and the client sends that call unary."""


def gradient_service_handlers(servicer: Any, metrics: Metrics, max_message_bytes: int, max_elements: int,
                              authenticate: Callable[[grpc.ServicerContext], None] | None = None,
                              streams: Streams | None = None) -> dict[str, grpc.RpcMethodHandler]:
    """Method name -> handler for every RPC of GradientService, bytes in and bytes out.
    ``authenticate`` (auth.py) vets each call before its request is even decoded (a stream
    once, as it opens: its metadata cannot change); ``streams``
    bounds the open streams, and how long each waits for the client's next message (without:
    7 streams, 4 of them CallStreams, 60 s)."""
    streams = streams or Streams(7, 4, 60.0)
    handlers = {}
    for method in SERVICE.methods:
        if method.name == CALL_STREAM:  # below: it carries the unary calls
            continue
        request_type = message_factory.GetMessageClass(method.input_type)
        full_name = f"/{SERVICE.full_name}/{method.name}"
        vet = None if method.client_streaming else authenticate  # streams: _vetted, as they open

        def decoded(data: bytes, context: grpc.ServicerContext, request_type: Any = request_type,
                    vet: Callable[[grpc.ServicerContext], None] | None = vet) -> Call:
            if vet is not None:
                vet(context)
            return Call(*decode(data, request_type, max_elements), context, max_message_bytes)

        inner = getattr(servicer, method.name)
        if method.client_streaming:
            kind = "bidi_stream" if method.server_streaming else "client_stream"
            make = _bidi_stream if method.server_streaming else _client_stream
            handler = make(metrics.method(full_name, kind), inner, decoded, streams, authenticate)
        else:
            handler = _unary(metrics.method(full_name, "unary"), inner, decoded)
        handlers[method.name] = handler
    carried = {StreamCall.DESCRIPTOR.fields_by_number[number].name:
               (number, metrics.method(f"/{SERVICE.full_name}/{name}", "unary"), getattr(servicer, name))
               for name, number in CARRIED.items()}
    handlers[CALL_STREAM] = _call_stream(
        metrics.method(f"/{SERVICE.full_name}/{CALL_STREAM}", "bidi_stream"), carried,
        streams, authenticate, max_elements, max_message_bytes, metrics)
    return handlers


def _abort(record: RpcRecord, context: grpc.ServicerContext, error: BaseException) -> None:
    """End the call with the status ``error`` maps to, recorded first (raises, as grpc's abort does)."""
    status = status_of(error, record.method.full_method)
    record.end(status.code, status.details)
    context.abort_with_status(status)


def _unary(record_of: Any, inner: Callable[[Call], bytes], decoded: Callable) -> grpc.RpcMethodHandler:
    def behavior(data: bytes, context: grpc.ServicerContext) -> bytes | None:
        record = RpcRecord(record_of, context, len(data))
        call = None
        try:
            call = decoded(data, context)
            response = inner(call)
        except Exception as e:
            record.session = call.session_id if call is not None else ""
            _abort(record, context, e)
            return None  # abort raised; unreachable
        record.session = call.session_id
        record.sent(len(response))
        record.end()
        return response
    return grpc.unary_unary_rpc_method_handler(behavior)


class Streams:
    """How many streams may be open, and when a CallStream ends. Every open stream (CallStream,
    UploadData, Train) holds an RPC thread for its whole life, between its messages too: all
    together hold at most ``threads`` (the server's --max-workers - 1, so unary calls always
    find one), CallStreams at most ``call_streams`` of those. A stream that finds none free is
    refused with RESOURCE_EXHAUSTED at once, never queued.

    A CallStream ends only between calls: a request it has read is answered, or (read just as
    its idle wait expired) not run at all, so a client whose stream ended may send that request
    again. It ends once its answer has been sent and the client has sent no next request for
    ``idle_seconds`` (a watchdog ends it: waiting costs no reader thread of its own), after
    ``max_age_seconds``, and when the server stops or the interpreter exits (which waits for
    every RPC thread). ``shared_memory``: a CallStream from a client on this host may ask for a
    shared-memory region and pipes to carry its calls (shared_memory.py)."""

    def __init__(self, threads: int, call_streams: int, idle_seconds: float, max_age_seconds: float = math.inf,
                 shared_memory: bool = False):
        self.threads = threading.BoundedSemaphore(max(threads, 0))  # 0 (--max-workers 1): no stream at all
        self.slots, self.idle_seconds = threading.BoundedSemaphore(max(call_streams, 0)), idle_seconds
        self.max_age_seconds = max_age_seconds
        self.shared_memory = shared_memory  # a local client's CallStream may borrow a region (shared_memory.py)
        self.open = call_streams > 0
        self.stopping = False
        self.watchdog = Watchdog(min(0.25, idle_seconds / 4), "gradgate-stream-idle")
        _STOP_AT_EXIT.add(self)

    def stop(self) -> None:
        """End every stream once its call in progress (if any) is answered, rather than hold
        the shutdown's grace period; refuse new ones."""
        self.stopping, self.open = True, False
        self.watchdog.expire_all()


_STOP_AT_EXIT: weakref.WeakSet[Streams] = weakref.WeakSet()


def _exiting() -> None:
    for streams in list(_STOP_AT_EXIT):
        streams.stop()


# Before the interpreter joins executor threads, which the streams hold: concurrent.futures
# registers that join the same way, at its import (above), and these run in reverse order;
# an atexit hook would run after the join.
getattr(threading, "_register_atexit", atexit.register)(_exiting)


def _call_stream(record_of: Any, carried: dict[str, tuple[int, Any, Callable[[Call], bytes]]],
                 streams: Streams, authenticate: Callable[[grpc.ServicerContext], None] | None,
                 max_elements: int, max_message_bytes: int, metrics: Metrics) -> grpc.RpcMethodHandler:
    """Calls of the unary methods in ``carried`` (StreamCall's field -> its number, the
    method's metrics and its servicer method), one per request of a bidi stream, each answered
    in order as the unary call answers it; a call's error ends the stream with its status.
    Each call is also counted and logged as the unary call it stands for, so per-method
    rates, errors and latencies read the same whichever way calls come."""
    def behavior(datas: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        record = RpcRecord(record_of, context, None)
        _vetted(record, context, authenticate)  # before a slot is taken
        if not streams.open or not streams.slots.acquire(blocking=False):
            _refuse(record, context, "every CallStream slot of this server is taken (--max-call-streams); "
                                     "send the calls as unary calls", full=True)
        if not streams.threads.acquire(blocking=False):
            streams.slots.release()
            _refuse(record, context, _NO_THREAD + "; send the calls as unary calls", full=True)
        ends, failed, cancelled = time.monotonic() + streams.max_age_seconds, None, []
        lane = Lane(streams.shared_memory and local(context.peer()), max_message_bytes, metrics)
        running: list[bool] = []  # a request read and being run: cancel() leaves it be
        lock = threading.Lock()

        def alive() -> bool:  # while waiting for a signalled call (the pipes do not see the stream end)
            return context.is_active() and not streams.stopping and time.monotonic() <= ends

        def cancel() -> None:  # idle, or the server stopping: only between calls
            with lock:
                if running:  # a request came in as the wait expired: it is answered first
                    return
                cancelled.append(True)
            context.cancel()

        def end() -> None:
            if cancelled:  # as the client sees it: the stream may end before grpc reports the cancel
                record.end(grpc.StatusCode.CANCELLED,
                           f"idle for {streams.idle_seconds:g} s (--stream-idle-seconds), or the server stopping")
            else:
                record.end()

        try:
            # the idle clock runs from the answer handed over (a client that reads nothing holds
            # the send) to the next request read
            streams.watchdog.arm(context, streams.idle_seconds, cancel)
            while True:
                if streams.stopping or time.monotonic() > ends:  # stop() expired the waits armed before it
                    break
                try:
                    data = lane.next_call(datas, alive)
                finally:
                    streams.watchdog.disarm(context)
                if data is None:
                    break
                with lock:
                    if cancelled:  # the wait expired as this request came in: not run, so the client's
                        break  # re-sent call runs once
                    running.append(True)
                lane.unread = False  # the client sends only once it has read the last answer
                each = None
                try:
                    name, msg, arrays = decode_within(data, StreamCall, max_elements)
                    shared = name == "in_region"
                    if shared:  # the call is in the stream's shared-memory region
                        data = lane.read(msg)
                        name, msg, arrays = decode_within(data, StreamCall, max_elements)
                        if name in ("in_region", "open_region"):
                            raise InvalidArgument(f"the shared-memory region holds {name}, not a call", "in_region")
                    if name == "open_region":  # the region's own messages are not counted as the stream's
                        response = lane.open(msg)
                    elif name not in carried:
                        raise InvalidArgument("a StreamCall holds no call (set one field of its oneof)", "call")
                    else:
                        record.received(len(data))  # the call's own size, whichever way it came
                        number, call_record_of, inner = carried[name]
                        each = RpcRecord(call_record_of, context, len(data))
                        call = Call(msg, arrays, context, max_message_bytes, number)
                        record.session = each.session = call.session_id
                        response = inner(call)
                except Unanswered as e:  # nothing ran or changed: the client sends the call unary
                    if each is not None:
                        each.end(grpc.StatusCode.CANCELLED, str(e))
                    break
                except Exception as e:  # the call's status ends the stream too (after the slot is freed)
                    failed = status_of(e, (each or record).method.full_method)
                    if each is not None:
                        each.end(failed.code, failed.details)
                    record.end(failed.code, failed.details)
                    break
                if each is not None:
                    each.sent(len(response))
                    each.end()
                    record.sent(len(response))
                out = lane.answer(response, shared)
                running.clear()  # the answer is handed over: the idle clock runs from here
                streams.watchdog.arm(context, streams.idle_seconds, cancel)
                if out is not None:  # None: signalled through the pipe
                    yield out
        except GeneratorExit:  # grpc dropped the stream (the client went away, or cancel())
            end()
            raise
        except grpc.RpcError:  # cancelled while waiting: by the client, or by cancel()
            end()
        except Exception as e:
            _abort(record, context, e)
        else:
            end()  # a no-op after a failed call
        finally:
            lane.close()
            streams.watchdog.disarm(context)
            streams.threads.release()
            streams.slots.release()
        if failed is not None:
            context.abort_with_status(failed)
    return grpc.stream_stream_rpc_method_handler(behavior)


class Requests:
    """A stream's requests as Calls, read ahead by a thread of its own so that waiting is
    bounded: ``next()`` waits at most ``idle_seconds`` for the client's next message, then
    raises DeadlineExceeded, so a client that opens a stream and goes quiet does not hold an
    RPC thread for good; it ends the requests at once when the call is over (the client
    gone, or cut off by a stopping server). ``ready()`` takes the messages already here
    without waiting."""

    def __init__(self, record: RpcRecord, datas: Iterator[bytes], context: grpc.ServicerContext,
                 decoded: Callable[[bytes, grpc.ServicerContext], Call], idle_seconds: float):
        self._record, self._context, self._decoded, self._idle = record, context, decoded, idle_seconds
        self._inbox: queue.Queue = queue.Queue(maxsize=2)  # read ahead a little: grpc's flow control does the rest
        self._ended = False
        threading.Thread(target=self._read, args=(datas,), name="gradgate-stream-reader", daemon=True).start()

    def _read(self, datas: Iterator[bytes]) -> None:
        try:
            for data in datas:
                if not self._put(data):
                    return
        except Exception:  # grpc.RpcError: the call ended or broke; the handler hears it as the end
            pass
        self._put(_END)

    def _put(self, item: Any) -> bool:
        while self._context.is_active():  # a handler that stopped reading ends the call, and this thread
            try:
                self._inbox.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Requests:
        return self

    def __next__(self) -> Call:
        if self._ended:
            raise StopIteration
        give_up = time.monotonic() + self._idle
        while True:  # looking every quarter second whether the call is still on: a client that
            try:  # went away (cancelled, gone, past its deadline, cut by a stopping server) ends it now
                data = self._inbox.get(timeout=min(0.25, max(give_up - time.monotonic(), 0.0)))
                break
            except queue.Empty:
                if not self._context.is_active():
                    self._ended = True
                    raise StopIteration from None
                if time.monotonic() >= give_up:
                    raise DeadlineExceeded(f"the client sent no message on this stream for {self._idle:g} s "
                                           "(--stream-idle-seconds)") from None
        return self._take(data)

    def ready(self) -> list[Call]:
        calls = []
        while not self._ended:
            try:
                calls.append(self._take(self._inbox.get_nowait()))
            except (queue.Empty, StopIteration):
                break
        return calls

    def _take(self, data: Any) -> Call:
        if data is _END:
            self._ended = True
            raise StopIteration
        self._record.received(len(data))
        call = self._decoded(data, self._context)
        self._record.session = self._record.session or call.session_id
        return call


_END = object()


_NO_THREAD = "every RPC thread that streams may hold is taken (--max-workers - 1 streams are open)"


def _refuse(record: RpcRecord, context: grpc.ServicerContext, details: str, full: bool = False) -> None:
    """Refuse a stream for want of a slot or thread (raises, as grpc's abort does); ``full``
    tells the SDK so (gradgate.call_stream): it sends a CallStream's calls unary, and tries an
    UploadData or Train again a moment later."""
    record.end(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
    if full:
        context.set_trailing_metadata(((STREAMS_FULL, "full"),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


def _vetted(record: RpcRecord, context: grpc.ServicerContext,
            authenticate: Callable[[grpc.ServicerContext], None] | None) -> None:
    """Authenticate a stream as it opens, once for all its messages (ends it if that fails)."""
    try:
        if authenticate is not None:
            authenticate(context)
    except Exception as e:
        _abort(record, context, e)


def _opened(record: RpcRecord, context: grpc.ServicerContext, streams: Streams,
            authenticate: Callable[[grpc.ServicerContext], None] | None) -> None:
    """Vet a client or bidi stream, then take a thread for it (released by the caller)."""
    _vetted(record, context, authenticate)  # before a thread is taken
    if not streams.threads.acquire(blocking=False):
        _refuse(record, context, _NO_THREAD + "; try again shortly", full=True)


def _client_stream(record_of: Any, inner: Callable, decoded: Callable, streams: Streams,
                   authenticate: Callable[[grpc.ServicerContext], None] | None) -> grpc.RpcMethodHandler:
    def behavior(datas: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        record = RpcRecord(record_of, context, None)
        _opened(record, context, streams, authenticate)
        try:
            response = inner(Requests(record, datas, context, decoded, streams.idle_seconds), context)
        except Exception as e:
            _abort(record, context, e)
            return None
        finally:
            streams.threads.release()
        record.sent(len(response))
        record.end()
        return response
    return grpc.stream_unary_rpc_method_handler(behavior)


def _bidi_stream(record_of: Any, inner: Callable, decoded: Callable, streams: Streams,
                 authenticate: Callable[[grpc.ServicerContext], None] | None) -> grpc.RpcMethodHandler:
    def behavior(datas: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        record = RpcRecord(record_of, context, None)
        _opened(record, context, streams, authenticate)
        try:
            for response in inner(Requests(record, datas, context, decoded, streams.idle_seconds), context):
                record.sent(len(response))
                yield response
        except GeneratorExit:  # grpc dropped the stream (the client went away)
            record.end()
            raise
        except Exception as e:
            _abort(record, context, e)
        else:
            record.end()
        finally:
            streams.threads.release()
    return grpc.stream_stream_rpc_method_handler(behavior)


class Observed:
    """Stands in for the grpc.Server while a stock servicer (health, reflection) registers,
    wrapping each of its handlers once with the per-RPC metrics; ``pool`` gives them a
    thread pool of their own, so they answer while every compute thread is busy."""

    def __init__(self, server: grpc.Server, metrics: Metrics, pool: ThreadPoolExecutor | None = None):
        self.server, self.metrics, self.pool = server, metrics, pool

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(
            service, {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(tuple(_ObservedGeneric(self, g) for g in generic_handlers))

    def wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self.metrics.observed(full_method, handler, self.pool)


class _ObservedGeneric(grpc.GenericRpcHandler):
    def __init__(self, observed: Observed, inner: grpc.GenericRpcHandler):
        self.observed, self.inner = observed, inner
        self._cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if method not in self._cache:  # only known methods: unknown ones are not cached (bounded)
            handler = self.inner.service(details)
            if handler is None:
                return None
            self._cache[method] = self.observed.wrap(method, handler)
        return self._cache[method]
