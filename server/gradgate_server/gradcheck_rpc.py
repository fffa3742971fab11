"""GradientCheck: decode the request, run engine.gradcheck, encode the result.

Kept apart from service.py so the servicer method stays one call. The check reads
a session's plan and parameters under its lock and runs outside it: it never
writes them, nor the session's cached forward.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from gradgate.v1 import gradcheck_pb2, graph_pb2
from gradgate.v1 import gradient_service_pb2 as pb

from .config import Config
from .engine import InvalidArgument, Watch, check_params, compile_graph
from .engine.gradcheck import CheckReport, CheckSettings, gradient_check
from .sessions import SessionStore

MODE_NAMES = {gradcheck_pb2.GRAD_CHECK_MODE_UNSPECIFIED: "sparse", gradcheck_pb2.GRAD_CHECK_MODE_SPARSE: "sparse",
              gradcheck_pb2.GRAD_CHECK_MODE_FULL: "full", gradcheck_pb2.GRAD_CHECK_MODE_FAST: "fast"}
MODE_CODES = {"sparse": gradcheck_pb2.GRAD_CHECK_MODE_SPARSE, "full": gradcheck_pb2.GRAD_CHECK_MODE_FULL,
              "fast": gradcheck_pb2.GRAD_CHECK_MODE_FAST}


def settings_from_proto(msg: gradcheck_pb2.GradCheckSettings) -> CheckSettings:
    """Unset fields take CheckSettings' defaults; the result is validated."""
    if msg.mode not in MODE_NAMES:
        raise InvalidArgument(f"unknown gradient check mode {msg.mode}; use SPARSE, FULL or FAST", "settings.mode")
    default = CheckSettings()
    settings = CheckSettings(
        mode=MODE_NAMES[msg.mode],
        eps=msg.eps if msg.HasField("eps") else default.eps,
        atol=msg.atol if msg.HasField("atol") else default.atol,
        rtol=msg.rtol if msg.HasField("rtol") else default.rtol,
        num_checks=msg.num_checks or default.num_checks,
        seed=msg.seed,
        params=tuple(msg.params),
        include_inputs=msg.include_inputs,
        max_worst=msg.max_worst or default.max_worst)
    settings.validate()
    return settings


def settings_to_proto(s: CheckSettings) -> gradcheck_pb2.GradCheckSettings:
    return gradcheck_pb2.GradCheckSettings(mode=MODE_CODES[s.mode], eps=s.eps, atol=s.atol, rtol=s.rtol,
                                           num_checks=s.num_checks, seed=s.seed, params=s.params,
                                           include_inputs=s.include_inputs, max_worst=s.max_worst)


def result_to_proto(report: CheckReport) -> gradcheck_pb2.GradCheckResult:
    result = gradcheck_pb2.GradCheckResult(passed=report.passed, loss=report.loss,
                                           settings=settings_to_proto(report.settings),
                                           numeric_steps=report.numeric_steps)
    for t in report.tensors:
        msg = result.tensors.add(name=t.name, is_input=t.is_input, shape=t.shape,
                                 coordinates_checked=t.coordinates_checked, max_rel_error=t.max_rel_error,
                                 max_abs_error=t.max_abs_error, allclose=t.allclose, non_finite=t.non_finite,
                                 message=t.message, passed=t.passed)
        for c in t.worst:
            msg.worst.add(index=c.index, analytic=c.analytic, numeric=c.numeric, abs_error=c.abs_error,
                          rel_error=c.rel_error)
    return result


def run_gradient_check(request: pb.GradientCheckRequest, arrays: Mapping[str, dict[str, np.ndarray]],
                       store: SessionStore, config: Config, deadline: Watch | float | None = None,
                       on_step: Callable[[str, float], None] | None = None) -> gradcheck_pb2.GradCheckResult:
    """``arrays``: the request's decoded tensor maps (params, inputs)."""
    settings = settings_from_proto(request.settings)
    inputs, given = arrays["inputs"], arrays["params"]
    subject = request.WhichOneof("subject")
    buffers: dict[str, np.ndarray] = {}
    if subject == "graph":
        plan = compile_graph(request.graph, max_nodes=config.max_nodes)
        check_params(plan, given)
        params = given
    elif subject == "session_id":
        with store.use(request.session_id) as session:  # a consistent snapshot; nothing is written back
            plan = session.plan
            check_params(plan, given, complete=False)
            params = {**session.params, **given}
            buffers = session.buffers
    else:
        raise InvalidArgument("set session_id to check a session, or graph (with params) to check inline",
                              "session_id")
    return result_to_proto(gradient_check(plan, inputs, params, settings, deadline, on_step, buffers=buffers,
                                          train=request.mode != graph_pb2.MODE_EVAL, seed=request.seed,
                                          limits=config.limits))
