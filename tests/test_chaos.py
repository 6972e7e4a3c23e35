"""Faults arriving together, on real worker processes and a real PostgreSQL: the service ends
consistent. Every point done exactly once, no trial left RUNNING, every FAIL trial says why,
claims and Optuna's trials one to one, and no point given up for disruptions alone.

`test_a_worker_killed_after_any_step_leaves_no_running_trial` kills a worker right after each
committed step of an attempt; `test_chaos` throws random SIGKILL, SIGTERM, SIGSTOP/SIGCONT and
database outages and restarts at a sweep for a bounded time, restarting workers as a supervisor
would. Its schedule is seeded and printed: `C5SNN_CHAOS_SEED=<seed>` replays one.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from conftest import PG_URL, ROOT, claim_rows, require_pg, run_cli, study_dict, write_study
from faults import FlakyProxy, through
from optuna.trial import TrialState

from c5snn.config import GRID_KEYS, load_config

pytestmark = pytest.mark.slow

# A child that runs `c5snn worker` and SIGKILLs itself right after the first call of one Store
# method returns: a worker dead between two committed steps of an attempt.
KILL_AFTER = """
import os, signal, sys
from c5snn.storage import Store
method = sys.argv.pop(1)
original = getattr(Store, method)
def killing(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(Store, method, killing)
from c5snn.cli import main
sys.argv[0] = "c5snn"
main()
"""
# the steps of an attempt, in order: claim, trial created, trial recorded on the claim, an epoch
# reported, trial finished, claim finished
STEPS = ("try_claim", "create_trial", "attach_trial", "report", "finish_trial", "finish")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "C5SNN_MALLOC": "glibc"}  # no re-exec: keep patches


def _worker_cmd(study: Path, url: str, name: str, artifacts: Path, *extra: str) -> list[str]:
    return ["worker", "--config", str(study), "--storage", url, "--name", name, "--threads", "1",
            "--heartbeat", "0.5", "--grace", "3", "--artifacts", str(artifacts), *extra]


def assert_consistent(url: str, study_path: Path, context: str = "") -> tuple[list, list]:
    """Every point done exactly once, no RUNNING trial, every FAIL trial with its reason, claims
    and trials one to one with matching states; returns (trials, claims)."""
    config = load_config(study_path)
    trials = optuna.load_study(study_name=config.name, storage=url).trials
    claims = claim_rows(url, config.name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["config_id"] for t in complete) == list(range(config.n_points)), context
    assert len({tuple(t.params[k] for k in GRID_KEYS) for t in complete}) == config.n_points
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], context
    assert all(t.datetime_start is not None for t in trials)
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("error"), (t.number, context)
    by_claim = {t.user_attrs["claim"]: t for t in trials}
    assert len(by_claim) == len(trials), context  # one trial per claim
    expected = {"done": TrialState.COMPLETE, "failed": TrialState.FAIL, "stale": TrialState.FAIL,
                "released": TrialState.FAIL}
    for claim in claims:
        assert claim.state != "running", context
        trial = by_claim.pop(claim.id, None)
        if trial is None:  # its worker died before creating a trial: nothing to agree with
            assert claim.trial_id is None and claim.state in ("stale", "released"), (claim, context)
            continue
        assert claim.trial_id is not None, (claim, context)
        assert trial.state == expected[claim.state], (claim, trial.number, trial.state, context)
    assert not by_claim, f"trials without a claim: {sorted(by_claim)} {context}"
    assert sum(c.state == "done" for c in claims) == config.n_points, context
    return trials, claims


def _small_study(tmp_path: Path, csv: Path, epochs: int = 2, **grid) -> Path:
    grid = grid or {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.5, 0.8],
                    "encoding": ["direct"]}
    return write_study(tmp_path / "study.yaml", study_dict(
        csv, name=f"k-{uuid.uuid4().hex[:8]}", grid=grid,
        training={"epochs": epochs, "limit_train_batches": 1, "limit_val_batches": 1}))


def test_a_worker_killed_after_any_step_leaves_no_running_trial(tmp_path, synthetic_csv):
    require_pg()
    for step in STEPS:
        folder = tmp_path / step
        folder.mkdir()
        study = _small_study(folder, synthetic_csv)
        artifacts = folder / "artifacts"
        assert run_cli("study", "create", "--config", str(study), "--storage", PG_URL).returncode == 0
        victim = subprocess.run(
            [sys.executable, "-c", KILL_AFTER, step,
             *_worker_cmd(study, PG_URL, "victim", artifacts)],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert victim.returncode == -signal.SIGKILL, (step, victim.stdout[-2000:], victim.stderr[-2000:])
        survivor = run_cli(*_worker_cmd(study, PG_URL, "survivor", artifacts), timeout=300)
        assert survivor.returncode == 0, (step, survivor.stdout[-3000:])
        trials, claims = assert_consistent(PG_URL, study, f"killed after {step}")
        if step in ("create_trial", "attach_trial", "report"):  # its trial: FAILed, heartbeat lost
            assert [t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL] == [
                "heartbeat lost"], step
            assert "reaped:" in survivor.stdout
        if step == "finish_trial":  # COMPLETE as the lease ran out: the claim is done, no retry
            assert len(claims) == 2 and {c.state for c in claims} == {"done"}
        # disruptions are not failures: status shows them apart
        status = run_cli("status", "--config", str(study), "--storage", PG_URL)
        assert status.returncode == 0 and "2/2 done" in status.stdout, status.stdout
        if step in ("try_claim", "create_trial", "attach_trial", "report"):
            assert "GIVEN UP" not in status.stdout


def test_status_repairs_a_study_an_older_version_left_inconsistent(tmp_path, synthetic_csv):
    """A RUNNING trial whose claim went stale before the trial was recorded on it (what the
    reaper of earlier versions skipped): status reports it, --repair FAILs it with one line."""
    require_pg()
    from c5snn.storage import Store
    from c5snn.studies import create_screening
    from c5snn.worker import distributions

    study = _small_study(tmp_path, synthetic_csv)
    config = load_config(study)
    store = Store(PG_URL)
    create_screening(config, store)
    claim = store.try_claim(config.name, 0, 1, worker="gone", host="h", device="cpu")
    store.create_trial(store.study_id(config.name), config.grid_points()[0], distributions(config),
                       user_attrs={"claim": claim.id, "config_id": 0, "seed": 42})
    store.mark_stale(config.name, -1, store.attempts(config.name))  # as the old reaper left it
    store.close()
    status = run_cli("status", "--config", str(study), "--storage", PG_URL)
    assert "trial 0: RUNNING without a live worker (claim stale)" in status.stdout, status.stdout
    assert "0/3 failed, 1/10 disrupted" in status.stdout
    repaired = run_cli("status", "--config", str(study), "--storage", PG_URL, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    fixes = [line for line in repaired.stdout.splitlines() if line.startswith("fixed: ")]
    assert len(fixes) == 1 and "trial 0" in fixes[0] and "FAILed (heartbeat lost)" in fixes[0]
    assert "status --repair` FAILs it" not in repaired.stdout  # status after the repair
    trial = optuna.load_study(study_name=config.name, storage=PG_URL).trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "heartbeat lost"
    assert claim_rows(PG_URL, config.name)[0].trial_id is not None  # recorded on its claim
    again = run_cli("status", "--config", str(study), "--storage", PG_URL, "--repair")
    assert "repair: 0 fix(es)" in again.stdout


CHAOS_S = 90  # at most this long faults arrive (less if the sweep ends first); then workers drain


class Fleet:
    """Worker processes on one study, restarted as a supervisor would when they exit."""

    def __init__(self, study: Path, url: str, artifacts: Path, log: Path):
        self.study, self.url, self.artifacts, self.log = study, url, artifacts, log
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = 0

    def start(self) -> str:
        name = f"w{self.started}"
        self.started += 1
        out = open(self.log / f"{name}.log", "w")  # noqa: SIM115 - the process owns it
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "c5snn", *_worker_cmd(
                self.study, self.url, name, self.artifacts, "--heartbeat", "1", "--grace", "5",
                "--db-outage-tolerance", "120")],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=self.log)
        return name

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.log.glob("w*.log")))


def _done(study: Path) -> int:
    return sum(c.state == "done" for c in claim_rows(PG_URL, load_config(study).name))


def _restart_postgresql() -> bool:
    """Restart the machine's PostgreSQL (fast mode: connections cut), where this process may."""
    tool = shutil.which("pg_ctlcluster")
    local = sa.engine.make_url(PG_URL).host in ("127.0.0.1", "localhost", None)
    if not local or tool is None or os.geteuid() != 0 or not os.path.isdir("/etc/postgresql"):
        return False
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    return subprocess.run([tool, "--skip-systemctl-redirect", version, "main", "restart", "-m",
                           "fast"], capture_output=True, timeout=60).returncode == 0


def test_chaos(tmp_path, synthetic_csv):
    require_pg()
    seed = int(os.environ.get("C5SNN_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    target = sa.engine.make_url(PG_URL)
    proxy = FlakyProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.restore()
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=f"chaos-{uuid.uuid4().hex[:8]}",
        training={"epochs": 15, "early_stopping_patience": 20, "limit_train_batches": 4,
                  "limit_val_batches": 1}))
    url = through(proxy)
    assert run_cli("study", "create", "--config", str(study), "--storage", PG_URL).returncode == 0
    fleet = Fleet(study, url, tmp_path / "artifacts", tmp_path)
    for _ in range(3):
        fleet.start()
    schedule, frozen = [], {}
    context = lambda: f"seed {seed} (C5SNN_CHAOS_SEED={seed} replays it); schedule: {schedule}"  # noqa: E731
    try:
        end = time.monotonic() + CHAOS_S
        while time.monotonic() < end and _done(study) < 72:
            time.sleep(rng.uniform(2, 5))
            for name, until in list(frozen.items()):  # thaw those frozen past their grace
                if time.monotonic() >= until:
                    fleet.procs[name].send_signal(signal.SIGCONT)
                    del frozen[name]
            for name in [n for n, p in fleet.procs.items() if p.poll() is not None
                         and not n.startswith("gone")]:  # the supervisor restarts exited workers
                fleet.procs[f"gone-{name}"] = fleet.procs.pop(name)
                fleet.start()
            fault = rng.choice(["kill", "term", "stop", "outage", "restart"])
            victims = [n for n in fleet.alive() if n not in frozen and not n.startswith("gone")]
            t = round(CHAOS_S - (end - time.monotonic()), 1)
            if fault in ("kill", "term", "stop") and victims:
                name = rng.choice(sorted(victims))
                schedule.append((t, fault, name))
                proc = fleet.procs[name]
                if fault == "stop":
                    proc.send_signal(signal.SIGSTOP)
                    frozen[name] = time.monotonic() + 8  # past --grace 5: its lease is taken
                else:
                    proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGTERM)
            elif fault == "restart" and _restart_postgresql():
                schedule.append((t, "postgresql restart"))
            else:
                schedule.append((t, "outage 3s"))
                proxy.outage()
                time.sleep(3)
                proxy.restore()
        print(f"chaos {context()}")
        for name in frozen:
            fleet.procs[name].send_signal(signal.SIGCONT)
        fleet.start()  # one more worker to drain
        deadline = time.monotonic() + 600
        while fleet.alive():
            assert time.monotonic() < deadline, f"workers did not drain; {context()}"
            time.sleep(1)
    finally:
        for proc in fleet.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        proxy.outage()
    _, claims = assert_consistent(PG_URL, study, f"{context()}\n{fleet.output()}")
    lost = [c for c in claims if c.state in ("stale", "released")]
    print(f"chaos: {len(claims)} attempts for 72 points, {len(lost)} lost to faults; "
          f"{fleet.started} worker processes")
    assert len(lost) >= 3, f"the faults hit too few attempts to test anything; {context()}"
    config = load_config(study)
    status = run_cli("status", "--config", str(study), "--storage", PG_URL)
    assert f"{config.n_points}/{config.n_points} done" in status.stdout and "GIVEN UP" not in status.stdout
    assert "status --repair` FAILs it" not in status.stdout
