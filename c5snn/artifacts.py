"""What runs leave on disk: the artifact store's layout, run directories, loading them back.

    <artifacts>/<study>/point-NNN/checkpoint.pt   per-epoch checkpoint of a point (resume)
    <artifacts>/<study>/point-NNN/run/            a promote point's run directory:

    best_model.pt        model_state_dict, optimizer_state_dict, epoch, best_val_recall_at_20,
                         config, seed (the best epoch's weights)
    config_snapshot.yaml the run's full configuration (c5snn.config.snapshot)
    pip_freeze.txt       installed distributions, for provenance
    metrics.csv          one row per epoch
    test_logits.pt       (n_test, 39) logits on the test windows scored

Every path c5snn records (a trial's `run_dir`) is relative to the artifacts root, so that a
machine that mounts the folder elsewhere, or holds a copy of it, finds the same files under its
own root (`--artifacts` / `C5SNN_ARTIFACTS`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

import optuna
import torch
import yaml

from c5snn.config import ModelParams
from c5snn.errors import ArtifactError, first_line
from c5snn.files import atomic_path
from c5snn.metrics import METRIC_KEYS
from c5snn.model import SpikingTransformer, build_model
from c5snn.train import RunResult


def pip_freeze() -> str:
    """`name==version` of every installed distribution, sorted (no pip subprocess needed)."""
    lines = {
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


DEFAULT_ARTIFACTS = Path("storage/artifacts")
BEST_FILES = ("best_model.pt", "config_snapshot.yaml", "pip_freeze.txt", "metrics.csv")
RUN_FILES = (*BEST_FILES, "test_logits.pt")  # a promote point's run directory
DASHBOARD_FILES = ("best_model.pt", "metrics.csv", "config_snapshot.yaml")  # uploaded to its trial
OPTUNA_ARTIFACTS = "optuna-artifacts"  # Optuna's artifact store, under the artifacts root


def safe_name(study: str) -> str:
    """A filesystem-safe folder name for a study name (hostile names included)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", study)[:60].strip(".") or "study"
    return f"{slug}-{hashlib.sha256(study.encode()).hexdigest()[:8]}"


def point_dir(artifacts: Path, study: str, point: int) -> Path:
    """Where one point of one study keeps its checkpoint and (promote) run directory."""
    return artifacts / safe_name(study) / f"point-{point:03d}"


def artifacts_root(option: Path | None) -> Path:
    """The artifacts root: `--artifacts`, else $C5SNN_ARTIFACTS, else storage/artifacts."""
    return Path(option or os.environ.get("C5SNN_ARTIFACTS") or DEFAULT_ARTIFACTS)


def relative_to_root(artifacts: Path, path: Path) -> str:
    """`path` as recorded in the database: relative to the artifacts root, '/'-separated."""
    return Path(path).absolute().relative_to(Path(artifacts).absolute()).as_posix()


def find_run_dir(artifacts: Path, study: str, point: int, recorded: str | None,
                 recorded_root: str | None = None) -> Path:
    """A promote point's run directory on this machine: the first of these that holds its files.

    `recorded` is the trial's `run_dir` attr: relative to the artifacts root, as c5snn records
    it, or an absolute path of the machine that ran it (studies written before). It is looked
    for under `artifacts` (this machine's root), then under `recorded_root` (the root the worker
    wrote to, its `artifacts_root` attr: the same machine needs no --artifacts), then as written.
    Raises ArtifactError naming the point and the path looked for under `artifacts`.
    """
    own = point_dir(Path(artifacts), study, point) / "run"
    candidates = [own]
    if recorded is not None and not Path(recorded).is_absolute():
        candidates = [Path(artifacts) / recorded]
        if recorded_root is not None:
            candidates.append(Path(recorded_root) / recorded)
    elif recorded is not None:
        candidates.append(Path(recorded))
    for here in candidates:
        if all((here / name).is_file() for name in RUN_FILES):
            return here
    missing = next(name for name in RUN_FILES if not (candidates[0] / name).is_file())
    raise ArtifactError(f"promote point {point} of '{study}': no {missing} in {candidates[0]} "
                        "(its run directory under the artifacts root; mount the folder the "
                        "workers wrote to and pass --artifacts or C5SNN_ARTIFACTS)")


def optuna_artifact_store(artifacts: Path) -> optuna.artifacts.FileSystemArtifactStore:
    """Optuna's artifact store under the artifacts root: the promote runs' files uploaded to their
    trials there, which optuna-dashboard lists and downloads (`c5snn dashboard`)."""
    return optuna.artifacts.FileSystemArtifactStore(Path(artifacts) / OPTUNA_ARTIFACTS)


def write_run_dir(run_dir: Path, result: RunResult, config: dict) -> Path:
    """Write a run's outputs (with its test logits, when it was scored on test) into a fresh
    directory, renamed into place when complete."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir) as tmp:
        tmp.mkdir()
        torch.save(
            {
                "model_state_dict": result.model_state,
                "optimizer_state_dict": result.optimizer_state,
                "epoch": result.best_epoch,
                "best_val_recall_at_20": result.val["recall_at_20"],
                "config": config,
                "seed": result.seed,
            },
            tmp / "best_model.pt",
        )
        (tmp / "config_snapshot.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "pip_freeze.txt").write_text(pip_freeze())
        if result.test_logits is not None:
            torch.save(result.test_logits, tmp / "test_logits.pt")
        with open(tmp / "metrics.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["epoch", "train_loss", *(f"val_{k}" for k in METRIC_KEYS), "seconds"])
            for r in result.history:
                writer.writerow(
                    [r.epoch, f"{r.train_loss:.6f}", *(f"{r.val[k]:.6f}" for k in METRIC_KEYS),
                     f"{r.seconds:.3f}"]
                )
    return run_dir


def load_model(checkpoint: Path, device: str = "cpu") -> tuple[SpikingTransformer, dict]:
    """A `SpikingTransformer` with a run directory's best weights, and the checkpoint dict."""
    try:  # plain types and tensors only: a checkpoint may come from a shared folder
        state = torch.load(checkpoint, map_location=device, weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{checkpoint}: not a loadable c5snn checkpoint "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
    params = ModelParams(**{k: v for k, v in state["config"]["model"].items() if k != "type"})
    model = build_model(params).to(device)
    model.load_state_dict(state["model_state_dict"])
    model.eval()
    return model, state
