from gradgate.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadDataRequest(_message.Message):
    __slots__ = ("session_id", "rows", "columns")
    class ColumnsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    rows: int
    columns: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, session_id: _Optional[str] = ..., rows: _Optional[int] = ..., columns: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class UploadDataResponse(_message.Message):
    __slots__ = ("rows", "bytes")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    bytes: int
    def __init__(self, rows: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class SGD(_message.Message):
    __slots__ = ("lr", "momentum")
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    lr: float
    momentum: float
    def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ...) -> None: ...

class Adam(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("sgd", "adam")
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    sgd: SGD
    adam: Adam
    def __init__(self, sgd: _Optional[_Union[SGD, _Mapping]] = ..., adam: _Optional[_Union[Adam, _Mapping]] = ...) -> None: ...

class OptimizerState(_message.Message):
    __slots__ = ("step", "slots")
    class SlotsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    slots: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., slots: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class RowRange(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class TrainStart(_message.Message):
    __slots__ = ("session_id", "optimizer", "optimizer_state", "batch_size", "epochs", "seed", "batches", "start_step", "sync_every")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    optimizer: Optimizer
    optimizer_state: OptimizerState
    batch_size: int
    epochs: int
    seed: int
    batches: _containers.RepeatedCompositeFieldContainer[RowRange]
    start_step: int
    sync_every: int
    def __init__(self, session_id: _Optional[str] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., optimizer_state: _Optional[_Union[OptimizerState, _Mapping]] = ..., batch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., seed: _Optional[int] = ..., batches: _Optional[_Iterable[_Union[RowRange, _Mapping]]] = ..., start_step: _Optional[int] = ..., sync_every: _Optional[int] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("start", "sync")
    START_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    start: TrainStart
    sync: bool
    def __init__(self, start: _Optional[_Union[TrainStart, _Mapping]] = ..., sync: _Optional[bool] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("first_step", "losses")
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    first_step: int
    losses: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, first_step: _Optional[int] = ..., losses: _Optional[_Iterable[float]] = ...) -> None: ...

class TrainSync(_message.Message):
    __slots__ = ("step", "params", "optimizer_state", "buffers", "done")
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
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    step: int
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    optimizer_state: OptimizerState
    buffers: _containers.MessageMap[str, _tensor_pb2.Tensor]
    done: bool
    def __init__(self, step: _Optional[int] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., optimizer_state: _Optional[_Union[OptimizerState, _Mapping]] = ..., buffers: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., done: _Optional[bool] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("progress", "sync")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    sync: TrainSync
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., sync: _Optional[_Union[TrainSync, _Mapping]] = ...) -> None: ...
