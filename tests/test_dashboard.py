"""optuna-dashboard started for real by `c5snn dashboard`, read through its HTTP API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT

from c5snn.artifacts import DASHBOARD_FILES
from c5snn.config import GRID_KEYS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_dashboard_serves_both_studies_with_trials_attrs_and_curves(swept):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "c5snn", "dashboard", "--config", str(swept["tmp"] / "study.yaml"),
         "--storage", swept["url"], "--port", str(port), "--artifacts",
         str(swept["tmp"] / "artifacts")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline:  # the server needs a moment; its cache a few seconds
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                if len(studies) >= 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert studies, "dashboard never answered"
        by_name = {s["study_name"]: s for s in studies}
        name = swept["config"].name
        assert {name, name + "-promote"} <= set(by_name)

        screening = _get(f"{base}/api/studies/{by_name[name]['study_id']}")
        trials = screening["trials"]
        assert len(trials) == 72 and {t["state"] for t in trials} == {"Complete"}
        for t in trials:
            assert {p["name"] for p in t["params"]} == set(GRID_KEYS)
            attrs = {a["key"] for a in t["user_attrs"]}
            assert {"config_id", "val_hit_at_20", "val_mrr", "spike_rate", "host"} <= attrs
            assert [v["step"] for v in t["intermediate_values"]] == [1, 2]
        assert screening["objective_names"] == ["val_recall_at_20"]  # not "Objective 0"
        study_attrs = {a["key"] for a in screening["user_attrs"]}
        assert {"grid", "window_size", "data_sha256"} <= study_attrs
        assert "data" in screening["note"]["body"]

        promote = _get(f"{base}/api/studies/{by_name[name + '-promote']['study_id']}")
        assert promote["objective_names"] == ["test_recall_at_20"]
        assert len(promote["trials"]) == 15
        for t in promote["trials"]:
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert t["state"] == "Complete" and "screening_trial" in attrs and "seed" in attrs
            assert "promoted from screening trial" in t["note"]["body"]
            # the run's files, uploaded by its worker to Optuna's artifact store, download
            files = {a["filename"]: a for a in t["artifacts"]}
            assert set(files) == set(DASHBOARD_FILES)
            run_dir = swept["tmp"] / "artifacts" / attrs["run_dir"]
            url = f"{base}/artifacts/{t['study_id']}/{t['trial_id']}/{files['metrics.csv']['artifact_id']}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read() == (run_dir / "metrics.csv").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard" in proc.stdout.read()
