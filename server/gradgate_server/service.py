"""The thin servicer: decode -> engine -> encode. Errors propagate as typed
exceptions to the ErrorInterceptor."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import grpc
import numpy as np

from gradgate.codec import DTYPE_NAMES, from_tensor_map, to_tensor_map
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate.v1 import graph_pb2

from .config import Config
from .engine import (OPS, DeadlineExceeded, InvalidArgument, Plan, backward, check_params, compile_graph,
                     forward)
from .engine.ops import REQUIRED
from .gradcheck_rpc import run_gradient_check
from .metrics import Metrics
from .sessions import Session, SessionStore


def deadline_of(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def on_step(record: Callable[[str, float], None], context: grpc.ServicerContext) -> Callable[[str, float], None]:
    """The engine's per-step hook: time the op, and stop computing for a call that
    is gone (client cancelled, deadline passed, or the shutdown grace ran out)."""
    def hook(op: str, seconds: float) -> None:
        record(op, seconds)
        if not context.is_active():
            raise DeadlineExceeded("the call ended (cancelled or past its deadline) before the pass finished")
    return hook


class GradientService(pb_grpc.GradientServiceServicer):
    def __init__(self, store: SessionStore, config: Config, metrics: Metrics | None = None):
        self.store = store
        self.config = config
        self.metrics = metrics or Metrics()  # a private registry when nobody scrapes
        self._forward_timer = self.metrics.op_timer("forward")
        self._backward_timer = self.metrics.op_timer("backward")

    # -- helpers shared by the RPCs --------------------------------------------

    def _decode(self, tensors: Mapping, field: str) -> dict[str, np.ndarray]:
        return from_tensor_map(tensors, field, self.config.max_tensor_elements)

    def _updated_params(self, session: Session, tensors: Mapping) -> dict[str, np.ndarray]:
        """The session's parameters with ``tensors`` applied, not yet committed."""
        if not tensors:
            return session.params
        params = self._decode(tensors, "params")
        check_params(session.plan, params, complete=False)
        return {**session.params, **params}

    def _forward(self, session: Session, request: pb.ForwardRequest | pb.ForwardBackwardRequest,
                 context: grpc.ServicerContext, response: pb.ForwardResponse | pb.ForwardBackwardResponse) -> None:
        plan = session.plan
        names = list(request.outputs) or plan.outputs
        unknown = [n for n in names if n not in plan.slot]
        if unknown:
            raise InvalidArgument(f"unknown output(s) {unknown}: not values of the graph", "outputs")
        params = self._updated_params(session, request.params)
        tape = forward(plan, self._decode(request.inputs, "inputs"), params, deadline_of(context),
                       on_step(self._forward_timer, context))
        self.store.cache(session, tape)  # commit only once everything succeeded
        session.params = params
        self.metrics.examples_processed(tape.batch_size)
        self.metrics.check_finite("loss", tape.loss)
        response.loss = tape.loss
        to_tensor_map({n: tape.values[plan.slot[n]] for n in names}, response.outputs)

    def _backward(self, session: Session, input_grads: bool, context: grpc.ServicerContext,
                  response: pb.BackwardResponse | pb.ForwardBackwardResponse) -> None:
        plan, tape = session.plan, session.require_tape()
        inputs = [s for s in plan.inputs if plan.dtypes[s] == plan.dtype] if input_grads else []
        grads = backward(plan, tape, [*plan.params, *inputs], deadline_of(context),
                         on_step(self._backward_timer, context))
        for g in grads.values():
            self.metrics.check_finite("gradient", g)
        response.loss = tape.loss
        to_tensor_map({plan.names[s]: grads[plan.names[s]] for s in plan.params}, response.param_grads)
        to_tensor_map({plan.names[s]: grads[plan.names[s]] for s in inputs}, response.input_grads)

    # -- RPCs ----------------------------------------------------------------

    def CreateSession(self, request: pb.CreateSessionRequest,
                      context: grpc.ServicerContext) -> pb.CreateSessionResponse:
        plan = compile_graph(request.graph, max_nodes=self.config.max_nodes)
        params = self._decode(request.params, "params")
        check_params(plan, params)
        session = self.store.create(plan, params)
        return pb.CreateSessionResponse(session_id=session.id, values=value_infos(plan),
                                        parameter_count=plan.parameter_count, ttl_seconds=self.store.ttl)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        response = pb.ForwardResponse()
        with self.store.use(request.session_id) as session:
            self._forward(session, request, context, response)
        return response

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        response = pb.BackwardResponse()
        with self.store.use(request.session_id) as session:
            self._backward(session, request.input_grads, context, response)
        return response

    def ForwardBackward(self, request: pb.ForwardBackwardRequest,
                        context: grpc.ServicerContext) -> pb.ForwardBackwardResponse:
        response = pb.ForwardBackwardResponse()
        with self.store.use(request.session_id) as session:
            self._forward(session, request, context, response)
            self._backward(session, request.input_grads, context, response)
        return response

    def SetParameters(self, request: pb.SetParametersRequest,
                      context: grpc.ServicerContext) -> pb.SetParametersResponse:
        with self.store.use(request.session_id) as session:
            session.params = self._updated_params(session, request.params)
            self.store.cache(session, None)  # the cached forward used the old values
        return pb.SetParametersResponse()

    def GetParameters(self, request: pb.GetParametersRequest,
                      context: grpc.ServicerContext) -> pb.GetParametersResponse:
        response = pb.GetParametersResponse()
        with self.store.use(request.session_id) as session:
            names = list(request.names) or list(session.params)
            unknown = [n for n in names if n not in session.params]
            if unknown:
                raise InvalidArgument(f"unknown parameter(s) {unknown}; parameters: {sorted(session.params)}",
                                      "names")
            to_tensor_map({n: session.params[n] for n in names}, response.params)
        return response

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        self.store.close(request.session_id)
        return pb.CloseSessionResponse()

    def ListOps(self, request: pb.ListOpsRequest, context: grpc.ServicerContext) -> pb.ListOpsResponse:
        return LIST_OPS

    def GradientCheck(self, request: pb.GradientCheckRequest,
                      context: grpc.ServicerContext) -> pb.GradientCheckResponse:
        # the perturbed partial forwards are not timed as "forward" ops; the hook only stops a dead call
        result = run_gradient_check(request, self.store, self.config, deadline_of(context),
                                    on_step(lambda op, seconds: None, context))
        self.metrics.gradient_check(result.passed)
        return pb.GradientCheckResponse(result=result)


def value_infos(plan: Plan) -> Iterable[graph_pb2.ValueInfo]:
    return [graph_pb2.ValueInfo(name=name, dtype=DTYPE_NAMES[dtype.name], shape=shape)
            for name, dtype, shape in zip(plan.names, plan.dtypes, plan.shapes)]


LIST_OPS = pb.ListOpsResponse(ops=[
    pb.OpInfo(name=op.name, inputs=op.inputs, doc=op.doc,
              attrs={k: "" if v is REQUIRED else repr(v) for k, v in op.attrs.items()})
    for op in sorted(OPS.values(), key=lambda op: op.name)])
