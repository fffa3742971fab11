"""ndarray <-> Tensor: the only place that knows the byte layout.

Tensors are little-endian, C-order, no strides. Decoding is ``np.frombuffer``
(zero copy, read-only) plus a size check; encoding is one ``tobytes()``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradgate.v1 import graph_pb2, tensor_pb2

DTYPES: dict[tensor_pb2.DType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_CODES: dict[np.dtype, tensor_pb2.DType] = {dt: code for code, dt in DTYPES.items()}
DTYPE_NAMES: dict[str, tensor_pb2.DType] = {dt.name: code for code, dt in DTYPES.items()}  # "float32" -> code


class CodecError(ValueError):
    """A tensor or attribute that cannot be decoded; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class TensorTooLarge(CodecError):
    """A tensor over the receiver's element limit."""


def dtype_code(dtype: Any) -> tensor_pb2.DType:
    """The wire enum for a numpy dtype or dtype name ("float32", np.float64, ...)."""
    try:
        return _CODES[np.dtype(dtype).newbyteorder("<")]
    except (KeyError, TypeError) as e:
        raise CodecError("dtype", f"unsupported dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}") from e


def dtype_of(code: int, field: str = "dtype") -> np.dtype:
    """The numpy dtype for a wire enum value."""
    try:
        return DTYPES[code]  # type: ignore[index]  # any int may arrive on the wire
    except KeyError:
        raise CodecError(field, f"unknown dtype enum {code}; use one of {sorted(DTYPE_NAMES)}") from None


def to_tensor(array: Any, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode an array (or scalar) into ``out`` (a new Tensor if None)."""
    a = np.asarray(array)
    code = dtype_code(a.dtype)
    a = np.asarray(a, dtype=DTYPES[code], order="C")  # no copy for C-order little-endian input
    t = tensor_pb2.Tensor() if out is None else out
    t.dtype = code
    t.shape[:] = a.shape
    t.data = a.tobytes()
    return t


def from_tensor(t: tensor_pb2.Tensor, field: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """Decode a Tensor into a read-only array viewing its bytes."""
    dtype = dtype_of(t.dtype, f"{field}.dtype")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"{field}.shape", f"negative dimension in shape {list(shape)}")
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if max_elements is not None and size > max_elements:
        raise TensorTooLarge(field, f"{size} elements exceed the limit of {max_elements}")
    data = t.data
    if len(data) != size * dtype.itemsize:
        raise CodecError(f"{field}.data", f"has {len(data)} bytes, but shape {list(shape)} of "
                                          f"{dtype.name} needs {size * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def to_tensor_map(arrays: Mapping[str, Any], out: Any) -> None:
    """Encode ``{name: array}`` into a protobuf ``map<string, Tensor>`` field."""
    for name, a in arrays.items():
        to_tensor(a, out[name])


def from_tensor_map(tensors: Mapping[str, tensor_pb2.Tensor], field: str,
                    max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Decode a ``map<string, Tensor>`` field; errors name ``field[key]``."""
    return {name: from_tensor(t, f"{field}[{name!r}]", max_elements) for name, t in tensors.items()}


def attr_to_value(v: graph_pb2.AttrValue, field: str = "attr") -> Any:
    """AttrValue -> python: float, int, str, bool, tuple of ints or ndarray."""
    kind = v.WhichOneof("value")
    if kind is None:
        raise CodecError(field, "attribute has no value set")
    if kind == "ints":
        return tuple(v.ints.values)
    if kind == "tensor":
        return from_tensor(v.tensor, field)
    return getattr(v, kind)


def value_to_attr(value: Any, out: graph_pb2.AttrValue) -> None:
    """python -> AttrValue. bool before int: bool is an int subclass."""
    if isinstance(value, (bool, np.bool_)):
        out.b = bool(value)
    elif isinstance(value, (int, np.integer)):
        out.i = int(value)
    elif isinstance(value, (float, np.floating)):
        out.f = float(value)
    elif isinstance(value, str):
        out.s = value
    elif isinstance(value, (tuple, list)) and all(isinstance(x, (int, np.integer)) for x in value):
        out.ints.values[:] = [int(x) for x in value]
    elif isinstance(value, np.ndarray):
        to_tensor(value, out.tensor)
    else:
        raise CodecError("attr", f"cannot encode attribute value {value!r} of type {type(value).__name__}")


def attrs_to_dict(attrs: Mapping[str, graph_pb2.AttrValue], field: str = "attrs") -> dict[str, Any]:
    return {k: attr_to_value(v, f"{field}[{k!r}]") for k, v in attrs.items()}
