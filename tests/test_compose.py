"""docker-compose.yml, checked without a Docker engine: structure and safety (its command lines
are parsed with the real CLI in test_deploy)."""

from __future__ import annotations

import re

import yaml
from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _defaults(text: str) -> str:
    """Compose interpolation with every variable at its default (`${X:-d}` -> d)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def test_services_and_dependencies():
    assert {"postgres", "worker", "dashboard", "create", "promote", "export"} <= set(SERVICES)
    assert SERVICES["postgres"]["healthcheck"]["test"][1].startswith("pg_isready")
    for name in ("worker", "dashboard", "create", "promote", "export"):
        svc = SERVICES[name]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "postgres:5432" in svc["environment"]["C5SNN_STORAGE"], name
        assert any(v.startswith("artifacts:") for v in svc["volumes"]), name
    for name in ("create", "promote", "export"):
        assert SERVICES[name]["profiles"] == ["steps"]
    assert any(v.endswith(":/app/results") for v in SERVICES["export"]["volumes"])
    assert {"pgdata", "artifacts"} <= set(COMPOSE["volumes"])
    assert any(v.startswith("pgdata:") for v in SERVICES["postgres"]["volumes"])


def test_gpu_reservation_and_scaling():
    worker = SERVICES["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "container_name" not in worker  # --scale worker=N needs unnamed replicas
    assert worker["build"]["args"]["TORCH_INDEX"].endswith("cu128")


def test_no_credentials_and_localhost_by_default():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert not re.search(r"postgres(ql)?(\+psycopg)?://[^:@/]+:(?!\$\{)[^@]+@", text)
    for name in ("postgres", "dashboard"):
        for port in SERVICES[name]["ports"]:
            assert _defaults(port).startswith("127.0.0.1:"), port


def test_postgresql_serves_the_connection_budget():
    assert "max_connections=200" in SERVICES["postgres"]["command"]  # 2 per worker: ~90 workers


def test_services_read_the_projects_own_data():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "../shared" not in text  # a user's clone has no ../shared
    for name in ("worker", "dashboard", "create", "promote", "export"):
        mounts = [_defaults(v) for v in SERVICES[name]["volumes"]]
        assert "./data:/app/data:ro" in mounts, name  # studies/*.yaml read ../data from /app/studies
    assert "COPY data ./data" in (ROOT / "Dockerfile").read_text()
