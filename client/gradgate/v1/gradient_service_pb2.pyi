from gradgate.v1 import gradcheck_pb2 as _gradcheck_pb2
from gradgate.v1 import graph_pb2 as _graph_pb2
from gradgate.v1 import tensor_pb2 as _tensor_pb2
from gradgate.v1 import train_pb2 as _train_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSessionRequest(_message.Message):
    __slots__ = ("graph", "params", "buffers")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "values", "parameter_count", "ttl_seconds", "buffers")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    values: _containers.RepeatedCompositeFieldContainer[_graph_pb2.ValueInfo]
    parameter_count: int
    ttl_seconds: float
    buffers: _containers.RepeatedCompositeFieldContainer[_graph_pb2.ValueInfo]
    def __init__(self, session_id: _Optional[str] = ..., values: _Optional[_Iterable[_Union[_graph_pb2.ValueInfo, _Mapping]]] = ..., parameter_count: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., buffers: _Optional[_Iterable[_Union[_graph_pb2.ValueInfo, _Mapping]]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "inputs", "outputs", "params", "mode", "seed")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    mode: _graph_pb2.Mode
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., outputs: _Optional[_Iterable[str]] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., mode: _Optional[_Union[_graph_pb2.Mode, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("loss", "outputs", "forward_id", "buffers")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    forward_id: int
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, loss: _Optional[float] = ..., outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., forward_id: _Optional[int] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "input_grads", "forward_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input_grads: bool
    forward_id: int
    def __init__(self, session_id: _Optional[str] = ..., input_grads: _Optional[bool] = ..., forward_id: _Optional[int] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("loss", "param_grads", "input_grads")
    class ParamGradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class InputGradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAM_GRADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    param_grads: _containers.MessageMap[str, _tensor_pb2.Tensor]
    input_grads: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, loss: _Optional[float] = ..., param_grads: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., input_grads: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("session_id", "inputs", "outputs", "params", "input_grads", "mode", "seed")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    input_grads: bool
    mode: _graph_pb2.Mode
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., outputs: _Optional[_Iterable[str]] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., input_grads: _Optional[bool] = ..., mode: _Optional[_Union[_graph_pb2.Mode, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("loss", "outputs", "param_grads", "input_grads", "buffers", "forward_id")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ParamGradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class InputGradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAM_GRADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    loss: float
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    param_grads: _containers.MessageMap[str, _tensor_pb2.Tensor]
    input_grads: _containers.MessageMap[str, _tensor_pb2.Tensor]
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    forward_id: int
    def __init__(self, loss: _Optional[float] = ..., outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., param_grads: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., input_grads: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., forward_id: _Optional[int] = ...) -> None: ...

class SetParametersRequest(_message.Message):
    __slots__ = ("session_id", "params", "buffers")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, session_id: _Optional[str] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class SetParametersResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("session_id", "names")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetParametersResponse(_message.Message):
    __slots__ = ("params", "buffers")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BuffersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class StreamCall(_message.Message):
    __slots__ = ("forward", "backward", "forward_backward", "set_parameters", "get_parameters", "open_region", "in_region")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    SET_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GET_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPEN_REGION_FIELD_NUMBER: _ClassVar[int]
    IN_REGION_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardRequest
    backward: BackwardRequest
    forward_backward: ForwardBackwardRequest
    set_parameters: SetParametersRequest
    get_parameters: GetParametersRequest
    open_region: SharedRegionRequest
    in_region: InRegion
    def __init__(self, forward: _Optional[_Union[ForwardRequest, _Mapping]] = ..., backward: _Optional[_Union[BackwardRequest, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardRequest, _Mapping]] = ..., set_parameters: _Optional[_Union[SetParametersRequest, _Mapping]] = ..., get_parameters: _Optional[_Union[GetParametersRequest, _Mapping]] = ..., open_region: _Optional[_Union[SharedRegionRequest, _Mapping]] = ..., in_region: _Optional[_Union[InRegion, _Mapping]] = ...) -> None: ...

class StreamAnswer(_message.Message):
    __slots__ = ("forward", "backward", "forward_backward", "set_parameters", "get_parameters", "region", "in_region")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    SET_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GET_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    IN_REGION_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardResponse
    backward: BackwardResponse
    forward_backward: ForwardBackwardResponse
    set_parameters: SetParametersResponse
    get_parameters: GetParametersResponse
    region: SharedRegion
    in_region: InRegion
    def __init__(self, forward: _Optional[_Union[ForwardResponse, _Mapping]] = ..., backward: _Optional[_Union[BackwardResponse, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardResponse, _Mapping]] = ..., set_parameters: _Optional[_Union[SetParametersResponse, _Mapping]] = ..., get_parameters: _Optional[_Union[GetParametersResponse, _Mapping]] = ..., region: _Optional[_Union[SharedRegion, _Mapping]] = ..., in_region: _Optional[_Union[InRegion, _Mapping]] = ...) -> None: ...

class SharedRegionRequest(_message.Message):
    __slots__ = ("size", "signal")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    size: int
    signal: bool
    def __init__(self, size: _Optional[int] = ..., signal: _Optional[bool] = ...) -> None: ...

class SharedRegion(_message.Message):
    __slots__ = ("size", "pid", "fd", "token", "call_pipe", "answer_pipe")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CALL_PIPE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_PIPE_FIELD_NUMBER: _ClassVar[int]
    size: int
    pid: int
    fd: int
    token: bytes
    call_pipe: int
    answer_pipe: int
    def __init__(self, size: _Optional[int] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ..., token: _Optional[bytes] = ..., call_pipe: _Optional[int] = ..., answer_pipe: _Optional[int] = ...) -> None: ...

class InRegion(_message.Message):
    __slots__ = ("length", "signal")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    length: int
    signal: bool
    def __init__(self, length: _Optional[int] = ..., signal: _Optional[bool] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOpsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("name", "inputs", "attrs", "doc")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    attrs: _containers.ScalarMap[str, str]
    doc: str
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., attrs: _Optional[_Mapping[str, str]] = ..., doc: _Optional[str] = ...) -> None: ...

class ListOpsResponse(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    def __init__(self, ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ...) -> None: ...

class GradientCheckRequest(_message.Message):
    __slots__ = ("session_id", "graph", "params", "inputs", "settings", "mode", "seed")
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
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    graph: _graph_pb2.Graph
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    settings: _gradcheck_pb2.GradCheckSettings
    mode: _graph_pb2.Mode
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., settings: _Optional[_Union[_gradcheck_pb2.GradCheckSettings, _Mapping]] = ..., mode: _Optional[_Union[_graph_pb2.Mode, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class GradientCheckResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _gradcheck_pb2.GradCheckResult
    def __init__(self, result: _Optional[_Union[_gradcheck_pb2.GradCheckResult, _Mapping]] = ...) -> None: ...
