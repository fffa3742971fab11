"""The deploy files against real tools: promtool on a real scrape and on the alert
rules, a real Prometheus scraping a real server, and the Grafana dashboard's
expressions evaluated by that Prometheus. Skipped without the binaries, except in
CI (.ci/run installs Debian's prometheus package)."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import Config, serve

from obs import Scrape, create_request, fetch, free_port, require_binary, stop_process, wait_for
from test_engine import mlp

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "gradgate.json"


def traffic(address: str, n_ok: int, n_not_found: int) -> None:
    """n_ok ListOps, n_not_found failing Backwards, and one training step on a session."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for _ in range(n_ok):
            stub.ListOps(pb.ListOpsRequest(), timeout=10)
        for _ in range(n_not_found):
            with pytest.raises(grpc.RpcError):
                stub.Backward(pb.BackwardRequest(session_id="0" * 32), timeout=10)
        sid = stub.CreateSession(create_request(mlp(), {"W": np.ones((2, 3)), "b": np.zeros(3)}),
                                 timeout=10).session_id
        request = pb.ForwardBackwardRequest(session_id=sid)
        codec.to_tensor_map({"x": np.ones((8, 2)), "y": np.zeros(8, np.int64)}, request.inputs)
        stub.ForwardBackward(request, timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator:
    with serve("127.0.0.1:0", Config(metrics_port=0)) as srv:
        traffic(srv.address, n_ok=5, n_not_found=3)
        yield srv


# -- promtool ----------------------------------------------------------------------

def test_promtool_accepts_a_real_scrape(server) -> None:
    text = fetch(f"http://{server.metrics_address}/metrics")
    result = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_config_and_alert_rule_unit_tests() -> None:
    promtool = require_binary("promtool")
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard and the rules name only metrics the server exports ---------------

PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)  # not functions, not numbers
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (le) (rate(a_b_bucket{x="y{z}",q=~"$i"}[5m])) / ignoring(c) group_left '
                        'histogram_quantile(0.99, b:c) > 1e3') == {"a_b_bucket", "b:c"}


def test_dashboard_loads_and_names_only_exported_metrics(server) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "error ratio by code", "latency quantiles", "sessions", "cache",
                  "compute time per op type"):
        assert topic in titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
    exported = Scrape.of(server.metrics_address).names()
    for expr in dashboard_exprs():
        assert metric_names(expr), expr
        assert metric_names(expr) <= exported, f"{expr} names {metric_names(expr) - exported}"
    for expr in rule_exprs():
        assert metric_names(expr) - {"up"} <= exported, expr


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "gradgate.yml").read_text())
    assert provider["providers"][0]["options"]["path"].endswith("/gradgate")
    assert json.loads(DASHBOARD.read_text())["uid"] == "gradgate"


# -- a real Prometheus ------------------------------------------------------------------

class Prometheus:
    """``prometheus`` on 127.0.0.1 with deploy/prometheus/prometheus.yml, retargeted at
    ``target`` and sped up to 1 s scrapes and rule evaluations."""

    def __init__(self, target: str, workdir: Path):
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        for _ in range(3):  # the port is picked before prometheus binds it: retry if taken meanwhile
            self.url = f"http://127.0.0.1:{free_port()}"
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [require_binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url[7:]}"],
                    stdout=log, stderr=subprocess.STDOUT)
            if wait_for(lambda: self.proc.poll() is not None or self._ready(), timeout=30,
                        what="prometheus to be ready") is True and self.proc.poll() is None:
                return
        pytest.fail("prometheus did not start: " + self.log_path.read_text()[-3000:])

    def _ready(self) -> bool:
        try:
            fetch(self.url + "/-/ready", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> dict:
        body = json.loads(fetch(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[Prometheus]:
    prom = Prometheus(server.metrics_address, tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.stop()


def test_prometheus_scrapes_the_numbers_the_server_served(server, prometheus) -> None:
    started = time.monotonic()
    ok = 'grpc_server_handled_total{grpc_method="ListOps",grpc_code="OK"}'
    wait_for(lambda: prometheus.value(ok) == 5, timeout=30, interval=0.2, what="5 ListOps in Prometheus")
    first = time.monotonic() - started
    assert prometheus.value('up{job="gradgate"}') == 1
    assert prometheus.value('grpc_server_handled_total{grpc_method="Backward",grpc_code="NotFound"}') == 3
    assert prometheus.value("gradgate_cache_bytes") == server.store.cache_bytes > 0
    assert prometheus.value("gradgate_examples_processed_total") == 8
    # live: more calls show up in the next scrapes
    traffic(server.address, n_ok=4, n_not_found=0)
    wait_for(lambda: prometheus.value(ok) == 9, timeout=30, interval=0.2, what="9 ListOps in Prometheus")
    print(f"\nreal Prometheus: first value {first:.1f}s after ready, "
          f"live update {time.monotonic() - started - first:.1f}s later")


def test_prometheus_loads_and_evaluates_every_alert_rule(prometheus) -> None:
    def rules() -> list[dict] | None:
        found = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return found if found and all(r["health"] == "ok" for r in found) else None
    found = wait_for(rules, timeout=30, interval=0.2, what="every rule evaluated with health ok")
    assert {r["name"] for r in found} == {"GradgateDown", "GradgateHighErrorRatio", "GradgateHighLatencyP99",
                                          "GradgateCacheNearBudget", "GradgateNonFiniteGradients"}


def test_every_dashboard_expression_returns_data(prometheus) -> None:
    exprs = [e.replace("$__rate_interval", "30s").replace("$instance", ".+") for e in dashboard_exprs()]

    def empty() -> list[str]:
        return [e for e in exprs if not prometheus.query(e)]
    wait_for(lambda: not empty(), timeout=30, interval=0.5,
             what="every dashboard expression to return data")
