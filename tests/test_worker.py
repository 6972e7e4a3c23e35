"""The sweep service with real worker processes on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from conftest import PG_URL, ROOT, claim_rows, require_pg, run_cli, study_dict, write_study
from helpers import torch_threads
from optuna.trial import TrialState

from c5snn.artifacts import point_dir
from c5snn.config import GRID_KEYS, load_config
from c5snn.data import prepare, write_synthetic
from c5snn.lease import Budget
from c5snn.train import train_run


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sweep.db'}"
    require_pg()
    return PG_URL


def _study(tmp_path, synthetic_csv, **sections):
    name = f"t-{uuid.uuid4().hex[:10]}"
    return write_study(tmp_path / "study.yaml", study_dict(synthetic_csv, name=name, **sections))


def _worker(study, url, tmp_path, name, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "c5snn", "worker", "--config", str(study), "--storage", url,
         "--name", name, "--threads", "1", "--heartbeat", "0.2", "--grace", "3",
         "--artifacts", str(tmp_path / "artifacts"), *extra],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def _wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


def _assert_exactly_once(study_path, url):
    config = load_config(study_path)
    trials = optuna.load_study(study_name=config.name, storage=url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = [tuple(t.params[k] for k in GRID_KEYS) for t in complete]
    assert len(points) == len(set(points)) == 72
    assert set(points) == set(itertools.product(*(config.grid[k] for k in GRID_KEYS)))
    assert sorted(t.user_attrs["config_id"] for t in complete) == list(range(72))
    return trials


def test_parallel_workers_run_each_grid_point_exactly_once(storage_url, tmp_path, synthetic_csv):
    study = _study(tmp_path, synthetic_csv, training={"epochs": 1, "limit_train_batches": 1})
    n = 4 if storage_url.startswith("postgresql") else 2
    assert run_cli("study", "create", "--config", str(study), "--storage", storage_url,
                   cwd=tmp_path).returncode == 0
    proc = run_cli("workers", "--config", str(study), "-n", str(n), "--storage", storage_url,
                   "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    trials = _assert_exactly_once(study, storage_url)
    assert len(trials) == 72  # no faults: no extra attempts
    assert {f"[w{i}]" for i in range(n)} <= {line.split()[0] for line in proc.stdout.splitlines()}
    assert "[72/72]" in proc.stdout
    t = trials[0]
    assert set(t.intermediate_values) == {1}
    for key in ("config_id", "val_hit_at_20", "val_mrr", "training_time_s", "best_epoch",
                "epochs_run", "device", "host", "seed", "spike_rate", "backend"):
        assert key in t.user_attrs
    assert {"device", "torch", "threads", "gemm", "compiled"} <= set(t.user_attrs["backend"])
    # idempotent create; a changed study file is refused with both hashes
    again = run_cli("study", "create", "--config", str(study), "--storage", storage_url)
    assert again.returncode == 0 and "exists" in again.stdout
    text = study.read_text().replace("learning_rate: 0.001", "learning_rate: 0.002")
    study.write_text(text)
    changed = run_cli("study", "create", "--config", str(study), "--storage", storage_url)
    assert changed.returncode == 1
    assert "training.learning_rate is 0.002 here but 0.001 in the study" in changed.stderr


def _created(tmp_path, synthetic_csv, epochs: int):
    """A created SQLite study of the 72-point grid with `epochs` of 3 batches: (url, file, name)."""
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = _study(tmp_path, synthetic_csv, training={"epochs": epochs, "limit_train_batches": 3})
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    return url, study, load_config(study).name


def test_sigkill_mid_trial_is_retried_and_resumed_exactly(tmp_path, synthetic_csv):
    url, study, name = _created(tmp_path, synthetic_csv, epochs=4)
    procs = [_worker(study, url, tmp_path, f"w{i}") for i in range(3)]
    victim = procs[0]
    # mid-trial: after epoch 1 or 2 of 4, not while it finishes (it beats with epoch 4 then)
    _wait_until(lambda: any(r.worker == "w0" and r.state == "running" and 1 <= r.epoch <= 2
                            for r in claim_rows(url, name)), "w0 is in epoch 2 or 3 of a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for p in procs[1:]:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-2000:]
    trials = _assert_exactly_once(study, url)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["error"] == "heartbeat lost"
    retried = [t for t in trials if t.state == TrialState.COMPLETE
               and t.params == failed[0].params]
    assert len(retried) == 1 and retried[0].user_attrs["resumed_from_epoch"] >= 1
    assert len(retried[0].intermediate_values) == retried[0].user_attrs["epochs_run"]
    # the resumed result equals an uninterrupted run of that point and seed
    config = load_config(study)
    data = prepare(config.data_path, config.window_size, config.split_ratios)
    with torch_threads(1):
        straight = train_run(config.model_params(retried[0].params), config.training, data, seed=42)
    assert retried[0].value == straight.val["recall_at_20"]
    assert retried[0].user_attrs["val_mrr"] == straight.val["mrr"]
    assert retried[0].user_attrs["best_epoch"] == straight.best_epoch


def test_sigterm_releases_and_restart_continues(tmp_path, synthetic_csv):
    url, study, name = _created(tmp_path, synthetic_csv, epochs=3)
    procs = [_worker(study, url, tmp_path, f"w{i}") for i in range(2)]
    _wait_until(lambda: sum(r.state == "done" for r in claim_rows(url, name)) >= 4
                and any(r.state == "running" and r.epoch == 1 for r in claim_rows(url, name)),
                "4 points are done and another is in epoch 2 of 3 (batches still to come)")
    t0 = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out[-2000:]
    assert time.time() - t0 < 20  # promptly: within one epoch, not one trial
    rows = claim_rows(url, name)
    assert not any(r.state == "running" for r in rows)
    done_before = {r.point for r in rows if r.state == "done"}
    released = {r.point for r in rows if r.state == "released"}
    assert released and not released & done_before
    checkpointed = {}  # released point -> epochs its checkpoint holds (none: stopped in epoch 1)
    for point in released:
        ckpt = point_dir(tmp_path / "artifacts", name, point) / "checkpoint.pt"
        if ckpt.exists():
            checkpointed[point] = torch.load(ckpt, weights_only=True)["epoch"]
    proc = run_cli("workers", "--config", str(study), "-n", "2", "--storage", url,
                   "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    trials = _assert_exactly_once(study, url)
    rows = claim_rows(url, name)
    for point in done_before:  # no completed point ran again
        assert sum(1 for r in rows if r.point == point) == 1
    for t in trials:
        if t.state == TrialState.COMPLETE and t.user_attrs["config_id"] in released:
            assert t.user_attrs.get("resumed_from_epoch") == checkpointed.get(
                t.user_attrs["config_id"])


def test_a_trial_that_diverges_fails_with_its_error_and_is_not_retried_forever(
    tmp_path, synthetic_csv
):
    url = f"sqlite:///{tmp_path / 'fail.db'}"
    grid = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.5],
            "encoding": ["direct", "rate_coded"]}
    # a learning rate this large drives the loss to inf/NaN: the trial's own fault
    study = _study(tmp_path, synthetic_csv, grid=grid, training={"learning_rate": 1e37})
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    proc = _worker(study, url, tmp_path, "w0", "--max-attempts", "2")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    trials = optuna.load_study(study_name=load_config(study).name, storage=url).trials
    assert len(trials) == 4 and all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs["error"].startswith("TrainingDiverged: the training loss is")
               for t in trials)
    status = run_cli("status", "--config", str(study), "--storage", url, "--max-attempts", "2")
    assert status.returncode == 0
    assert status.stdout.count("GIVEN UP") == 2 and "0/2 done" in status.stdout


def _untouched(study, url):
    """The study has all its points claimable: no attempt, no trial."""
    name = load_config(study).name
    assert optuna.load_study(study_name=name, storage=url).trials == []
    assert claim_rows(url, name) == []


def _one_line(proc, fragment):
    assert proc.returncode == 1, proc.stdout[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_a_misconfigured_worker_stops_before_it_claims(tmp_path, synthetic_csv):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    study = _study(tmp_path, synthetic_csv)
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    common = ["--config", str(study), "--storage", url, "--artifacts", str(tmp_path / "a")]
    _one_line(run_cli("worker", *common, "--device", "cuda:0"), "no usable CUDA device")
    _one_line(run_cli("workers", *common, "-n", "1", "--gpus", "9"), "GPU 9 does not exist")
    _untouched(study, url)
    # the data file replaced by other valid data after `study create`
    write_synthetic(synthetic_csv, rows=300, seed=2)
    _one_line(run_cli("worker", *common), "data.sha256 is")
    _untouched(study, url)


def test_a_full_disk_stops_the_worker_and_charges_no_point(tmp_path, synthetic_csv, monkeypatch):
    import errno

    from c5snn.errors import EnvironmentFault
    from c5snn.storage import ClaimState, Store
    from c5snn.studies import create_screening, point_states
    from c5snn.worker import Worker

    config = load_config(_study(tmp_path, synthetic_csv))
    store = Store(f"sqlite:///{tmp_path / 'full.db'}")
    create_screening(config, store)
    artifacts = tmp_path / "artifacts"
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp"):  # a checkpoint or run directory being written
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    lines = []
    worker = Worker(config, store, name="w", artifacts=artifacts, echo=lines.append)
    with pytest.raises(EnvironmentFault, match="No space left on device; point 0 was released"):
        worker.run()
    rows = store.attempts(config.name)
    assert [(r.state, r.error.split(":")[0]) for r in rows] == [(ClaimState.RELEASED, "released")]
    states = point_states(rows, config.n_points)
    assert all(s.claimable(Budget(1, 1)) for s in states)  # nothing counted, not even with 1 each
    assert not [p for p in artifacts.rglob("*") if p.name.endswith(".tmp")]  # no leftovers
    # too little room is refused before claiming anything
    monkeypatch.setattr("shutil.disk_usage", lambda _path: shutil._ntuple_diskusage(1, 1, 1 << 20))
    with pytest.raises(EnvironmentFault, match="1 MB free"):
        Worker(config, store, name="w2", artifacts=artifacts, echo=lines.append).run()
    assert len(store.attempts(config.name)) == 1


def test_a_damaged_checkpoint_of_a_stale_point_costs_time_not_the_point(tmp_path, synthetic_csv):
    from c5snn.storage import Store

    url = f"sqlite:///{tmp_path / 'ckpt.db'}"
    grid = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.8],
            "encoding": ["rate_coded"]}
    study = _study(tmp_path, synthetic_csv, grid=grid, training={"epochs": 3})
    config = load_config(study)
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    # a worker died holding point 0 after writing its checkpoint, which then got truncated
    store = Store(url)
    assert store.try_claim(config.name, 0, 1, worker="dead", host="h", device="cpu")
    store.close()
    data = prepare(config.data_path, config.window_size, config.split_ratios)
    ckpt = point_dir(tmp_path / "artifacts", config.name, 0) / "checkpoint.pt"
    train_run(config.model_params(config.grid_points()[0]), dataclasses.replace(
        config.training, epochs=1), data, seed=42, checkpoint_path=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    proc = _worker(study, url, tmp_path, "w0", "--max-attempts", "2")  # grace 3 s
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    trials = optuna.load_study(study_name=config.name, storage=url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 1 and "resumed_from_epoch" not in complete[0].user_attrs
    assert "unreadable" in complete[0].user_attrs["checkpoint_discarded"]
    assert "checkpoint" in out and "moved to checkpoint.pt.corrupt" in out
    assert (ckpt.parent / "checkpoint.pt.corrupt").exists()
    status = run_cli("status", "--config", str(study), "--storage", url, "--max-attempts", "2")
    assert "1/1 done" in status.stdout and "GIVEN UP" not in status.stdout
    # it trained from epoch 0: the result is the straight run's
    straight = train_run(config.model_params(config.grid_points()[0]), config.training, data,
                         seed=42)
    assert complete[0].user_attrs["epochs_run"] == straight.epochs_run


@pytest.mark.parametrize("skew_s", [600, -600])
def test_leases_are_judged_on_the_database_clock(storage_url, monkeypatch, skew_s):
    """A worker whose clock runs 10 min ahead takes no live lease; one 10 min behind keeps its
    own: heartbeats and their ages are the database's time, never a worker's."""
    from c5snn.reaper import reap
    from c5snn.storage import ClaimState, Store

    study = f"clock-{uuid.uuid4().hex[:8]}"
    owner, skewed = Store(storage_url), Store(storage_url)
    claim = owner.try_claim(study, 0, 1, worker="owner", host="a", device="cpu")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew_s)
    assert reap(skewed, study, 180, skewed.attempts(study)) == []
    assert skewed.beat(claim, 1)  # a skewed clock does not cost the owner its lease either
    assert [r.state for r in owner.attempts(study)] == [ClaimState.RUNNING]
    assert abs(skewed.now() - real_time()) < 5  # the database's clock, not the patched one
    owner.close()
    skewed.close()
