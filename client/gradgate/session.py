"""Session: one graph with its parameters and cached activations on the server.

A session lives in one server's memory. If that server restarts, or a proxy sends
the session's calls to another replica, the session id is unknown there
(NOT_FOUND). The Session then re-creates itself from the graph and the parameter
values it last sent (the server never changes them on its own), replays the last
forward when the call was a Backward, and retries the call once: the results are
the same, with no state shared between servers (DESIGN.md, Scale-out).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from gradgate.call_stream import CARRIED, CallStream, when_free
from gradgate.codec import decode, dtype_of, encode, from_tensor_map, to_tensor_map
from gradgate.errors import GradgateError, from_rpc_error
from gradgate.gradcheck import GradCheckReport, check_session
from gradgate.graph import Graph, TensorSpec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import graph_pb2, train_pb2

if TYPE_CHECKING:
    from gradgate.client import Client
    from gradgate.optim import Optimizer
    from gradgate.transport import DirectStream, ThreadedStream

Arrays = Mapping[str, Any]
log = logging.getLogger("gradgate")


@dataclass(frozen=True)
class ForwardResult:
    loss: float
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class StepResult:
    """The result of forward_backward; unpacks as ``loss, grads``."""

    loss: float
    grads: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.loss, self.grads))


class Session:
    """A server session; use ``Client.session`` to open one. Arrays returned are read-only."""

    def __init__(self, client: Client, graph: Graph, params: Arrays, buffers: Arrays | None = None,
                 key: str | None = None):
        self.client, self.graph = client, graph
        # routes every call of this session, CreateSession included, to one replica; kept when re-created
        self.key: str = key or uuid.uuid4().hex
        self._dtypes = {v.name: v.dtype for v in (*graph.inputs, *graph.params)}
        self._closed = False
        self._graph = graph.to_proto()
        self._params = self._cast(params)  # what the server holds: all we need to re-create it
        self._buffers = {k: np.asarray(v, graph.dtype) for k, v in (buffers or {}).items()}  # ... and the state
        # the call whose activations the server caches: (method, request, arrays), and its forward id;
        # each thread also keeps the id of its own last forward, which its backward() names
        self._last_forward: tuple[str, Any, dict[str, Any]] | None = None
        self._forward_id = 0
        self._thread = threading.local()
        # the session's calls over one stream, when the client allows it (gradgate.call_stream)
        self._stream = CallStream(client, self.key) if client.call_streams else None
        response = self._create()
        self.parameter_count: int = response.parameter_count
        self.ttl_seconds: float = response.ttl_seconds
        # what the server inferred for every value, in topological order
        self.values: dict[str, TensorSpec] = {
            v.name: TensorSpec(v.name, tuple(v.shape), dtype_of(v.dtype).name) for v in response.values}
        # the graph's state buffers ("<node>.running_mean", ...): updated by train-mode forwards
        self.buffer_specs: dict[str, TensorSpec] = {
            v.name: TensorSpec(v.name, tuple(v.shape), dtype_of(v.dtype).name) for v in response.buffers}

    def _create(self, deadline: float | None = None) -> Any:
        response, _ = self.client.call("CreateSession", pb.CreateSessionRequest(graph=self._graph), self.key,
                                       deadline=deadline, params=self._params, buffers=self._buffers)
        self.id: str = response.session_id
        return response

    def _cast(self, arrays: Arrays | None) -> dict[str, np.ndarray]:
        # the server accepts only the declared dtypes; asarray copies only when a cast is needed
        dtypes = self._dtypes
        return {name: np.asarray(a, dtypes.get(name)) for name, a in arrays.items()} if arrays else {}

    def _call(self, method: str, request: Any, **arrays: Any) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
        """One RPC on this session; a session the server lost is re-created once (see the module
        doc), all within the client's timeout."""
        stream = self._stream if method in CARRIED else None
        deadline = time.monotonic() + self.client.timeout
        try:
            return self.client.call(method, request, self.key, stream=stream, deadline=deadline, **arrays)
        except GradgateError as e:
            if e.code != grpc.StatusCode.NOT_FOUND or self._closed or not self.client.recover_sessions:
                raise
        lost = self.id
        self._create(deadline)
        if method == "Backward" and self._last_forward is not None:
            forward_method, forward_request, forward_arrays = self._last_forward
            forward_request.session_id = self.id
            replayed, _ = self.client.call(forward_method, forward_request, self.key, deadline=deadline,
                                           **forward_arrays)
            request.forward_id = self._forward_id = self._thread.forward_id = replayed.forward_id
        log.warning("session %s... was not found on the server (restarted, expired or another replica); "
                    "re-created it as %s... from the parameters last sent", lost[:8], self.id[:8])
        request.session_id = self.id
        return self.client.call(method, request, self.key, stream=stream, deadline=deadline, **arrays)

    def _sent(self, params: dict[str, np.ndarray], forward: tuple[str, Any, dict[str, Any]] | None,
              forward_id: int = 0, buffers: dict[str, np.ndarray] | None = None) -> None:
        """After a successful call: the server now holds ``params``, ``buffers`` and the activations
        of ``forward``."""
        if params:
            self._params.update(params)
        if buffers:
            self._buffers.update(buffers)
        self._last_forward, self._forward_id = forward, forward_id
        self._thread.forward_id = forward_id

    def forward(self, batch: Arrays, outputs: Sequence[str] | None = None,
                params: Arrays | None = None, *, train: bool = True, seed: int = 0) -> ForwardResult:
        """Set ``params`` (if any), run forward on ``batch`` and cache the activations.

        ``outputs`` names the nodes to return; None returns the graph's declared outputs.
        ``train=False`` runs in eval mode (batchnorm uses its running statistics, dropout is
        off); ``seed`` seeds random ops (dropout), so the same seed gives the same masks.
        """
        request = pb.ForwardRequest(session_id=self.id, outputs=outputs or (), mode=_mode(train), seed=seed)
        arrays = {"inputs": self._cast(batch), "params": self._cast(params)}
        response, got = self._call("Forward", request, **arrays)
        self._sent(arrays["params"], ("Forward", request, arrays), response.forward_id, got.get("buffers"))
        return ForwardResult(response.loss, got["outputs"])

    def backward(self, inputs: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the loss of this thread's last forward: every parameter, and the float inputs
        if ``inputs``. Fails with FAILED_PRECONDITION if another forward on this session (say, from
        another thread) has replaced that forward, rather than return that forward's gradients."""
        forward_id = getattr(self._thread, "forward_id", self._forward_id)
        request = pb.BackwardRequest(session_id=self.id, input_grads=inputs, forward_id=forward_id)
        return _grads(self._call("Backward", request)[1])

    def forward_backward(self, batch: Arrays, params: Arrays | None = None,
                         outputs: Sequence[str] | None = None, inputs: bool = False, *, train: bool = True,
                         seed: int = 0) -> StepResult:
        """forward then backward in one round trip; ``loss, grads = sess.forward_backward(batch)``.
        ``train`` and ``seed`` as in ``forward``."""
        request = pb.ForwardBackwardRequest(session_id=self.id, outputs=outputs or (), input_grads=inputs,
                                            mode=_mode(train), seed=seed)
        arrays = {"inputs": self._cast(batch), "params": self._cast(params)}
        response, got = self._call("ForwardBackward", request, **arrays)
        self._sent(arrays["params"], ("ForwardBackward", request, arrays), response.forward_id, got.get("buffers"))
        return StepResult(response.loss, _grads(got), got["outputs"])

    def set_params(self, params: Arrays | None = None, buffers: Arrays | None = None) -> None:
        """Replace any subset of the parameters and of the state buffers."""
        params = self._cast(params)
        state = {k: np.asarray(v, self.graph.dtype) for k, v in (buffers or {}).items()}
        self._call("SetParameters", pb.SetParametersRequest(session_id=self.id), params=params, buffers=state)
        if params:
            self._sent(params, None, buffers=state)  # the server dropped its cached forward too
        else:
            self._buffers.update(state)

    def upload(self, data: Arrays, chunk_bytes: int = 4 * 2**20) -> int:
        """Store ``data`` ({input name: rows}) in the session for training on the server, in
        chunks of about ``chunk_bytes`` (a client stream); replaces an earlier upload.
        Returns the bytes it counts against the server's data budget."""
        columns = self._cast(data)
        rows = len(next(iter(columns.values())))
        row_bytes = max(1, sum(a[:1].nbytes for a in columns.values()))
        step = max(1, min(chunk_bytes, self.client.max_message_bytes // 2) // row_bytes)

        def chunks() -> Iterator[bytes]:
            for start in range(0, rows, step):
                request = train_pb2.UploadDataRequest(session_id=self.id, rows=rows) if start == 0 else \
                    train_pb2.UploadDataRequest()
                yield encode(request, columns={k: a[start:start + step] for k, a in columns.items()})

        timeout = self.client.timeout + rows * row_bytes / 50e6  # seconds: allow for 50 MB/s at least

        def send() -> bytes | None:
            with self._data_stream("UploadData", timeout) as stream:
                for chunk in chunks():
                    stream.put(chunk)
                stream.put(None)
                reply = next(stream, None)
                for _ in stream:  # its status
                    pass
                return reply
        try:  # a server whose stream threads are all taken may have one free a moment later
            reply = when_free(send, self.client.retry_seconds)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if reply is None:
            raise GradgateError(grpc.StatusCode.INTERNAL, "the server ended UploadData without an answer")
        return int(decode(reply, train_pb2.UploadDataResponse)[0].bytes)

    def train_stream(self, optimizer: Optimizer, batch_size: int, epochs: int, seed: int, start_step: int = 0,
                     sync_every: int = 0) -> Iterator[train_pb2.TrainResponse]:
        """The server's Train stream over the uploaded data (gg.train(on_server=True) drives it);
        it is cancelled when this generator is closed before its end."""
        start = train_pb2.TrainStart(session_id=self.id, optimizer=optimizer.to_proto(), batch_size=batch_size,
                                     epochs=epochs, seed=seed, start_step=start_step, sync_every=sync_every)
        if optimizer.step_count or start_step:
            start.optimizer_state.step = optimizer.step_count
            to_tensor_map(optimizer.state(), start.optimizer_state.slots)
        request = train_pb2.TrainRequest(start=start).SerializeToString()

        def opened() -> tuple[DirectStream | ThreadedStream, bytes | None]:  # a refusal comes as the first answer
            with self._data_stream("Train") as stream:
                stream.put(request)
                stream.put(None)
                return stream, next(stream, None)

        stream = None
        try:
            stream, data = when_free(opened, self.client.retry_seconds)
            while data is not None:
                yield train_pb2.TrainResponse.FromString(data)
                data = next(stream, None)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            if stream is not None:
                stream.abandon()  # a no-op once it has ended

    def _data_stream(self, method: str, timeout: float | None = None) -> DirectStream | ThreadedStream:
        """A stream of UploadData or Train; the session's CallStream pauses first, so the server
        thread it holds serves it."""
        if self._stream is not None:
            self._stream.pause()
        return self.client.open_stream(method, self.key, timeout)

    def _synced(self, sync: train_pb2.TrainSync, optimizer: Optimizer) -> dict[str, np.ndarray]:
        """Take a Train sync: the server's parameters and the optimizer's state as of it."""
        params = from_tensor_map(sync.params, "params")
        optimizer.load_state(sync.optimizer_state.step, from_tensor_map(sync.optimizer_state.slots, "slots"))
        self._params.update(params)
        self._last_forward, self._forward_id = None, 0
        return params

    def _restore(self, params: dict[str, np.ndarray], deadline: float) -> bool:
        """Put ``params`` back after a broken Train stream, waiting up to ``deadline`` for the
        server: into the session if it survived (True: its data too), else into a new one."""
        self._params.update(params)
        while True:
            try:
                self.client.call("SetParameters", pb.SetParametersRequest(session_id=self.id), self.key,
                                 wait_for_ready=True, params=params)
                return True
            except GradgateError as e:
                if e.code == grpc.StatusCode.NOT_FOUND:
                    self._create()
                    return False
                if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_params(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named parameters, or all of them."""
        return self._call("GetParameters", pb.GetParametersRequest(session_id=self.id, names=names or ()))[1]["params"]

    def get_buffers(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named state buffers (e.g. "bn1.running_mean"), or all of them."""
        if not names and not self.buffer_specs:
            return {}
        request = pb.GetParametersRequest(session_id=self.id, names=names or list(self.buffer_specs))
        buffers = self._call("GetParameters", request)[1]["buffers"]
        self._buffers.update(buffers)
        return buffers

    def gradient_check(self, batch: Arrays, mode: str = "sparse", params: Arrays | None = None, *,
                       train: bool = True, forward_seed: int = 0, **settings: Any) -> GradCheckReport:
        """Compare the analytic gradients at ``batch`` with centered differences, on the server in float64.

        ``mode`` is sparse | full | fast; ``params`` overrides parameter values for this check only;
        ``train`` and ``forward_seed`` are the forward's mode and dropout seed (the masks stay fixed
        while coordinates move); ``settings`` are gradgate.gradcheck.settings's (eps, atol, rtol,
        num_checks, seed, wrt, include_inputs, max_worst). The session's parameters, buffers and
        cached forward are left as they were.
        """
        return check_session(self, batch, mode, params, train=train, forward_seed=forward_seed, **settings)

    def close(self) -> None:
        """Free the session on the server. Closing twice, a session the server already
        expired, or one whose client is closed (the server expires it after its TTL) is
        harmless, so leaving a ``with`` block never hides the original error."""
        if not self._closed:
            self._closed = True
            deadline = time.monotonic() + self.client.timeout  # for both: a frozen server costs one timeout
            if self._stream is not None:
                self._stream.close(deadline)
            if self.client.closed:
                return
            try:
                self.client.call("CloseSession", pb.CloseSessionRequest(session_id=self.id), self.key,
                                 deadline=deadline)
            except GradgateError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _mode(train: bool) -> Any:
    return graph_pb2.MODE_TRAIN if train else graph_pb2.MODE_EVAL


def _grads(arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    # input_grads is empty unless they were asked for
    return {**arrays["param_grads"], **arrays["input_grads"]}
