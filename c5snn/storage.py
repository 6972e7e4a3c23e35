"""The one place that talks to the database: Optuna's storage and c5snn's claim table.

Optuna keeps studies, trials, params, intermediate values and attributes; readers use its API,
while a worker writes its trial's lifecycle straight into Optuna's tables, one transaction per
step (`Store.create_trial`, `report`, `finish_trial`; see the note on those tables). Beside them,
c5snn keeps `c5snn_claims`: one row per attempt at one point of one study, with a unique key
(study, point, attempt). A worker claims a point by INSERTing the next attempt's row; when two
workers race for the same attempt the database's unique constraint lets exactly one insert
succeed, in SQLite and PostgreSQL alike. A claim is a lease: its worker refreshes `heartbeat`,
and a row whose heartbeat is older than the grace period is marked stale by a compare-and-set
UPDATE (`WHERE state = 'running' AND heartbeat < cutoff`), after which the point can be claimed
again as the next attempt. Study names and other user text only ever travel as bound parameters.
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from c5snn.errors import StorageError, first_line

DEFAULT_STORAGE = "sqlite:///storage/c5snn.db"  # the embedded default (relative to the cwd)
SQLITE_TIMEOUT_S = 60  # how long a SQLite writer waits for the lock before "database is locked"

class ClaimState(enum.StrEnum):
    """Where one attempt at a point stands. Only RUNNING moves, and only by compare-and-set."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # training raised: counts toward --max-attempts
    RELEASED = "released"  # SIGTERM/Ctrl-C: resumable, not a failure
    STALE = "stale"  # heartbeat lost (a dead worker): counts toward --max-attempts


metadata = sa.MetaData()
claims = sa.Table(
    "c5snn_claims",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study", sa.String(512), nullable=False),
    sa.Column("point", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # a ClaimState value
    sa.Column("trial_id", sa.Integer),
    sa.Column("trial_number", sa.Integer),
    sa.Column("worker", sa.String(128), nullable=False),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False, default=0),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("error", sa.Text),
    sa.UniqueConstraint("study", "point", "attempt", name="uq_c5snn_claim_attempt"),
)


# Optuna's own tables (its RDB schema, stable across Optuna 3-5), written directly for the trial
# lifecycle of a worker: creating a trial with its params and attributes, and finishing it with
# its value, each in one transaction, where Optuna's API takes a transaction per param and per
# attribute and re-reads the whole trial on tell. That is most of what keeps the coordination
# cost per trial low (benchmarks/bench_coordination.py). Readers (status, export, promote,
# optuna-dashboard) go through Optuna as usual.
_studies = optuna_models.StudyModel.__table__
_trials = optuna_models.TrialModel.__table__
_trial_params = optuna_models.TrialParamModel.__table__
_trial_values = optuna_models.TrialValueModel.__table__
_trial_intermediate_values = optuna_models.TrialIntermediateValueModel.__table__
_trial_user_attributes = optuna_models.TrialUserAttributeModel.__table__
_trial_system_attributes = optuna_models.TrialSystemAttributeModel.__table__


def _utcnow() -> datetime.datetime:
    """Optuna's RDB schema stores naive UTC datetimes."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def resolve_url(option: str | None, study_file_value: str | None) -> str:
    """Storage URL precedence: --storage > C5SNN_STORAGE > study file > embedded SQLite."""
    url = option or os.environ.get("C5SNN_STORAGE") or study_file_value or DEFAULT_STORAGE
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not psycopg2
    return url


def mask(url: str) -> str:
    """The URL with any password replaced by ***, safe to print."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


@dataclass(frozen=True)
class Claim:
    id: int
    study: str
    point: int
    attempt: int


@dataclass(frozen=True)
class ClaimRow:
    """A read-only view of one attempt (for status and scheduling)."""

    id: int
    point: int
    attempt: int
    state: ClaimState
    trial_id: int | None
    trial_number: int | None
    worker: str
    host: str
    device: str
    epoch: int
    started: float
    heartbeat: float
    finished: float | None
    error: str | None


def _create_tables(engine: sa.Engine) -> None:
    """Create c5snn's table unless it exists; workers starting together may race to create it."""
    try:
        metadata.create_all(engine)
    except SQLAlchemyError:
        if not sa.inspect(engine).has_table(claims.name):
            raise


class Store:
    """Connections for one process: an engine for the claim table and Optuna's RDBStorage."""

    def __init__(self, url: str):
        self.url = url
        self.masked = mask(url)
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StorageError(f"not a valid SQLAlchemy storage URL: {self.masked}") from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.backend = parsed.get_backend_name()
        self._engine_kwargs: dict = {"pool_pre_ping": True}
        if self.is_sqlite:
            self._engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        self._database = parsed.database
        self._engine: sa.Engine | None = None
        self._optuna: optuna.storages.RDBStorage | None = None

    @property
    def engine(self) -> sa.Engine:
        """Connect on first use, so that a command failing earlier (bad data) writes nothing."""
        if self._engine is None:
            try:
                if self.is_sqlite and self._database and self._database != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(self._database)), exist_ok=True)
                engine = sa.create_engine(self.url, **self._engine_kwargs)
                if self.is_sqlite:
                    with engine.begin() as conn:
                        # WAL lets readers (status, dashboard) run beside one writer.
                        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                self._retry(lambda: _create_tables(engine))
            except (SQLAlchemyError, ImportError) as exc:
                raise StorageError(f"cannot open storage {self.masked}: {first_line(exc)}") from None
            self._engine = engine
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self._optuna is not None:
            self._optuna.remove_session()
            self._optuna.engine.dispose()

    @property
    def optuna(self) -> optuna.storages.RDBStorage:
        """Optuna's storage on the same database (created on first use)."""
        if self._optuna is None:
            self.engine  # noqa: B018 - creates the folder, WAL mode and c5snn's table first
            try:
                self._optuna = self._retry(
                    lambda: optuna.storages.RDBStorage(self.url, engine_kwargs=self._engine_kwargs)
                )
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot open storage {self.masked}: {first_line(exc)}") from None
        return self._optuna

    def _retry(self, fn, attempts: int = 8):
        """Run `fn`, retrying SQLite's transient 'database is locked' with backoff."""
        for i in range(attempts):
            try:
                return fn()
            except OperationalError as exc:
                if not (self.is_sqlite and "locked" in str(exc)) or i == attempts - 1:
                    raise
                time.sleep(0.05 * 2**i)
        raise AssertionError("unreachable")

    def _run(self, fn):
        """`fn(conn)` in one transaction, retried on SQLite lock contention; SQL errors other
        than integrity violations (which callers handle) become StorageError."""

        def once():
            with self.engine.begin() as conn:
                return fn(conn)

        try:
            return self._retry(once)
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StorageError(f"storage {self.masked}: {first_line(exc)}") from None

    # ---- claims -----------------------------------------------------------------------------

    def attempts(self, study: str) -> list[ClaimRow]:
        """Every attempt of a study, oldest first."""

        def read(conn):
            rows = conn.execute(
                sa.select(claims).where(claims.c.study == study).order_by(claims.c.id)
            ).mappings()
            return [ClaimRow(**{k: ClaimState(r[k]) if k == "state" else r[k]
                                for k in ClaimRow.__dataclass_fields__}) for r in rows]

        return self._run(read)

    def try_claim(
        self, study: str, point: int, attempt: int, *, worker: str, host: str, device: str
    ) -> Claim | None:
        """Insert attempt `attempt` of `point`; None when another worker inserted it first."""
        now = time.time()
        values = dict(
            study=study, point=point, attempt=attempt, state=ClaimState.RUNNING, worker=worker, host=host,
            device=device, epoch=0, started=now, heartbeat=now,
        )
        try:
            claim_id = self._run(
                lambda conn: conn.execute(sa.insert(claims).values(**values)).inserted_primary_key[0]
            )
        except IntegrityError:
            return None
        return Claim(int(claim_id), study, point, attempt)

    def attach_trial(self, claim: Claim, trial_id: int, trial_number: int) -> None:
        self._run(
            lambda conn: conn.execute(
                sa.update(claims).where(claims.c.id == claim.id)
                .values(trial_id=trial_id, trial_number=trial_number)
            )
        )

    def beat(self, claim: Claim, epoch: int) -> bool:
        """Refresh the lease; False when it was lost (marked stale by another worker)."""
        result = self._run(
            lambda conn: conn.execute(
                sa.update(claims)
                .where(claims.c.id == claim.id, claims.c.state == ClaimState.RUNNING)
                .values(heartbeat=time.time(), epoch=epoch)
            )
        )
        return result.rowcount == 1

    def finish(self, claim: Claim, state: ClaimState, error: str | None = None, *,
               from_state: ClaimState = ClaimState.RUNNING) -> bool:
        """Compare-and-set the claim from `from_state` to a final state; False if it had moved."""
        result = self._run(
            lambda conn: conn.execute(
                sa.update(claims)
                .where(claims.c.id == claim.id, claims.c.state == from_state)
                .values(state=state, finished=time.time(), error=error)
            )
        )
        return result.rowcount == 1

    def mark_stale(
        self, study: str, grace_s: float, rows: list[ClaimRow] | None = None
    ) -> list[ClaimRow]:
        """Mark running claims whose heartbeat is older than `grace_s` stale; returns those won.

        `rows` is the study's attempts when the caller has just read them.
        """
        cutoff = time.time() - grace_s
        won = []
        for row in self.attempts(study) if rows is None else rows:
            if row.state != ClaimState.RUNNING or row.heartbeat >= cutoff:
                continue
            result = self._run(
                lambda conn, rid=row.id: conn.execute(
                    sa.update(claims)
                    .where(claims.c.id == rid, claims.c.state == ClaimState.RUNNING,
                           claims.c.heartbeat < cutoff)
                    .values(state=ClaimState.STALE, finished=time.time(),
                            error=f"heartbeat lost (none for {grace_s:.0f}s)")
                )
            )
            if result.rowcount == 1:
                won.append(row)
        return won

    # ---- Optuna trials (see the note on Optuna's tables above) --------------------------------

    def create_trial(
        self,
        study_id: int,
        params: dict[str, Any],
        distributions: dict[str, BaseDistribution],
        *,
        user_attrs: dict[str, Any],
        system_attrs: dict[str, Any] | None = None,
    ) -> tuple[int, int]:
        """A RUNNING trial with its params and attributes, in one transaction: (trial_id, number).

        Numbers are assigned as Optuna does: with the study row locked (FOR UPDATE where the
        database has it; SQLite serializes writers), number = trials of the study created before.
        """

        def create(conn) -> tuple[int, int]:
            conn.execute(sa.select(_studies.c.study_id).where(_studies.c.study_id == study_id)
                         .with_for_update())
            trial_id = conn.execute(sa.insert(_trials).values(
                number=None, study_id=study_id, state=TrialState.RUNNING,
                datetime_start=_utcnow(),
            )).inserted_primary_key[0]
            number = conn.execute(sa.select(sa.func.count()).select_from(_trials).where(
                _trials.c.study_id == study_id, _trials.c.trial_id < trial_id)).scalar_one()
            conn.execute(sa.update(_trials).where(_trials.c.trial_id == trial_id)
                         .values(number=number))
            conn.execute(sa.insert(_trial_params), [
                {"trial_id": trial_id, "param_name": name,
                 "param_value": distributions[name].to_internal_repr(value),
                 "distribution_json": distribution_to_json(distributions[name])}
                for name, value in params.items()
            ])
            _insert_attrs(conn, _trial_user_attributes, trial_id, user_attrs)
            _insert_attrs(conn, _trial_system_attributes, trial_id, system_attrs or {})
            return int(trial_id), int(number)

        return self._run(create)

    def finish_trial(
        self, trial_id: int, state: TrialState, value: float | None = None,
        user_attrs: dict[str, Any] | None = None,
    ) -> bool:
        """Compare-and-set a RUNNING trial to `state` with its value and new user attributes.

        False (and nothing written) when the trial had already finished, e.g. failed by a
        worker that found its lease stale.
        """

        def finish(conn) -> bool:
            moved = conn.execute(
                sa.update(_trials)
                .where(_trials.c.trial_id == trial_id, _trials.c.state == TrialState.RUNNING)
                .values(state=state, datetime_complete=_utcnow())
            ).rowcount
            if moved != 1:
                return False
            if value is not None:
                stored, kind = optuna_models.TrialValueModel.value_to_stored_repr(value)
                conn.execute(sa.insert(_trial_values).values(
                    trial_id=trial_id, objective=0, value=stored, value_type=kind))
            _insert_attrs(conn, _trial_user_attributes, trial_id, user_attrs or {})
            return True

        return self._run(finish)

    def report(self, trial_id: int, step: int, value: float) -> None:
        """A trial's intermediate value at `step` (an epoch's val recall@20), one INSERT."""
        stored, kind = optuna_models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
            value)
        self._run(lambda conn: conn.execute(sa.insert(_trial_intermediate_values).values(
            trial_id=trial_id, step=step, intermediate_value=stored, intermediate_value_type=kind)))


def _insert_attrs(conn, table: sa.Table, trial_id: int, attrs: dict[str, Any]) -> None:
    if attrs:
        conn.execute(sa.insert(table), [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
        ])


def open_store(option: str | None, study_file_value: str | None) -> Store:
    return Store(resolve_url(option, study_file_value))
