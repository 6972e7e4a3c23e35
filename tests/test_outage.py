"""A PostgreSQL outage while workers train: it costs time, never a worker, a point or a trial.

A small TCP proxy stands between the workers and the shared PostgreSQL; for the outage it drops
every open connection and refuses new ones (as a database restart or failover looks to clients),
then accepts again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import sqlalchemy as sa
from conftest import PG_URL, ROOT, require_pg, run_cli, study_dict, write_study
from faults import FlakyProxy, through
from optuna.trial import TrialState

from c5snn.config import GRID_KEYS, load_config

OUTAGE_S = 20


def test_three_workers_ride_out_a_20s_postgresql_outage(tmp_path, synthetic_csv):
    require_pg()
    target = sa.engine.make_url(PG_URL)
    proxy = FlakyProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.restore()
    url = through(proxy)
    name = f"outage-{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=name, training={"epochs": 2, "limit_train_batches": 2}))
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    workers = [subprocess.Popen(
        [sys.executable, "-m", "c5snn", "worker", "--config", str(study), "--storage", url,
         "--name", f"w{i}", "--threads", "1", "--heartbeat", "1", "--grace", "60",
         "--db-outage-tolerance", "120", "--artifacts", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(3)]
    direct = sa.create_engine(PG_URL)  # the test watches through the real port

    def done() -> int:
        with direct.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM c5snn_claims WHERE study = :s AND "
                                        "state = 'done'"), {"s": name}).scalar_one()

    try:
        deadline = time.time() + 300
        while done() < 10:
            assert time.time() < deadline and all(w.poll() is None for w in workers)
            time.sleep(0.2)
        proxy.outage()
        time.sleep(OUTAGE_S)
        assert all(w.poll() is None for w in workers), "a worker died in the outage"
        proxy.restore()
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        proxy.outage()
    finally:  # a failing test must not leave workers behind
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
    assert any("database unreachable" in out and "database back after" in out for out in outputs)
    trials = optuna.load_study(study_name=name, storage=PG_URL).trials
    config = load_config(study)
    assert len(trials) == 72  # not one retried attempt, not one FAIL
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({tuple(t.params[k] for k in GRID_KEYS) for t in trials}) == 72
    assert sorted(t.user_attrs["config_id"] for t in trials) == list(range(config.n_points))
    with direct.connect() as conn:
        rows = conn.execute(sa.text("SELECT state, attempt FROM c5snn_claims WHERE study = :s"),
                            {"s": name}).all()
    direct.dispose()
    assert len(rows) == 72 and {tuple(r) for r in rows} == {("done", 1)}


def test_one_off_commands_fail_with_one_line_when_the_database_is_down(tmp_path, synthetic_csv):
    require_pg()
    proxy = FlakyProxy(("127.0.0.1", 1))  # nothing listens behind it
    proxy.restore()
    proxy.outage()
    study = write_study(tmp_path / "study.yaml", study_dict(synthetic_csv, name="down"))
    for command in (["status"], ["promote"], ["export", "--output", str(tmp_path / "r.csv")]):
        proc = run_cli(*command, "--config", str(study), "--storage", through(proxy))
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.csv").exists()


pytestmark = pytest.mark.slow
