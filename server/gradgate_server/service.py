"""The thin servicer: decoded call -> engine -> encoded reply, then commit.

Each method gets a ``Call`` (rpc.py) and returns the reply's bytes. Nothing is
committed to a session until that reply is built and known to fit in a message, so
a failed call changes nothing. Errors propagate as typed exceptions to rpc.py.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from gradgate.codec import DTYPE_NAMES
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import graph_pb2

from .config import Config
from .engine import (OPS, InvalidArgument, Plan, Tape, backward, check_buffers, check_params,
                     compile_graph, forward, full_buffers)
from .engine.cost import admit, plan_bytes
from .engine.ops import REQUIRED
from .gradcheck_rpc import run_gradient_check
from .metrics import Metrics
from .rpc import Call, Requests
from .sessions import KEEP, Session, SessionStore
from .training import Training


class GradientService:
    def __init__(self, store: SessionStore, config: Config, metrics: Metrics | None = None):
        self.store = store
        self.config = config
        self.limits = config.limits
        self.metrics = metrics or Metrics()  # a private registry when nobody scrapes
        self.training = Training(store, config, self.metrics)
        self._timers = {p: self.metrics.op_timer(p) for p in ("forward", "backward")}
        self._calls = itertools.count()

    # -- helpers shared by the RPCs --------------------------------------------

    def timer(self, pass_: str) -> Callable[[str, float], None] | None:
        """The engine's per-op hook for one call in ``op_timing_every``: per-op metrics are a
        sample, per-call metrics count every call."""
        every = self.config.op_timing_every
        return self._timers.get(pass_) if every and next(self._calls) % every == 0 else None

    def _forward(self, session: Session, call: Call, backward: bool = False) -> tuple[Tape, dict[str, np.ndarray]]:
        """Run the request's forward with its parameters applied (nothing committed)."""
        params = call.arrays["params"]
        if params:
            check_params(session.plan, params, complete=False)
        cost = admit(session.plan, call.arrays["inputs"], self.limits, backward)  # bounded before anything runs
        tape = forward(session.plan, call.arrays["inputs"], {**session.params, **params} if params else session.params,
                       session.buffers, train=call.msg.mode != graph_pb2.MODE_EVAL, seed=call.msg.seed,
                       deadline=call.watch, on_step=self.timer("forward"), batch=cost.batch)
        return tape, params

    def _buffers(self, session: Session, tape: Tape) -> dict[str, np.ndarray] | None:
        """Every state buffer after ``tape``'s forward (None for a graph without any)."""
        return {**session.buffers, **tape.updates} if session.plan.buffers else None

    def _outputs(self, plan: Plan, tape: Tape, requested: Iterable[str]) -> dict[str, np.ndarray]:
        names = list(requested) or plan.outputs
        unknown = [n for n in names if n not in plan.slot]
        if unknown:
            raise InvalidArgument(f"unknown output(s) {unknown}: not values of the graph", "outputs")
        return {n: tape.values[plan.slot[n]] for n in names}

    def _grads(self, session: Session, tape: Tape, input_grads: bool,
               call: Call) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        plan = session.plan
        inputs = [s for s in plan.inputs if plan.dtypes[s] == plan.dtype] if input_grads else []
        grads = backward(plan, tape, [*plan.params, *inputs], call.watch, self.timer("backward"))
        self.metrics.check_finite("gradient", grads.values())
        return ({plan.names[s]: grads[plan.names[s]] for s in plan.params},
                {plan.names[s]: grads[plan.names[s]] for s in inputs})

    # -- RPCs ----------------------------------------------------------------

    def CreateSession(self, call: Call) -> bytes:
        plan = compile_graph(call.msg.graph, max_nodes=self.config.max_nodes)
        self.limits.check_static(plan)
        params, buffers = call.arrays["params"], call.arrays["buffers"]
        check_params(plan, params)
        check_buffers(plan, buffers)
        session = self.store.create(plan, params, full_buffers(plan, buffers),
                                    plan_bytes=plan_bytes(plan, call.msg.graph.ByteSize()))
        call.session_id = session.id
        return call.reply(pb.CreateSessionResponse(
            session_id=session.id, values=[value_info(*v) for v in zip(plan.names, plan.dtypes, plan.shapes)],
            parameter_count=plan.parameter_count, ttl_seconds=self.store.ttl,
            buffers=[value_info(b.name, b.dtype, b.shape) for b in plan.buffers]))

    def Forward(self, call: Call) -> bytes:
        with self.store.use(call.msg.session_id) as session:
            tape, params = self._forward(session, call)
            reply = call.reply(pb.ForwardResponse(loss=tape.loss, forward_id=session.forwards + 1),
                               outputs=self._outputs(session.plan, tape, call.msg.outputs),
                               buffers=self._buffers(session, tape))
            self.store.commit(session, params=params, buffers=tape.updates, tape=tape)
        self.metrics.forward_ran(tape.batch_size, tape.loss)
        return reply

    def Backward(self, call: Call) -> bytes:
        with self.store.use(call.msg.session_id) as session:
            tape = session.require_tape(call.msg.forward_id)
            param_grads, input_grads = self._grads(session, tape, call.msg.input_grads, call)
        return call.reply(pb.BackwardResponse(loss=tape.loss), param_grads=param_grads, input_grads=input_grads)

    def ForwardBackward(self, call: Call) -> bytes:
        with self.store.use(call.msg.session_id) as session:
            tape, params = self._forward(session, call, backward=True)
            param_grads, input_grads = self._grads(session, tape, call.msg.input_grads, call)
            reply = call.reply(pb.ForwardBackwardResponse(loss=tape.loss, forward_id=session.forwards + 1),
                               outputs=self._outputs(session.plan, tape, call.msg.outputs),
                               param_grads=param_grads, input_grads=input_grads, buffers=self._buffers(session, tape))
            self.store.commit(session, params=params, buffers=tape.updates, tape=tape)
        self.metrics.forward_ran(tape.batch_size, tape.loss)
        return reply

    def SetParameters(self, call: Call) -> bytes:
        with self.store.use(call.msg.session_id) as session:
            params, buffers = call.arrays["params"], call.arrays["buffers"]
            check_params(session.plan, params, complete=False)
            check_buffers(session.plan, buffers)
            reply = call.reply(pb.SetParametersResponse())
            # new parameters invalidate the cached forward; buffers do not (backward reads its residuals)
            self.store.commit(session, params=params, buffers=buffers, tape=None if params else KEEP)
        return reply

    def GetParameters(self, call: Call) -> bytes:
        with self.store.use(call.msg.session_id) as session:
            names = list(call.msg.names) or [*session.params, *session.buffers]
            unknown = [n for n in names if n not in session.params and n not in session.buffers]
            if unknown:
                raise InvalidArgument(f"unknown parameter(s) {unknown}; parameters: {sorted(session.params)}"
                                      + (f", buffers: {sorted(session.buffers)}" if session.buffers else ""), "names")
            return call.reply(pb.GetParametersResponse(),
                              params={n: session.params[n] for n in names if n in session.params},
                              buffers={n: session.buffers[n] for n in names if n in session.buffers})

    def CloseSession(self, call: Call) -> bytes:
        self.store.close(call.msg.session_id)
        return call.reply(pb.CloseSessionResponse())

    def ListOps(self, call: Call) -> bytes:
        return LIST_OPS

    def GradientCheck(self, call: Call) -> bytes:
        # its many partial forwards are not timed as ops: the check is counted as a whole
        result = run_gradient_check(call.msg, call.arrays, self.store, self.config, call.watch)
        self.metrics.gradient_check(result.passed)
        return call.reply(pb.GradientCheckResponse(result=result))

    def UploadData(self, calls: Requests, context: grpc.ServicerContext) -> bytes:
        return self.training.upload(calls)

    def Train(self, calls: Requests, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self.training.train(calls, context)


def value_info(name: str, dtype: np.dtype, shape: Iterable[int]) -> graph_pb2.ValueInfo:
    return graph_pb2.ValueInfo(name=name, dtype=DTYPE_NAMES[dtype.name], shape=shape)


LIST_OPS = pb.ListOpsResponse(ops=[
    pb.OpInfo(name=op.name, inputs=op.inputs, doc=op.doc,
              attrs={k: "" if v is REQUIRED else repr(v) for k, v in op.attrs.items()})
    for op in sorted(OPS.values(), key=lambda op: op.name)]).SerializeToString()
