"""The deployment files, checked offline (no Docker engine or cluster here): the compose
file against the compose spec, the Kubernetes manifests against Kubernetes' schemas
(kubernetes-validate --strict), and the pieces against each other (flags, ports, mounts,
scrape targets, upstreams, probes). The same topology runs as real processes in
tests/test_failover.py; nginx -t and a real nginx in tests/test_nginx.py."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradgate.client import SERVICE
from gradgate_server.app import parse_args

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
NGINX = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
K8S = ROOT / "deploy" / "k8s"
REPLICAS = sorted(name for name in COMPOSE["services"] if name.startswith("gradgate-"))


def k8s(kind: str, name: str | None = None) -> dict:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    [found] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def entrypoint_config(command: list[str]) -> tuple[str, object]:
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE, re.M).group(1))
    assert entrypoint[0] == "gradgate-server"
    return parse_args(entrypoint[1:] + command)  # the flags the container passes are real flags


# -- docker compose ------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists_and_every_replica_runs_the_server_cli() -> None:
    for source in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert REPLICAS == ["gradgate-1", "gradgate-2", "gradgate-3"]
    for name in REPLICAS:
        service = COMPOSE["services"][name]
        address, config = entrypoint_config(service["command"])
        assert address == "0.0.0.0:50051" and config.metrics_port == 9464
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > config.grace_seconds  # the container is killed only after the drain
        assert "ports" not in service  # reached through nginx only


def test_nginx_fronts_every_replica_and_prometheus_scrapes_each() -> None:
    upstreams = re.findall(r"^\s*server (\S+) ", NGINX, re.M)
    assert upstreams == [f"{name}:50051" for name in REPLICAS]
    nginx = COMPOSE["services"]["nginx"]
    assert nginx["ports"] == ["50051:50051"] and re.search(r"listen 50051 http2;", NGINX)
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"{name}:9464" for name in REPLICAS]
    assert (ROOT / "deploy/prometheus" / prometheus["rule_files"][0]).exists()


def test_mounted_files_exist_and_data_lives_in_named_volumes() -> None:
    named = set(COMPOSE["volumes"])
    for service in COMPOSE["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or (ROOT / source).exists(), volume
    prometheus = COMPOSE["services"]["prometheus"]
    assert "prometheus-data:/prometheus" in prometheus["volumes"]
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]


def test_grafana_mount_is_where_the_provisioning_reads_dashboards() -> None:
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/gradgate.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_container_health_check_command_is_valid_python() -> None:
    test = COMPOSE["services"]["gradgate-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")


# -- Kubernetes --------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifests_match_the_kubernetes_schemas_strictly(path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_deployment_probes_resources_and_grace() -> None:
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    _, config = entrypoint_config(container["args"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.grace_seconds
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": config.metrics_port}
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE}
    assert container["livenessProbe"]["grpc"] == {"port": 50051}  # "": the whole server
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "1"  # one core per replica
    assert {"memory"} <= set(resources["requests"]) & set(resources["limits"])
    memory_limit = int(resources["limits"]["memory"].rstrip("Gi")) * 2**30
    assert memory_limit > config.cache_bytes


def test_k8s_services_budget_and_autoscaler_select_the_replicas() -> None:
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    headless, proxied = k8s("Service", "gradgate-headless"), k8s("Service", "gradgate")
    assert headless["spec"]["clusterIP"] == "None"  # DNS returns every pod: dns:/// in the SDK
    for service in (headless, proxied):
        assert service["spec"]["selector"] == labels
        assert {"name": "grpc", "port": 50051, "targetPort": "grpc"}.items() <= service["spec"]["ports"][0].items()
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gradgate"}
    assert hpa["spec"]["minReplicas"] >= 2
    ingress = k8s("Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_session_id"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "gradgate"


def test_k8s_prometheus_finds_the_annotated_pods_without_a_service_monitor() -> None:
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    config = yaml.safe_load(k8s("ConfigMap")["data"]["prometheus.yml"])
    [job] = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    keep = relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]
    assert keep["action"] == "keep" and re.fullmatch(keep["regex"], annotations["prometheus.io/scrape"])
    address = relabel[("__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port")]
    pod_address = f"10.1.2.3:50051;{annotations['prometheus.io/port']}"  # Prometheus joins with ";"
    target = re.sub(f"^(?:{address['regex']})$", address["replacement"].replace("$", "\\"), pod_address)
    assert target == "10.1.2.3:9464"
    assert config["rule_files"] == ["alerts.yml"] and (ROOT / "deploy/prometheus/alerts.yml").exists()
