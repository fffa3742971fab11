"""Observability in one place: every Prometheus metric, the per-RPC record that
keeps the standard grpc_server_* metrics and logs one line per RPC (rpc.py puts it
around every handler), and the metrics HTTP endpoint. docs/operations.md lists every metric.

Each server owns a ``Metrics`` with its own CollectorRegistry, so many servers in
one process (tests, the SDK's embedded server) never collide.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Metric
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.utils import floatToGoString

from .logs import ACCESS, access

if TYPE_CHECKING:
    from .sessions import SessionStore


# Calls range from a ~0.3 ms ListOps to multi-second forwards on big batches.
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
# One op on one node: microseconds for small tensors, seconds for huge matmuls.
OP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
              2.5, 5)
BYTES_BUCKETS = tuple(float(4**k) for k in range(3, 14))  # 64 B .. 64 MiB, the default message limit


def _go_code_name(code: grpc.StatusCode) -> str:
    """grpc_code as Go's codes.Code.String() spells it ("InvalidArgument"), which is
    what go-grpc-prometheus exports and existing dashboards and alerts match on."""
    special = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}
    return special.get(code) or "".join(w.capitalize() for w in code.name.split("_"))


GRPC_CODES: dict[grpc.StatusCode, str] = {c: _go_code_name(c) for c in grpc.StatusCode}


class Metrics:
    """Every metric of one server. Recording methods are cheap and thread-safe."""

    def __init__(self, version: str = "unknown", cache_budget_bytes: int = 0):
        self.registry = r = CollectorRegistry()
        # the per-method series of every RPC, counted in plain Python (see RpcSeries)
        self._methods: dict[str, _MethodMetrics] = {}
        r.register(RpcSeries(self._methods))

        self.sessions_active = Gauge("gradgate_sessions_active", "Sessions held by the server.", registry=r)
        self.sessions_created = Counter("gradgate_sessions_created_total", "Sessions created.", registry=r)
        self.sessions_closed = Counter(
            "gradgate_sessions_closed_total",
            "Sessions ended: reason=closed (CloseSession) or expired (idle longer than the TTL).",
            ["reason"], registry=r)
        self.evictions = Counter(
            "gradgate_activations_evicted_total",
            "Times a session's cached activations were evicted to fit the cache budget (the session stays; "
            "its next Backward needs a new Forward).", registry=r)
        self.cache_bytes = Gauge("gradgate_cache_bytes", "Bytes of cached activations held by all sessions.",
                                 registry=r)
        self.cache_budget = Gauge("gradgate_cache_budget_bytes", "The cache budget (--cache-bytes).", registry=r)
        self.cache_budget.set(cache_budget_bytes)
        self.state_bytes = Gauge("gradgate_state_bytes", "Bytes of parameters, buffers, uploaded datasets, "
                                 "training optimizer state and compiled graphs (estimated) held by all sessions.",
                                 registry=r)
        self.state_budget = Gauge("gradgate_state_budget_bytes", "The state budget (--state-bytes).", registry=r)
        self.op_seconds = Histogram("gradgate_op_compute_seconds",
                                    "Compute time of one node, by op type and pass (forward|backward).",
                                    ["op", "pass"], buckets=OP_BUCKETS, registry=r)
        self.examples = Counter("gradgate_examples_processed_total",
                                "Examples (batch rows) run through a forward pass.", registry=r)
        self.gradient_checks = Counter("gradgate_gradient_checks_total", "Gradient checks run, by result.",
                                       ["result"], registry=r)
        self.nonfinite = Counter("gradgate_nonfinite_values_total",
                                 "NaN or infinite values computed, in losses or in gradients.", ["kind"],
                                 registry=r)
        self.shared_memory_bytes = Gauge("gradgate_shared_memory_bytes",
                                         "Bytes of the shared-memory regions lent to local clients' CallStreams.",
                                         registry=r)
        self.shared_memory_calls = Counter("gradgate_shared_memory_calls_total",
                                           "CallStream calls that came through a shared-memory region.", registry=r)
        Info("gradgate_build", "Build information; the value is always 1.", registry=r).info(
            {"version": version, "python_version": platform.python_version(), "grpc_version": grpc.__version__,
             "numpy_version": np.__version__})
        # Series that exist from the start, so rate() and alerts see 0 rather than nothing.
        for reason in ("closed", "expired"):
            self.sessions_closed.labels(reason)
        for result in ("pass", "fail"):
            self.gradient_checks.labels(result)
        for kind in ("loss", "gradient"):
            self.nonfinite.labels(kind)
        self._op_timers: dict[tuple[str, str], Callable[[float], None]] = {}
        self._http: WSGIServer | None = None

    # -- domain recorders --------------------------------------------------------

    def watch_store(self, store: SessionStore) -> None:
        """Read session count, cache and state bytes live from ``store`` at every scrape."""
        self.sessions_active.set_function(lambda: len(store))
        self.cache_bytes.set_function(lambda: store.cache_bytes)
        self.state_bytes.set_function(lambda: store.state_bytes)
        self.state_budget.set(store.state_budget)

    def session_event(self, event: str) -> None:
        """SessionStore's hook: created | closed | expired | evicted."""
        if event == "created":
            self.sessions_created.inc()
        elif event == "evicted":
            self.evictions.inc()
        else:
            self.sessions_closed.labels(event).inc()

    def op_timer(self, pass_: str) -> Callable[[str, float], None]:
        """A callback ``(op, seconds)`` for the engine's ``on_step``."""
        def observe(op: str, seconds: float) -> None:
            timer = self._op_timers.get((op, pass_))
            if timer is None:  # op names come from the registry, so this stays bounded
                timer = self._op_timers[op, pass_] = self.op_seconds.labels(op, pass_).observe
            timer(seconds)
        return observe

    def forward_ran(self, examples: int, loss: float) -> None:
        """A forward over ``examples`` batch rows gave ``loss`` (counted as non-finite if it is)."""
        self.examples.inc(examples)
        if not math.isfinite(loss):
            self.nonfinite.labels("loss").inc()

    def gradient_check(self, passed: bool) -> None:
        """Call once per gradient check run (the GradientCheck RPC)."""
        self.gradient_checks.labels("pass" if passed else "fail").inc()

    def check_finite(self, kind: str, values: Iterable[np.ndarray]) -> None:
        """Count NaN/Inf among the arrays ``values`` (a loss: forward_ran); ``kind`` labels them."""
        bad, small = 0, []
        with np.errstate(all="ignore"):  # huge finite values: counted below, not warned about
            for v in values:
                if v.dtype.kind == "f" and v.size:
                    if v.size <= _SMALL:  # checked together below: one numpy call instead of one each
                        small.append(v.reshape(-1))
                    elif not math.isfinite(np.dot(r := v.reshape(-1), r)):
                        # one BLAS pass, faster than a sum: NaN/Inf if any element is (or on overflow: the count finds 0)
                        bad += v.size - int(np.count_nonzero(np.isfinite(v)))
            if small:
                together = np.concatenate(small) if len(small) > 1 else small[0]
                if not math.isfinite(np.dot(together, together)):
                    bad += together.size - int(np.count_nonzero(np.isfinite(together)))
        if bad:
            self.nonfinite.labels(kind).inc(bad)

    # -- the metrics endpoint ------------------------------------------------------

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port) in a thread; returns the bound port."""
        host = host.strip("[]")

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._http = make_server(host, port, prometheus_client.make_wsgi_app(self.registry), Server, _QuietHandler)
        # a short poll interval so stop() returns promptly
        threading.Thread(target=self._http.serve_forever, args=(0.05,), name="gradgate-metrics", daemon=True).start()
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def scrape(self) -> str:
        """The text exposition, as the endpoint would serve it."""
        return prometheus_client.generate_latest(self.registry).decode()

    def method(self, full_method: str, grpc_type: str) -> _MethodMetrics:
        m = self._methods.get(full_method)
        if m is None:  # setdefault: two threads resolving one method share one
            m = self._methods.setdefault(full_method, _MethodMetrics(full_method, grpc_type))
        return m

    def observed(self, full_method: str, handler: grpc.RpcMethodHandler,
                 pool: ThreadPoolExecutor | None = None) -> grpc.RpcMethodHandler:
        """``handler`` of a stock servicer with the per-RPC metrics and log line around it;
        run in ``pool`` when given."""
        kind = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream",
                (True, True): "bidi_stream"}[handler.request_streaming, handler.response_streaming]
        return _observed(self.method(full_method, kind), handler, pool)


_SMALL = 4096  # elements: arrays up to this size are checked for NaN/Inf in one concatenation


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log line per scrape
        pass


class _Buckets:
    """A histogram's bucket counts and sum (its method's lock guards them)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(le, count) pairs as Prometheus wants them, and the sum."""
        return [(floatToGoString(le), float(n)) for le, n in
                zip((*self.bounds, math.inf), itertools.accumulate(self.counts))], self.sum


class _MethodMetrics:
    """The counts of one RPC method, kept under one lock: recording a unary call takes three
    short locked updates (3.4 us in a loop), where prometheus_client's objects took a lock and
    a bucket search for each of its eight (8.0 us). RpcSeries turns them into metric families
    at scrape time."""

    def __init__(self, full_method: str, grpc_type: str):
        self.full_method = full_method
        service, method = full_method.lstrip("/").rsplit("/", 1)
        self.labels = (grpc_type, service, method)
        self.created = time.time()
        self.lock = threading.Lock()
        self.started = self.received = self.sent = 0
        # Code OK exists from the start, at 0, as in go-grpc-prometheus: methods are resolved
        # when the server starts, so the first calls are an increase that rate() and alerts see.
        # Other codes appear with their first call: [count, when].
        self.handled: dict[str, list] = {GRPC_CODES[grpc.StatusCode.OK]: [0, self.created]}
        self.seconds = _Buckets(LATENCY_BUCKETS)
        self.request_bytes, self.response_bytes = _Buckets(BYTES_BUCKETS), _Buckets(BYTES_BUCKETS)

    def start(self, request_bytes: int | None) -> None:
        with self.lock:
            self.started += 1
            if request_bytes is not None:
                self.received += 1
                self.request_bytes.observe(request_bytes)

    def receive(self, size: int) -> None:
        with self.lock:
            self.received += 1
            self.request_bytes.observe(size)

    def send(self, size: int) -> None:
        with self.lock:
            self.sent += 1
            self.response_bytes.observe(size)

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        name = GRPC_CODES[code]
        with self.lock:
            count = self.handled.get(name)
            if count is None:
                count = self.handled[name] = [0, time.time()]
            count[0] += 1
            self.seconds.observe(seconds)


class RpcSeries:
    """The grpc_server_* series (go-grpc-prometheus's names) and gradgate_request/response_bytes
    of every method, as a prometheus_client collector."""

    def __init__(self, methods: dict[str, _MethodMetrics]):
        self.methods = methods

    def describe(self) -> list[Metric]:
        return self._families([])

    def collect(self) -> list[Metric]:
        return self._families(list(self.methods.values()))

    @staticmethod
    def _families(methods: list[_MethodMetrics]) -> list[Metric]:
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily("grpc_server_started", "RPCs started on the server.", labels=grpc_labels)
        handled = CounterMetricFamily("grpc_server_handled", "RPCs completed on the server, by status code.",
                                      labels=[*grpc_labels, "grpc_code"])
        handling = HistogramMetricFamily("grpc_server_handling_seconds",
                                         "Time from the start of an RPC to its status, in seconds.", labels=grpc_labels)
        received = CounterMetricFamily("grpc_server_msg_received", "Request messages received.", labels=grpc_labels)
        sent = CounterMetricFamily("grpc_server_msg_sent", "Response messages sent.", labels=grpc_labels)
        payload_labels = ["grpc_service", "grpc_method"]
        request_bytes = HistogramMetricFamily("gradgate_request_bytes", "Serialized size of each request message.",
                                              labels=payload_labels)
        response_bytes = HistogramMetricFamily("gradgate_response_bytes", "Serialized size of each response message.",
                                               labels=payload_labels)
        # the *_created samples prometheus_client's own metrics have, unless it was told to drop them
        # (prometheus_client.disable_created_metrics(), as the CLI does; read where that keeps it)
        with_created = getattr(prometheus_client.metrics, "_use_created", True)
        for m in methods:
            labels = list(m.labels)
            created = m.created if with_created else None
            with m.lock:  # one consistent reading of the method
                counts = m.started, m.received, m.sent, {code: tuple(n) for code, n in m.handled.items()}
                histograms = m.seconds.cumulative(), m.request_bytes.cumulative(), m.response_bytes.cumulative()
            started.add_metric(labels, counts[0], created)
            received.add_metric(labels, counts[1], created)
            sent.add_metric(labels, counts[2], created)
            for code, (n, first) in counts[3].items():
                handled.add_metric([*labels, code], n, first if with_created else None)
            for family, (buckets, total), names in zip((handling, request_bytes, response_bytes), histograms,
                                                       (grpc_labels, payload_labels, payload_labels)):
                values = labels[-len(names):]
                family.add_metric(values, buckets, total)
                if created is not None:  # HistogramMetricFamily takes no created time: the sample Histogram has
                    family.add_sample(f"{family.name}_created", dict(zip(names, values)), created)
        return [started, handled, handling, received, sent, request_bytes, response_bytes]


class RpcRecord:
    """One RPC in progress: counts its messages and records its end exactly once.
    Sizes are those of the bytes on the wire, taken where they are at hand."""

    __slots__ = ("method", "context", "start", "received_bytes", "sent_bytes", "session", "_once")

    def __init__(self, method: _MethodMetrics, context: grpc.ServicerContext, request_bytes: int | None):
        self.method, self.context = method, context
        self.start = time.perf_counter()
        self.received_bytes = self.sent_bytes = 0
        self.session = ""
        self._once = [True]  # list.pop is atomic: end() may race with a stream's close callback
        method.start(request_bytes)
        if request_bytes is not None:
            self.received_bytes = request_bytes

    def received(self, size: int) -> None:
        self.received_bytes += size
        self.method.receive(size)

    def sent(self, size: int) -> None:
        self.sent_bytes += size
        self.method.send(size)

    def end(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        """Record the call's status: ``code`` (None: OK), unless the client went away first:
        then what it saw, DEADLINE_EXCEEDED or CANCELLED (a pass stopped for that reason raises
        DeadlineExceeded, which would answer DEADLINE_EXCEEDED had the client stayed)."""
        try:
            self._once.pop()
        except IndexError:
            return
        seconds = time.perf_counter() - self.start
        if not self.context.is_active():
            remaining = self.context.time_remaining()  # None (documented) or huge without a deadline
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED)
        elif code is None:
            code = grpc.StatusCode.OK
        self.method.finish(code, seconds)
        if ACCESS.isEnabledFor(logging.INFO):
            self._log(code, seconds, details)

    def _log(self, code: grpc.StatusCode, seconds: float, details: str) -> None:
        fields: dict[str, Any] = {"method": self.method.full_method, "code": code.name,
                                  "duration_ms": round(seconds * 1e3, 3),
                                  "request_bytes": self.received_bytes, "response_bytes": self.sent_bytes}
        if self.session:
            fields["session"] = self.session[:8]  # enough to correlate, useless as a credential
        if details:  # our messages name nodes, fields and shapes, never tensor values
            fields["error"] = details[:300]
        access(fields, _Line(fields))


class _Line:
    """The text of an access-log line, made only if a text formatter asks for it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields

    def __str__(self) -> str:  # client text (a session id, names in an error) escaped: one line stays one line
        return " ".join(f"{k}={_printable(str(v))}" for k, v in self.fields.items())


def _printable(text: str) -> str:
    """Client text with control characters escaped, so it never starts a log line of its own."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# -- stock servicers (health, reflection): their handlers wrapped once -------------------

def _observed(method: _MethodMetrics, handler: grpc.RpcMethodHandler,
              pool: ThreadPoolExecutor | None) -> grpc.RpcMethodHandler:
    kind = ("stream_stream" if handler.response_streaming else "stream_unary") if handler.request_streaming \
        else ("unary_stream" if handler.response_streaming else "unary_unary")
    inner = getattr(handler, kind)
    if kind == "unary_unary":
        behavior = _unary_unary(method, inner)
    elif kind == "unary_stream":
        behavior = (_unary_stream_non_blocking(method, inner) if getattr(inner, "experimental_non_blocking", False)
                    else _unary_stream(method, inner))
    elif kind == "stream_unary":
        behavior = _stream_unary(method, inner)
    else:
        behavior = _stream_stream(method, inner)
    if pool is not None:
        behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return handler._replace(**{kind: behavior})


def _end(record: RpcRecord, raised: bool) -> None:
    code = record.context.code()
    record.end(grpc.StatusCode.UNKNOWN if raised and code is None else code)


def _unary_unary(method: _MethodMetrics, inner: Callable) -> Callable:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        record = RpcRecord(method, context, request.ByteSize())
        raised = True
        try:
            response = inner(request, context)
            if response is not None and context.code() in (None, grpc.StatusCode.OK):
                record.sent(response.ByteSize())
            raised = False
            return response
        finally:
            _end(record, raised)
    return behavior


def _counted_requests(record: RpcRecord, requests: Iterator) -> Iterator:
    for request in requests:
        record.received(request.ByteSize())
        yield request


def _counted_responses(record: RpcRecord, responses: Iterator) -> Iterator:
    raised = True
    try:
        for response in responses:
            record.sent(response.ByteSize())
            yield response
        raised = False
    finally:  # also on GeneratorExit when grpc drops a cancelled stream
        _end(record, raised)


def _unary_stream(method: _MethodMetrics, inner: Callable) -> Callable:
    def behavior(request: Any, context: grpc.ServicerContext) -> Iterator:
        record = RpcRecord(method, context, request.ByteSize())
        try:
            responses = inner(request, context)
        except BaseException:
            _end(record, True)
            raise
        return _counted_responses(record, responses)
    return behavior


def _unary_stream_non_blocking(method: _MethodMetrics, inner: Callable) -> Callable:
    """Health Watch holds no thread while it waits; keep it that way."""
    def behavior(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> Any:
        record = RpcRecord(method, context, request.ByteSize())

        def counted_send(response: Any) -> None:
            if response is None:  # the handler finished the stream
                record.end(grpc.StatusCode.OK)
            else:
                record.sent(response.ByteSize())
            send(response)

        context.add_callback(lambda: record.end(grpc.StatusCode.CANCELLED))  # no-op if it already ended
        return inner(request, context, counted_send)
    behavior.experimental_non_blocking = True  # type: ignore[attr-defined]
    return behavior


def _stream_unary(method: _MethodMetrics, inner: Callable) -> Callable:
    def behavior(requests: Iterator, context: grpc.ServicerContext) -> Any:
        record = RpcRecord(method, context, None)
        raised = True
        try:
            response = inner(_counted_requests(record, requests), context)
            if response is not None and context.code() in (None, grpc.StatusCode.OK):
                record.sent(response.ByteSize())
            raised = False
            return response
        finally:
            _end(record, raised)
    return behavior


def _stream_stream(method: _MethodMetrics, inner: Callable) -> Callable:
    def behavior(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        record = RpcRecord(method, context, None)
        try:
            responses = inner(_counted_requests(record, requests), context)
        except BaseException:
            _end(record, True)
            raise
        return _counted_responses(record, responses)
    return behavior
