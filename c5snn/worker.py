"""Workers: pull points from the phases of one study file, train them, record them.

A worker loops: claim a point (INSERT its next attempt into the claim table, `c5snn.storage`),
then run one `Attempt` through its lifecycle -- open its Optuna trial, hold the lease with a
heartbeat thread while `c5snn.train.train_run` trains (resuming from the point's checkpoint),
report each epoch's val recall@20, and finish the trial (or release it on SIGTERM). Exactly once
holds because a point is only trained under a claim the database granted to one worker;
GridSampler is the screening study's sampler (so Optuna tools recognise the grid) but never picks.
"""

from __future__ import annotations

import enum
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from c5snn import kernels
from c5snn.artifacts import (
    DASHBOARD_FILES,
    DEFAULT_ARTIFACTS,
    OPTUNA_ARTIFACTS,
    optuna_artifact_store,
    point_dir,
    relative_to_root,
    write_run_dir,
)
from c5snn.config import GRID_KEYS, StudyConfig, snapshot
from c5snn.dashboard import write_note
from c5snn.data import WindowData, prepare
from c5snn.errors import (
    EnvironmentFault,
    StorageError,
    TrainingInterrupted,
    first_line,
)
from c5snn.files import atomic_path
from c5snn.lease import Timing
from c5snn.reaper import HEARTBEAT_LOST, reap
from c5snn.runtime import check_device, environment_fault, tune_cpu_allocator
from c5snn.storage import Claim, ClaimState, Store
from c5snn.studies import PROMOTE, Phase, Point, open_screening, phases, point_states
from c5snn.train import EpochRecord, RunResult, train_run

# SIGTERM (scancel, preemption, Kubernetes, docker stop), Ctrl-C, and SIGUSR1: Slurm's warning
# before a time limit, which reaches every process of a job under --signal=USR1@<seconds>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MIN_FREE_BYTES = 256 << 20  # checkpoints and run directories are a few MB per point


class Outcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"  # training raised: the attempt counts toward max_attempts
    RELEASED = "released"  # stopped on request: the point resumes elsewhere
    LOST = "lost"  # the lease was taken over: another worker owns the point now (trial FAILed)


class StopFlag:
    """Set by STOP_SIGNALS: the worker checkpoints, releases its trial and exits 0."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda *_: self.event.set())
        return self

    def __call__(self) -> bool:
        return self.event.is_set()


class Heartbeat:
    """Refreshes a claim's lease from a background thread; `lost` turns True if it is taken."""

    def __init__(self, store: Store, claim: Claim, interval_s: float):
        self.store, self.claim, self.interval_s = store, claim, interval_s
        self.epoch = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="c5snn-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.beat(self.claim, self.epoch):
                    self.lost = True
                    return
            except StorageError:
                continue  # the database is briefly away; the grace period covers it

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def distributions(config: StudyConfig) -> dict[str, CategoricalDistribution]:
    return {k: CategoricalDistribution(list(config.grid[k])) for k in GRID_KEYS}


class Attempt:
    """One attempt at one point: open its trial, run it under a lease, finish or release it."""

    def __init__(self, worker: Worker, phase: Phase, claim: Claim, point: Point):
        self.worker, self.phase, self.claim, self.point = worker, phase, claim, point
        self.params = worker.config.model_params(point.params)
        self.label = f"spiking_transformer {self.params.describe()}"
        if phase.kind == PROMOTE:
            self.label += f" seed={point.seed}"
        self.trial_id = self.number = -1
        self.dir = point_dir(worker.artifacts, phase.study, point.index)

    @property
    def store(self) -> Store:
        return self.worker.store

    def echo(self, line: str) -> None:
        self.worker.echo(line)

    def open(self) -> bool:
        """Create the RUNNING Optuna trial with the point's params and tie it to the claim;
        False when the lease was already lost (the caller then gives the trial up, `lost`)."""
        w, point = self.worker, self.point
        user_attrs = {"config_id": point.config_id, "seed": point.seed, "claim": self.claim.id,
                      "attempt": self.claim.attempt, "worker": w.name, "host": w.host,
                      "device": w.device,
                      "backend": kernels.describe(w.device, w.config.training.lif_kernel)}
        if point.screening_trial is not None:
            user_attrs["screening_trial"] = point.screening_trial
        self.trial_id, self.number = self.store.create_trial(
            self.store.study_id(self.phase.study), point.params, distributions(w.config),
            user_attrs=user_attrs)
        if self.store.attach_trial(self.claim, self.trial_id, self.number) != ClaimState.RUNNING:
            return False  # reaped before the trial was recorded (a frozen worker): not ours
        if self.phase.kind == PROMOTE:
            self.store.call(lambda: write_note(
                optuna.Trial(w.study(self.phase.study), self.trial_id),
                f"config_id {point.config_id}: `{self.label}`, promoted from screening "
                f"trial {point.screening_trial}, seed {point.seed}, scored on **test**"))
        self.echo(f"start trial {self.number} point {point.index}: {self.label}")
        return True

    def run(self) -> Outcome:
        """Train under a heartbeat-kept lease; report each epoch; finish, fail or release."""
        w = self.worker
        with Heartbeat(self.store, self.claim, w.timing.heartbeat_s) as beat:

            def report(record: EpochRecord) -> None:
                try:
                    self.store.report(self.trial_id, record.epoch, record.val["recall_at_20"])
                except UpdateFinishedTrialError:  # a reaper failed the trial (a frozen worker)
                    beat.lost = True
                    raise TrainingInterrupted("the lease was lost") from None
                beat.epoch = record.epoch
                if not record.replayed:
                    self.echo(record.line(w.config.training.epochs))

            try:
                result = w.train_fn(
                    self.params, w.config.training, w.data, seed=self.point.seed,
                    evaluate_test=self.point.evaluate_test, on_epoch=report,
                    checkpoint_path=self.dir / "checkpoint.pt",
                    should_stop=lambda: w.stop() or beat.lost,
                    on_checkpoint_discarded=lambda why: self.echo(
                        f"trial {self.number} point {self.point.index}: checkpoint {why}"),
                    on_backend_change=lambda what: self.echo(
                        f"trial {self.number} point {self.point.index}: {what}"),
                )
                return self.finish(result)
            except TrainingInterrupted as exc:
                return self.lost() if beat.lost else self.release(str(exc))
            except StorageError:
                raise  # the database stayed away past the tolerance: the worker's fault, not the point's
            except Exception as exc:
                error = f"{type(exc).__name__}: {first_line(exc)}"
                if environment_fault(exc):  # disk, data, device: every point would fail alike
                    self.release(f"environment: {error}")
                    raise EnvironmentFault(
                        f"worker {w.name} stopped: {error}; point {self.point.index} was released "
                        "for another worker (no attempt counted)") from None
                return self.fail(error)  # the trial's own: a NaN loss, a bug, CUDA OOM

    def fail(self, error: str) -> Outcome:
        self.store.finish_trial(self.trial_id, TrialState.FAIL, user_attrs={"error": error})
        self.store.finish(self.claim, ClaimState.FAILED, error)
        self.echo(f"trial {self.number} point {self.point.index} FAILED: {error}")
        return Outcome.FAILED

    def lost(self) -> Outcome:
        """The lease was taken over: FAIL the trial unless the reaper already did (a reaper that
        took the lease before the trial was recorded on the claim could not find it)."""
        self.store.finish_trial(self.trial_id, TrialState.FAIL,
                                user_attrs={"error": HEARTBEAT_LOST})
        self.echo(f"trial {self.number}: lease lost to another worker; abandoning it")
        return Outcome.LOST

    def release(self, why: str) -> Outcome:
        self.store.finish_trial(self.trial_id, TrialState.FAIL,
                                user_attrs={"error": f"released: {why}"})
        self.store.finish(self.claim, ClaimState.RELEASED, f"released: {why}")
        self.echo(f"trial {self.number} released ({why})")
        return Outcome.RELEASED

    def upload(self, run_dir: Path) -> None:
        """The run's files as the trial's Optuna artifacts, which optuna-dashboard lists and
        downloads (while the trial is RUNNING: Optuna refuses attrs on a finished trial)."""
        artifact_store = optuna_artifact_store(self.worker.artifacts)
        (self.worker.artifacts / OPTUNA_ARTIFACTS).mkdir(exist_ok=True)
        trial = self.store.call(lambda: optuna.Trial(self.worker.study(self.phase.study),
                                                     self.trial_id))
        for name in DASHBOARD_FILES:
            try:
                self.store.call(lambda name=name: optuna.artifacts.upload_artifact(
                    artifact_store=artifact_store, file_path=str(run_dir / name),
                    study_or_trial=trial))
            except UpdateFinishedTrialError:
                return  # a reaper failed the trial meanwhile: finish() finds the lease lost

    def finish(self, result: RunResult) -> Outcome:
        """COMPLETE the trial with its value and facts (compare-and-set: not if reaped meanwhile)."""
        attrs = {
            "val_recall_at_20": result.val["recall_at_20"],
            "val_hit_at_20": result.val["hit_at_20"],
            "val_mrr": result.val["mrr"],
            "val_metrics": result.val,
            "training_time_s": round(result.training_time_s, 3),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "spike_rate": [round(r, 6) for r in result.spike_rate],
            "silent": bool(result.spike_rate and result.spike_rate[-1] == 0.0),
        }
        if result.resumed_from_epoch is not None:
            attrs["resumed_from_epoch"] = result.resumed_from_epoch
        if result.discarded_checkpoint is not None:
            attrs["checkpoint_discarded"] = result.discarded_checkpoint
        if result.backend_changes:
            attrs["resumed_on_other_backend"] = result.backend_changes
        if result.test is not None:
            attrs["test_metrics"] = result.test
            run_dir = write_run_dir(self.dir / "run", result, snapshot(
                self.worker.config, self.params, self.point.seed, result.backend))
            attrs["run_dir"] = relative_to_root(self.worker.artifacts, run_dir)
            attrs["artifacts_root"] = str(self.worker.artifacts)  # where this worker mounts it
            self.upload(run_dir)
        value = result.test["recall_at_20"] if self.point.evaluate_test else result.val["recall_at_20"]
        if not self.store.beat(self.claim, result.epochs_run):
            return self.lost()  # taken over (e.g. during a long outage): write no result
        if not self.store.finish_trial(self.trial_id, TrialState.COMPLETE, value, attrs):
            return self.lost()  # a reaper failed it meanwhile; its point runs again elsewhere
        self.store.finish(self.claim, ClaimState.DONE)
        n_done = sum(s.done for s in point_states(self.store.attempts(self.phase.study),
                                                  len(self.phase.points)))
        silent = " [silent: last block never fires]" if attrs["silent"] else ""
        self.echo(f"[{n_done}/{len(self.phase.points)}] {self.label} -> {self.phase.metric}="
                  f"{value:.4f} ({result.training_time_s:.1f}s){silent}")
        return Outcome.DONE


class Worker:
    """Pulls points from the phases of one study file until none is left to claim."""

    def __init__(
        self,
        config: StudyConfig,
        store: Store,
        *,
        name: str,
        device: str = "cpu",
        artifacts: Path = DEFAULT_ARTIFACTS,
        timing: Timing = Timing(),
        echo: Callable[[str], None] = print,
        stop: Callable[[], bool] = lambda: False,
        train_fn: Callable[..., RunResult] = train_run,
    ):
        """`train_fn` is `train_run`; the coordination benchmark swaps in a ~0 s stub."""
        self.config, self.store, self.name, self.device = config, store, name, device
        self.artifacts, self.timing, self.echo, self.stop = Path(artifacts).absolute(), timing, echo, stop
        self.train_fn = train_fn
        self.host = socket.gethostname()
        self._data: WindowData | None = None
        self._studies: dict[str, optuna.Study] = {}

    @property
    def data(self) -> WindowData:
        if self._data is None:
            self._data = prepare(
                self.config.data_path, self.config.window_size, self.config.split_ratios,
                self.device,
            )
        return self._data

    def study(self, name: str) -> optuna.Study:
        """The Optuna study `name` (call inside `store.call`: it may touch the database)."""
        if name not in self._studies:
            self._studies[name] = optuna.load_study(study_name=name, storage=self.store.optuna)
        return self._studies[name]

    def preflight(self) -> None:
        """What would fail every point, checked before claiming any: the device works, the data
        file reads (and is the study's: open_screening compares its sha256), the artifacts
        folder takes a file and has room to spare. Raises DeviceError / DataError /
        EnvironmentFault, so a misconfigured worker stops instead of burning the study."""
        check_device(self.config.training, self.device)
        if torch.device(self.device).type == "cpu" and self.config.training.lif_kernel == "torch":
            kernels.backend()  # build or load the compiled CPU kernels now, not inside a lease
        self.store.call(lambda: open_screening(self.config, self.store))
        self.data  # noqa: B018 - loads and validates the data file on the device
        try:
            with atomic_path(self.artifacts / f".probe-{self.name}") as probe:
                probe.write_bytes(b"c5snn")
            (self.artifacts / f".probe-{self.name}").unlink()
            free = shutil.disk_usage(self.artifacts).free
        except OSError as exc:
            raise EnvironmentFault(f"artifacts folder {self.artifacts} is not writable "
                                   f"({exc.strerror or exc})") from None
        if free < MIN_FREE_BYTES:
            raise EnvironmentFault(f"artifacts folder {self.artifacts} has {free >> 20} MB free; "
                                   f"a worker needs at least {MIN_FREE_BYTES >> 20} MB")

    def run(self, max_trials: int | None = None) -> int:
        """Train points until none is left (or `max_trials`, or a stop); returns trials run."""
        self.preflight()
        if self.device == "cpu":
            tune_cpu_allocator()
        ran = 0
        while (max_trials is None or ran < max_trials) and not self.stop():
            attempt = self.claim()
            if attempt is None:
                if not self.others_running():
                    break
                self._sleep(self.timing.poll_s)
                continue
            outcome = attempt.run() if attempt.open() else attempt.lost()
            if outcome in (Outcome.RELEASED, Outcome.LOST):
                continue
            ran += 1
        return ran

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop():
            time.sleep(min(0.2, seconds))

    def claim(self) -> Attempt | None:
        """The next attempt this worker won: points with an earlier attempt first (they resume
        from a checkpoint), then in order; None when no point is claimable."""
        for phase in self.store.call(lambda: phases(self.config, self.store)):
            rows = self.store.attempts(phase.study)
            if self._may_reap():
                fixes = reap(self.store, phase.study, self.timing.grace_s, rows)
                for fix in fixes:
                    self.echo(f"reaped: {fix}")
                if fixes:
                    rows = self.store.attempts(phase.study)
            states = point_states(rows, len(phase.points))
            order = sorted(range(len(states)), key=lambda i: (states[i].last_attempt == 0, i))
            for i in order:
                if not states[i].claimable(self.timing.budget):
                    continue
                claim = self.store.try_claim(
                    phase.study, i, states[i].last_attempt + 1, worker=self.name, host=self.host,
                    device=self.device,
                )
                if claim is not None:
                    return Attempt(self, phase, claim, phase.points[i])
        return None

    def _may_reap(self) -> bool:
        """Not within a grace period after this worker's own database outage: every worker's
        heartbeats aged through it alike, and their owners are only now writing again."""
        end = self.store.last_outage_end
        return end is None or time.monotonic() - end > self.timing.grace_s

    def others_running(self) -> bool:
        """Whether any point is still held by a live worker (it might die and need a retry)."""
        return any(r.state == ClaimState.RUNNING
                   for phase in self.store.call(lambda: phases(self.config, self.store))
                   for r in self.store.attempts(phase.study))
