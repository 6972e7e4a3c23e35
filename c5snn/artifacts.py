"""What runs leave on disk: the artifact store's layout, run directories, loading them back.

    <artifacts>/<study>/point-NNN/checkpoint.pt   per-epoch checkpoint of a point (resume)
    <artifacts>/<study>/point-NNN/run/            a promote point's run directory:

    best_model.pt        model_state_dict, optimizer_state_dict, epoch, best_val_recall_at_20,
                         config, seed (the best epoch's weights)
    config_snapshot.yaml the run's full configuration (c5snn.config.snapshot)
    pip_freeze.txt       installed distributions, for provenance
    metrics.csv          one row per epoch
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import re
from pathlib import Path

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


def safe_name(study: str) -> str:
    """A filesystem-safe folder name for a study name (hostile names included)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", study)[:60].strip(".") or "study"
    return f"{slug}-{hashlib.sha256(study.encode()).hexdigest()[:8]}"


def point_dir(artifacts: Path, study: str, point: int) -> Path:
    """Where one point of one study keeps its checkpoint and (promote) run directory."""
    return artifacts / safe_name(study) / f"point-{point:03d}"


def write_run_dir(run_dir: Path, result: RunResult, config: dict) -> Path:
    """Write a run's outputs into a fresh directory, renamed into place when complete."""
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
