"""Fuzzing a real server at scale (issue 9): over 10,000 generated requests per run, to
every RPC, on 127.0.0.1:
1. sessions driven through valid and almost-valid graphs, tensors and requests, a third of
   them also uploading a dataset and training on the server;
2. every request message type generated from its protobuf descriptor;
3. random and mutated bytes on a raw channel.
Every answer is OK or a documented status, never UNKNOWN or INTERNAL; the server stays
healthy, and a session the fuzzer never names keeps its parameters and computes the
same results bit for bit.

Hypothesis draws the structure (graph, which calls, which faults) and a seed; the bulk
of each request (tensor values, field values) comes from ``random.Random(seed)``, which
keeps a draw cheap enough for thousands of requests a run and every failure replayable.
"""
from __future__ import annotations

import collections
import math
import os
import random
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradgate as gg
from gradgate import codec
from gradgate.v1 import gradcheck_pb2, graph_pb2, tensor_pb2, train_pb2
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate_server import Config, serve

from test_fuzz import graphs as almost_valid_graphs

Code = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED,
              Code.DEADLINE_EXCEEDED}
LIMITS = Config(max_nodes=60, max_sessions=200, max_tensor_elements=50_000, cache_bytes=32 * 2**20,
                max_flops=10**9, max_message_bytes=2 * 2**20)
TIMEOUT = 10.0
SCENARIOS = int(os.environ.get("FUZZ_SCENARIOS", 1000))  # about 7 requests each
MESSAGES = int(os.environ.get("FUZZ_MESSAGES", 2200))
BYTES_PER_METHOD = int(os.environ.get("FUZZ_BYTES", 260))
COUNT: dict[str, int] = {}
CODES: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, status) of every answer


class Fuzzed:
    """The server under fuzz and what must not change on it."""

    def __init__(self) -> None:
        self.server = serve("127.0.0.1:0", LIMITS)
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_send_message_length", 4 * 2**20), ("grpc.max_receive_message_length", 4 * 2**20)])
        self.client = gg.connect(self.server.address, recover_sessions=False)
        g = gg.Graph("float64")
        x, y = g.input("x", (None, 3)), g.input("y", (None,), dtype="int64")
        h = gg.tanh(x @ g.param("W1", (3, 5)) + g.param("b1", (5,)))
        g.set_loss(gg.softmax_cross_entropy(h @ g.param("W2", (5, 4)), y))
        self.params = gg.init_params(g, seed=1)
        self.sentinel = self.client.session(g, self.params)
        rng = np.random.default_rng(2)
        self.batch = {"x": rng.normal(size=(7, 3)), "y": rng.integers(0, 4, 7)}
        self.expected = self.sentinel.forward_backward(self.batch)
        self.live: list[str] = []

    def call(self, kind: str, method: str, request: Any, raw: bool = False,
             timeout: float = TIMEOUT) -> tuple[grpc.StatusCode, Any]:
        """One request of any method (raw: bytes, or a list of bytes for a client stream);
        returns the status and a unary response's bytes; fails on an undocumented status."""
        COUNT[kind] = COUNT.get(kind, 0) + 1
        m = SERVICE.methods_by_name[method]
        kinds = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                 (True, False): self.channel.stream_unary, (True, True): self.channel.stream_stream}
        stub = kinds[m.client_streaming, m.server_streaming](
            f"/{SERVICE.full_name}/{method}", request_serializer=None if raw else (lambda msg: msg.SerializeToString()),
            response_deserializer=None)
        if m.client_streaming:
            request = iter(request if isinstance(request, list) else [request])
        try:
            result = stub(request, timeout=timeout)
            if m.server_streaming:
                for _ in zip(range(50), result):  # a bounded look at a stream
                    pass
                result.cancel()
                result = None
            CODES[method, "OK"] += 1
            return Code.OK, result
        except grpc.RpcError as e:
            assert e.code() in DOCUMENTED, f"{method}: {e.code().name} {e.details()!r} for {str(request)[:3000]}"
            CODES[method, e.code().name] += 1
            return e.code(), None

    def live_ids(self) -> list[str]:
        """Sessions the message fuzz may name (and close): a fresh one every 100 calls."""
        if COUNT.get("messages", 0) % 100 == 0 or not self.live:
            self.live = [*self.live[-4:], self.client.session(tiny_graph(), {"W": np.ones(2)}).id]
        return self.live

    def assert_unharmed(self) -> None:
        with grpc.insecure_channel(self.server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        params = self.sentinel.get_params()
        for name, value in self.params.items():
            np.testing.assert_array_equal(params[name], value)
        again = self.sentinel.forward_backward(self.batch)
        assert again.loss == self.expected.loss
        for name, grad in self.expected.grads.items():
            np.testing.assert_array_equal(again.grads[name], grad)

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(0)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    f = Fuzzed()
    start = time.perf_counter()
    yield f
    f.close()
    print(f"\nfuzz: {sum(COUNT.values())} requests {COUNT} in {time.perf_counter() - start:.1f}s")
    for method in sorted({m for m, _ in CODES}):
        print(f"  {method}: " + ", ".join(f"{c} {n}" for (m, c), n in sorted(CODES.items()) if m == method))


def tiny_graph() -> gg.Graph:
    g = gg.Graph("float64")
    g.set_loss(gg.sum(g.input("x", (None, 2)) * g.param("W", (2,))))
    return g


# -- tensors and requests ------------------------------------------------------------------

NAMES = ["x", "y", "W", "b", "W0", "b0", "n0", "n1", "out", "total", "loss", "", "ghost", "x\n", "é" * 3]
DTYPES = [tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT64, tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_INT32]
HUGE_SHAPES = [[2**32, 2**32], [3, 6148914691236517206], [0, 2**62], [2**31], [1] * 40, [-1, 2], [-5], [0]]
SPECIAL = [0.0, -0.0, 1e300, -1e300, float("nan"), float("inf"), -float("inf"), 1e-310]
FAULTS = ["dtype", "shape", "bytes", "huge", "labels"]


def tensor(rng: random.Random, dtype: int, shape: tuple[int, ...], batch: int, fault: str | None) -> tensor_pb2.Tensor:
    """The declared dtype and shape (batch filled in) with random values, sometimes NaN or
    infinite; with ``fault``, wrong in that one way."""
    dims = [batch if s == -1 else s for s in shape]
    if fault == "dtype":
        dtype = rng.choice([*DTYPES, 0, 99])
    elif fault == "shape":
        dims = [rng.randint(0, 5) for _ in range(rng.randint(0, 4))]
    elif fault == "huge":
        dims = rng.choice(HUGE_SHAPES)
    np_dtype = codec.DTYPES.get(dtype, np.dtype("<f8"))
    size = 1 if fault == "huge" or min(dims, default=0) < 0 else min(math.prod(dims), 60_000)
    values = np.random.default_rng(rng.getrandbits(32))
    if np_dtype.kind == "i":
        data = (np.full(size, rng.choice([-(2**40), 2**40, 3, -1]), np.int64).astype(np_dtype) if fault == "labels"
                else values.integers(0, 3, size).astype(np_dtype))
    else:
        data = values.normal(size=size).astype(np_dtype)
        if size and rng.random() < 0.2:
            with np.errstate(over="ignore"):
                data[rng.randrange(size)] = rng.choice(SPECIAL)
    raw = data.tobytes()
    if fault == "bytes":
        raw = raw[:rng.randint(0, max(len(raw) - 1, 0))] + rng.randbytes(rng.randint(0, 3))
    return tensor_pb2.Tensor(dtype=dtype, shape=dims, data=raw)


MAP_KINDS = ["clean"] * 4 + ["fault", "missing", "extra"]


def tensor_map(rng: random.Random, kind: str, declared: Any, batch: int) -> dict[str, tensor_pb2.Tensor]:
    """A tensor per declared value; ``kind`` clean | fault (one wrong) | missing | extra."""
    faulty = rng.randrange(len(declared)) if kind == "fault" and declared else -1
    out = {v.name: tensor(rng, v.dtype, tuple(v.shape), batch, rng.choice(FAULTS) if i == faulty else None)
           for i, v in enumerate(declared)}
    if kind == "missing" and out:
        del out[rng.choice(sorted(out))]
    if kind == "extra":
        out[rng.choice(NAMES)] = tensor(rng, tensor_pb2.DTYPE_FLOAT64, (2,), batch, None)
    return out


def put(field: Any, tensors: dict[str, tensor_pb2.Tensor]) -> None:
    for name, t in tensors.items():
        field[name].CopyFrom(t)


SESSION_METHODS = ["Forward", "Backward", "ForwardBackward", "SetParameters", "GetParameters", "GradientCheck",
                   "CloseSession", "ListOps", "Forward", "ForwardBackward", "ForwardBackward"]
CALLS = st.tuples(st.sampled_from(SESSION_METHODS), st.sampled_from(MAP_KINDS), st.sampled_from(MAP_KINDS),
                  st.integers(0, 2**32 - 1))


def session_call(call: tuple, graph: graph_pb2.Graph, sid: str) -> tuple[str, Any]:
    """One request on session ``sid`` (or, now and then, another id)."""
    method, input_kind, param_kind, seed = call
    rng = random.Random(seed)
    if rng.random() < 0.07:
        sid = rng.choice(["", "0" * 32, sid.upper(), sid[:-1], sid + "\n", "é" * 40])
    batch = rng.choice([1, 2, 3, 4, 7, 0, 5000])
    inputs = tensor_map(rng, input_kind, graph.inputs, batch)
    params = tensor_map(rng, param_kind, graph.params, batch) if rng.random() < 0.25 else {}
    outputs = rng.sample(NAMES + [n.name for n in graph.nodes], rng.randint(0, 2))
    if method in ("Forward", "ForwardBackward"):
        request = getattr(pb, f"{method}Request")(session_id=sid, outputs=outputs, mode=rng.randint(0, 3),
                                                  seed=rng.getrandbits(64))
        put(request.inputs, inputs)
        put(request.params, params)
        if method == "ForwardBackward":
            request.input_grads = rng.random() < 0.5
    elif method == "Backward":
        request = pb.BackwardRequest(session_id=sid, input_grads=rng.random() < 0.5,
                                     forward_id=rng.choice([0, 0, 1, 2**64 - 1]))
    elif method == "SetParameters":
        request = pb.SetParametersRequest(session_id=sid)
        put(request.params, tensor_map(rng, param_kind, graph.params, batch))
    elif method == "GetParameters":
        request = pb.GetParametersRequest(session_id=sid, names=rng.sample(NAMES, rng.randint(0, 2)))
    elif method == "GradientCheck":
        request = pb.GradientCheckRequest(graph=graph) if rng.random() < 0.25 else pb.GradientCheckRequest(
            session_id=sid)
        request.settings.CopyFrom(gradcheck_pb2.GradCheckSettings(
            mode=rng.randint(0, 4), num_checks=rng.choice([0, 1, 3, -1, 2**31 - 1]), seed=rng.getrandbits(64),
            include_inputs=rng.random() < 0.5, max_worst=rng.choice([0, 1, -1, 2**31 - 1]),
            params=rng.sample(NAMES, rng.randint(0, 1))))
        for key in ("eps", "atol", "rtol"):
            if rng.random() < 0.2:
                setattr(request.settings, key, rng.choice([1e-6, 0.0, -1.0, float("nan"), float("inf"), 1e300]))
        put(request.inputs, inputs)
        put(request.params, params)
    elif method == "CloseSession":
        request = pb.CloseSessionRequest(session_id=sid)
    else:
        request = pb.ListOpsRequest()
    return method, request


def training_calls(seed: int, graph: graph_pb2.Graph, sid: str) -> list[tuple[str, list]]:
    """An UploadData of a small dataset (sometimes faulty) and a Train run over it with
    random, sometimes nonsensical, settings."""
    rng = random.Random(seed)
    sane = rng.random() < 0.6  # otherwise anything goes
    rows = rng.choice([1, 2, 5, 8] if sane else [0, 1, 3, 2**31])
    upload = train_pb2.UploadDataRequest(session_id=sid, rows=rows if sane else rng.choice([rows, rows + 1, -1]))
    put(upload.columns, tensor_map(rng, "clean" if sane else rng.choice(MAP_KINDS), graph.inputs, min(rows, 9)))
    chunks = [upload] if rng.random() < 0.8 else [upload, train_pb2.UploadDataRequest(session_id=sid)]
    lr = rng.choice([0.1, 0.01] if sane else [0.0, -1.0, float("nan"), 1e300])
    optimizer = (train_pb2.Optimizer(sgd=train_pb2.SGD(lr=lr, momentum=rng.choice([0.0, 0.9, -1.0])))
                 if rng.random() < 0.5 else train_pb2.Optimizer(adam=train_pb2.Adam(lr=lr, beta1=rng.choice([0.0, 0.9, 2.0]))))
    start = train_pb2.TrainStart(
        session_id=sid, optimizer=optimizer if sane or rng.random() < 0.5 else None, seed=rng.getrandbits(64),
        batch_size=rng.choice([0, 1, 2, 3] if sane else [-1, 2**40, 7]), epochs=rng.choice([1, 2, 3] if sane else [0, -1, 2**40]),
        start_step=rng.choice([0, 0, 1] if sane else [5, -1, 2**40]), sync_every=rng.choice([0, 1, 2] if sane else [-1, 2**40]))
    if not sane and rng.random() < 0.5:
        start.batches.extend(train_pb2.RowRange(start=rng.randint(-1, 8), stop=rng.randint(-1, 9))
                             for _ in range(rng.randint(0, 4)))
    train = [train_pb2.TrainRequest(start=start)] + [train_pb2.TrainRequest(sync=True)] * rng.randint(0, 2)
    if rng.random() < 0.05:
        train.reverse()  # a sync first
    return [("UploadData", chunks), ("Train", train)]


@st.composite
def valid_graphs(draw: st.DrawFn) -> graph_pb2.Graph:
    """Small real networks: an MLP of random depth, widths, activation and loss."""
    g = gg.Graph(draw(st.sampled_from(["float32", "float64"])))
    width = draw(st.integers(1, 6))
    h = g.input("x", (None, width))
    for i in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 6))
        h = h @ g.param(f"W{i}", (width, out)) + g.param(f"b{i}", (out,))
        h = draw(st.sampled_from([gg.relu, gg.tanh, gg.sigmoid, gg.exp, gg.square]))(h)
        width = out
    loss = draw(st.sampled_from(["softmax", "svm", "mean", "l2"]))
    if loss in ("softmax", "svm"):
        y = g.input("y", (None,), dtype="int64")
        g.set_loss((gg.softmax_cross_entropy if loss == "softmax" else gg.svm_loss)(h, y))
    else:
        g.set_loss(gg.mean(gg.square(h)) if loss == "mean" else gg.l2(h) + gg.sum(gg.transpose(h)))
    g.output(h, name="out")
    return g.to_proto()


# -- 1. sessions through valid and almost-valid requests ------------------------------------

# 0-6: a valid session, 7: bad parameters at creation, 8-9: an almost-valid graph
SCENARIO = st.integers(0, 9).flatmap(lambda kind: st.tuples(
    st.just(kind), valid_graphs() if kind < 8 else almost_valid_graphs(), st.integers(0, 2**32 - 1),
    st.lists(CALLS, min_size=3, max_size=9)))


@settings(max_examples=SCENARIOS, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=SCENARIO)
def test_sessions_under_valid_and_almost_valid_requests(fuzzed: Fuzzed, scenario: tuple) -> None:
    kind, graph, seed, calls = scenario
    create = pb.CreateSessionRequest(graph=graph)
    put(create.params, tensor_map(random.Random(seed), "clean" if kind < 7 else "fault", graph.params, 1))
    code, response = fuzzed.call("sessions", "CreateSession", create)
    if code is not Code.OK:
        return
    sid = pb.CreateSessionResponse.FromString(response).session_id
    for call in calls:
        fuzzed.call("sessions", *session_call(call, graph, sid))
    if seed % 3 == 0:  # a third of the sessions also train on the server
        for method, messages in training_calls(seed, graph, sid):
            fuzzed.call("sessions", method, messages, timeout=3)
    fuzzed.call("sessions", "CloseSession", pb.CloseSessionRequest(session_id=sid))


def test_sessions_fuzz_harmed_nothing(fuzzed: Fuzzed) -> None:
    assert COUNT.get("sessions", 0) >= 4 * SCENARIOS, COUNT
    fuzzed.assert_unharmed()


# -- 2. every request message type, generated from its descriptor ---------------------------

LIVE = "@live"  # a session_id drawn as this names a real session
INT_RANGES = {d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
              d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
              d.FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1)}
OP_NAMES = ["add", "matmul", "relu", "sum", "mean", "reshape", "transpose", "constant", "softmax_cross_entropy"]


def scalar(f: d.FieldDescriptor, rng: random.Random, live: list[str]) -> Any:
    if f.type == d.FieldDescriptor.TYPE_STRING:
        if f.name == "session_id" and rng.random() < 0.6:
            return rng.choice(live)
        pool = NAMES + OP_NAMES
        return rng.choice(pool) if rng.random() < 0.8 else "".join(chr(rng.randint(1, 0x2FFF))
                                                                    for _ in range(rng.randint(0, 12)))
    if f.type in INT_RANGES:
        lo, hi = INT_RANGES[f.type]
        return rng.randint(max(lo, -2), 8) if rng.random() < 0.7 else rng.randint(lo, hi)
    if f.type == d.FieldDescriptor.TYPE_DOUBLE:
        return rng.choice([*SPECIAL, 1e-3, 0.5, 1.0, 3.0]) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)
    if f.type == d.FieldDescriptor.TYPE_FLOAT:
        return rng.uniform(-10, 10)
    if f.type == d.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    return rng.randbytes(rng.randint(0, 48))


def message(desc: d.Descriptor, rng: random.Random, live: list[str], depth: int = 0) -> Any:
    """A message of type ``desc``: each field unset or random; nesting bounded; tensors
    usually well-formed, often not."""
    if desc.full_name == "gradgate.v1.Tensor":
        shape = tuple(rng.randint(-1, 4) for _ in range(rng.randint(0, 3)))
        return tensor(rng, rng.choice(DTYPES), shape, 2, rng.choice([None, None, *FAULTS]))
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if rng.random() < 0.4 or (f.message_type is not None and depth >= 4):
            continue
        field = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_field, value_field = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(rng.randint(1, 3)):
                key = scalar(key_field, rng, live)
                if value_field.message_type is not None:
                    field[key].CopyFrom(message(value_field.message_type, rng, live, depth + 1))
                else:
                    field[key] = scalar(value_field, rng, live)
        elif f.is_repeated:
            for _ in range(rng.randint(1, 3)):
                if f.message_type is not None:
                    field.add().CopyFrom(message(f.message_type, rng, live, depth + 1))
                else:
                    field.append(scalar(f, rng, live))
        elif f.message_type is not None:
            field.CopyFrom(message(f.message_type, rng, live, depth + 1))
        else:
            setattr(msg, f.name, scalar(f, rng, live))
    return msg


@settings(max_examples=MESSAGES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(method=st.sampled_from(list(SERVICE.methods)), seed=st.integers(0, 2**32 - 1))
def test_every_rpc_with_messages_generated_from_their_descriptors(fuzzed: Fuzzed, method: Any, seed: int) -> None:
    rng, live = random.Random(seed), fuzzed.live_ids()
    if method.client_streaming:
        request: Any = [message(method.input_type, rng, live) for _ in range(rng.randint(1, 3))]
    else:
        request = message(method.input_type, rng, live)
    fuzzed.call("messages", method.name, request)


def test_message_fuzz_harmed_nothing(fuzzed: Fuzzed) -> None:
    assert COUNT.get("messages", 0) >= MESSAGES, COUNT
    fuzzed.assert_unharmed()


# -- 3. random and mutated bytes on a raw channel ---------------------------------------------

def test_random_and_mutated_bytes_to_every_rpc(fuzzed: Fuzzed) -> None:
    seed = time.time_ns() % 2**32
    rng = random.Random(seed)
    sid = fuzzed.client.session(tiny_graph(), {"W": np.ones(2)}).id
    valid = {m.name: GetMessageClass(m.input_type)() for m in SERVICE.methods}
    for msg in valid.values():
        if "session_id" in msg.DESCRIPTOR.fields_by_name:
            msg.session_id = sid
    valid["CreateSession"].graph.CopyFrom(tiny_graph().to_proto())
    codec.to_tensor_map({"W": np.ones(2)}, valid["CreateSession"].params)
    for name in ("Forward", "ForwardBackward", "GradientCheck"):
        codec.to_tensor_map({"x": np.ones((2, 2))}, valid[name].inputs)
    valid["CallStream"].forward_backward.CopyFrom(valid["ForwardBackward"])
    blobs = {name: msg.SerializeToString() for name, msg in valid.items()}

    def mutate(blob: bytes) -> bytes:
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            how, pos = rng.randrange(4), rng.randrange(len(b) + 1)
            if how == 0 and pos < len(b):
                b[pos] = rng.randrange(256)
            elif how == 1:
                del b[pos:]
            elif how == 2:
                b[pos:pos] = rng.randbytes(rng.randint(1, 8))
            elif pos < len(b):
                b[pos] ^= 1 << rng.randrange(8)
        return bytes(b)

    jobs = []
    for method in SERVICE.methods:
        for i in range(BYTES_PER_METHOD):
            def make() -> bytes:
                return rng.randbytes(rng.randint(0, 200)) if i % 2 else mutate(blobs[method.name])
            jobs.append((method.name, [make() for _ in range(rng.randint(1, 3))] if method.client_streaming
                         else make()))
    with futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(fuzzed.call, "bytes", name, request, True) for name, request in jobs]:
            f.result()
    assert COUNT["bytes"] >= BYTES_PER_METHOD * len(SERVICE.methods), (COUNT, seed)
    fuzzed.assert_unharmed()


def test_total_is_over_10000(fuzzed: Fuzzed) -> None:
    if set(COUNT) != {"sessions", "messages", "bytes"}:
        pytest.skip("only part of the fuzz ran")
    assert sum(COUNT.values()) >= 10_000, COUNT
