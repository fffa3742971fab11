"""ndarray <-> Tensor: the only place that knows the byte layout.

Tensors are little-endian, C-order, no strides. Messages that carry
``map<string, Tensor>`` fields travel through ``encode`` and ``decode``, which
write and read those maps by hand: ``encode`` copies each array's bytes once,
straight into the outgoing message at an offset that is a multiple of ALIGN, and
``decode`` hands out read-only arrays that view the received bytes (no copy at all;
aligned too, as grpc hands over each message as a new, 16-aligned bytes object).
``encode_within`` and ``decode_within`` do the same for such a message as the one field of
an enclosing message (a CallStream's StreamCall and StreamAnswer). Everything else in a
message is ordinary protobuf. Element counts are Python ints,
checked before numpy sees them.
"""
from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from gradgate.v1 import graph_pb2, tensor_pb2

DTYPES: dict[tensor_pb2.DType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_CODES: dict[np.dtype, tensor_pb2.DType] = {dt: code for code, dt in DTYPES.items()}
DTYPE_NAMES: dict[str, tensor_pb2.DType] = {dt.name: code for code, dt in DTYPES.items()}  # "float32" -> code
M = TypeVar("M", bound=Message)
Arrays = Mapping[str, Any]


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


def _at(field: str, name: str | None) -> str:
    """How an error names a tensor: "inputs['x']" (names shortened: they come from the wire)."""
    return field if name is None else f"{field}[{name[:64]!r}]"


MAX_NDIM = 32  # numpy 1.x's limit (2.x allows 64)


def _array(code: int, shape: tuple[int, ...], data: bytes, offset: int, nbytes: int, max_elements: int | None,
           field: str, name: str | None = None) -> np.ndarray:
    """A read-only array viewing ``data[offset:offset + nbytes]``, after checking it against ``shape``.
    Errors name ``field`` (and map key ``name``)."""
    dtype = DTYPES.get(code)  # type: ignore[call-overload]  # any int may arrive on the wire
    if dtype is None:
        dtype_of(code, f"{_at(field, name)}.dtype")  # raises, naming the field
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{_at(field, name)}.shape", f"has {len(shape)} dimensions; at most {MAX_NDIM} are supported")
    if shape and min(shape) < 0:
        raise CodecError(f"{_at(field, name)}.shape", f"negative dimension in shape {list(shape)}")
    size = math.prod(shape)  # exact: a Python int, however large the dimensions
    # numpy refuses even an empty array whose other dimensions overflow, e.g. (0, 2**62): count 0 as 1
    span = size or math.prod(max(d, 1) for d in shape)
    if max_elements is not None and span > max_elements:
        raise _too_large(field, name, shape, size, max_elements)
    if span > sys.maxsize // dtype.itemsize:  # no limit given: numpy's own
        raise CodecError(f"{_at(field, name)}.shape", f"shape {list(shape)} is too large for any array")
    if nbytes != size * dtype.itemsize:
        raise CodecError(f"{_at(field, name)}.data", f"has {nbytes} bytes, but shape {list(shape)} of "
                                                     f"{dtype.name} needs {size * dtype.itemsize}")
    if size == 0:
        a = np.empty(shape, dtype)
        a.flags.writeable = False
        return a
    return np.frombuffer(data, dtype, size, offset).reshape(shape)


def _too_large(field: str, name: str | None, shape: tuple[int, ...], size: int, limit: int) -> TensorTooLarge:
    return TensorTooLarge(_at(field, name), f"shape {list(shape)} has {size} elements; the limit is {limit}")


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
    """Decode a Tensor message into a read-only array viewing its bytes."""
    data = t.data
    return _array(t.dtype, tuple(t.shape), data, 0, len(data), max_elements, field)


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


# -- whole messages: tensor maps written and read by hand -------------------------

_SMALL = tuple(bytes((i,)) for i in range(128))


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    if n < 16384:
        return bytes((n & 127 | 128, n >> 7))
    out = bytearray()
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


_MAPS: dict[type, dict[str, int]] = {}
_NESTED: dict[type, dict[str, tuple[int, type[Message]]]] = {}


def _tensor_maps(cls: type[Message]) -> dict[str, int]:
    """Field name -> number of every top-level ``map<string, Tensor>`` field of ``cls``."""
    maps = _MAPS.get(cls)
    if maps is None:
        maps = _MAPS[cls] = {
            f.name: f.number for f in cls.DESCRIPTOR.fields
            if f.message_type is not None and f.message_type.GetOptions().map_entry
            and f.message_type.fields_by_name["value"].message_type is tensor_pb2.Tensor.DESCRIPTOR}
    return maps


def _nested(cls: type[Message]) -> dict[str, tuple[int, type[Message]]]:
    """Field name -> (number, class) of every singular message field of ``cls`` that holds
    tensor maps itself or further down (TrainResponse.sync, TrainSync.optimizer_state)."""
    nested = _NESTED.get(cls)
    if nested is None:
        _NESTED[cls] = {}  # a message type that contains itself ends here
        nested = _NESTED[cls] = {
            f.name: (f.number, sub) for f in cls.DESCRIPTOR.fields
            if f.message_type is not None and not f.message_type.GetOptions().map_entry
            and not f.is_repeated
            and (_tensor_maps(sub := message_factory.GetMessageClass(f.message_type)) or _nested(sub))}
    return nested


_HEADERS: dict[tuple[bytes, str, int, tuple[int, ...], int], bytes] = {}  # see _header
_LAYOUTS: dict[tuple[int, int, bytes | None], tuple[bytes, str, np.dtype, tuple[int, ...], int]] = {}  # see decode
_CACHED = 4096  # entries per cache; a training loop sends the same few names and shapes every step
ALIGN = 16  # tensor data starts at a multiple of this in the message; received bytes objects are 16-aligned


def _padded(n: int, extra: int) -> bytes:
    """The varint ``n`` written ``extra`` bytes longer than it needs (continuation bytes of
    zero bits; protobuf reads a varint value of up to ten bytes)."""
    out = bytearray(_varint(n))
    if extra:
        out[-1] |= 128
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


def _header(tag: bytes, name: str, code: int, shape: tuple[int, ...], at: int) -> bytes:
    """The bytes of a map entry {name: Tensor} up to its data, starting ``at`` bytes (mod ALIGN)
    into the message: they depend only on these five. Numpy's fast loops want aligned arrays
    (a sum runs twice as fast), and the receiver's arrays view the message, so the data is
    aligned by writing some varints longer than they need: the dtype and the dimensions (up to
    ten bytes each), and the entry's length (up to five bytes, protobuf's limit for lengths)."""
    key = (tag, name, code, shape, at)
    head = _HEADERS.get(key)
    if head is None:
        nbytes = math.prod(shape) * DTYPES[code].itemsize  # type: ignore[index]
        k = name.encode()

        def padded_by(inner: int, outer: int) -> bytes:
            pads = [min(9, max(0, inner - 9 * i)) for i in range(1 + len(shape))]  # dtype first
            dims = b"".join([_padded(d, e) for d, e in zip(shape, pads[1:])])
            tensor = b"\x08" + _padded(code, pads[0]) + (b"\x12" + _varint(len(dims)) + dims if dims else b"") + (
                b"\x1a" + _varint(nbytes) if nbytes else b"")
            entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(tensor) + nbytes) + tensor
            size = _padded(len(entry) + nbytes, outer)  # padding it changes no length: no varint grows
            return tag + size + entry if len(size) <= 5 else b""

        shortest = padded_by(0, 0)
        want = -(at + len(shortest)) % ALIGN  # extra bytes: as the dtype's, unless a length grows with them
        every = ((i, o) for i in range(10 * (1 + len(shape))) for o in range(5))
        heads = (padded_by(i, o) for i, o in itertools.chain([(want, 0)], every) if nbytes)  # no data: no need
        # a scalar may not reach alignment (its data is a few bytes): then the shortest header
        head = next((h for h in heads if h and (at + len(h)) % ALIGN == 0), shortest)
        if len(_HEADERS) >= _CACHED:
            _HEADERS.clear()
        _HEADERS[key] = head
    return head


def _tensor_entry(parts: list, at: int, tag: bytes, name: str, value: Any) -> int:
    """Append one map entry {name: Tensor(value)} with field tag ``tag`` to ``parts``, ``at``
    bytes into the message; returns the message's length after it. The array itself goes in
    as a buffer, so the final join copies its bytes once."""
    a = value if type(value) is np.ndarray else np.asarray(value)
    code = _CODES.get(a.dtype)
    if code is None:
        code = dtype_code(a.dtype)
        a = a.astype(DTYPES[code])
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    head = _header(tag, name, code, a.shape, at % ALIGN)
    parts.append(head)
    if a.nbytes:
        parts.append(a)
    return at + len(head) + a.nbytes


def encode(message: Message, **tensors: Any) -> bytes:
    """Serialize ``message`` with its ``map<string, Tensor>`` fields given as arrays:
    ``encode(pb.ForwardRequest(session_id=s), inputs={"x": x})``; maps inside a message field
    as a dict of that message's maps: ``encode(TrainResponse(sync=...), sync={"params": p})``.
    Each array's bytes are copied once, into the result, at an offset that is a multiple of ALIGN."""
    parts: list[Any] = [message.SerializeToString()]
    _write(parts, len(parts[0]), type(message), tensors)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def encode_within(number: int, message: Message, /, **tensors: Any) -> bytes:
    """``encode(message, **tensors)`` as field ``number`` of an enclosing message that holds
    nothing else (a StreamCall or StreamAnswer), still in one copy; ``decode_within`` reads it."""
    return b"".join(pieces_within(number, message, **tensors).parts)


class Pieces:
    """An encoded message not yet copied together: ``nbytes`` long; ``write_to`` copies it
    into a writable buffer (a shared-memory region) instead of a new bytes object."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: list[Any], nbytes: int):
        self.parts, self.nbytes = parts, nbytes

    def write_to(self, buffer: Any) -> None:
        at = 0
        for part in self.parts:
            data = part if type(part) is bytes else memoryview(part).cast("B")  # an array's bytes, any shape
            buffer[at:at + len(data)] = data
            at += len(data)


def pieces_within(number: int, message: Message, /, **tensors: Any) -> Pieces:
    """``encode_within``'s message, in pieces."""
    tag = _varint(number << 3 | 2)
    start = len(tag) + 5  # the length takes five bytes: the offsets after it come first
    parts: list[Any] = [tag, b"", message.SerializeToString()]
    end = _write(parts, start + len(parts[2]), type(message), tensors)
    parts[1] = _padded(end - start, 5 - len(_varint(end - start)))
    return Pieces(parts, end)


def _write(parts: list, at: int, cls: type[Message], tensors: Mapping[str, Any]) -> int:
    """Append the tensor maps of a ``cls`` message, ``at`` bytes into the whole one; returns
    its length after them. A message field goes in as one more occurrence of that field,
    which protobuf merges into the first."""
    numbers = _tensor_maps(cls)
    for field, arrays in tensors.items():
        if not arrays:
            continue
        if field in numbers:
            tag = _varint(numbers[field] << 3 | 2)
            for name, value in arrays.items():
                at = _tensor_entry(parts, at, tag, name, value)
            continue
        number, sub = _nested(cls)[field]
        tag, mark = _varint(number << 3 | 2), len(parts)
        parts += [tag, b""]
        start = at + len(tag) + 5  # the length takes five bytes: its contents' offsets come first
        end = _write(parts, start, sub, arrays)
        if end == start:  # no tensor in it after all: leave the field as the message has it
            del parts[mark:]
            continue
        parts[mark + 1] = _padded(end - start, 5 - len(_varint(end - start)))
        at = end
    return at


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        b = data[pos]
        pos += 1
        result |= (b & 127) << shift
        if b < 128:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise DecodeError("truncated or overlong varint")


def _skip(data: bytes, key: int, pos: int, end: int) -> int:
    """The position after the value of the field whose key (number and wire type) is ``key``."""
    wire = key & 7
    if key < 8:
        raise DecodeError("field number 0")
    if wire == 0:
        return _read_varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 2:
        length, pos = _read_varint(data, pos, end)
        pos += length
    elif wire == 5:
        pos += 4
    else:
        raise DecodeError(f"unsupported wire type {wire}")
    if pos > end:
        raise DecodeError("truncated field")
    return pos


def _read_dims(data: bytes, pos: int, stop: int) -> list[int]:
    """Packed int64 varints (negative ones are ten bytes long)."""
    dims = data[pos:stop]
    if dims.isascii():  # every dimension < 128: one byte each, the common case
        return list(dims)
    out = []
    while pos < stop:
        d, pos = _read_varint(data, pos, stop)
        out.append(d - (1 << 64) if d >= 1 << 63 else d)
    return out


def _read_tensor(data: bytes, pos: int, end: int) -> tuple[int, tuple[int, ...], int, int]:
    """A Tensor message in data[pos:end]: dtype code, shape, data offset and length.
    Single-byte tags and lengths take the short path."""
    code, shape, offset, nbytes = 0, [], pos, 0
    while pos < end:
        key = data[pos]
        pos += 1
        if key == 0x08:  # dtype
            code = data[pos]
            pos += 1
            if code >= 128:
                code, pos = _read_varint(data, pos - 1, end)
        elif key == 0x12:  # shape, packed
            n = data[pos]
            pos += 1
            if n >= 128:
                n, pos = _read_varint(data, pos - 1, end)
            if pos + n > end:
                raise DecodeError("truncated shape")
            shape += _read_dims(data, pos, pos + n)
            pos += n
        elif key == 0x1A:  # data
            nbytes, offset = _read_varint(data, pos, end)
            pos = offset + nbytes
            if pos > end:
                raise DecodeError("truncated tensor data")
        else:
            key, pos = _read_varint(data, pos - 1, end)
            if key == 0x10:  # shape, unpacked, as some encoders write it
                d, pos = _read_varint(data, pos, end)
                shape.append(d - (1 << 64) if d >= 1 << 63 else d)
            else:
                pos = _skip(data, key, pos, end)
    if pos > end:  # a last field's value past the tensor's end
        raise DecodeError("truncated tensor")
    return code, tuple(shape), offset, nbytes


MAX_FIELDS = 100_000  # per message body: no request needs more, and each costs the reader 1-14 µs


def decode(data: bytes, cls: type[M], max_elements: int | None = None,
           start: int = 0) -> tuple[M, dict[str, dict[str, np.ndarray]]]:
    """Parse ``data`` (from byte ``start`` on) as a ``cls`` message: the message without its
    top-level tensor maps, and those maps as ``{field: {name: array}}`` of read-only arrays
    viewing ``data`` (maps deeper down, as in a Train sync, are left to protobuf). A malformed
    body, or one of more than MAX_FIELDS fields, raises CodecError naming the field; a tensor
    over ``max_elements`` raises TensorTooLarge."""
    numbers = _tensor_maps(cls)
    arrays: dict[str, dict[str, np.ndarray]] = {field: {} for field in numbers}
    if not numbers:
        try:
            return cls.FromString(data[start:] if start else data), arrays
        except DecodeError as e:
            raise _not_a(cls, data, e) from None
    fields = {number: field for field, number in numbers.items()}
    rest: list[bytes] = []
    pos, end, count = start, len(data), 0
    try:
        while pos < end:
            count += 1
            if count > MAX_FIELDS:
                raise DecodeError(f"more than {MAX_FIELDS} fields")
            start = pos
            tag = data[pos]
            pos += 1
            if tag >= 128:
                tag, pos = _read_varint(data, pos - 1, end)
            field = fields.get(tag >> 3) if tag & 7 == 2 else None
            if field is None:
                pos = _skip(data, tag, pos, end)
                rest.append(data[start:pos])
                continue
            length = data[pos]
            pos += 1
            if length >= 128:
                length, pos = _read_varint(data, pos - 1, end)
            stop = pos + length
            if stop > end:
                raise DecodeError("truncated map entry")
            # the usual entry starts with its key (field 1), a short name: look for a header seen before
            named = data[pos + 2:pos + 2 + data[pos + 1]] if length > 2 and data[pos] == 0x0A and data[pos + 1] < 128 \
                else None
            layout = _LAYOUTS.get((tag, length, named))
            if layout is not None and data.startswith(layout[0], pos):  # only the data differs
                head, name, dtype, shape, size = layout  # checked when it was cached: only the limit is left
                if max_elements is not None and size > max_elements:
                    raise _too_large(field, name, shape, size, max_elements)
                arrays[field][name] = np.frombuffer(data, dtype, size, pos + len(head)).reshape(shape)
                pos = stop
                continue
            start = pos
            name, tensor = "", None
            while pos < stop:  # the entry: key = 1 (string), value = 2 (Tensor)
                key = data[pos]
                if key == 0x0A or key == 0x12:
                    n = data[pos + 1]
                    pos += 2
                    if n >= 128:
                        n, pos = _read_varint(data, pos - 1, stop)
                    if key == 0x0A:
                        name = data[pos:pos + n].decode()
                    elif tensor is None:
                        tensor = (pos, pos + n)
                    else:  # protobuf would merge the two Tensors; no encoder writes that
                        raise DecodeError("a map entry with two values")
                    pos += n
                else:
                    key, pos = _read_varint(data, pos, stop)
                    pos = _skip(data, key, pos, stop)
            if pos > stop:
                raise DecodeError("truncated map entry")
            t0, t1 = tensor if tensor is not None else (stop, stop)
            code, shape, offset, nbytes = _read_tensor(data, t0, t1)
            arrays[field][name] = _array(code, shape, data, offset, nbytes, max_elements, field, name)
            if offset + nbytes == stop == t1 and nbytes:  # the usual layout, data last: remember its header
                if len(_LAYOUTS) >= _CACHED:
                    _LAYOUTS.clear()
                _LAYOUTS[tag, length, named] = (data[start:offset], name, DTYPES[code], shape,  # type: ignore[index]
                                                 math.prod(shape))
        message = cls.FromString(b"".join(rest))
    except IndexError:
        raise _not_a(cls, data, DecodeError("truncated field")) from None
    except (DecodeError, UnicodeDecodeError) as e:
        raise _not_a(cls, data, e) from None
    return message, arrays


_ONEOFS: dict[type, dict[int, tuple[str, type[Message]]]] = {}


def decode_within(data: bytes, cls: type[Message], max_elements: int | None = None
                  ) -> tuple[str, Message, dict[str, dict[str, np.ndarray]]]:
    """Parse ``data`` as a ``cls`` message that holds one field of its oneof (a StreamCall or
    StreamAnswer): that field's name ("" when none is set), and its message as ``decode``
    gives it. The body ``encode_within`` writes is read in place, without a copy; any
    other valid body (more than one field, say) is parsed by protobuf first."""
    members = _ONEOFS.get(cls)
    if members is None:
        members = _ONEOFS[cls] = {f.number: (f.name, message_factory.GetMessageClass(f.message_type))
                                  for f in cls.DESCRIPTOR.oneofs[0].fields}
    try:
        key, pos = _read_varint(data, 0, len(data)) if data else (0, 0)
        if key & 7 == 2 and key >> 3 in members:
            length, pos = _read_varint(data, pos, len(data))
            if pos + length == len(data):  # the one field, the whole body
                name, sub = members[key >> 3]
                return (name, *decode(data, sub, max_elements, pos))
        outer = cls.FromString(data)
    except DecodeError as e:
        raise _not_a(cls, data, e) from None
    name = outer.WhichOneof(cls.DESCRIPTOR.oneofs[0].name) or ""
    if not name:
        return "", outer, {}
    inner = getattr(outer, name)
    return (name, *decode(inner.SerializeToString(), type(inner), max_elements))


def _not_a(cls: type[Message], data: bytes, error: Exception) -> CodecError:
    return CodecError("request", f"the body ({len(data)} bytes) is not a valid {cls.DESCRIPTOR.full_name} "
                                 f"message: {error}")
