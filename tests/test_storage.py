import threading

import pytest

from c5snn.errors import StorageError
from c5snn.storage import Store, mask, resolve_url


def test_url_precedence(monkeypatch):
    monkeypatch.delenv("C5SNN_STORAGE", raising=False)
    assert resolve_url(None, None) == "sqlite:///storage/c5snn.db"
    assert resolve_url(None, "sqlite:///file.db") == "sqlite:///file.db"
    monkeypatch.setenv("C5SNN_STORAGE", "sqlite:///env.db")
    assert resolve_url(None, "sqlite:///file.db") == "sqlite:///env.db"
    assert resolve_url("sqlite:///opt.db", "sqlite:///file.db") == "sqlite:///opt.db"
    assert resolve_url("postgresql://u@h/db", None) == "postgresql+psycopg://u@h/db"


MASKED = [  # (url, what must be printed)
    ("postgresql+psycopg://me:hunter2@db.example:5432/x", "postgresql+psycopg://me:***@db.example:5432/x"),
    ("postgresql://u:Ab@SECRET@host/db", "postgresql://u:***@host/db"),  # unescaped '@'
    ("postgresql://u:a/b?c#SECRET@host:5432/db", "postgresql://u:***@host:5432/db"),  # '/', '?', '#'
    ("postgresql://u:p%40SECRET@host/db", "postgresql://u:***@host/db"),  # escaped
    ("postgresql://u@host/db?password=SECRET", "postgresql://u@host/db?password=***"),
    ("postgresql://u@host/db?sslmode=require&PASSWORD=SECRET&x=1",
     "postgresql://u@host/db?sslmode=require&PASSWORD=***&x=1"),
    ("postgresql://:SECRET@host/db", "postgresql://:***@host/db"),
    ("sqlite:///storage/c5snn.db", "sqlite:///storage/c5snn.db"),
    ("sqlite:////abs/c5snn.db?timeout=5", "sqlite:////abs/c5snn.db?timeout=5"),
    ("not a url with SECRET=1", "<unparseable storage URL>"),
]


@pytest.mark.parametrize("url,shown", MASKED)
def test_mask_hides_every_password(url, shown):
    assert mask(url) == shown
    assert "SECRET" not in mask(url) and "hunter2" not in mask(url)


def test_passwords_are_masked_in_messages():
    assert "hunter2" not in mask("postgresql+psycopg://me:hunter2@db.example:5432/x")
    with pytest.raises(StorageError) as info:
        Store("postgresql+psycopg://me:Ab@hunter2@127.0.0.1:1/x").attempts("s")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(StorageError) as info:
        Store("postgresql+psycopg://me@127.0.0.1:1/x?password=hunter2").attempts("s")
    assert "hunter2" not in str(info.value)
    with pytest.raises(StorageError) as info:
        Store("postgresql+psycopg://me:hunter2@127.0.0.1:1/x").attempts("s")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_concurrent_claims_grant_each_attempt_once(tmp_path):
    """Many threads create the table and race for the same points on a fresh SQLite database:
    each (point, attempt) is granted once and nobody sees "database is locked"."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    granted, errors = [], []

    def racer(name):
        store = Store(url)
        try:
            for point in range(20):
                claim = store.try_claim("s", point, 1, worker=name, host="h", device="cpu")
                if claim is not None:
                    granted.append((claim.point, name))
        except Exception as exc:  # "database is locked" would land here
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=racer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p for p, _ in granted) == list(range(20))


def test_lease_compare_and_set(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lease.db'}")
    claim = store.try_claim("s", 0, 1, worker="a", host="h", device="cpu")
    assert store.beat(claim, 1)
    assert store.mark_stale("s", 3600, store.attempts("s")) == []
    stale = store.mark_stale("s", -1, store.attempts("s"))
    assert [r.id for r in stale] == [claim.id]
    assert not store.beat(claim, 2)  # the lease is gone: the worker learns it
    assert not store.finish(claim, "done")
    assert store.try_claim("s", 0, 1, worker="b", host="h", device="cpu") is None
    assert store.try_claim("s", 0, 2, worker="b", host="h", device="cpu") is not None


def test_hostile_study_name_is_only_ever_a_bound_parameter(tmp_path):
    import sqlalchemy as sa
    import yaml
    from conftest import study_dict

    from c5snn.config import load_config
    from c5snn.data import write_synthetic
    from c5snn.studies import create_screening
    from c5snn.worker import Worker

    name = "x'); DROP TABLE c5snn_claims; -- ../../etc"
    data = write_synthetic(tmp_path / "e.csv", rows=300, seed=0)
    grid = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.5], "encoding": ["direct"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study_dict(data, name=name, grid=grid)))
    config = load_config(path)
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = Store(url)
    create_screening(config, store)
    assert Worker(config, store, name="w", artifacts=tmp_path / "art", echo=lambda _: None).run() == 1
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        studies = conn.execute(sa.text("SELECT study FROM c5snn_claims")).scalars().all()
    assert "c5snn_claims" in tables and studies == [name]
    created = [p for p in (tmp_path / "art").rglob("*") if p.is_file()]
    assert created and all(tmp_path / "art" in p.parents for p in created)


def test_postgresql_sessions_cannot_hold_locks_idle_in_a_transaction():
    """A client that vanishes mid-transaction (a partition, no FIN) must not hold Optuna's study
    row lock -- which every trial creation takes -- until TCP keepalive: the server ends such a
    session after a minute, on c5snn's engine and Optuna's alike."""
    from conftest import PG_URL, require_pg

    require_pg()
    store = Store(PG_URL)
    for engine in (store.engine, store.optuna.engine):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "1min"
    store.close()


def test_a_worker_process_holds_at_most_two_postgresql_connections(tmp_path, synthetic_csv):
    """The connection budget (docs/cluster.md): measured in pg_stat_activity while 4 worker
    processes run a sweep with a heartbeat every 0.2 s, each holds POOL_SIZE connection(s)
    between calls and at most POOL_SIZE + POOL_OVERFLOW at once."""
    import collections
    import os
    import subprocess
    import sys
    import uuid

    import sqlalchemy as sa
    from conftest import PG_URL, ROOT, require_pg, run_cli, study_dict, write_study

    from c5snn.storage import POOL_OVERFLOW, POOL_SIZE

    require_pg()
    tag = f"cb{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name=tag, training={"epochs": 2, "limit_train_batches": 2}))
    assert run_cli("study", "create", "--config", str(study), "--storage", PG_URL).returncode == 0
    procs = [subprocess.Popen(
        [sys.executable, "-m", "c5snn", "worker", "--config", str(study), "--storage", PG_URL,
         "--name", f"{tag}-w{i}", "--threads", "1", "--heartbeat", "0.2", "--grace", "3",
         "--artifacts", str(tmp_path / "artifacts")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT) for i in range(4)]
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")  # a fresh snapshot a query
    try:
        with engine.connect() as conn:
            while any(p.poll() is None for p in procs):
                rows = conn.execute(sa.text(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE "
                    "application_name LIKE :tag GROUP BY application_name"),
                    {"tag": f"c5snn worker {tag}-%"}).all()
                for name, count in rows:
                    seen[name][count] += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        engine.dispose()
    assert all(p.returncode == 0 for p in procs)
    assert len(seen) == 4, seen
    peaks = {name: max(counts) for name, counts in seen.items()}
    idle = {name: counts.most_common(1)[0][0] for name, counts in seen.items()}
    print(f"connections per worker: peak {peaks}, most of the time {idle}")
    assert max(peaks.values()) <= POOL_SIZE + POOL_OVERFLOW, seen
    assert set(idle.values()) == {POOL_SIZE}, seen
