"""Study identity and the read side, through the CLI as users run it."""

from __future__ import annotations

import shutil
import uuid

import yaml
from conftest import run_cli, study_dict, write_study

from c5snn.config import load_config
from c5snn.storage import ClaimState, Store

ONE_CONFIG_GRID = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.8],
                   "encoding": ["direct", "rate_coded"]}


def _one_line(proc) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_a_study_remembers_its_overrides_and_its_data_by_content(tmp_path, synthetic_csv):
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=f"id-{uuid.uuid4().hex[:8]}", grid=ONE_CONFIG_GRID,
        training={"epochs": 1, "limit_train_batches": 1}, promote={"top_k": 1, "seeds": [42]}))
    url = f"sqlite:///{tmp_path / 'id.db'}"
    common = ["--config", str(study), "--storage", url]
    sweep = run_cli("phase-c-sweep", *common, "--screening-seed", "7", "--workers", "1",
                    "--threads", "1", "--output", str(tmp_path / "r" / "phase_c_sweep.csv"),
                    "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr
    # later commands apply the stored override without being told
    for command in (["promote"], ["status"],
                    ["export", "--output", str(tmp_path / "again" / "phase_c_sweep.csv")]):
        proc = run_cli(*command, *common, cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
    assert (tmp_path / "again" / "phase_c_top5.json").exists()
    # an override that changes a result is refused, naming the key and both values
    line = _one_line(run_cli("phase-c-sweep", *common, "--screening-seed", "9"))
    assert "promote.screening_seed is 9 here but 7 in the study" in line
    line = _one_line(run_cli("worker", *common, "--set", "training.learning_rate=0.002"))
    assert "training.learning_rate is 0.002 here but 0.001 in the study" in line
    # the same bytes in another folder (another machine's mount) open the same study
    moved = tmp_path / "mnt" / "events-copy.csv"
    moved.parent.mkdir()
    shutil.move(synthetic_csv, moved)
    raw = yaml.safe_load(study.read_text())
    raw["data"]["path"] = str(moved)
    study.write_text(yaml.safe_dump(raw))
    proc = run_cli("status", *common)
    assert proc.returncode == 0 and "1/1 done" in proc.stdout, proc.stderr
    # other bytes do not
    moved.write_text(moved.read_text().replace("\n1/", "\n01/", 1))
    assert "data.sha256" in _one_line(run_cli("status", *common))


def test_promote_wait_ends_with_the_given_up_points(tmp_path, synthetic_csv):
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=f"wait-{uuid.uuid4().hex[:8]}", grid=ONE_CONFIG_GRID,
        training={"epochs": 1, "limit_train_batches": 1}, promote={"top_k": 1, "seeds": [42, 7]}))
    url = f"sqlite:///{tmp_path / 'w.db'}"
    common = ["--config", str(study), "--storage", url]
    assert run_cli("study", "create", *common).returncode == 0
    workers = run_cli("workers", *common, "-n", "1", "--artifacts", str(tmp_path / "art"),
                      cwd=tmp_path)
    assert workers.returncode == 0, workers.stdout[-2000:]
    assert run_cli("promote", *common).returncode == 0
    # promote point 1 failed three times (as a trial that raises would), point 0 is still open
    config = load_config(study)
    store = Store(url)
    for attempt in (1, 2, 3):
        claim = store.try_claim(config.name + "-promote", 1, attempt, worker="w", host="h",
                                device="cpu")
        store.finish(claim, ClaimState.FAILED, "RuntimeError: CUDA error: out of memory")
    store.close()
    workers = run_cli("workers", *common, "-n", "1", "--artifacts", str(tmp_path / "art"),
                      cwd=tmp_path)
    assert workers.returncode == 0, workers.stdout[-2000:]
    proc = run_cli("promote", *common, "--wait", "--max-attempts", "3", timeout=60)
    line = _one_line(proc)
    assert "1/2 done" in line and "point 1 (3 failed, 0 disrupted): RuntimeError: CUDA error" in line
