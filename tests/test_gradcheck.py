"""GradientCheck over real gRPC on 127.0.0.1: the SDK report, the session left untouched, case files."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

import gradgate as gg
from gradgate.gradcheck import CaseFileError, GradCheckReport, load_case, make_case, run_case, save_case
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate_server import serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "gradcheck"
MODES = ["full", "sparse", "fast"]


@pytest.fixture(scope="module")
def server():
    with serve("127.0.0.1:0") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with gg.connect(server.address, timeout=20.0) as c:
        yield c


def tanh_net(dtype: str = "float64") -> gg.Graph:
    g = gg.Graph(dtype=dtype)
    x, y = g.input("x", (None, 3)), g.input("y", (None,), dtype="int64")
    W1, b1, W2, b2 = g.param("W1", (3, 5)), g.param("b1", (5,)), g.param("W2", (5, 4)), g.param("b2", (4,))
    g.set_loss(gg.softmax_cross_entropy(gg.tanh(x @ W1 + b1) @ W2 + b2, y) + 0.1 * gg.l2(W1))
    return g


def tanh_point() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "W2": rng.normal(size=(5, 4)),
              "b2": rng.normal(size=4)}
    return params, {"x": rng.normal(size=(4, 3)), "y": np.array([0, 1, 2, 3])}


@pytest.mark.parametrize("mode", MODES)
def test_correct_float64_graph_passes_in_each_mode(client, mode: str) -> None:
    params, batch = tanh_point()
    with client.session(tanh_net(), params) as sess:
        report = sess.gradient_check(batch, mode=mode, include_inputs=True)
    assert report.passed, str(report)
    assert [t.name for t in report.tensors] == ["W1", "b1", "W2", "b2", "x"]
    assert report["x"].is_input and report["x"].shape == (4, 3)
    for t in report.tensors:
        assert t.max_rel_error <= 1e-7 and t.allclose and not t.non_finite and t.message == ""
        size = int(np.prod(t.shape))
        assert t.coordinates_checked == {"full": size, "sparse": min(10, size), "fast": 1}[mode]
    assert (report.mode, report.eps, report.atol, report.rtol) == (mode, 1e-6, 1e-5, 1e-3)
    assert "PASSED" in str(report) and "W1" in str(report)


def test_float32_session_is_checked_in_float64(client) -> None:
    params, batch = tanh_point()
    with client.session(tanh_net("float32"), params) as sess:
        report = sess.gradient_check(batch, mode="full")
        assert all(v.dtype == np.float32 for v in sess.get_params().values())
    # float32 centered differences with eps 1e-6 would be off by ~10%
    assert report.passed and max(t.max_rel_error for t in report.tensors) <= 1e-7


def test_check_leaves_params_and_cache_untouched(client) -> None:
    params, batch = tanh_point()
    with client.session(tanh_net(), params) as sess:
        loss, grads = sess.forward_backward(batch)
        before = sess.get_params()
        for mode in MODES:  # with parameter overrides too: they apply to the check only
            sess.gradient_check(batch, mode=mode, include_inputs=True,
                                params={"W1": np.zeros((3, 5))} if mode == "fast" else None)
        after_grads = sess.backward()  # from the cached forward, which must be the one before the checks
        after = sess.get_params()
    assert set(after_grads) == set(grads)
    for name in grads:
        np.testing.assert_array_equal(after_grads[name], grads[name])
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_check_creates_no_cache(client) -> None:
    params, batch = tanh_point()
    with client.session(tanh_net(), params) as sess:
        assert sess.gradient_check(batch).passed
        with pytest.raises(gg.GradgateError) as e:
            sess.backward()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_param_overrides_are_checked(client) -> None:
    g = gg.Graph(dtype="float64")
    w = g.param("w", (3,))
    g.set_loss(gg.sum(gg.relu(w)))
    with client.session(g, {"w": np.ones(3)}) as sess:
        assert sess.gradient_check({}, mode="full", eps=1e-2).passed
        report = sess.gradient_check({}, mode="full", eps=1e-2, params={"w": [1.0, 0.0, -1.0]})
    (t,) = report.tensors
    assert not report.passed and t.worst[0].index == (1,) and t.max_rel_error == pytest.approx(1.0)


def test_relu_kink_example_is_reported_failing(client) -> None:
    report = run_case(client, load_case(EXAMPLES / "failing" / "relu_kink.pb"))
    assert not report.passed
    w1 = report["W1"]
    assert not w1.passed and not w1.non_finite and w1.max_rel_error == pytest.approx(1.0)
    assert w1.worst[0].analytic == 0.0 and abs(w1.worst[0].numeric) > 0.1
    assert "'W1'" in w1.message and "FAILED" in str(report) and "W1[" in str(report)


def test_nan_gives_a_failed_verdict_naming_the_tensor(client) -> None:
    g = gg.Graph(dtype="float64")
    w, v = g.param("w", (2,)), g.param("v", (2,))
    g.set_loss(gg.sum(gg.log(w) * v))
    with client.session(g, {"w": [1.0, -1.0], "v": [1.0, 1.0]}) as sess:
        report = sess.gradient_check({}, mode="full")
    assert not report.passed
    for t in report.tensors:
        assert t.non_finite and not t.passed and f"'{t.name}'" in t.message and "nan" in t.message
    assert "NON-FINITE" in str(report)


def test_inline_check_without_a_session(client, server) -> None:
    params, batch = tanh_point()
    sessions = len(server.store)
    report = gg.gradcheck.check(client, tanh_net(), params, batch, mode="fast", wrt=["W2"])
    assert report.passed and [t.name for t in report.tensors] == ["W2"]
    assert len(server.store) == sessions


def test_counts_checks_by_result(client, server) -> None:
    def count(result: str) -> float:
        line = next(ln for ln in server.metrics.scrape().splitlines()
                    if ln.startswith(f'gradgate_gradient_checks_total{{result="{result}"}}'))
        return float(line.split()[-1])
    passed, failed = count("pass"), count("fail")
    run_case(client, load_case(EXAMPLES / "lecture_add_mul.pb"))
    run_case(client, load_case(EXAMPLES / "failing" / "relu_kink.pb"))
    assert (count("pass"), count("fail")) == (passed + 1, failed + 1)


@pytest.mark.parametrize("request_, field", [
    (pb.GradientCheckRequest(), "session_id"),
    (pb.GradientCheckRequest(session_id="0" * 32), None),
])
def test_bad_requests(client, request_: pb.GradientCheckRequest, field: str | None) -> None:
    with pytest.raises(gg.GradgateError) as e:
        client.call("GradientCheck", request_)
    if field is None:
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    else:
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.violations[0][0] == field


@pytest.mark.parametrize("settings, field", [
    ({"eps": -1.0}, "settings.eps"),
    ({"rtol": float("inf")}, "settings.rtol"),
    ({"wrt": ["nope"]}, "settings.params"),
])
def test_bad_settings(client, settings: dict, field: str) -> None:
    params, batch = tanh_point()
    with client.session(tanh_net(), params) as sess, pytest.raises(gg.GradgateError) as e:
        sess.gradient_check(batch, **settings)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.violations[0][0] == field


def test_float32_batch_must_match_the_declared_dtype(client) -> None:
    params, batch = tanh_point()
    case = make_case("c", tanh_net("float32"), params, batch)
    case.inputs["x"].CopyFrom(gg.codec.to_tensor(batch["x"]))  # float64 where float32 is declared
    with pytest.raises(gg.GradgateError) as e:
        run_case(client, case)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "float32" in e.value.message


@pytest.mark.parametrize("suffix", [".pb", ".json"])
def test_case_file_round_trip(client, tmp_path: Path, suffix: str) -> None:
    params, batch = tanh_point()
    case = make_case("tanh", tanh_net("float32"), params, batch, description="d", mode="fast", seed=7,
                     eps=1e-5, include_inputs=True)
    loaded = load_case(save_case(case, tmp_path / f"case{suffix}"))
    assert loaded == case
    assert gg.codec.from_tensor(loaded.params["W1"]).dtype == np.float32  # cast to the declared dtype
    report = run_case(client, loaded)
    assert report.passed and report.mode == "fast" and report.eps == 1e-5 and report["x"].is_input


def test_case_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    case = load_case(EXAMPLES / "json" / "lecture_sigmoid_neuron.json")
    assert case == load_case(EXAMPLES / "lecture_sigmoid_neuron.pb")
    case.name = ""
    assert load_case(save_case(case, tmp_path / "anon.pb")).name == "anon"


@pytest.mark.parametrize("name, content", [("missing.pb", None), ("junk.pb", b"\xff\xff\xff"),
                                           ("junk.json", b"{not json"), ("empty.pb", b""),
                                           ("case.txt", b"")])
def test_unreadable_case_files(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CaseFileError) as e:
        load_case(path)
    assert name in str(e.value)


def test_report_from_proto_round_trip(client) -> None:
    report = run_case(client, load_case(EXAMPLES / "lecture_add_mul.pb"))
    assert GradCheckReport.from_proto(report.proto) == report
    assert [(t.name, t.worst[0].analytic) for t in report.tensors] == [("x", -4.0), ("y", -4.0), ("z", 3.0)]
