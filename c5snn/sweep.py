"""The sweep service: studies, phases and the worker loop.

A *phase* is one Optuna study whose trials are a fixed list of points: screening (every grid
point, the screening seed, scored on val) and promote (top-K configurations x seeds, scored on
test). Workers pull points from the phases in order through the claim table
(`c5snn.storage`), train each with `c5snn.train.train_run`, report per-epoch val recall@20 as
the trial's intermediate values, and complete the trial. Exactly once holds because a point is
only trained under a claim the database granted to one worker; GridSampler is the study's
sampler (so optuna tools recognise the grid) but never picks points itself.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from c5snn.artifacts import write_run_dir
from c5snn.config import GRID_KEYS, StudyConfig, snapshot
from c5snn.dashboard import write_note
from c5snn.data import WindowData, prepare
from c5snn.errors import NotReadyError, StorageError, StudyMismatchError, TrainingInterrupted
from c5snn.runs import epoch_line
from c5snn.runtime import check_device, tune_cpu_allocator
from c5snn.storage import Claim, ClaimRow, Store
from c5snn.train import EpochRecord, RunResult, train_run

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROMOTE_SUFFIX = "-promote"
SCREENING_METRIC = "val_recall_at_20"  # the objective's name in Optuna and optuna-dashboard
PROMOTE_METRIC = "test_recall_at_20"
DEFAULT_ARTIFACTS = Path("storage/artifacts")


@dataclass(frozen=True)
class Point:
    """One unit of work: a grid point trained with one seed."""

    index: int  # position within its phase: the claim key
    config_id: int
    params: dict
    seed: int
    evaluate_test: bool
    screening_trial: int | None = None  # promote points: the screening trial they came from


@dataclass(frozen=True)
class Phase:
    study: str
    kind: str  # "screening" or "promote"
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Timing:
    """Lease settings: how often a worker beats, how long silence means death."""

    heartbeat_s: float = 15.0
    grace_s: float = 180.0
    poll_s: float = 5.0
    max_attempts: int = 3  # failed or stale attempts before a point is given up


def distributions(config: StudyConfig) -> dict[str, CategoricalDistribution]:
    return {k: CategoricalDistribution(list(config.grid[k])) for k in GRID_KEYS}


def grid_id(config: StudyConfig, params: dict) -> int:
    """GridSampler's index of a point (its grid is the product over sorted parameter names)."""
    names = sorted(GRID_KEYS)
    grids = list(itertools.product(*(config.grid[k] for k in names)))
    return grids.index(tuple(params[k] for k in names))


def screening_phase(config: StudyConfig) -> Phase:
    points = tuple(
        Point(i, i, p, config.screening_seed, evaluate_test=False)
        for i, p in enumerate(config.grid_points())
    )
    return Phase(config.name, "screening", points)


def set_metric_name(study: optuna.Study, name: str) -> None:
    """Name the objective, so optuna-dashboard's charts say what they plot ("Objective 0" else).
    `Study.set_metric_names` is public but flagged experimental; its warning says nothing here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([name])


def promote_study_name(config: StudyConfig) -> str:
    return config.name + PROMOTE_SUFFIX


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(study: optuna.Study, config: StudyConfig) -> None:
    stored = study.user_attrs.get("c5snn_hash")
    if stored != config.content_hash:
        raise StudyMismatchError(
            f"study '{study.study_name}' in storage was created from a different study file "
            f"(stored hash {stored}, {config.source} has {config.content_hash}); "
            f"use a new study.name in {config.source} or restore the original file"
        )


def create_study(config: StudyConfig, store: Store) -> tuple[optuna.Study, bool]:
    """Create the screening study, or open it when it exists; returns (study, created).

    The data file is validated before the database is touched, so bad data writes nothing.
    """
    prepare(config.data_path, config.window_size, config.split_ratios)  # raises DataError
    try:
        study = optuna.load_study(study_name=config.name, storage=store.optuna)
        _check_hash(study, config)
        return study, False
    except KeyError:
        pass
    space = {k: list(config.grid[k]) for k in GRID_KEYS}
    study = optuna.create_study(
        study_name=config.name,
        storage=store.optuna,
        sampler=optuna.samplers.GridSampler(space),
        direction="maximize",
        load_if_exists=True,
    )
    if "c5snn_hash" not in study.user_attrs:
        set_metric_name(study, SCREENING_METRIC)  # optuna-dashboard labels its charts with it
        attrs = {
            "c5snn_hash": config.content_hash,
            "kind": "screening",
            "study_file": str(config.source),
            "window_size": config.window_size,
            "split_ratios": list(config.split_ratios),
            "grid": space,
            "n_points": config.n_points,
            "data_path": str(config.data_path),
            "data_sha256": file_sha256(config.data_path),
            "objective": f"val_recall_at_20 of the best epoch (seed {config.screening_seed})",
            "created": time.time(),
        }
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        write_note(study, (
            f"**c5snn screening study** from `{config.source}` (hash `{config.content_hash}`)\n\n"
            f"- grid: {space} ({config.n_points} points, `config_id` in product order)\n"
            f"- window {config.window_size}, splits {list(config.split_ratios)}, "
            f"seed {config.screening_seed}\n"
            f"- data `{config.data_path}` sha256 `{attrs['data_sha256'][:16]}...`\n"
            "- objective: val recall@20 of the best epoch; intermediate values: val recall@20 "
            "per epoch"
        ))
    _check_hash(study, config)
    return study, True


def load_study(store: Store, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=store.optuna)
    except KeyError:
        raise NotReadyError(
            f"study '{name}' does not exist in {store.masked}; run `c5snn study create` first"
        ) from None


def open_screening(config: StudyConfig, store: Store) -> optuna.Study:
    study = load_study(store, config.name)
    _check_hash(study, config)
    return study


def promote_phase(config: StudyConfig, store: Store) -> Phase | None:
    """The promote phase when `c5snn promote` created it, else None."""
    try:
        study = optuna.load_study(study_name=promote_study_name(config), storage=store.optuna)
    except KeyError:
        return None
    stored = study.user_attrs.get("points")
    if stored is None:  # being created by `c5snn promote` right now
        return None
    points = tuple(
        Point(i, p["config_id"], p["params"], p["seed"], evaluate_test=True,
              screening_trial=p["screening_trial"])
        for i, p in enumerate(stored)
    )
    return Phase(study.study_name, "promote", points)


def phases(config: StudyConfig, store: Store) -> list[Phase]:
    promote = promote_phase(config, store)
    return [screening_phase(config)] + ([promote] if promote else [])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def safe_name(study: str) -> str:
    """A filesystem-safe folder name for a study name (hostile names included)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", study)[:60].strip(".") or "study"
    return f"{slug}-{hashlib.sha256(study.encode()).hexdigest()[:8]}"


def point_dir(artifacts: Path, study: str, point: int) -> Path:
    return artifacts / safe_name(study) / f"point-{point:03d}"


@dataclass
class PointState:
    done: bool = False
    running: bool = False
    failures: int = 0
    last_attempt: int = 0
    errors: list[str] = field(default_factory=list)


def point_states(rows: list[ClaimRow], n_points: int) -> list[PointState]:
    states = [PointState() for _ in range(n_points)]
    for row in rows:
        s = states[row.point]
        s.last_attempt = max(s.last_attempt, row.attempt)
        if row.state == "done":
            s.done = True
        elif row.state == "running":
            s.running = True
        elif row.state in ("failed", "stale"):
            s.failures += 1
            if row.error:
                s.errors.append(row.error)
    return states


def reap(
    store: Store, study_name: str, grace_s: float, rows: list[ClaimRow] | None = None
) -> list[ClaimRow]:
    """Fail the Optuna trials of claims whose worker stopped beating; returns those reaped.

    `rows` is the study's attempts when the caller has just read them.
    """
    reaped = store.mark_stale(study_name, grace_s, rows)
    if not reaped:
        return []
    study = load_study(store, study_name)
    for row in reaped:
        if row.trial_id is None:
            continue
        if store.finish_trial(row.trial_id, TrialState.FAIL, user_attrs={"error": "heartbeat lost"}):
            continue
        if study._storage.get_trial(row.trial_id).state == TrialState.COMPLETE:
            # it finished just as the lease ran out
            store.finish(Claim(row.id, study_name, row.point, row.attempt), "done",
                         from_state="stale")
    return reaped


@dataclass(frozen=True)
class RunningTrial:
    """The Optuna trial a worker is training (written through `Store`, not `optuna.Trial`)."""

    trial_id: int
    number: int


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


class StopFlag:
    """Set by SIGTERM/SIGINT: the worker checkpoints, releases its trial and exits 0."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        return self

    def __call__(self) -> bool:
        return self.event.is_set()


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
        self.artifacts, self.timing, self.echo, self.stop = artifacts, timing, echo, stop
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

    def _study(self, name: str) -> optuna.Study:
        if name not in self._studies:
            self._studies[name] = load_study(self.store, name)
        return self._studies[name]

    def run(self, max_trials: int | None = None) -> int:
        """Train points until none is left (or `max_trials`, or a stop); returns trials run."""
        check_device(self.config.training, self.device)  # before claiming anything
        open_screening(self.config, self.store)
        if self.device == "cpu":
            tune_cpu_allocator()
        ran = 0
        while (max_trials is None or ran < max_trials) and not self.stop():
            claimed = self._claim()
            if claimed is None:
                if not self._others_running():
                    break
                self._sleep(self.timing.poll_s)
                continue
            outcome = self._run_point(*claimed)  # done | failed | released | lost
            if outcome in ("released", "lost"):
                if self.stop():
                    break
                continue
            ran += 1
        return ran

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop():
            time.sleep(min(0.2, seconds))

    def _claim(self) -> tuple[Phase, Claim, Point] | None:
        for phase in phases(self.config, self.store):
            rows = self.store.attempts(phase.study)
            if reap(self.store, phase.study, self.timing.grace_s, rows):
                rows = self.store.attempts(phase.study)
            states = point_states(rows, len(phase.points))
            # points with an earlier attempt first: they resume from a checkpoint
            order = sorted(range(len(states)), key=lambda i: (states[i].last_attempt == 0, i))
            for i in order:
                s = states[i]
                if s.done or s.running or s.failures >= self.timing.max_attempts:
                    continue
                claim = self.store.try_claim(
                    phase.study, i, s.last_attempt + 1, worker=self.name, host=self.host,
                    device=self.device,
                )
                if claim is not None:
                    return phase, claim, phase.points[i]
        return None

    def _others_running(self) -> bool:
        """Whether any point is still held by a live worker (it might die and need a retry)."""
        for phase in phases(self.config, self.store):
            if any(r.state == "running" for r in self.store.attempts(phase.study)):
                return True
        return False

    def _run_point(self, phase: Phase, claim: Claim, point: Point) -> str:
        study = self._study(phase.study)
        params = self.config.model_params(point.params)
        user_attrs = {
            "config_id": point.config_id, "seed": point.seed, "attempt": claim.attempt,
            "worker": self.name, "host": self.host, "device": self.device,
        }
        if point.screening_trial is not None:
            user_attrs["screening_trial"] = point.screening_trial
        system_attrs = {}
        if phase.kind == "screening":
            system_attrs = {"grid_id": grid_id(self.config, point.params),
                            "search_space": {k: list(self.config.grid[k]) for k in GRID_KEYS}}
        trial_id, number = self.store.create_trial(
            study._study_id, point.params, distributions(self.config),
            user_attrs=user_attrs, system_attrs=system_attrs,
        )
        trial = RunningTrial(trial_id, number)
        self.store.attach_trial(claim, trial_id, number)
        label = f"spiking_transformer {params.describe()}"
        if phase.kind == "promote":
            label += f" seed={point.seed}"
            write_note(optuna.Trial(study, trial_id),
                       f"config_id {point.config_id}: `{label}`, promoted from screening "
                       f"trial {point.screening_trial}, seed {point.seed}, scored on **test**")
        self.echo(f"start trial {number} point {point.index}: {label}")

        pdir = point_dir(self.artifacts, phase.study, point.index)
        with Heartbeat(self.store, claim, self.timing.heartbeat_s) as beat:

            def on_epoch(record: EpochRecord) -> None:
                self.store.report(trial_id, record.epoch, record.val["recall_at_20"])
                beat.epoch = record.epoch
                if not record.replayed:
                    self.echo(epoch_line(record, self.config.training.epochs))

            try:
                result = self.train_fn(
                    params, self.config.training, self.data, seed=point.seed,
                    evaluate_test=point.evaluate_test, on_epoch=on_epoch,
                    checkpoint_path=pdir / "checkpoint.pt",
                    should_stop=lambda: self.stop() or beat.lost,
                )
            except TrainingInterrupted as exc:
                return self._interrupted(trial, claim, beat.lost, str(exc))
            except Exception as exc:  # a bug or CUDA OOM: FAIL this trial, keep the worker
                error = f"{type(exc).__name__}: {first_line(exc)}"
                self.store.finish_trial(trial_id, TrialState.FAIL, user_attrs={"error": error})
                self.store.finish(claim, "failed", error)
                self.echo(f"trial {trial.number} point {point.index} FAILED: {error}")
                return "failed"
        return self._complete(phase, trial, claim, point, result, pdir)

    def _interrupted(self, trial: RunningTrial, claim, lost: bool, why: str) -> str:
        if lost:
            self.echo(f"trial {trial.number}: lease lost to another worker; abandoning it")
            return "lost"
        self.store.finish_trial(trial.trial_id, TrialState.FAIL,
                                user_attrs={"error": f"released: {why}"})
        self.store.finish(claim, "released", f"released: {why}")
        self.echo(f"trial {trial.number} released ({why})")
        return "released"

    def _complete(self, phase, trial: RunningTrial, claim, point, result: RunResult, pdir: Path) -> str:
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
        if result.test is not None:
            attrs["test_metrics"] = result.test
        if phase.kind == "promote":
            run_dir = write_run_dir(pdir / "run", result,
                                    snapshot(self.config, self.config.model_params(point.params),
                                             point.seed))
            torch.save(result.test_logits, run_dir / "test_logits.pt")
            attrs["run_dir"] = str(run_dir)
        value = result.test["recall_at_20"] if phase.kind == "promote" else result.val["recall_at_20"]
        if not self.store.finish_trial(trial.trial_id, TrialState.COMPLETE, value, attrs):
            return "lost"  # a reaper failed it meanwhile; its point runs again elsewhere
        self.store.finish(claim, "done")
        n_done = sum(s.done for s in point_states(self.store.attempts(phase.study), len(phase.points)))
        params = self.config.model_params(point.params)
        metric = "test_recall@20" if phase.kind == "promote" else "val_recall@20"
        seed = f" seed={point.seed}" if phase.kind == "promote" else ""
        silent = " [silent: last block never fires]" if attrs["silent"] else ""
        self.echo(
            f"[{n_done}/{len(phase.points)}] spiking_transformer {params.describe()}{seed} -> "
            f"{metric}={value:.4f} ({result.training_time_s:.1f}s){silent}"
        )
        return "done"
