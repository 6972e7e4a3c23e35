"""Shared fixtures: tiny synthetic data and study files, and a runner for the real CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from c5snn.config import load_config
from c5snn.data import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("C5SNN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    """Whether the PostgreSQL the tests use answers (CI sets C5SNN_TEST_PG_URL and starts it)."""
    try:
        with sa.create_engine(PG_URL).connect():
            return True
    except Exception:
        return False


def require_pg() -> None:
    """Skip without PostgreSQL, unless C5SNN_TEST_PG_URL is set: then it must be there."""
    if not os.environ.get("C5SNN_TEST_PG_URL") and not pg_available():
        pytest.skip("no PostgreSQL: set C5SNN_TEST_PG_URL (CI does) or start one on 127.0.0.1")


def claim_rows(url: str, study: str) -> list:
    """Every column of the claim table's rows of `study`, oldest first, read directly."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM c5snn_claims WHERE study = :s ORDER BY id"),
                                {"s": study}).all()
    finally:
        engine.dispose()


def study_dict(data_path: Path, name: str = "t", **sections) -> dict:
    """A small study: the real 72-point grid, a 12-event window and a budget of seconds."""
    study = {
        "study": {"name": name},
        "data": {"path": str(data_path), "window_size": 12, "split_ratios": [0.7, 0.15, 0.15],
                 "batch_size": 16},
        "model": {"type": "spiking_transformer", "timesteps": 3, "dropout": 0.1,
                  "max_window_size": 100, "surrogate": "fast_sigmoid", "d_ffn_multiplier": 2},
        "grid": {"n_layers": [2, 4, 6], "n_heads": [2, 4], "d_model": [64, 128],
                 "beta": [0.5, 0.8, 0.95], "encoding": ["direct", "rate_coded"]},
        "training": {"epochs": 2, "learning_rate": 0.001, "optimizer": "adam",
                     "early_stopping_patience": 10, "early_stopping_metric": "val_recall_at_20",
                     "limit_train_batches": 2, "limit_val_batches": 2},
        "promote": {"top_k": 5, "seeds": [42, 123, 7], "screening_seed": 42},
        "output": {"dir": "results"},
    }
    for section, values in sections.items():
        study[section].update(values)
    if "promote" not in sections:  # a valid study: top_k fits a small test grid
        study["promote"]["top_k"] = min(5, math.prod(len(v) for v in study["grid"].values()))
    return study


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def synthetic_csv(tmp_path) -> Path:
    return write_synthetic(tmp_path / "events.csv", rows=300, seed=1)


@pytest.fixture
def study_file(tmp_path, synthetic_csv) -> Path:
    return write_study(tmp_path / "study.yaml", study_dict(synthetic_csv))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run `python -m c5snn ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("C5SNN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "c5snn", *args], cwd=cwd, env=full_env, capture_output=True,
        text=True, timeout=timeout,
    )


TRAINING = {"epochs": 2, "limit_train_batches": 1, "limit_val_batches": 2}


def run_sweep(tmp: Path, csv_path: Path, url: str, workers: int):
    """`c5snn phase-c-sweep` on the study file in `tmp`, asserting success."""
    proc = run_cli("phase-c-sweep", "--config", str(tmp / "study.yaml"), "--output", str(csv_path),
                   "--workers", str(workers), "--threads", "1", "--storage", url,
                   "--artifacts", str(tmp / "artifacts"), cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def swept(tmp_path_factory):
    """A finished tiny sweep (72 screening + 15 promote trials) by one worker on SQLite."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_synthetic(tmp / "events.csv", rows=300, seed=1)
    name = f"p-{uuid.uuid4().hex[:8]}"
    write_study(tmp / "study.yaml", study_dict(data, name=name, training=TRAINING))
    url = f"sqlite:///{tmp / 'sweep.db'}"
    proc = run_sweep(tmp, tmp / "results" / "phase_c_sweep.csv", url, 1)
    return {"tmp": tmp, "url": url, "out": proc.stdout, "results": tmp / "results",
            "config": load_config(tmp / "study.yaml")}
