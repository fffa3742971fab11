"""The compose file and Dockerfile, checked offline (no Docker engine here): schema,
and that the pieces point at each other (ports, mounts, scrape targets)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gradgate_server.app import parse_args

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def test_compose_file_matches_the_compose_spec() -> None:
    tool = shutil.which("check-jsonschema") or pytest.fail("check-jsonschema is a test dependency")
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists_and_runs_the_server_cli() -> None:
    for source in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE, re.M).group(1))
    command = COMPOSE["services"]["gradgate"]["command"]
    assert entrypoint[0] == "gradgate-server"
    address, config = parse_args(entrypoint[1:] + command)  # the flags the container passes are real flags
    assert address == "0.0.0.0:50051" and config.metrics_port == 9464


def test_mounted_files_exist_and_prometheus_scrapes_the_server_service() -> None:
    for service in COMPOSE["services"].values():
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists(), volume
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "gradgate:9464" in targets and "gradgate" in COMPOSE["services"]
    assert (ROOT / "deploy/prometheus" / prometheus["rule_files"][0]).exists()


def test_container_health_check_command_is_valid_python() -> None:
    test = COMPOSE["services"]["gradgate"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")
