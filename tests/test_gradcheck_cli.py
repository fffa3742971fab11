"""``gradgate gradcheck``: exit codes 0/1/2, the JSON report, one job shared by two real servers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gradgate as gg
from gradgate.cli import main
from gradgate.gradcheck import load_case, make_case, save_case
from gradgate.gradcheck_job import exit_code, run_job
from gradgate.v1 import graph_pb2
from gradgate_server import serve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "gradcheck"
PASSING = sorted(str(p) for p in EXAMPLES.glob("*.pb"))
FAILING = str(EXAMPLES / "failing" / "relu_kink.pb")


def gradcheck(*args: str) -> int:
    return main(["gradcheck", "--no-progress", *args])


def test_examples_pass_with_exit_0(tmp_path: Path, capsys) -> None:
    report_path = tmp_path / "report.json"
    assert len(PASSING) >= 12
    assert gradcheck(*PASSING, "--report", str(report_path)) == 0
    out = capsys.readouterr().out
    assert "lecture_add_mul" in out and "max rel error" in out and "FAIL" not in out
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["exit_code"] == 0 and report["counts"]["pass"] == len(PASSING)
    assert {c["case"] for c in report["cases"]} >= {"lecture_add_mul", "lecture_sigmoid_neuron", "mlp_relu_f32",
                                                     "svm_linear_f64", "softmax_linear_f32"}
    assert all(c["status"] == "pass" and c["result"]["passed"] for c in report["cases"])


def test_failing_case_exits_1_and_is_named(tmp_path: Path, capsys) -> None:
    report_path = tmp_path / "report.json"
    assert gradcheck(PASSING[0], FAILING, "--report", str(report_path)) == 1
    out = capsys.readouterr().out
    assert "relu_kink" in out and "FAIL" in out and "'W1'" in out
    report = json.loads(report_path.read_text())
    failing = next(c for c in report["cases"] if c["case"] == "relu_kink")
    assert failing["status"] == "fail" and not report["passed"]
    w1 = next(t for t in failing["result"]["tensors"] if t["name"] == "W1")
    assert w1["max_rel_error"] == pytest.approx(1.0) and not w1["passed"]


def test_directories_stand_for_their_cases(capsys) -> None:
    assert gradcheck(str(EXAMPLES / "json")) == 0
    assert "lecture_sigmoid_neuron" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["does-not-exist.pb"],
    ["--server", "127.0.0.1:1", "--retry-seconds", "0.2", PASSING[0]],  # nothing listens on port 1
    ["--jobs", "0", PASSING[0]],
])
def test_usage_and_connection_errors_exit_2(args: list[str], tmp_path: Path, capsys) -> None:
    assert gradcheck(*args) == 2
    assert "gradgate gradcheck:" in capsys.readouterr().err


def test_unreadable_case_file_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.json").write_text("{")
    assert gradcheck(PASSING[0], str(tmp_path / "bad.json")) == 2
    assert "bad.json" in capsys.readouterr().err


def test_case_the_server_rejects_exits_2(tmp_path: Path, capsys) -> None:
    g = graph_pb2.Graph(loss="out")
    g.params.add(name="w", dtype=2)
    g.nodes.add(name="out", op="no_such_op", inputs=["w"])
    save_case(make_case("broken", g, {"w": np.array(1.0)}, {}), tmp_path / "broken.pb")
    assert gradcheck(PASSING[0], str(tmp_path / "broken.pb")) == 2
    out = capsys.readouterr().out
    assert "ERROR" in out and "no_such_op" in out


def test_argparse_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["gradcheck"])  # CASES is required
    assert e.value.code == 2


def test_two_servers_share_one_job(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    with serve("127.0.0.1:0") as a, serve("127.0.0.1:0") as b:
        code = gradcheck(*PASSING, FAILING, "--server", a.address, "--server", b.address, "--jobs", "1",
                         "--report", str(report_path))
    assert code == 1
    report = json.loads(report_path.read_text())
    assert report["servers"] == [a.address, b.address]
    assert {c["server"] for c in report["cases"]} == {a.address, b.address}
    assert len(report["cases"]) == len(PASSING) + 1


def test_real_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    run = subprocess.run([sys.executable, "-m", "gradgate.cli", "gradcheck", FAILING, PASSING[0]],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "relu_kink" in run.stdout and "FAIL" in run.stdout and "2 case(s): 1 passed, 1 failed" in run.stdout
    assert "case/s" in run.stderr  # the progress bar


def slow_case() -> object:
    """A case that takes a few tenths of a second on this machine (many scrapes of /metrics long)."""
    from cluster import tanh_chain

    g, params = tanh_chain(24, 256)
    x = np.random.default_rng(1).normal(size=(128, 256))
    return make_case("slow", g, params, {"x": x}, mode="sparse", num_checks=10)


def test_cases_of_a_server_that_dies_mid_job_go_to_the_others() -> None:
    from cluster import replicas
    from obs import Scrape, wait_for

    cases = [("slow", slow_case())] * 6 + [(p, load_case(p)) for p in PASSING]
    with replicas(3) as reps:
        victim = reps[1]

        def kill_during_its_first_case() -> None:
            def in_flight() -> bool:  # from one scrape: started and not yet handled
                scrape = Scrape.of(victim.metrics_address)
                return (scrape.value("grpc_server_started_total", grpc_method="GradientCheck")
                        > scrape.value("grpc_server_handled_total", grpc_method="GradientCheck"))

            wait_for(in_flight, interval=0.005, what="the victim to have a case in flight")
            victim.kill()

        killer = threading.Thread(target=kill_during_its_first_case)
        killer.start()
        clients = [gg.connect(r.address, timeout=60, retry_seconds=0.5) for r in reps]
        try:
            outcomes = run_job(cases, clients, jobs=1, progress=False)  # one case at a time per server
        finally:
            for c in clients:
                c.close()
        killer.join(10)
    assert [o.status for o in outcomes] == ["pass"] * len(cases) and exit_code(outcomes) == 0
    moved = [o for o in outcomes if o.moved_from]
    assert len(moved) == 1 and moved[0].moved_from == (victim.address,)  # the case it had in flight
    assert moved[0].server in (reps[0].address, reps[2].address)


def test_exit_2_when_no_server_is_left(tmp_path: Path, capsys) -> None:
    with serve("127.0.0.1:0") as server:
        client = gg.connect(server.address, timeout=10, retry_seconds=0.2)
        client.list_ops()
    outcomes = run_job([(p, load_case(p)) for p in PASSING[:3]], [client], jobs=2, progress=False)
    client.close()
    assert [(o.status, o.server, o.error) for o in outcomes] == [("error", "", "no server left to check it")] * 3
    # two were in flight (jobs=2) when the server turned out gone, the third never started
    assert [o.moved_from for o in outcomes] == [(server.address,)] * 2 + [()]
    assert exit_code(outcomes) == 2
    assert "stopped answering" in capsys.readouterr().err
