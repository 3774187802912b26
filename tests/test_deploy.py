"""Deployment files: the compose file's structure, the Dockerfiles (hadolint), and that the container runs the
same command the tests start."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from harness.server import REPO, SERVICE_ARGS

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
SERVICE_COMMAND = ["python", *SERVICE_ARGS]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_make_serve_runs_the_tested_command():
    serve = (REPO / "Makefile").read_text().split("\nserve:")[1].splitlines()[1].split()
    assert serve == ["$(BIN)/python", *SERVICE_ARGS]


def test_compose_reserves_a_gpu_and_has_a_cpu_profile():
    services = compose()["services"]
    gpu = services["reid"]
    assert "profiles" not in gpu, "the GPU service must start with a plain `docker compose up`"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["reid-cpu"]["profiles"] == ["cpu"] and "deploy" not in services["reid-cpu"]
    assert (
        gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        and services["reid-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    )


@pytest.mark.parametrize("name", ["reid", "reid-cpu"])
def test_compose_service_has_store_volume_healthcheck_and_valid_settings(name):
    spec = compose()
    service = spec["services"][name]
    assert "gallery:/data" in service["volumes"] and "gallery" in spec["volumes"]
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    known = {f"REID_{field.upper()}" for field in Settings.model_fields}
    assert set(service["environment"]) <= known


def test_compose_cluster_profile_puts_replicas_with_a_gpu_each_behind_a_load_balancer():
    services = compose()["services"]
    cluster = {name for name, service in services.items() if service.get("profiles") == ["cluster"]}
    assert cluster == {"etcd", "minio", "milvus", "postgres", "reid-replica", "reid-lb"}
    replica = services["reid-replica"]
    assert (
        replica["deploy"]["replicas"] == "${REID_REPLICAS:-2}" and "ports" not in replica
    )  # reached through the balancer only
    [device] = replica["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 1 and "gpu" in device["capabilities"]
    assert "/readyz" in " ".join(replica["healthcheck"]["test"])
    env = replica["environment"]
    assert (
        env["REID_GALLERY_BACKEND"] == "cluster"
        and env["REID_MILVUS_URI"] == "http://milvus:19530"
        and "@postgres:5432/" in env["REID_POSTGRES_DSN"]
    )
    assert set(env) <= {f"REID_{field.upper()}" for field in Settings.model_fields}
    assert all(services[name]["healthcheck"] for name in cluster)
    assert replica["depends_on"] == {
        "milvus": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    nginx = (REPO / "docker" / "nginx-cluster.conf").read_text()
    assert (
        "reid-replica:8000" in nginx
        and "./docker/nginx-cluster.conf:/etc/nginx/conf.d/default.conf:ro" in services["reid-lb"]["volumes"]
    )
    # the replicas see only nginx's address: the per-client cap is nginx's, with the same figure
    assert str(env["REID_MAX_CONNECTIONS_PER_CLIENT"]) == "0"
    assert f"limit_conn per_client {Settings().max_connections_per_client};" in nginx


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_tested_command_as_a_non_root_user_with_a_healthcheck(dockerfile):
    lines = dockerfile.read_text().splitlines()
    cmd = [line for line in lines if line.startswith("CMD ")][-1]
    assert yaml.safe_load(cmd[4:]) == SERVICE_COMMAND
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    assert user not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/data" in line for line in lines if line.startswith("VOLUME"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed here")
def test_docker_compose_config_passes():
    for args in ([], ["--profile", "cpu"], ["--profile", "cluster"]):
        subprocess.run(["docker-compose", *args, "config", "-q"], cwd=REPO, check=True)


def test_the_grafana_dashboard_reads_only_metrics_the_service_exposes():
    import json
    import re

    from service.metrics import ServiceMetrics

    dashboard = json.loads((REPO / "docker" / "grafana" / "reid-dashboard.json").read_text())
    exposed = {metric.name for metric in ServiceMetrics().registry.collect()}
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count|total)$", "", name) for expr in queries for name in re.findall(r"\breid_\w+", expr)
    }
    assert used and used <= {re.sub(r"_total$", "", name) for name in exposed}, used - exposed
    assert {"reid_build_info", "reid_queued_images", "reid_request_seconds", "reid_errors"} <= used
