"""/metrics of a real server under real gRPC traffic: the numbers match what the test did."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate.v1 import graph_pb2
from gradgate_server import Config, serve
from gradgate_server.app import version
from gradgate_server.engine import compile_graph, forward
from gradgate_server.logs import JsonFormatter
from gradgate_server.metrics import GRPC_CODES, Metrics, RpcRecord

from graphs import declare, node
from obs import (GRADIENT_SERVICE, Scrape, chain_graph, chain_params, create_request, forward_request,
                 wait_for)
from test_engine import mlp

Code = grpc.StatusCode
PARAMS = {"W": np.ones((2, 3)), "b": np.zeros(3)}


@pytest.fixture
def server() -> Iterator:
    with serve("127.0.0.1:0", Config(metrics_port=0, op_timing_every=1)) as srv:
        yield srv


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel) -> pb_grpc.GradientServiceStub:
    return pb_grpc.GradientServiceStub(channel)


class Active:
    """The context of a call whose client is still there, for RpcRecord."""

    @staticmethod
    def is_active() -> bool:
        return True


def scrape(server) -> Scrape:
    return Scrape.of(server.metrics_address)


def fb_request(sid: str, n: int = 4) -> pb.ForwardBackwardRequest:
    rng = np.random.default_rng(n)
    request = pb.ForwardBackwardRequest(session_id=sid)
    codec.to_tensor_map({"x": rng.normal(size=(n, 2)), "y": rng.integers(0, 3, n)}, request.inputs)
    return request


def handled(s: Scrape, method: str, code: str) -> float:
    return s.value("grpc_server_handled_total", grpc_service=GRADIENT_SERVICE, grpc_method=method,
                   grpc_type="unary", grpc_code=code)


def test_every_call_counted_with_its_code_and_bytes(server, stub) -> None:
    before = scrape(server)
    sent, received = 0, 0
    create = create_request(mlp(), PARAMS)
    sid = stub.CreateSession(create, timeout=10).session_id
    n_calls, batch = 7, 4
    # the response as it crossed the wire (its tensor data is padded to be aligned: longer than ByteSize())
    with grpc.insecure_channel(server.address) as channel:
        fb_raw = channel.unary_unary(f"/{GRADIENT_SERVICE}/ForwardBackward",
                                     request_serializer=pb.ForwardBackwardRequest.SerializeToString)
        for _ in range(n_calls):
            request = fb_request(sid, batch)
            sent += request.ByteSize()
            received += len(fb_raw(request, timeout=10))
    failures = {
        "NotFound": pb.BackwardRequest(session_id="0" * 32),  # unknown session
        "InvalidArgument": fb_request(sid, 0),  # empty batch
    }
    for code, request in failures.items():
        call = stub.Backward if isinstance(request, pb.BackwardRequest) else stub.ForwardBackward
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=10)
        assert GRPC_CODES[e.value.code()] == code
    bad_graph = create_request(mlp(), PARAMS)
    bad_graph.graph.nodes[0].op = "nope"
    with pytest.raises(grpc.RpcError):
        stub.CreateSession(bad_graph, timeout=10)

    s = scrape(server)
    fb = dict(grpc_service=GRADIENT_SERVICE, grpc_method="ForwardBackward", grpc_type="unary")
    assert before.value("grpc_server_started_total", **fb) == 0
    assert s.value("grpc_server_started_total", **fb) == n_calls + 1
    assert handled(s, "ForwardBackward", "OK") == n_calls
    assert handled(s, "ForwardBackward", "InvalidArgument") == 1
    assert handled(s, "Backward", "NotFound") == 1
    assert handled(s, "CreateSession", "OK") == 1
    assert handled(s, "CreateSession", "InvalidArgument") == 1
    assert s.value("grpc_server_handling_seconds_count", **fb) == n_calls + 1
    assert s.value("grpc_server_handling_seconds_bucket", le="+Inf", **fb) == n_calls + 1
    assert s.value("grpc_server_msg_received_total", **fb) == n_calls + 1
    assert s.value("grpc_server_msg_sent_total", **fb) == n_calls  # the failed call sent no message
    # payload bytes are exact: the serialized sizes of what went over the wire
    ok_bytes = s.value("gradgate_request_bytes_sum", grpc_method="ForwardBackward")
    assert ok_bytes == sent + fb_request(sid, 0).ByteSize()
    assert s.value("gradgate_response_bytes_sum", grpc_method="ForwardBackward") == received
    assert s.value("gradgate_request_bytes_count", grpc_method="ForwardBackward") == n_calls + 1
    # domain metrics
    assert s.value("gradgate_examples_processed_total") == n_calls * batch
    for op in ("matmul", "add", "softmax_cross_entropy"):  # one node each in mlp()
        for pass_ in ("forward", "backward"):
            assert s.value("gradgate_op_compute_seconds_count", op=op, **{"pass": pass_}) == n_calls
    assert s.value("gradgate_op_compute_seconds_sum") > 0
    assert s.value("gradgate_sessions_created_total") == 1
    assert s.value("gradgate_sessions_active") == 1
    assert s.value("gradgate_nonfinite_values_total") == 0
    [info] = [x for x in s.samples if x.name == "gradgate_build_info"]
    assert info.value == 1 and info.labels["version"] == version()


def test_call_records_add_up_exactly_under_concurrency() -> None:
    """Four threads record 500 calls each while another scrapes: every count is exact, and a
    size equal to a bucket's bound is counted in that bucket (le means <=)."""
    metrics = Metrics()
    method = metrics.method("/t.S/M", "unary")

    def calls() -> None:
        for _ in range(500):
            record = RpcRecord(method, Active(), 64)  # type: ignore[arg-type]  # the first bytes bucket's bound
            record.sent(65)
            record.end()

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        Scrape(metrics.scrape())
    for t in threads:
        t.join()
    s = Scrape(metrics.scrape())
    labels = {"grpc_service": "t.S", "grpc_method": "M"}
    for name in ("grpc_server_started_total", "grpc_server_msg_received_total", "grpc_server_msg_sent_total",
                 "grpc_server_handling_seconds_count", "gradgate_request_bytes_count"):
        assert s.value(name, **labels) == 2000, name
    assert s.value("grpc_server_handled_total", grpc_code="OK", **labels) == 2000
    assert s.value("gradgate_request_bytes_bucket", le="64.0", **labels) == 2000
    assert s.value("gradgate_request_bytes_sum", **labels) == 64 * 2000
    assert s.value("gradgate_response_bytes_bucket", le="64.0", **labels) == 0
    assert s.value("gradgate_response_bytes_bucket", le="256.0", **labels) == 2000


def test_created_series_follow_prometheus_clients_switch() -> None:
    """The per-call series have the *_created samples prometheus_client's metrics have, and drop
    them as those do after disable_created_metrics() (the CLI's choice)."""
    metrics = Metrics()
    method = metrics.method("/t.S/M", "unary")
    record = RpcRecord(method, Active(), 10)  # type: ignore[arg-type]
    record.end(grpc.StatusCode.NOT_FOUND)
    was_on = getattr(prometheus_client.metrics, "_use_created", True)  # a process-wide switch: put back after
    try:
        prometheus_client.enable_created_metrics()
        created = {s.name for s in Scrape(metrics.scrape()).samples if s.name.endswith("_created")}
        prometheus_client.disable_created_metrics()
        text = metrics.scrape()
    finally:
        (prometheus_client.enable_created_metrics if was_on else prometheus_client.disable_created_metrics)()
    assert {"grpc_server_started_created", "grpc_server_handled_created", "grpc_server_handling_seconds_created",
            "gradgate_request_bytes_created"} <= created
    assert "_created" not in text.replace("gradgate_sessions_created", "")
    assert Scrape(text).value("grpc_server_handled_total", grpc_code="NotFound") == 1


def test_cache_bytes_follow_sessions_back_to_zero(server, stub) -> None:
    sids = [stub.CreateSession(create_request(mlp(), PARAMS), timeout=10).session_id for _ in range(3)]
    for i, sid in enumerate(sids):
        stub.ForwardBackward(fb_request(sid, 4 + 10 * i), timeout=10)
    s = scrape(server)
    assert s.value("gradgate_sessions_active") == 3
    assert s.value("gradgate_cache_bytes") == server.store.cache_bytes > 0
    assert s.value("gradgate_cache_budget_bytes") == server.config.cache_bytes
    for sid in sids:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
    s = scrape(server)
    assert s.value("gradgate_cache_bytes") == 0
    assert s.value("gradgate_sessions_active") == 0
    assert s.value("gradgate_sessions_created_total") == 3
    assert s.value("gradgate_sessions_closed_total", reason="closed") == 3
    assert s.value("gradgate_sessions_closed_total", reason="expired") == 0


def test_expiry_without_traffic_and_eviction_are_counted() -> None:
    request = fb_request("", 20)
    tape = forward(compile_graph(mlp()), codec.from_tensor_map(request.inputs, "inputs"), PARAMS)
    budget = tape.nbytes * 3 // 2  # room for one session's activations, not two
    with serve("127.0.0.1:0", Config(metrics_port=0, session_ttl_seconds=0.3, cache_bytes=budget)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        a = stub.CreateSession(create_request(mlp(), PARAMS), timeout=10).session_id
        b = stub.CreateSession(create_request(mlp(), PARAMS), timeout=10).session_id
        stub.ForwardBackward(fb_request(a, 20), timeout=10)
        stub.ForwardBackward(fb_request(b, 20), timeout=10)  # both tapes do not fit: a's is evicted
        s = scrape(server)
        assert s.value("gradgate_activations_evicted_total") == 1
        assert s.value("gradgate_cache_bytes") == tape.nbytes
        # no more calls: the server's sweeper expires both sessions on its own
        s = wait_for(lambda: (x := scrape(server)).value("gradgate_sessions_active") == 0 and x, timeout=10,
                     what="idle sessions to expire")
        assert s.value("gradgate_sessions_closed_total", reason="expired") == 2
        assert s.value("gradgate_cache_bytes") == 0


def test_nonfinite_losses_and_gradients_are_counted(server, stub) -> None:
    g = graph_pb2.Graph()
    declare(g.params, "w", "float64", (3,))
    g.loss = node(g, "loss", "sum", node(g, "logw", "log", "w"))
    sid = stub.CreateSession(create_request(g, {"w": np.array([0.0, 1.0, 2.0])}), timeout=10).session_id
    response = stub.ForwardBackward(pb.ForwardBackwardRequest(session_id=sid), timeout=10)
    assert response.loss == -np.inf  # log(0); and d/dw log(w) = 1/w = inf at 0
    s = scrape(server)
    assert s.value("gradgate_nonfinite_values_total", kind="loss") == 1
    assert s.value("gradgate_nonfinite_values_total", kind="gradient") == 1


def test_gradient_check_recorder() -> None:
    metrics = Metrics()
    for passed in (True, True, False):
        metrics.gradient_check(passed)
    s = Scrape(metrics.scrape())
    assert s.value("gradgate_gradient_checks_total", result="pass") == 2
    assert s.value("gradgate_gradient_checks_total", result="fail") == 1


def test_client_deadline_stops_the_computation_and_is_recorded(server, stub) -> None:
    layers, width = 40, 256
    sid = stub.CreateSession(create_request(chain_graph(layers, width), chain_params(width)), timeout=10).session_id
    x = np.random.default_rng(1).normal(size=(2048, width))
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(forward_request(sid, {"x": x}), timeout=0.1)
    assert e.value.code() == Code.DEADLINE_EXCEEDED

    def recorded() -> Scrape | None:
        s = scrape(server)
        return s if handled(s, "Forward", "DeadlineExceeded") == 1 else None
    s = wait_for(recorded, what="the expired Forward to be recorded")
    # the engine stopped at the next op instead of finishing a pass nobody will read
    assert s.value("gradgate_op_compute_seconds_count", op="matmul", **{"pass": "forward"}) < layers
    assert s.value("gradgate_examples_processed_total") == 0


def test_a_call_its_client_cancels_is_recorded_as_cancelled(server, stub) -> None:
    """The pass stops once the client has gone, by raising DeadlineExceeded; the call is
    counted with what the client saw, CANCELLED, unary or on a CallStream (and so is that
    stream), not as a server-side DEADLINE_EXCEEDED that the error-ratio alert counts."""
    layers, width = 40, 256
    sid = stub.CreateSession(create_request(chain_graph(layers, width), chain_params(width)), timeout=10).session_id
    x = np.random.default_rng(1).normal(size=(2048, width))
    unary = stub.Forward.future(forward_request(sid, {"x": x}), timeout=30)
    streamed = stub.CallStream(iter([pb.StreamCall(forward=forward_request(sid, {"x": x}))]), timeout=30)

    def ran(n: int) -> bool:  # both calls are computing
        return scrape(server).value("gradgate_op_compute_seconds_count", op="matmul", **{"pass": "forward"}) >= n
    wait_for(lambda: ran(2), what="both forwards to run")
    unary.cancel()
    streamed.cancel()
    s = wait_for(lambda: (x := scrape(server)).value("grpc_server_handled_total", grpc_method="Forward") == 2 and x,
                 what="both cancelled Forwards to be recorded")
    assert handled(s, "Forward", "Canceled") == 2
    wait_for(lambda: scrape(server).value("grpc_server_handled_total", grpc_method="CallStream",
                                          grpc_code="Canceled") == 1, what="the cancelled stream to be recorded")
    assert scrape(server).value("grpc_server_handled_total", grpc_code="DeadlineExceeded") == 0


def test_health_and_reflection_calls_are_counted_too(server, channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=GRADIENT_SERVICE), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    labels = dict(grpc_service="grpc.health.v1.Health", grpc_method="Watch", grpc_type="server_stream")
    s = wait_for(lambda: (x := scrape(server)).value("grpc_server_handled_total", **labels) and x,
                 what="the cancelled Watch to be recorded")
    assert s.value("grpc_server_handled_total", grpc_code="Canceled", **labels) == 1
    assert s.value("grpc_server_msg_sent_total", **labels) == 1
    check = dict(grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_type="unary")
    assert s.value("grpc_server_handled_total", grpc_code="OK", **check) == 3
    assert s.value("grpc_server_handled_total", grpc_code="NotFound", **check) == 1


def test_servers_in_one_process_keep_separate_counts() -> None:
    with serve("127.0.0.1:0", Config(metrics_port=0)) as a, serve("127.0.0.1:0", Config(metrics_port=0)) as b:
        with grpc.insecure_channel(a.address) as channel:
            pb_grpc.GradientServiceStub(channel).ListOps(pb.ListOpsRequest(), timeout=10)
        assert handled(Scrape.of(a.metrics_address), "ListOps", "OK") == 1
        assert handled(Scrape.of(b.metrics_address), "ListOps", "OK") == 0


def test_metrics_endpoint_is_off_unless_asked() -> None:
    with serve("127.0.0.1:0") as server:
        assert server.metrics_address is None


def test_one_structured_log_line_per_rpc_without_tensors(server, stub, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gradgate_server.rpc")
    secret = 123456.789  # a distinctive tensor value that must not reach the log
    sid = stub.CreateSession(create_request(mlp(), {"W": np.full((2, 3), secret), "b": np.zeros(3)}),
                             timeout=10).session_id
    stub.ForwardBackward(fb_request(sid), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Backward(pb.BackwardRequest(session_id="f" * 32), timeout=10)
    records = [r for r in caplog.records if r.name == "gradgate_server.rpc"]
    assert len(records) == 3
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    create, fb, bad = lines
    assert create["method"] == f"/{GRADIENT_SERVICE}/CreateSession" and create["code"] == "OK"
    assert create["session"] == fb["session"] == sid[:8]
    assert fb["request_bytes"] == fb_request(sid).ByteSize() and fb["response_bytes"] > 0
    assert fb["duration_ms"] > 0
    assert bad["code"] == "NOT_FOUND" and "not found" in bad["error"] and bad["session"] == "f" * 8
    for line in lines:
        text = json.dumps(line)
        assert sid not in text and str(secret) not in text and "123456" not in text
        assert {"time", "level", "logger", "method", "code", "duration_ms", "request_bytes",
                "response_bytes"} <= set(line)


def test_a_fresh_server_exports_every_method_with_code_ok_at_zero() -> None:
    """As go-grpc-prometheus does: the first calls after a start are an increase from 0
    (alerts.yml's error ratio counts calls by grpc_server_started_total)."""
    with serve("127.0.0.1:0") as srv:
        s = Scrape(srv.metrics.scrape())
    methods = {(x.labels["grpc_service"], x.labels["grpc_method"], x.labels["grpc_code"], x.value)
               for x in s.samples if x.name == "grpc_server_handled_total"}
    expected = {(GRADIENT_SERVICE, m.name, "OK", 0.0)
                for m in pb.DESCRIPTOR.services_by_name["GradientService"].methods}
    expected |= {("grpc.health.v1.Health", m.name, "OK", 0.0)
                 for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}
    assert methods == expected
    for m in ("ForwardBackward", "Train"):
        assert s.value("grpc_server_started_total", grpc_service=GRADIENT_SERVICE, grpc_method=m) == 0
    [watch] = {x.labels["grpc_type"] for x in s.samples
               if x.name == "grpc_server_started_total" and x.labels["grpc_method"] == "Watch"}
    assert watch == "server_stream"


def test_logging_can_be_configured_again_and_drains_at_exit() -> None:
    """A second configure_logging replaces the writer thread; at exit the last one writes what is
    queued (stopping the first one twice once raised at exit)."""
    script = ("import logging\nfrom gradgate_server.logs import access, configure_logging\n"
              "configure_logging('text')\nconfigure_logging('json')\n"
              "access({'method': 'm', 'code': 'OK'}, 'method=m code=OK')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1])["method"] == "m"
