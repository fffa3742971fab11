"""The wire codec: hand-written tensor maps agree with protobuf both ways, decoding is
zero-copy, and malformed bodies are CodecErrors naming the field, never anything else."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import train_pb2

DTYPES = [np.float32, np.float64, np.int64, np.int32]
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
tensor_maps = st.dictionaries(st.text(max_size=12), arrays, max_size=4)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=tensor_maps, params=tensor_maps, session_id=st.text(max_size=40),
       outputs=st.lists(st.text(max_size=8), max_size=3))
def test_encode_is_protobuf_and_decode_reads_protobuf(inputs, params, session_id, outputs) -> None:
    request = pb.ForwardRequest(session_id=session_id, outputs=outputs, seed=7)
    data = codec.encode(request, inputs=inputs, params=params)
    # protobuf reads what encode wrote ...
    parsed = pb.ForwardRequest.FromString(data)
    assert parsed.session_id == session_id and list(parsed.outputs) == outputs and parsed.seed == 7
    for field, want in (("inputs", inputs), ("params", params)):
        got = codec.from_tensor_map(getattr(parsed, field), field)
        assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    assert all(offset(a, data) % codec.ALIGN == 0 for a in codec.decode(data, pb.ForwardRequest)[1]["inputs"].values()
               if a.ndim and a.size)
    # ... and decode reads what protobuf wrote, with the same result as reading encode's bytes
    for body in (data, parsed.SerializeToString()):
        message, maps = codec.decode(body, pb.ForwardRequest)
        assert message.session_id == session_id and list(message.outputs) == outputs and not message.inputs
        for field, want in (("inputs", inputs), ("params", params)):
            assert maps[field].keys() == want.keys() and all(same(maps[field][k], want[k]) for k in want)


def offset(a: np.ndarray, data: bytes) -> int:
    """Where ``a``'s data starts in ``data``."""
    return a.ctypes.data - np.frombuffer(data, np.uint8).ctypes.data


@pytest.mark.parametrize("name", ["x", "n" * 200])
@pytest.mark.parametrize("lead", ["", "s" * 37, "s" * 300])
def test_tensor_data_starts_aligned(name: str, lead: str) -> None:
    """Tensors of any size, after fields of any length, start at a multiple of ALIGN: numpy's
    fast loops want aligned arrays, and decoded arrays view the message."""
    shapes = [(1,), (3, 5), (300, 2), (2, 70000), (128, 16384, 0), (7, 1, 129)]
    arrays = {f"{name}{i}{dt.char}": np.ones(shape, dt) for i, shape in enumerate(shapes)
              for dt in (np.dtype(np.float32), np.dtype(np.int64))}
    data = codec.encode(pb.ForwardRequest(session_id=lead), inputs=arrays, params={"s": np.float64(2.5)})
    message, maps = codec.decode(data, pb.ForwardRequest)
    assert message.session_id == lead and maps["params"]["s"] == 2.5
    for key, a in arrays.items():
        got = maps["inputs"][key]
        assert same(got, a) and (not a.size or offset(got, data) % codec.ALIGN == 0), key
    parsed = pb.ForwardRequest.FromString(data)  # protobuf reads the longer varints as the same values
    assert parsed == pb.ForwardRequest.FromString(parsed.SerializeToString())
    assert same(codec.from_tensor(parsed.inputs[f"{name}3f"]), arrays[f"{name}3f"])


def test_alignment_across_varint_boundaries() -> None:
    """Sizes whose lengths cross a varint boundary (127 -> 128 bytes) as padding grows, at every offset."""
    for n in range(1, 40):
        for lead in range(16):
            for dtype in (np.float32, np.float64):
                data = codec.encode(pb.ForwardRequest(session_id="s" * lead), inputs={"x": np.ones(n, dtype)})
                a = codec.decode(data, pb.ForwardRequest)[1]["inputs"]["x"]
                assert offset(a, data) % codec.ALIGN == 0 and same(a, np.ones(n, dtype)), (n, lead, dtype)


def test_decoded_arrays_view_the_received_bytes() -> None:
    x = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    data = codec.encode(pb.ForwardRequest(session_id="s"), inputs={"x": x})
    _, maps = codec.decode(data, pb.ForwardRequest)
    got = maps["inputs"]["x"]
    assert not got.flags.writeable and not got.flags.owndata
    base = got
    while isinstance(base, np.ndarray):
        base = base.base
    assert base is data  # no copy at all
    np.testing.assert_array_equal(got, x)


def test_a_header_seen_before_is_still_held_to_the_element_limit() -> None:
    x = np.arange(12.0).reshape(3, 4)
    data = codec.encode(pb.ForwardRequest(session_id="s"), inputs={"x": x})
    for _ in range(2):  # the second decode takes the cached header's path
        np.testing.assert_array_equal(codec.decode(data, pb.ForwardRequest, 12)[1]["inputs"]["x"], x)
    with pytest.raises(codec.TensorTooLarge, match=r"shape \[3, 4\] has 12 elements; the limit is 11"):
        codec.decode(data, pb.ForwardRequest, 11)
    other = codec.encode(pb.ForwardRequest(session_id="s"), inputs={"x": x + 1})  # same header, other data
    np.testing.assert_array_equal(codec.decode(other, pb.ForwardRequest)[1]["inputs"]["x"], x + 1)


def test_encode_takes_any_layout_and_casts_nothing_it_can_send() -> None:
    a = np.arange(12.0).reshape(3, 4)
    data = codec.encode(pb.ForwardRequest(), inputs={"t": a.T, "f": 1.5, "l": [1, 2], "big": a.astype(">f8")})
    _, maps = codec.decode(data, pb.ForwardRequest)
    np.testing.assert_array_equal(maps["inputs"]["t"], a.T)
    assert maps["inputs"]["f"].shape == () and maps["inputs"]["f"] == 1.5
    assert maps["inputs"]["l"].dtype == np.int64
    assert maps["inputs"]["big"].dtype == np.dtype("<f8")
    with pytest.raises(codec.CodecError, match="unsupported dtype"):
        codec.encode(pb.ForwardRequest(), inputs={"b": np.array([True])})


def test_messages_without_tensor_maps_go_through_protobuf() -> None:
    msg = pb.CloseSessionRequest(session_id="s")
    got, maps = codec.decode(codec.encode(msg), pb.CloseSessionRequest)
    assert got == msg and maps == {}
    progress = train_pb2.TrainResponse(progress=train_pb2.TrainProgress(first_step=3, losses=[1.0, 0.5]))
    got, maps = codec.decode(codec.encode(progress), train_pb2.TrainResponse)
    assert got == progress and maps == {}


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(params=tensor_maps, slots=tensor_maps)
def test_maps_inside_message_fields(params, slots) -> None:
    """A Train sync's maps sit two messages deep: encoded by hand as one more occurrence of
    those fields, which protobuf merges (and decode leaves to protobuf)."""
    msg = train_pb2.TrainResponse(sync=train_pb2.TrainSync(step=5, done=True, optimizer_state=train_pb2.OptimizerState(
        step=9)))
    data = codec.encode(msg, sync={"params": params, "optimizer_state": {"slots": slots}, "buffers": {}})
    for parsed in (train_pb2.TrainResponse.FromString(data), codec.decode(data, train_pb2.TrainResponse)[0]):
        assert parsed.sync.step == 5 and parsed.sync.done and parsed.sync.optimizer_state.step == 9
        for got, want in ((parsed.sync.params, params), (parsed.sync.optimizer_state.slots, slots)):
            got = codec.from_tensor_map(got, "x")
            assert got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    # a field with no tensors in it is left as the message has it: not made present
    bare = codec.encode(train_pb2.TrainRequest(), start={"optimizer_state": {"slots": {}}})
    assert not train_pb2.TrainRequest.FromString(bare).HasField("start")


@pytest.mark.parametrize("body, message", [
    (b"\xff\xff\xff not protobuf", "is not a valid gradgate.v1.ForwardRequest message"),
    (b"\x12\x05\x0a\x01x", "truncated"),  # a map entry longer than the body
    (b"\x12\x04\x0a\x01x\x12", "is not a valid"),
    (b"\x0f", "is not a valid"),  # wire type 7
])
def test_malformed_bodies_are_codec_errors(body: bytes, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message) as e:
        codec.decode(body, pb.ForwardRequest)
    assert e.value.field == "request"


def entry(field: int, key: bytes, tensor: bytes) -> bytes:
    inner = b"\x0a" + codec._varint(len(key)) + key + b"\x12" + codec._varint(len(tensor)) + tensor
    return codec._varint(field << 3 | 2) + codec._varint(len(inner)) + inner


def tensor(dtype: int, shape: list[int], data: bytes) -> bytes:
    dims = b"".join(codec._varint(d & (2**64 - 1)) for d in shape)
    return b"\x08" + codec._varint(dtype) + b"\x12" + codec._varint(len(dims)) + dims + \
        b"\x1a" + codec._varint(len(data)) + data


@pytest.mark.parametrize("shape, data, error, text", [
    ([2**32, 2**32], b"", codec.TensorTooLarge, "18446744073709551616 elements; the limit is 1000"),
    ([3, 6148914691236517206], b"", codec.TensorTooLarge, "the limit is 1000"),
    ([-1, 4], b"", codec.CodecError, "negative dimension"),
    ([2, 2], b"\x00" * 31, codec.CodecError, "has 31 bytes, but shape [2, 2] of float64 needs 32"),
])
def test_bad_tensors_name_their_field(shape, data, error, text) -> None:
    body = entry(2, b"x", tensor(2, shape, data))
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")) as e:
        codec.decode(body, pb.ForwardRequest, max_elements=1000)
    assert e.value.field.startswith("inputs['x']")


def test_unknown_dtype_and_a_missing_value() -> None:
    with pytest.raises(codec.CodecError, match="unknown dtype enum 99") as e:
        codec.decode(entry(4, b"W", tensor(99, [1], b"\x00" * 8)), pb.ForwardRequest)
    assert e.value.field == "params['W'].dtype"
    with pytest.raises(codec.CodecError, match="unknown dtype enum 0"):
        codec.decode(entry(4, b"W", b""), pb.ForwardRequest)


def test_entries_protobuf_rejects_are_rejected() -> None:
    """The hand-written reader is no laxer than protobuf inside a map entry or a tensor."""
    value = tensor(2, [1], b"\x00" * 8)
    lone_dtype_tag = b"\x0a\x01W\x12" + codec._varint(len(value) + 1) + value + b"\x08" + b"\x02\x00"
    field_zero = b"\x0a\x01W\x01" + b"\x00" * 8 + b"\x12" + codec._varint(len(value)) + value
    for inner in (lone_dtype_tag, field_zero):
        body = codec._varint(4 << 3 | 2) + codec._varint(len(inner)) + inner
        with pytest.raises(DecodeError):
            pb.ForwardRequest.FromString(body)
        with pytest.raises(codec.CodecError, match="is not a valid gradgate.v1.ForwardRequest"):
            codec.decode(body, pb.ForwardRequest)
    # and an entry with its value twice, which protobuf merges (shape [1] + [1]), is refused, not half read
    twice = b"\x0a\x01W\x12" + codec._varint(len(value)) + value + b"\x12\x04\x12\x02\x01\x01"
    body = codec._varint(4 << 3 | 2) + codec._varint(len(twice)) + twice
    assert list(pb.ForwardRequest.FromString(body).params["W"].shape) == [1, 1, 1]
    with pytest.raises(codec.CodecError, match="a map entry with two values"):
        codec.decode(body, pb.ForwardRequest)


@settings(max_examples=300)
@given(data=st.data())
def test_a_body_protobuf_rejects_is_a_codec_error(data) -> None:
    body = bytearray(codec.encode(pb.ForwardRequest(session_id="s", outputs=["o"]),
                                  inputs={"x": np.arange(6.0).reshape(2, 3)}, params={"w": np.float32(1.5)}))
    for _ in range(data.draw(st.integers(1, 3))):  # overwrite, drop or insert a byte
        at = data.draw(st.integers(0, len(body) - 1))
        how = data.draw(st.sampled_from(["set", "drop", "insert"]))
        if how == "drop":
            del body[at]
        else:
            body[at:at + (how == "set")] = bytes([data.draw(st.integers(0, 255))])
    try:
        pb.ForwardRequest.FromString(bytes(body))
    except DecodeError:
        with pytest.raises(codec.CodecError):
            codec.decode(bytes(body), pb.ForwardRequest)


def test_a_body_of_too_many_fields_is_refused_early() -> None:
    """Each field costs the hand-written reader microseconds: 64 MiB of two-byte fields once held
    a server thread for ~25 s, so a body may have MAX_FIELDS fields (protobuf reads it in ms)."""
    message, _ = codec.decode(b"\x0a\x00" * codec.MAX_FIELDS, pb.ForwardRequest)
    assert message.session_id == ""
    with pytest.raises(codec.CodecError, match=f"more than {codec.MAX_FIELDS} fields"):
        codec.decode(b"\x0a\x00" * (codec.MAX_FIELDS + 1), pb.ForwardRequest)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error(body: bytes) -> None:
    for cls in (pb.ForwardBackwardRequest, pb.CreateSessionRequest, train_pb2.UploadDataRequest):
        try:
            codec.decode(body, cls, max_elements=10_000)
        except codec.CodecError:
            pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=tensor_maps, params=tensor_maps, session_id=st.text(max_size=40))
def test_a_call_within_a_stream_call(inputs, params, session_id) -> None:
    """A CallStream request: the unary request as the one field of a StreamCall, written in one
    copy and read in place, aligned; a StreamCall that protobuf wrote reads the same."""
    request = pb.ForwardBackwardRequest(session_id=session_id, seed=3, input_grads=True)
    data = codec.encode_within(3, request, inputs=inputs, params=params)
    parsed = pb.StreamCall.FromString(data)  # protobuf reads it as a StreamCall holding the request
    assert parsed.WhichOneof("call") == "forward_backward" and parsed.forward_backward.session_id == session_id
    assert codec.from_tensor_map(parsed.forward_backward.inputs, "inputs").keys() == inputs.keys()
    for body in (data, parsed.SerializeToString()):
        name, message, maps = codec.decode_within(body, pb.StreamCall)
        assert name == "forward_backward" and message.session_id == session_id and message.seed == 3
        assert message.input_grads and not message.inputs
        for field, want in (("inputs", inputs), ("params", params)):
            assert maps[field].keys() == want.keys() and all(same(maps[field][k], want[k]) for k in want)
            if body is data:
                assert all(offset(a, data) % codec.ALIGN == 0 for a in maps[field].values() if a.ndim and a.size)


def test_a_call_within_a_stream_call_views_the_received_bytes() -> None:
    x = np.arange(1 << 12, dtype=np.float32).reshape(64, 64)
    data = codec.encode_within(1, pb.ForwardRequest(session_id="s"), inputs={"x": x})
    got = codec.decode_within(data, pb.StreamCall)[2]["inputs"]["x"]
    base = got
    while isinstance(base, np.ndarray):
        base = base.base
    assert base is data and not got.flags.writeable  # no copy at all
    np.testing.assert_array_equal(got, x)


def test_stream_calls_without_a_call_or_not_protobuf() -> None:
    assert codec.decode_within(b"", pb.StreamCall)[0] == ""
    assert codec.decode_within(pb.StreamCall().SerializeToString(), pb.StreamCall)[0] == ""
    empty = codec.decode_within(codec.encode_within(2, pb.BackwardRequest()), pb.StreamCall)
    assert empty[0] == "backward" and empty[1] == pb.BackwardRequest()
    # two occurrences of the field: protobuf merges them, and so does decode_within
    two = pb.StreamCall(forward=pb.ForwardRequest(session_id="s")).SerializeToString() + \
        codec.encode_within(1, pb.ForwardRequest(seed=4), inputs={"x": np.ones(3)})
    name, message, maps = codec.decode_within(two, pb.StreamCall)
    assert (name, message.session_id, message.seed) == ("forward", "s", 4)
    np.testing.assert_array_equal(maps["inputs"]["x"], np.ones(3))
    for body in (b"\xff\xff\xff not protobuf", b"\x1a\x05ab", b"\x1a\x02\x12\x09"):
        with pytest.raises(codec.CodecError, match="is not a valid gradgate.v1"):
            codec.decode_within(body, pb.StreamCall)
    big = codec.encode_within(1, pb.ForwardRequest(), inputs={"x": np.ones(20)})
    with pytest.raises(codec.TensorTooLarge, match="the limit is 10"):
        codec.decode_within(big, pb.StreamCall, max_elements=10)


def test_pieces_write_the_bytes_encode_within_joins() -> None:
    """A call copied into a buffer (a shared-memory region) piece by piece is the same message."""
    request = pb.ForwardBackwardRequest(session_id="s", seed=3)
    arrays = {"inputs": {"x": np.arange(12.0).reshape(3, 4), "y": np.arange(3)},
              "params": {"w": np.ones((4, 2), np.float32), "b": np.float32(0.5)}}
    pieces = codec.pieces_within(3, request, **arrays)
    buffer = bytearray(pieces.nbytes + 10)
    pieces.write_to(buffer)
    data = codec.encode_within(3, request, **arrays)
    assert pieces.nbytes == len(data) and bytes(buffer[:len(data)]) == data
    name, message, maps = codec.decode_within(bytes(buffer[:len(data)]), pb.StreamCall)
    assert (name, message.seed) == ("forward_backward", 3)
    np.testing.assert_array_equal(maps["params"]["w"], np.ones((4, 2), np.float32))


def test_stream_answers_mirror_stream_calls() -> None:
    """StreamAnswer holds each unary call's response in the field of that call's number; the
    fields after the calls are the shared-memory region's."""
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    by_request = {m.input_type: m for m in service.methods}
    answers = pb.StreamAnswer.DESCRIPTOR.oneofs[0].fields
    calls = [f for f in pb.StreamCall.DESCRIPTOR.oneofs[0].fields if f.message_type in by_request]
    assert [(f.name, f.number) for f in calls] == [(f.name, f.number) for f in answers[:len(calls)]]
    for call, answer in zip(calls, answers):
        assert by_request[call.message_type].output_type is answer.message_type
    assert [(f.name, f.number, f.message_type.name) for f in answers[len(calls):]] == [
        ("region", 6, "SharedRegion"), ("in_region", 7, "InRegion")]
    assert [(f.name, f.number) for f in pb.StreamCall.DESCRIPTOR.oneofs[0].fields[len(calls):]] == [
        ("open_region", 6), ("in_region", 7)]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_decode_within_or_raise_codec_error(body: bytes) -> None:
    for cls in (pb.StreamCall, pb.StreamAnswer):
        try:
            codec.decode_within(body, cls, max_elements=10_000)
        except codec.CodecError:
            pass
