"""A PostgreSQL outage while workers train: it costs time, never a worker, a point or a trial.

A small TCP proxy stands between the workers and the shared PostgreSQL; for the outage it drops
every open connection and refuses new ones (as a database restart or failover looks to clients),
then accepts again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
import sqlalchemy as sa
from conftest import PG_URL, ROOT, require_pg, run_cli, study_dict, write_study
from optuna.trial import TrialState

from c5snn.config import GRID_KEYS, load_config

OUTAGE_S = 20


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to the database; `outage()` cuts and refuses, `restore()` ends it."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def outage(self) -> None:
        self._server.close()  # new connections are refused
        with self._lock:
            for sock in self._open:  # open ones are cut
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # shutdown sends the FIN (close alone would not, while the other
            try:                 # pump thread still sits in recv on the socket)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _through(proxy: FlakyProxy) -> str:
    url = sa.engine.make_url(PG_URL)
    return url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def test_three_workers_ride_out_a_20s_postgresql_outage(tmp_path, synthetic_csv):
    require_pg()
    target = sa.engine.make_url(PG_URL)
    proxy = FlakyProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.restore()
    url = _through(proxy)
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
        proc = run_cli(*command, "--config", str(study), "--storage", _through(proxy))
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.csv").exists()


pytestmark = pytest.mark.slow
