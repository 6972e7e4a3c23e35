"""The read side of a sweep: its Optuna studies, their phases and points, and where they stand.

A *phase* is one Optuna study whose trials are a fixed list of points: screening (every grid
point, the screening seed, scored on val) and promote (top-K configurations x seeds, scored on
test; created by `c5snn.promote`). `SweepState.read` takes one snapshot of both phases (claims and
trials) for a command (`status`, `promote`, `export`, `plots`, the one-shot); workers
(`c5snn.worker`) use the same `point_states` on the claim table alone. Nothing here trains.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from c5snn.artifacts import find_run_dir
from c5snn.config import GRID_KEYS, StudyConfig, definition_changes, load_config
from c5snn.dashboard import write_note
from c5snn.data import prepare
from c5snn.errors import NotReadyError, StudyMismatchError
from c5snn.lease import Budget
from c5snn.storage import ClaimRow, ClaimState, Store

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROMOTE_SUFFIX = "-promote"
SCREENING_METRIC = "val_recall_at_20"  # the objective's name in Optuna and optuna-dashboard
PROMOTE_METRIC = "test_recall_at_20"
SCREENING, PROMOTE = "screening", "promote"


@dataclass(frozen=True)
class Point:
    """One unit of work: a grid point trained with one seed."""

    index: int  # position within its phase: the claim key (the config_id in screening)
    config_id: int
    params: dict
    seed: int
    screening_trial: int | None = None  # promote points: the screening trial they came from

    @property
    def evaluate_test(self) -> bool:
        """Promote points are scored on test; screening never touches it."""
        return self.screening_trial is not None


@dataclass(frozen=True)
class Phase:
    study: str
    kind: str  # SCREENING or PROMOTE
    points: tuple[Point, ...]

    @property
    def metric(self) -> str:
        return PROMOTE_METRIC if self.kind == PROMOTE else SCREENING_METRIC


def promote_study_name(config: StudyConfig) -> str:
    return config.name + PROMOTE_SUFFIX


def screening_phase(config: StudyConfig) -> Phase:
    points = tuple(Point(i, i, p, config.screening_seed) for i, p in enumerate(config.grid_points()))
    return Phase(config.name, SCREENING, points)


def _load(store: Store, name: str) -> optuna.Study | None:
    """The Optuna study `name`, or None; never creates a database to find out."""
    if not store.exists():
        return None
    try:
        return store.call(lambda: optuna.load_study(study_name=name, storage=store.optuna))
    except KeyError:
        return None


def open_study(store: Store, name: str) -> optuna.Study:
    """An existing Optuna study, or NotReadyError naming it."""
    study = _load(store, name)
    if study is not None:
        return study
    raise NotReadyError(
        f"study '{name}' does not exist in {store.masked}; run `c5snn study create` first")


def _check_hash(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse a study file (with its overrides) that would change the study's results, naming
    each differing setting with the study's value and this command's."""
    stored = study.user_attrs.get("c5snn_hash")
    if stored == config.content_hash:
        return
    changes = definition_changes(study.user_attrs.get("definition", {}), config.definition)
    named = "; ".join(f"{key} is {now!r} here but {then!r} in the study"
                      for key, then, now in changes[:3]) or f"hash {stored} vs {config.content_hash}"
    raise StudyMismatchError(
        f"study '{study.study_name}' was created with other settings: {named} "
        f"({config.source}); restore them, or use a new study.name"
    )


def with_stored_overrides(config: StudyConfig, store: Store) -> StudyConfig:
    """`config` with the --set overrides its study was created with applied first (this
    command's own overrides after them), so later commands need not repeat them."""
    study = _load(store, config.name)
    stored = list(study.user_attrs.get("overrides", [])) if study is not None else []
    if not stored:
        return config
    own = [a for a in config.overrides if a not in stored]
    return load_config(config.source, [*stored, *own])


def open_screening(config: StudyConfig, store: Store) -> optuna.Study:
    study = open_study(store, config.name)
    _check_hash(study, config)
    return study


def describe_study(study: optuna.Study, metric: str, attrs: dict, note: str) -> None:
    """What a new study says of itself: its objective's name (so optuna-dashboard's charts say
    what they plot, not "Objective 0"), its facts as user attrs (with the creation time) and a
    readable note. `Study.set_metric_names` is public but flagged experimental: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])
    for key, value in {**attrs, "created": time.time()}.items():
        study.set_user_attr(key, value)
    write_note(study, note)


def create_screening(config: StudyConfig, store: Store) -> tuple[optuna.Study, bool]:
    """Create the screening study, or open it when it exists; returns (study, created).

    The data file is validated before the database is touched, so bad data writes nothing.
    """
    config.check_top_k()
    prepare(config.data_path, config.window_size, config.split_ratios)  # raises DataError
    try:
        return open_screening(config, store), False
    except NotReadyError:
        pass
    space = {k: list(config.grid[k]) for k in GRID_KEYS}
    study = store.call(lambda: optuna.create_study(
        study_name=config.name,
        storage=store.optuna,
        sampler=optuna.samplers.GridSampler(space),
        direction="maximize",
        load_if_exists=True,
    ))
    if "c5snn_hash" not in study.user_attrs:
        attrs = {
            "c5snn_hash": config.content_hash,
            "definition": config.definition,
            "overrides": list(config.overrides),
            "kind": SCREENING,
            "study_file": str(config.source),
            "window_size": config.window_size,
            "split_ratios": list(config.split_ratios),
            "grid": space,
            "n_points": config.n_points,
            "data_path": str(config.data_path),
            "data_sha256": config.definition["data"]["sha256"],
            "objective": f"val_recall_at_20 of the best epoch (seed {config.screening_seed})",
        }
        store.call(lambda: describe_study(study, SCREENING_METRIC, attrs, (
            f"**c5snn screening study** from `{config.source}` (hash `{config.content_hash}`)\n\n"
            f"- grid: {space} ({config.n_points} points, `config_id` in product order)\n"
            f"- window {config.window_size}, splits {list(config.split_ratios)}, "
            f"seed {config.screening_seed}\n"
            f"- data `{config.data_path}` sha256 `{attrs['data_sha256'][:16]}...`\n"
            "- objective: val recall@20 of the best epoch; intermediate values: val recall@20 "
            "per epoch"
        )))
    _check_hash(study, config)
    return study, True


def _promote_study(config: StudyConfig, store: Store) -> optuna.Study | None:
    return _load(store, promote_study_name(config))


def promote_phase(config: StudyConfig, store: Store) -> Phase | None:
    """The promote phase when `c5snn promote` created it, else None."""
    study = _promote_study(config, store)
    return _promote_phase_of(study) if study is not None else None


def _promote_phase_of(study: optuna.Study) -> Phase | None:
    stored = study.user_attrs.get("points")
    if stored is None:  # being created by `c5snn promote` right now
        return None
    points = tuple(Point(i, p["config_id"], p["params"], p["seed"], p["screening_trial"])
                   for i, p in enumerate(stored))
    return Phase(study.study_name, PROMOTE, points)


def phases(config: StudyConfig, store: Store) -> list[Phase]:
    """The phases workers serve, in order: screening, then promote once it exists."""
    promote = promote_phase(config, store)
    return [screening_phase(config)] + ([promote] if promote else [])


@dataclass
class PointState:
    """What the claim table says about one point."""

    done: bool = False
    running: bool = False
    failures: int = 0  # failed attempts: the trial's own fault
    disruptions: int = 0  # stale attempts: its worker died or froze
    last_attempt: int = 0
    errors: list[str] = field(default_factory=list)  # of failed and stale attempts, oldest first

    def given_up(self, budget: Budget) -> bool:
        return not self.done and (self.failures >= budget.max_attempts
                                  or self.disruptions >= budget.max_disruptions)

    def claimable(self, budget: Budget) -> bool:
        return not (self.done or self.running or self.given_up(budget))


def point_states(rows: list[ClaimRow], n_points: int) -> list[PointState]:
    """Per point of a phase, from its attempts (the claim table's rows)."""
    states = [PointState() for _ in range(n_points)]
    for row in rows:
        s = states[row.point]
        s.last_attempt = max(s.last_attempt, row.attempt)
        if row.state == ClaimState.DONE:
            s.done = True
        elif row.state == ClaimState.RUNNING:
            s.running = True
        elif row.state in (ClaimState.FAILED, ClaimState.STALE):
            if row.state == ClaimState.FAILED:
                s.failures += 1
            else:
                s.disruptions += 1
            if row.error:
                s.errors.append(row.error)
    return states


@dataclass(frozen=True)
class PhaseState:
    """One phase as read at one moment: its study, points, attempts and trials."""

    phase: Phase
    study: optuna.Study
    attempts: tuple[ClaimRow, ...]
    trials: tuple[FrozenTrial, ...]
    points: tuple[PointState, ...]
    budget: Budget

    @property
    def n_points(self) -> int:
        return len(self.phase.points)

    @property
    def done(self) -> int:
        return sum(s.done for s in self.points)

    @property
    def running(self) -> list[ClaimRow]:
        return [r for r in self.attempts if r.state == ClaimState.RUNNING]

    @property
    def given_up(self) -> list[int]:
        return [i for i, s in enumerate(self.points) if s.given_up(self.budget)]

    @property
    def complete(self) -> bool:
        return self.done == self.n_points

    @property
    def finished(self) -> bool:
        """No point is left to run: each is done or given up."""
        return all(s.done or s.given_up(self.budget) for s in self.points)

    def complete_trials(self) -> list[FrozenTrial]:
        """COMPLETE trials, ordered by config_id (and seed, in promote)."""
        trials = [t for t in self.trials if t.state == TrialState.COMPLETE]
        return sorted(trials, key=lambda t: (t.user_attrs["config_id"], t.user_attrs["seed"]))

    def require_complete(self, what: str) -> list[FrozenTrial]:
        """The COMPLETE trials, or NotReadyError saying how far the phase is (for `what`)."""
        trials = self.complete_trials()
        if len(trials) < self.n_points:
            raise NotReadyError(
                f"{self.phase.kind} of '{self.phase.study}' has {len(trials)}/{self.n_points} "
                f"points complete; {what} (c5snn status)"
            )
        return trials

    def run_dirs(self, artifacts: Path) -> dict[tuple[int, int], Path]:
        """(config_id, seed) -> the run directory of each point of a complete promote phase under
        `artifacts`, or ArtifactError naming the first point whose files are not there."""
        done = {(t.user_attrs["config_id"], t.user_attrs["seed"]): t
                for t in self.require_complete("run the workers until it finishes")}
        attrs = {key: t.user_attrs for key, t in done.items()}
        return {(p.config_id, p.seed): find_run_dir(
                    artifacts, self.phase.study, p.index, attrs[(p.config_id, p.seed)].get("run_dir"),
                    attrs[(p.config_id, p.seed)].get("artifacts_root"))
                for p in self.phase.points}

    def given_up_summary(self) -> str:
        """'point 3 (3 failed, 0 disrupted): <last error>; ...' for each given-up point."""
        return "; ".join(
            f"point {i} ({self.points[i].failures} failed, {self.points[i].disruptions} "
            f"disrupted): "
            f"{self.points[i].errors[-1] if self.points[i].errors else 'no error recorded'}"
            for i in self.given_up
        )


@dataclass(frozen=True)
class SweepState:
    """Both phases of a sweep, read once per command."""

    screening: PhaseState
    promote: PhaseState | None
    now: float  # the database's clock when this was read (heartbeat ages are on it)

    @property
    def phases(self) -> list[PhaseState]:
        return [self.screening] + ([self.promote] if self.promote else [])

    @classmethod
    def read(cls, config: StudyConfig, store: Store, budget: Budget = Budget()) -> SweepState:
        screening = _read_phase(store, screening_phase(config), open_screening(config, store),
                                budget)
        study = _promote_study(config, store)
        phase = _promote_phase_of(study) if study is not None else None
        promote = _read_phase(store, phase, study, budget) if phase is not None else None
        return cls(screening, promote, store.now())


def _read_phase(store: Store, phase: Phase, study: optuna.Study, budget: Budget) -> PhaseState:
    rows = store.attempts(phase.study)
    return PhaseState(
        phase=phase, study=study, attempts=tuple(rows),
        trials=tuple(store.call(lambda: study.get_trials(deepcopy=False))),
        points=tuple(point_states(rows, len(phase.points))), budget=budget,
    )
