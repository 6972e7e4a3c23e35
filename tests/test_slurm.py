"""The shipped Slurm templates (deploy/slurm/), submitted to a real single-node Slurm cluster.

The fixture starts munged, slurmctld and slurmd (Debian's slurm-wlm and munge; `.ci/run`
installs them) with a slurm.conf for this machine and its cores, on ports of its own, and stops
them afterwards. The tests submit the templates in deploy/slurm/ themselves, configured through
the environment as c5snn.env allows, never copies of them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import PG_URL, ROOT, claim_rows, require_pg, run_cli, study_dict, write_study
from optuna.trial import TrialState

from c5snn.config import GRID_KEYS, load_config

SLURM = ROOT / "deploy" / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable() -> str | None:
    """Why a Slurm cluster cannot start here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d, path="/usr/sbin:/usr/bin:" + os.environ["PATH"])
               is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _run(*cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="module")
def slurm(request):
    """A running single-node Slurm cluster: the environment its commands need (SLURM_CONF)."""
    why = _unavailable()
    if why is not None:
        if os.environ.get("C5SNN_TEST_SLURM"):
            pytest.fail(f"C5SNN_TEST_SLURM is set but {why}")
        pytest.skip(why)
    # jobs may run as another user (the PostgreSQL one): slurmd's spool must be theirs to enter
    root = Path(tempfile.mkdtemp(prefix="c5snn-slurm-"))
    root.chmod(0o755)
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""
ClusterName=c5snn-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = False
    if _run("sh", "-c", "munge -n | unmunge", check=False).returncode != 0:
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run("runuser", "-u", "munge", "--", "mungekey", "--create")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        started_munge = True
    _run("/usr/sbin/slurmctld", "-f", str(conf), env=env)
    _run("/usr/sbin/slurmd", "-f", str(conf), env=env)
    deadline = time.time() + 60
    while "idle" not in _run("sinfo", "-h", "-o", "%T", env=env, check=False).stdout:
        if time.time() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in (root / "log").glob("*.log"))
            pytest.fail(f"the Slurm cluster did not come up:\n{logs}")
        time.sleep(0.5)
    failed_before = request.session.testsfailed
    yield env
    _run("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name, env=env, check=False)
    for pidfile in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pidfile).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    if started_munge:
        _run("pkill", "-x", "munged", check=False)
    if request.session.testsfailed > failed_before:
        print(f"the Slurm cluster's state and logs are kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def _squeue(env: dict) -> list[tuple[str, str]]:
    out = _run("squeue", "-h", "-o", "%i %T", env=env).stdout
    return [tuple(line.split()) for line in out.splitlines()]


def _wait(predicate, what: str, env: dict, logs: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*"))
                              if p.is_file())
            pytest.fail(f"timed out waiting until {what}; squeue: {_squeue(env)}\n{tails}")
        time.sleep(0.25)


def test_the_shipped_templates_run_the_sweep_on_slurm(slurm, tmp_path, synthetic_csv):
    """submit.sh: create -> worker array of 2 tasks x 2 workers -> promote -> worker array ->
    export. One task is
    cancelled mid-trial (its point is released and resumed from its checkpoint by the other);
    the other gets the time-limit signal (it releases its point and requeues itself, and the
    requeued task resumes). Every grid point ends done exactly once; the dependent jobs write the
    three outputs."""
    require_pg()
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=name, output={"dir": str(tmp_path / "results")},
        training={"epochs": 12, "early_stopping_patience": 30, "limit_train_batches": 3,
                  "limit_val_batches": 1}))
    logs = tmp_path / "logs"
    env = {**slurm, "C5SNN_HOME": str(ROOT), "C5SNN_CONFIG": str(study),
           "C5SNN_STORAGE": PG_URL, "C5SNN_ARTIFACTS": str(tmp_path / "artifacts"),
           "C5SNN_LOGS": str(logs), "C5SNN_TASKS": "2", "C5SNN_GPUS_PER_TASK": "0",
           "C5SNN_WORKERS_PER_TASK": "2", "C5SNN_CPUS_PER_TASK": "1", "C5SNN_TIME": "30:00",
           "C5SNN_BIN": str(ROOT / ".venv" / "bin" / "c5snn")}
    if not Path(env["C5SNN_BIN"]).exists():  # a checkout without make install's venv
        env["C5SNN_BIN"] = shutil.which("c5snn") or pytest.fail("no c5snn executable")
    started = time.time()
    submitted = _run(str(SLURM / "submit.sh"), env=env)
    jobs = dict(item.split("=") for item in submitted.stdout.split())
    assert set(jobs) == {"create", "screening", "promote", "promote_workers", "export"}
    screening = jobs["screening"]

    def mid_trial(task: str) -> bool:  # a deeper model's trial of that task, 1..5 of 12 epochs done
        try:
            running = optuna.load_study(study_name=name, storage=PG_URL).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the create job has not run yet
            return False
        return any(f":slurm{screening}_{task}." in t.user_attrs["worker"] and
                   t.params["n_layers"] >= 4 and 1 <= len(t.intermediate_values) <= 5
                   for t in running)

    def released(task: str) -> bool:
        return any(c.state == "released" and f":slurm{screening}_{task}." in c.worker
                   for c in claim_rows(PG_URL, name))

    _wait(lambda: mid_trial("0"), "task 0 is mid-trial", slurm, logs)
    _run("scancel", f"{screening}_0", env=slurm)
    _wait(lambda: released("0"), "task 0 released its point", slurm, logs, timeout=60)
    _wait(lambda: mid_trial("1"), "task 1 is mid-trial", slurm, logs)
    _run("scancel", "--signal=USR1", "--batch", f"{screening}_1", env=slurm)  # time limit near
    _wait(lambda: released("1"), "task 1 released its point", slurm, logs, timeout=60)
    _wait(lambda: (f"{screening}_1", "PENDING") in _squeue(slurm), "task 1 is requeued", slurm,
          logs, timeout=60)
    # Slurm holds a requeued job back for two minutes; an administrator may start it sooner. Not
    # at once: a run that starts within milliseconds of the requeue can be taken for the first
    # run's end (seen with Slurm 22.05), so 5 s from now.
    _run("scontrol", "update", f"JobId={screening}_1", "StartTime=now+5", env=slurm)
    _wait(lambda: not _squeue(slurm), "every job ended", slurm, logs, timeout=600)
    elapsed = time.time() - started

    config = load_config(study)
    trials = optuna.load_study(study_name=name, storage=PG_URL).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["config_id"] for t in complete) == list(range(72))
    assert len({tuple(t.params[k] for k in GRID_KEYS) for t in complete}) == 72
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # a released point resumed from the checkpoint of its last finished epoch (or a later one)
    released_trials = [t for t in trials if t.user_attrs.get("error", "").startswith("released")
                       and t.intermediate_values]
    assert len(released_trials) >= 2, [t.user_attrs for t in trials if t.state != TrialState.COMPLETE]
    for gone in released_trials:
        done = next(t for t in complete if t.user_attrs["config_id"] == gone.user_attrs["config_id"])
        assert done.user_attrs["resumed_from_epoch"] >= max(gone.intermediate_values)
    assert any("requeueing task" in p.read_text() for p in logs.glob("c5snn-workers-*_1.out"))
    promote = optuna.load_study(study_name=name + "-promote", storage=PG_URL).trials
    assert len(promote) == 15 and {t.state for t in promote} == {TrialState.COMPLETE}
    results = tmp_path / "results"
    assert len((results / "phase_c_sweep.csv").read_text().splitlines()) == 73
    report = json.loads((results / "phase_c_top5.json").read_text())
    assert len(report["models"]) == config.top_k
    assert (results / "phase_c_best" / "best_model.pt").is_file()
    print(f"slurm sweep: {elapsed:.0f} s from submit.sh to the last job")


def test_postgres_in_a_job_serves_the_workers(slurm, tmp_path, synthetic_csv):
    """postgres.sbatch starts PostgreSQL in a job and writes its URL where the templates read it;
    scancel stops it and removes the file. Run as the postgres user: PostgreSQL refuses root."""
    user = "postgres"
    try:
        pwd.getpwnam(user)
    except KeyError:
        pytest.skip("no 'postgres' user to run the job as")
    shared = Path(tempfile.mkdtemp(prefix="c5snn-pgjob-"))  # pytest's folders are root's alone
    shared.chmod(0o777)
    url_file, data = shared / "postgres.url", shared / "pgdata"
    env = {**slurm, "C5SNN_HOME": str(ROOT), "C5SNN_PG_URL_FILE": str(url_file),
           "C5SNN_PG_DATA": str(data), "C5SNN_SLURM_DIR": str(SLURM), "C5SNN_STORAGE": ""}
    job = _run("sbatch", "--parsable", "--export=ALL", f"--uid={user}", f"--chdir={shared}",
               f"--output={shared}/pg-%j.out", str(SLURM / "postgres.sbatch"), env=env).stdout.strip()
    try:
        _wait(lambda: url_file.exists() or not _squeue(slurm), "the job wrote its URL", slurm,
              shared, timeout=120)
        assert url_file.exists(), (shared / f"pg-{job}.out").read_text()
        assert oct(url_file.stat().st_mode & 0o777) == "0o600"
        url = url_file.read_text().strip()
        assert url.startswith("postgresql+psycopg://c5snn:") and "@" in url
        study = write_study(tmp_path / "study.yaml", study_dict(synthetic_csv, name="in-a-job"))
        # a template's view: no C5SNN_STORAGE, the URL from the file (common.sh)
        read = _run("bash", "-c", f"source {SLURM}/common.sh && echo \"$C5SNN_STORAGE\"", env=env)
        assert read.stdout.strip() == url
        created = run_cli("study", "create", "--config", str(study), env={"C5SNN_STORAGE": url})
        assert created.returncode == 0 and "created study 'in-a-job'" in created.stdout, created.stderr
        _run("scancel", job, env=slurm)
        _wait(lambda: not url_file.exists(), "the stopped job removed its URL", slurm, shared,
              timeout=60)
    finally:
        _run("scancel", job, env=slurm, check=False)
        shutil.rmtree(shared, ignore_errors=True)
