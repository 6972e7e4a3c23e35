"""The one place that talks to the database: Optuna's storage and c5snn's claim table.

Optuna keeps studies, trials, params, intermediate values and attributes, and c5snn reaches them
through Optuna's public storage API only (`RDBStorage.create_new_trial`,
`set_trial_intermediate_value`, `set_trial_user_attr`, `set_trial_state_values`, ...), so an
Optuna upgrade cannot corrupt a study behind c5snn's back. Beside them, c5snn keeps its own table
`c5snn_claims`: one row per attempt at one point of one study, with a unique key (study, point,
attempt). A worker claims a point by INSERTing the next attempt's row; when two workers race for
the same attempt the database's unique constraint lets exactly one insert succeed, in SQLite and
PostgreSQL alike. A claim is a lease: its worker refreshes `heartbeat`, and a row whose heartbeat
is older than the grace period is marked stale by a compare-and-set UPDATE, after which the point
can be claimed again as the next attempt. Every time in that table is the database server's
clock (`db_now`), never a worker's, so machines with skewed clocks neither steal live leases nor
lose their own. Study names and other user text only ever travel as bound parameters.

Outages: a call that fails because the database is away (a restart, a failover, a dropped
connection, a locked SQLite file) is retried with capped exponential backoff for up to
`outage_tolerance_s` (workers; one-off commands fail at once), with one line when the outage
starts and one when it ends; only then does it raise `StorageError`. Opening the database is
such a call too, so a worker started during an outage waits for the database.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from c5snn.errors import StorageError, first_line

DEFAULT_STORAGE = "sqlite:///storage/c5snn.db"  # the embedded default (relative to the cwd)
SQLITE_TIMEOUT_S = 60  # how long a SQLite writer waits for the lock before "database is locked"
BACKOFF_S = (0.5, 30.0)  # first and largest wait between retries during an outage
IDLE_IN_TRANSACTION_MS = 60_000  # PostgreSQL ends a session idle inside a transaction this long
POOL_SIZE = 1  # connections a process keeps open between calls
POOL_OVERFLOW = 1  # more while two threads call at once (a worker's loop and its heartbeat)

T = TypeVar("T")


class ClaimState(enum.StrEnum):
    """Where one attempt at a point stands. Only RUNNING moves, and only by compare-and-set."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # training raised: counts toward --max-attempts
    RELEASED = "released"  # SIGTERM/Ctrl-C, or the worker's environment failed: not counted
    STALE = "stale"  # heartbeat lost (a dead or frozen worker): counts toward --max-disruptions


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
    # seconds since the epoch on the database server's clock (db_now)
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("finished", sa.Float),
    sa.Column("error", sa.Text),
    sa.UniqueConstraint("study", "point", "attempt", name="uq_c5snn_claim_attempt"),
)


def db_now(backend: str) -> sa.ColumnElement:
    """The database server's current time in seconds since the epoch, as a SQL expression."""
    if backend == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
    return sa.cast(sa.func.extract("epoch", sa.func.now()), sa.Float)


def resolve_url(option: str | None, study_file_value: str | None) -> str:
    """Storage URL precedence: --storage > C5SNN_STORAGE > study file > embedded SQLite."""
    url = option or os.environ.get("C5SNN_STORAGE") or study_file_value or DEFAULT_STORAGE
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not psycopg2
    return url


SECRET_KEYS = {"password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key"}


def mask(url: str) -> str:
    """The URL with every secret replaced by ***, safe to print. Never raises.

    Userinfo is everything between `://` and the LAST '@' (a password may hold '@', '/', '?' or
    '#' unescaped; a '@' further on only masks more), and query parameters named like secrets
    (`?password=...`) are masked too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url and "=" not in url else "<unparseable storage URL>"
    if "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    base, qsep, query = rest.partition("?")
    if qsep:
        parts = [(p.partition("=")[0] + "=***") if p.partition("=")[0].lower() in SECRET_KEYS
                 else p for p in query.split("&")]
        rest = base + "?" + "&".join(parts)
    return f"{scheme}://{rest}"


def escape_password(url: str) -> str:
    """The URL with '@', '/', '?' and '#' in its password percent-escaped, as URLs require and
    users often forget (`postgresql://u:Ab@cd@host/db`): SQLAlchemy would otherwise take part of
    the password for the host, connect elsewhere and print it in its errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, host = rest.rsplit("@", 1)
    user, colon, password = userinfo.partition(":")
    for char, code in (("@", "%40"), ("/", "%2F"), ("?", "%3F"), ("#", "%23")):
        password = password.replace(char, code)
    return f"{scheme}://{user}{colon}{password}@{host}"


def _transient(exc: BaseException) -> bool:
    """Whether `exc` says the database is away (worth retrying), not that a request is wrong."""
    if isinstance(exc, StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    # PendingRollbackError: a session whose connection died mid-transaction, before its rollback
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.PendingRollbackError)) or bool(
        getattr(exc, "connection_invalidated", False))


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
    """Connections for one process: an engine for the claim table and Optuna's RDBStorage.

    `outage_tolerance_s`: how long a call keeps retrying after the database that this Store has
    already reached goes away (0: fail at once, as one-off commands do); `echo` prints the
    outage's start and end lines; `application` names the process in PostgreSQL's
    `pg_stat_activity` (`c5snn worker w0@host:pid`).

    Connections: one engine, at most POOL_SIZE + POOL_OVERFLOW (2) open at once, POOL_SIZE (1)
    kept open between calls (docs/cluster.md, "Connection budget").
    """

    def __init__(self, url: str, *, outage_tolerance_s: float = 0.0,
                 echo: Callable[[str], None] | None = None, application: str = "command"):
        self.url = url = escape_password(url)
        self.masked = mask(url)
        try:
            parsed = make_url(url)
            parsed.port  # noqa: B018 - a non-numeric port fails here, not at the first query
        except (ArgumentError, ValueError):
            raise StorageError(f"not a valid SQLAlchemy storage URL: {self.masked}") from None
        # the secrets of this URL, removed from any message a driver writes
        self._secrets = [s for s in (parsed.password, *(v for k, v in parsed.query.items()
                                                        if k.lower() in SECRET_KEYS)) if s]
        self.backend = parsed.get_backend_name()
        self.is_sqlite = self.backend == "sqlite"
        # One engine per process (Optuna's; the claim table uses it too) with a pool of
        # POOL_SIZE connections and at most POOL_OVERFLOW more while both of a worker's threads
        # (its loop and its heartbeat) talk to the database at once: the connection budget.
        self._engine_kwargs: dict = {"pool_pre_ping": True, "pool_size": POOL_SIZE,
                                     "max_overflow": POOL_OVERFLOW}
        if self.backend == "postgresql":
            # A PostgreSQL session that stays idle inside a transaction for a minute is ended by
            # the server: c5snn's transactions last milliseconds, and a client that vanished
            # without closing its socket (a network partition) would otherwise hold its row
            # locks -- Optuna's study row, which every trial creation takes -- until TCP
            # keepalive, hours later. application_name shows who holds each connection
            # (pg_stat_activity).
            self._engine_kwargs["connect_args"] = {
                "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
                "application_name": f"c5snn {application}"[:63]}
        self._database = parsed.database
        if self.is_sqlite:
            self._engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
            if not self._database or self._database == ":memory:":  # one connection per thread
                self._engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        self._optuna: optuna.storages.RDBStorage | None = None
        self.outage_tolerance_s = outage_tolerance_s
        self.echo = echo or (lambda _line: None)
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None  # monotonic time the current outage began
        self.last_outage_end: float | None = None  # monotonic time the last outage ended

    # ---- connections ---------------------------------------------------------------------------

    @property
    def optuna(self) -> optuna.storages.RDBStorage:
        """Optuna's storage, created on first use (so that a command failing earlier, on bad
        data say, writes nothing), with c5snn's table beside Optuna's on its engine."""
        if self._optuna is None:

            def open_storage() -> optuna.storages.RDBStorage:
                if self.is_sqlite and self._database and self._database != ":memory:":
                    self._retry_opening(self._prepare_sqlite_file)
                storage = self._retry_opening(
                    lambda: optuna.storages.RDBStorage(self.url, engine_kwargs=self._engine_kwargs))
                self._retry_opening(lambda: _create_tables(storage.engine))
                return storage

            try:  # a worker started during an outage rides it out as one that reached the database
                self._optuna = self.call(open_storage)
            except StorageError as exc:
                raise StorageError(f"cannot open {exc}") from None
            except (ImportError, OSError, ValueError, IntegrityError) as exc:
                raise StorageError(f"cannot open storage {self.masked}: "
                                   f"{self.redact(first_line(exc))}") from None
        return self._optuna

    @property
    def engine(self) -> sa.Engine:
        """The process's one engine (Optuna's), which the claim table shares."""
        return self.optuna.engine

    def _prepare_sqlite_file(self) -> None:
        """The database file's folder, and WAL mode (kept in the file), which lets readers
        (status, dashboard) run beside one writer; set through a short-lived connection of its
        own, before Optuna's engine opens the file."""
        os.makedirs(os.path.dirname(os.path.abspath(self._database)), exist_ok=True)
        connection = sqlite3.connect(self._database, timeout=SQLITE_TIMEOUT_S)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            raise sa.exc.OperationalError("PRAGMA journal_mode=WAL", None, exc) from None
        finally:
            connection.close()

    def exists(self) -> bool:
        """Whether there is a database to read: False for a SQLite file not yet created, so
        that reading a study that does not exist creates nothing. A server always exists."""
        if not self.is_sqlite or not self._database or self._database == ":memory:":
            return True
        return os.path.exists(self._database)

    def redact(self, text: str) -> str:
        """A message safe to print: URLs masked and this URL's secrets removed wherever they are."""
        text = mask(text) if "://" in text else text
        for secret in self._secrets:
            text = text.replace(str(secret), "***")
        return text

    def close(self) -> None:
        if self._optuna is not None:
            self._optuna.remove_session()
            self._optuna.engine.dispose()

    def _retry_opening(self, fn: Callable[[], T], attempts: int = 8) -> T:
        """Run `fn` while opening the database, retrying what processes opening it at the same
        moment do to each other (two one-shots, N workers on a fresh file or server): SQLite's
        "database is locked", and a table or Optuna's version row that a neighbour created
        first ("already exists", a unique violation). Opening writes nothing else."""
        for i in range(attempts):
            try:
                return fn()
            except (sa.exc.OperationalError, sa.exc.ProgrammingError,
                    sa.exc.IntegrityError) as exc:
                neighbour = isinstance(exc, sa.exc.IntegrityError) or "already exists" in str(exc)
                locked = self.is_sqlite and "locked" in str(exc)
                if not (neighbour or locked) or i == attempts - 1:
                    raise
                time.sleep(0.05 * 2**i)
        raise AssertionError("unreachable")

    def call(self, fn: Callable[[], T]) -> T:
        """Run a storage call, riding out an outage of the database.

        Transient errors (connection lost or refused, server shutting down, SQLite locked) are
        retried with capped exponential backoff until `outage_tolerance_s` has passed since the
        outage began; then, and for any other database error, StorageError (one line, no
        password). Errors that are answers (IntegrityError, a finished trial) pass through.
        """
        delay = BACKOFF_S[0]
        while True:
            try:
                result = fn()
            except (IntegrityError, UpdateFinishedTrialError):
                self._outage_over()
                raise
            except (SQLAlchemyError, StorageInternalError) as exc:
                if not _transient(exc) or not self._ride_out(exc):
                    raise StorageError(f"storage {self.masked}: {self.redact(first_line(exc))}") from None
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            self._outage_over()
            return result

    def _ride_out(self, exc: BaseException) -> bool:
        """Note the outage (one line when it starts); False once it outlasted the tolerance."""
        with self._outage_lock:
            now = time.monotonic()
            if self._outage_since is None:
                if self.outage_tolerance_s <= 0:
                    return False
                self._outage_since = now
                self.echo(f"database unreachable ({self.redact(first_line(exc))}); retrying for up to "
                          f"{self.outage_tolerance_s:.0f}s")
            return now - self._outage_since < self.outage_tolerance_s

    def _outage_over(self) -> None:
        if self._outage_since is None:
            return
        with self._outage_lock:
            if self._outage_since is not None:
                self.last_outage_end = time.monotonic()
                self.echo(f"database back after {self.last_outage_end - self._outage_since:.0f}s")
                self._outage_since = None

    def _run(self, fn: Callable[[sa.Connection], T]) -> T:
        """`fn(conn)` in one transaction through `call` (integrity violations pass through)."""

        def once() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self.call(once)

    def now(self) -> float:
        """The database server's clock, seconds since the epoch."""
        return self._run(lambda conn: conn.execute(sa.select(db_now(self.backend))).scalar_one())

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
        """Insert attempt `attempt` of `point`; None when another worker inserted it first.

        If the connection drops after the INSERT committed, the retry meets our own row: the
        unique key then names this worker, and the claim is ours.
        """
        now = db_now(self.backend)
        values = dict(study=study, point=point, attempt=attempt, state=ClaimState.RUNNING,
                      worker=worker, host=host, device=device, epoch=0, started=now,
                      heartbeat=now)
        try:
            claim_id = self._run(
                lambda conn: conn.execute(sa.insert(claims).values(**values)).inserted_primary_key[0]
            )
        except IntegrityError:
            row = self._run(lambda conn: conn.execute(
                sa.select(claims.c.id, claims.c.worker).where(
                    claims.c.study == study, claims.c.point == point, claims.c.attempt == attempt)
            ).one_or_none())
            if row is None or row.worker != worker:
                return None
            claim_id = row.id
        return Claim(int(claim_id), study, point, attempt)

    def attach_trial(self, claim: Claim, trial_id: int, trial_number: int) -> ClaimState:
        """Record the claim's Optuna trial; returns the claim's state, which is no longer RUNNING
        when a reaper took the lease before the trial was recorded (the caller then fails it)."""

        def attach(conn):
            conn.execute(sa.update(claims).where(claims.c.id == claim.id)
                         .values(trial_id=trial_id, trial_number=trial_number))
            return ClaimState(conn.execute(
                sa.select(claims.c.state).where(claims.c.id == claim.id)).scalar_one())

        return self._run(attach)

    def beat(self, claim: Claim, epoch: int) -> bool:
        """Refresh the lease; False when it was lost (marked stale by another worker)."""
        result = self._run(
            lambda conn: conn.execute(
                sa.update(claims)
                .where(claims.c.id == claim.id, claims.c.state == ClaimState.RUNNING)
                .values(heartbeat=db_now(self.backend), epoch=epoch)
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
                .values(state=state, finished=db_now(self.backend), error=error)
            )
        )
        return result.rowcount == 1

    def mark_stale(self, study: str, grace_s: float, rows: list[ClaimRow]) -> list[ClaimRow]:
        """Mark running claims silent for more than `grace_s` (on the database's clock) stale;
        returns those this call won. `rows` is the study's attempts as just read."""
        won = []
        for row in rows:
            if row.state != ClaimState.RUNNING:
                continue
            cutoff = db_now(self.backend) - grace_s
            result = self._run(
                lambda conn, rid=row.id, cutoff=cutoff: conn.execute(
                    sa.update(claims)
                    .where(claims.c.id == rid, claims.c.state == ClaimState.RUNNING,
                           claims.c.heartbeat < cutoff)
                    .values(state=ClaimState.STALE, finished=db_now(self.backend),
                            error=f"heartbeat lost (none for {grace_s:.0f}s)")
                )
            )
            if result.rowcount == 1:
                won.append(row)
        return won

    # ---- Optuna trials, through Optuna's public storage API ---------------------------------

    def study_id(self, name: str) -> int:
        return self.call(lambda: self.optuna.get_study_id_from_name(name))

    def create_trial(self, study_id: int, params: dict[str, Any],
                     distributions: dict[str, BaseDistribution], *,
                     user_attrs: dict[str, Any]) -> tuple[int, int]:
        """A RUNNING trial with its params and user attrs, in one `create_new_trial`:
        (trial_id, number). `user_attrs["claim"]` names the claim; when a dropped connection
        hides whether the first try committed, the retry finds that trial instead of adding one.
        """
        template = FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
            datetime_complete=None, params=params, distributions=distributions,
            user_attrs=user_attrs, system_attrs={}, intermediate_values={}, trial_id=-1,
        )
        tag = user_attrs["claim"]
        tried = False

        def create() -> int:
            nonlocal tried
            if tried:  # a retry: did the lost attempt commit?
                for t in self.optuna.get_all_trials(study_id, deepcopy=False):
                    if t.user_attrs.get("claim") == tag:
                        return self.optuna.get_trial_id_from_study_id_trial_number(
                            study_id, t.number)
            tried = True
            return self.optuna.create_new_trial(study_id, template_trial=template)

        trial_id = self.call(create)
        number = self.call(lambda: self.optuna.get_trial_number_from_id(trial_id))
        return trial_id, number

    def report(self, trial_id: int, step: int, value: float) -> None:
        """A trial's intermediate value at `step` (an epoch's val recall@20)."""
        self.call(lambda: self.optuna.set_trial_intermediate_value(trial_id, step, value))

    def finish_trial(self, trial_id: int, state: TrialState, value: float | None = None,
                     user_attrs: dict[str, Any] | None = None) -> bool:
        """Set a RUNNING trial's user attrs, then its final state and value (Optuna locks the row
        and refuses a finished trial: a compare-and-set). False when it had already finished,
        e.g. failed by a worker that found its lease stale; True when this call finished it."""
        try:
            for key, attr in (user_attrs or {}).items():
                self.call(lambda key=key, attr=attr: self.optuna.set_trial_user_attr(
                    trial_id, key, attr))
            self.call(lambda: self.optuna.set_trial_state_values(
                trial_id, state, None if value is None else [value]))
        except UpdateFinishedTrialError:
            # finished before: by us, if a dropped connection hid our own commit
            done = self.call(lambda: self.optuna.get_trial(trial_id))
            return done.state == state and (value is None or done.value == value)
        return True

    def trial(self, trial_id: int) -> FrozenTrial:
        return self.call(lambda: self.optuna.get_trial(trial_id))

    def running_trials(self, study: str) -> list[FrozenTrial]:
        """The study's RUNNING trials (each names its claim in `user_attrs["claim"]`); none for
        a study that Optuna does not hold."""
        try:
            study_id = self.study_id(study)
        except KeyError:
            return []
        return self.call(lambda: self.optuna.get_all_trials(
            study_id, deepcopy=False, states=(TrialState.RUNNING,)))

    def trial_id(self, study: str, number: int) -> int:
        """The storage id of trial `number` of `study`."""
        study_id = self.study_id(study)
        return self.call(lambda: self.optuna.get_trial_id_from_study_id_trial_number(study_id, number))


def open_store(option: str | None, study_file_value: str | None, *,
               outage_tolerance_s: float = 0.0, echo: Callable[[str], None] | None = None,
               application: str = "command") -> Store:
    return Store(resolve_url(option, study_file_value), outage_tolerance_s=outage_tolerance_s,
                 echo=echo, application=application)
