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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from gradgate.codec import dtype_of, from_tensor_map, to_tensor_map
from gradgate.errors import GradgateError
from gradgate.gradcheck import GradCheckReport, check_session
from gradgate.graph import Graph, TensorSpec
from gradgate.v1 import gradient_service_pb2 as pb

if TYPE_CHECKING:
    from gradgate.client import Client

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

    def __init__(self, client: Client, graph: Graph, params: Arrays):
        self.client, self.graph = client, graph
        self._dtypes = {v.name: v.dtype for v in (*graph.inputs, *graph.params)}
        self._closed = False
        self._graph = graph.to_proto()
        self._params = self._cast(params)  # what the server holds: all we need to re-create it
        self._last_forward: tuple[str, Any] | None = None  # (method, request) whose activations the server caches
        response = self._create()
        self.parameter_count: int = response.parameter_count
        self.ttl_seconds: float = response.ttl_seconds
        # what the server inferred for every value, in topological order
        self.values: dict[str, TensorSpec] = {
            v.name: TensorSpec(v.name, tuple(v.shape), dtype_of(v.dtype).name) for v in response.values}

    def _create(self) -> Any:
        request = pb.CreateSessionRequest(graph=self._graph)
        to_tensor_map(self._params, request.params)
        response = self.client.call("CreateSession", request)
        self.id: str = response.session_id
        return response

    def _cast(self, arrays: Arrays | None) -> dict[str, np.ndarray]:
        # the server accepts only the declared dtypes; asarray copies only when a cast is needed
        return {name: np.asarray(a, self._dtypes.get(name)) for name, a in (arrays or {}).items()}

    def _encode(self, arrays: Arrays | None, out: Any) -> None:
        to_tensor_map(self._cast(arrays), out)

    def _call(self, method: str, request: Any) -> Any:
        """One RPC on this session; a session the server lost is re-created once (see the module doc)."""
        try:
            return self.client.call(method, request, self.id)
        except GradgateError as e:
            if e.code != grpc.StatusCode.NOT_FOUND or self._closed or not self.client.recover_sessions:
                raise
        lost = self.id
        self._create()
        if method == "Backward" and self._last_forward is not None:
            forward_method, forward_request = self._last_forward
            forward_request.session_id = self.id
            self.client.call(forward_method, forward_request, self.id)
        log.warning("session %s... was not found on the server (restarted, expired or another replica); "
                    "re-created it as %s... from the parameters last sent", lost[:8], self.id[:8])
        request.session_id = self.id
        return self.client.call(method, request, self.id)

    def _sent(self, params: dict[str, np.ndarray], forward: tuple[str, Any] | None) -> None:
        """After a successful call: the server now holds ``params`` and the activations of ``forward``."""
        self._params.update(params)
        self._last_forward = forward

    def forward(self, batch: Arrays, outputs: Sequence[str] | None = None,
                params: Arrays | None = None) -> ForwardResult:
        """Set ``params`` (if any), run forward on ``batch`` and cache the activations.

        ``outputs`` names the nodes to return; None returns the graph's declared outputs.
        """
        request = pb.ForwardRequest(session_id=self.id, outputs=outputs or ())
        self._encode(batch, request.inputs)
        to_tensor_map(params := self._cast(params), request.params)
        response = self._call("Forward", request)
        self._sent(params, ("Forward", request))
        return ForwardResult(response.loss, from_tensor_map(response.outputs, "outputs"))

    def backward(self, inputs: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the loss of the last forward: every parameter, and the float inputs if ``inputs``."""
        return _grads(self._call("Backward", pb.BackwardRequest(session_id=self.id, input_grads=inputs)))

    def forward_backward(self, batch: Arrays, params: Arrays | None = None,
                         outputs: Sequence[str] | None = None, inputs: bool = False) -> StepResult:
        """forward then backward in one round trip; ``loss, grads = sess.forward_backward(batch)``."""
        request = pb.ForwardBackwardRequest(session_id=self.id, outputs=outputs or (), input_grads=inputs)
        self._encode(batch, request.inputs)
        to_tensor_map(params := self._cast(params), request.params)
        response = self._call("ForwardBackward", request)
        self._sent(params, ("ForwardBackward", request))
        return StepResult(response.loss, _grads(response), from_tensor_map(response.outputs, "outputs"))

    def set_params(self, params: Arrays) -> None:
        """Replace any subset of the parameters."""
        request = pb.SetParametersRequest(session_id=self.id)
        to_tensor_map(params := self._cast(params), request.params)
        self._call("SetParameters", request)
        self._sent(params, None)  # the server dropped its cached forward too

    def get_params(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named parameters, or all of them."""
        response = self._call("GetParameters", pb.GetParametersRequest(session_id=self.id, names=names or ()))
        return from_tensor_map(response.params, "params")

    def gradient_check(self, batch: Arrays, mode: str = "sparse", params: Arrays | None = None,
                       **settings: Any) -> GradCheckReport:
        """Compare the analytic gradients at ``batch`` with centered differences, on the server in float64.

        ``mode`` is sparse | full | fast; ``params`` overrides parameter values for this check only;
        ``settings`` are gradgate.gradcheck.settings's (eps, atol, rtol, num_checks, seed, wrt,
        include_inputs, max_worst). The session's parameters and cached forward are left as they were.
        """
        return check_session(self, batch, mode, params, **settings)

    def close(self) -> None:
        """Free the session on the server. Closing twice, or a session the server already
        expired, is harmless, so leaving a ``with`` block never hides the original error."""
        if not self._closed:
            self._closed = True
            try:
                self._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))
            except GradgateError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _grads(response: Any) -> dict[str, np.ndarray]:
    # input_grads is empty unless they were asked for
    return {**from_tensor_map(response.param_grads, "param_grads"),
            **from_tensor_map(response.input_grads, "input_grads")}
