"""Gradient checks from the SDK: settings, readable reports, and case files for batch jobs.

The server compares the analytic gradients (backward) with centered differences in
float64, all perturbations inside one GradientCheck call:

>>> report = sess.gradient_check({"x": X, "y": y}, mode="sparse", num_checks=20)
>>> print(report)          # a table: tensor, coordinates checked, max rel error, verdict
>>> assert report.passed

A ``GradCheckCase`` (graph, parameters, batch, settings, name) is a saved job, as
binary protobuf (``.pb``) or protobuf JSON (``.json``); ``gradgate gradcheck`` runs many.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from gradgate.codec import dtype_of, to_tensor_map
from gradgate.graph import Graph
from gradgate.v1 import gradcheck_pb2
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import graph_pb2

if TYPE_CHECKING:
    from gradgate.client import Client
    from gradgate.session import Session

GradCheckCase = gradcheck_pb2.GradCheckCase
MODES = {"sparse": gradcheck_pb2.GRAD_CHECK_MODE_SPARSE, "full": gradcheck_pb2.GRAD_CHECK_MODE_FULL,
         "fast": gradcheck_pb2.GRAD_CHECK_MODE_FAST}
MODE_NAMES = {code: name for name, code in MODES.items()} | {gradcheck_pb2.GRAD_CHECK_MODE_UNSPECIFIED: "sparse"}
CASE_SUFFIXES = (".pb", ".json")


def settings(mode: str = "sparse", *, eps: float | None = None, atol: float | None = None,
             rtol: float | None = None, num_checks: int | None = None, seed: int = 0,
             wrt: Sequence[str] | None = None, include_inputs: bool = False,
             max_worst: int | None = None) -> gradcheck_pb2.GradCheckSettings:
    """Settings for a check; None leaves the server default (eps 1e-6, atol 1e-5, rtol 1e-3,
    num_checks 10, max_worst 5). ``wrt`` names the parameters to check (None = all);
    ``include_inputs`` also checks the batch's float inputs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {sorted(MODES)}")
    msg = gradcheck_pb2.GradCheckSettings(mode=MODES[mode], seed=seed, params=wrt or (),
                                          include_inputs=include_inputs, num_checks=num_checks or 0,
                                          max_worst=max_worst or 0)
    for name, value in (("eps", eps), ("atol", atol), ("rtol", rtol)):
        if value is not None:
            setattr(msg, name, value)
    return msg


# -- reports --------------------------------------------------------------------

@dataclass(frozen=True)
class Coordinate:
    """One checked coordinate; ``index`` is () in fast mode (a random direction)."""

    index: tuple[int, ...]
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float


@dataclass(frozen=True)
class TensorCheck:
    """The verdict on one parameter (or input, ``is_input``)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    coordinates_checked: int
    max_rel_error: float  # CS231n: |a - n| / max(1e-8, |a| + |n|)
    max_abs_error: float
    allclose: bool  # every checked |a - n| <= atol + rtol * |n|
    worst: tuple[Coordinate, ...]  # furthest outside the tolerance first
    non_finite: bool  # NaN/Inf in forward, analytic or numeric
    message: str  # why it failed, naming the tensor
    passed: bool


@dataclass(frozen=True)
class GradCheckReport:
    """The result of one gradient check; ``str(report)`` is a readable table."""

    passed: bool
    tensors: tuple[TensorCheck, ...]
    loss: float
    mode: str
    eps: float
    atol: float
    rtol: float
    numeric_steps: int  # op evaluations of the numeric side
    proto: gradcheck_pb2.GradCheckResult = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: gradcheck_pb2.GradCheckResult) -> GradCheckReport:
        tensors = tuple(TensorCheck(
            t.name, t.is_input, tuple(t.shape), t.coordinates_checked, t.max_rel_error, t.max_abs_error,
            t.allclose, tuple(Coordinate(tuple(c.index), c.analytic, c.numeric, c.abs_error, c.rel_error)
                              for c in t.worst), t.non_finite, t.message, t.passed) for t in msg.tensors)
        s = msg.settings
        return cls(msg.passed, tensors, msg.loss, MODE_NAMES.get(s.mode, "sparse"), s.eps, s.atol, s.rtol,
                   msg.numeric_steps, msg)

    def __getitem__(self, name: str) -> TensorCheck:
        """The check of the tensor ``name``."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        head = (f"gradient check {'PASSED' if self.passed else 'FAILED'}: {self.mode} mode, eps {self.eps:g}, "
                f"atol {self.atol:g}, rtol {self.rtol:g}; loss {self.loss:.6g}")
        rows = [(t.name + (" (input)" if t.is_input else ""), _shape(t.shape), str(t.coordinates_checked),
                 f"{t.max_rel_error:.2e}", f"{t.max_abs_error:.2e}", verdict(t)) for t in self.tensors]
        lines = [head, *table(("tensor", "shape", "checked", "max rel error", "max abs error", "verdict"), rows)]
        for t in self.tensors:
            if not t.passed:
                lines.append(f"  {t.message}")
                lines += [f"    {_coordinate(t.name, c.index, self.mode)}: analytic {c.analytic:.8g}, "
                          f"numeric {c.numeric:.8g}, rel error {c.rel_error:.3g}" for c in t.worst]
        return "\n".join(lines)


def verdict(t: TensorCheck) -> str:
    return "ok" if t.passed else "NON-FINITE" if t.non_finite else "FAIL"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns; numbers (any cell starting with a digit) right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths)]
        return "  ".join(cells).rstrip()
    return [line(header), *map(line, rows)]


def _coordinate(name: str, index: Sequence[int], mode: str) -> str:
    if mode == "fast":
        return f"grad({name}) . u"  # one random direction, not a coordinate
    return f"{name}[{', '.join(map(str, index))}]" if index else name


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


# -- running checks ---------------------------------------------------------------

def check_session(sess: Session, batch: Mapping[str, Any], mode: str = "sparse",
                  params: Mapping[str, Any] | None = None, *, train: bool = True, forward_seed: int = 0,
                  **kwargs: Any) -> GradCheckReport:
    """Check ``sess``'s gradients at ``batch``; see ``Session.gradient_check``. ``train`` and
    ``forward_seed`` are the checked forward's mode and random-op seed (``seed`` picks coordinates)."""
    request = pb.GradientCheckRequest(session_id=sess.id, settings=settings(mode, **kwargs), seed=forward_seed,
                                      mode=graph_pb2.MODE_TRAIN if train else graph_pb2.MODE_EVAL)
    response, _ = sess._call("GradientCheck", request, inputs=sess._cast(batch), params=sess._cast(params))
    return GradCheckReport.from_proto(response.result)


def check(client: Client, graph: Graph | graph_pb2.Graph, params: Mapping[str, Any], batch: Mapping[str, Any],
          mode: str = "sparse", **kwargs: Any) -> GradCheckReport:
    """Check a graph given inline (no session is created)."""
    return run_case(client, make_case("", graph, params, batch, mode=mode, **kwargs))


def run_case(client: Client, case: gradcheck_pb2.GradCheckCase) -> GradCheckReport:
    """Run one saved case on ``client``'s server."""
    request = pb.GradientCheckRequest(graph=case.graph, settings=case.settings, mode=case.mode, seed=case.seed)
    request.params.MergeFrom(case.params)
    request.inputs.MergeFrom(case.inputs)
    return GradCheckReport.from_proto(client.call("GradientCheck", request)[0].result)


# -- case files -------------------------------------------------------------------

def make_case(name: str, graph: Graph | graph_pb2.Graph, params: Mapping[str, Any], batch: Mapping[str, Any],
              description: str = "", mode: str = "sparse", **kwargs: Any) -> gradcheck_pb2.GradCheckCase:
    """A case; arrays are cast to the graph's declared dtypes. ``kwargs`` are ``settings``'s."""
    graph_msg = graph.to_proto() if isinstance(graph, Graph) else graph
    dtypes = {v.name: dtype_of(v.dtype) for v in (*graph_msg.inputs, *graph_msg.params)}
    case = gradcheck_pb2.GradCheckCase(name=name, description=description, graph=graph_msg,
                                       settings=settings(mode, **kwargs))
    for arrays, out in ((params, case.params), (batch, case.inputs)):
        to_tensor_map({k: np.asarray(a, dtypes.get(k)) for k, a in arrays.items()}, out)
    return case


class CaseFileError(ValueError):
    """A case file that cannot be read or parsed; the message names the file."""


def save_case(case: gradcheck_pb2.GradCheckCase, path: str | Path) -> Path:
    """Write ``case`` as binary protobuf (``.pb``) or protobuf JSON (``.json``), by the suffix,
    creating the folder if needed."""
    path = Path(path)
    if path.suffix in CASE_SUFFIXES:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        # sorted keys: protobuf writes map entries in no fixed order, and a case file should not change
        path.write_text(json_format.MessageToJson(case, preserving_proto_field_name=True, sort_keys=True) + "\n")
    elif path.suffix == ".pb":
        path.write_bytes(case.SerializeToString(deterministic=True))  # same case, same bytes
    else:
        raise CaseFileError(f"{path}: a case file must end in .pb or .json")
    return path


def load_case(path: str | Path) -> gradcheck_pb2.GradCheckCase:
    """Read a ``.pb`` or ``.json`` case; a case without a name takes the file's stem."""
    path = Path(path)
    case = gradcheck_pb2.GradCheckCase()
    try:
        if path.suffix == ".json":
            json_format.Parse(path.read_text(), case)
        elif path.suffix == ".pb":
            case.ParseFromString(path.read_bytes())
        else:
            raise CaseFileError(f"{path}: a case file must end in .pb or .json")
    except OSError as e:
        raise CaseFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as e:
        raise CaseFileError(f"{path}: not a GradCheckCase: {e}") from None
    if not case.HasField("graph"):
        raise CaseFileError(f"{path}: the case has no graph")
    case.name = case.name or path.stem
    return case
