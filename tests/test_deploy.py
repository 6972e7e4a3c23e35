"""deploy/: the Kubernetes manifests against the Kubernetes schemas, and every c5snn command line
in them, in the Slurm templates and in the compose file parsed by the real CLI."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from cli_lines import env_defaults, parse, shell_commands
from conftest import ROOT
from typer._click.exceptions import UsageError

K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
# the oldest version with every field used (backoffLimitPerIndex), and the newest known
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents():
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    return (template or {}).get("spec", {}).get("containers", [])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    docs = _documents()
    assert {doc["kind"] for _, doc in docs} >= {"Secret", "StatefulSet", "Service",
                                                "PersistentVolumeClaim", "Job", "Deployment"}
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}: {exc.message} at {list(exc.path)}")


def _k8s_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every c5snn container: the image's entrypoint is `c5snn`, `args` its
    command line, with `$(VAR)` taken from the container's env."""
    found = []
    for name, doc in _documents():
        for container in _containers(doc):
            if not container["image"].startswith("c5snn"):
                continue
            env = {e["name"]: e.get("value", "x") for e in container.get("env", [])}
            args = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env.get(m[1], "x"), a)
                    for a in container["args"]]
            found.append((f"{name}:{container['name']}", args))
    return found


def test_the_kubernetes_jobs_are_set_up_for_a_sweep():
    docs = {doc["metadata"]["name"] + "/" + doc["kind"]: doc for _, doc in _documents()}
    workers = docs["c5snn-workers/Job"]["spec"]
    assert workers["completionMode"] == "Indexed" and workers["parallelism"] >= 1
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} \
        in workers["podFailurePolicy"]["rules"]  # disruptions are not failures
    pod = workers["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to release the point after a batch
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {"name": "artifacts", "mountPath": "/artifacts"} in container["volumeMounts"]
    assert docs["c5snn-artifacts/PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for key, doc in docs.items():  # the URL, password included, only ever from the Secret
        for c in _containers(doc):
            for e in c.get("env", []):
                if e["name"] in ("C5SNN_STORAGE", "POSTGRES_PASSWORD"):
                    assert e["valueFrom"]["secretKeyRef"]["name"] == "c5snn-storage", key
    assert "max_connections=200" in docs["c5snn-postgres/StatefulSet"]["spec"]["template"][
        "spec"]["containers"][0]["args"]


def _slurm_commands() -> list[tuple[str, list[str]]]:
    values = env_defaults(SLURM / "c5snn.env")
    return [(path.name, argv) for path in sorted(SLURM.glob("*.sbatch"))
            for argv in shell_commands(path, values)]


def _compose_commands() -> list[tuple[str, list[str]]]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return [(name, [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in svc["command"]])
            for name, svc in services.items() if "command" in svc and name != "postgres"]


def test_every_command_line_in_deploy_and_compose_parses_with_the_real_cli():
    lines = _k8s_commands() + _slurm_commands() + _compose_commands()
    commands = {argv[0] if argv[0] != "study" else "study create" for _, argv in lines}
    assert commands >= {"study create", "workers", "promote", "export", "dashboard"}
    for where, argv in lines:
        try:
            parse(argv)
        except UsageError as exc:
            pytest.fail(f"{where}: c5snn {' '.join(argv)}: {exc.format_message()}")


def test_the_parser_refuses_what_the_cli_refuses():
    """A renamed option, a value of the wrong type and a missing required option all fail
    here as they would for a user (so the test above can fail)."""
    parse(["workers", "--config", "s.yaml", "-n", "4", "--gpus", "all"])
    for argv in (["workers", "--config", "s.yaml", "--n-workers", "4"],
                 ["workers", "--config", "s.yaml", "-n", "four"],
                 ["export", "--output", "r.csv"],
                 ["exportt", "--config", "s.yaml"]):
        with pytest.raises(UsageError):
            parse(argv)
