from gradgate.v1 import graph_pb2 as _graph_pb2
from gradgate.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GradCheckMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAD_CHECK_MODE_UNSPECIFIED: _ClassVar[GradCheckMode]
    GRAD_CHECK_MODE_SPARSE: _ClassVar[GradCheckMode]
    GRAD_CHECK_MODE_FULL: _ClassVar[GradCheckMode]
    GRAD_CHECK_MODE_FAST: _ClassVar[GradCheckMode]
GRAD_CHECK_MODE_UNSPECIFIED: GradCheckMode
GRAD_CHECK_MODE_SPARSE: GradCheckMode
GRAD_CHECK_MODE_FULL: GradCheckMode
GRAD_CHECK_MODE_FAST: GradCheckMode

class GradCheckSettings(_message.Message):
    __slots__ = ("mode", "eps", "atol", "rtol", "num_checks", "seed", "params", "include_inputs", "max_worst")
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECKS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORST_FIELD_NUMBER: _ClassVar[int]
    mode: GradCheckMode
    eps: float
    atol: float
    rtol: float
    num_checks: int
    seed: int
    params: _containers.RepeatedScalarFieldContainer[str]
    include_inputs: bool
    max_worst: int
    def __init__(self, mode: _Optional[_Union[GradCheckMode, str]] = ..., eps: _Optional[float] = ..., atol: _Optional[float] = ..., rtol: _Optional[float] = ..., num_checks: _Optional[int] = ..., seed: _Optional[int] = ..., params: _Optional[_Iterable[str]] = ..., include_inputs: _Optional[bool] = ..., max_worst: _Optional[int] = ...) -> None: ...

class GradCheckCoordinate(_message.Message):
    __slots__ = ("index", "analytic", "numeric", "abs_error", "rel_error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ANALYTIC_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float
    def __init__(self, index: _Optional[_Iterable[int]] = ..., analytic: _Optional[float] = ..., numeric: _Optional[float] = ..., abs_error: _Optional[float] = ..., rel_error: _Optional[float] = ...) -> None: ...

class TensorCheck(_message.Message):
    __slots__ = ("name", "is_input", "shape", "coordinates_checked", "max_rel_error", "max_abs_error", "allclose", "worst", "non_finite", "message", "passed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_INPUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COORDINATES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    ALLCLOSE_FIELD_NUMBER: _ClassVar[int]
    WORST_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_input: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    coordinates_checked: int
    max_rel_error: float
    max_abs_error: float
    allclose: bool
    worst: _containers.RepeatedCompositeFieldContainer[GradCheckCoordinate]
    non_finite: bool
    message: str
    passed: bool
    def __init__(self, name: _Optional[str] = ..., is_input: _Optional[bool] = ..., shape: _Optional[_Iterable[int]] = ..., coordinates_checked: _Optional[int] = ..., max_rel_error: _Optional[float] = ..., max_abs_error: _Optional[float] = ..., allclose: _Optional[bool] = ..., worst: _Optional[_Iterable[_Union[GradCheckCoordinate, _Mapping]]] = ..., non_finite: _Optional[bool] = ..., message: _Optional[str] = ..., passed: _Optional[bool] = ...) -> None: ...

class GradCheckResult(_message.Message):
    __slots__ = ("passed", "tensors", "loss", "settings", "numeric_steps")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_STEPS_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    tensors: _containers.RepeatedCompositeFieldContainer[TensorCheck]
    loss: float
    settings: GradCheckSettings
    numeric_steps: int
    def __init__(self, passed: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[TensorCheck, _Mapping]]] = ..., loss: _Optional[float] = ..., settings: _Optional[_Union[GradCheckSettings, _Mapping]] = ..., numeric_steps: _Optional[int] = ...) -> None: ...

class GradCheckCase(_message.Message):
    __slots__ = ("name", "description", "graph", "params", "inputs", "settings", "mode", "seed")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    graph: _graph_pb2.Graph
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    settings: GradCheckSettings
    mode: _graph_pb2.Mode
    seed: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., settings: _Optional[_Union[GradCheckSettings, _Mapping]] = ..., mode: _Optional[_Union[_graph_pb2.Mode, str]] = ..., seed: _Optional[int] = ...) -> None: ...
