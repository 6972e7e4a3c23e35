"""Promote and export through the one-shot pipeline, on tiny data, with real workers."""

from __future__ import annotations

import csv
import json
import os
import statistics
import uuid
from math import comb

import optuna
import pytest
import torch
from conftest import PG_URL, TRAINING, require_pg, run_cli, run_sweep, study_dict, write_study
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from c5snn.artifacts import load_model
from c5snn.config import load_config
from c5snn.data import prepare
from c5snn.export import CSV_COLUMNS
from c5snn.metrics import METRIC_KEYS, compute_metrics
from c5snn.promote import rank
from c5snn.storage import Store
from c5snn.worker import Worker


def test_console_shows_progress_leaderboard_and_top_table(swept):
    out = swept["out"]
    assert "[72/72] spiking_transformer" in out and "[15/15] spiking_transformer" in out
    assert "screening leaderboard" in out and out.count("\n") > 72
    assert "frequency_baseline" in out and "chance (uniform ranking)" in out


def test_sweep_csv_has_exact_columns_and_72_rows(swept):
    with open(swept["results"] / "phase_c_sweep.csv") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        assert reader.fieldnames == CSV_COLUMNS
    assert [int(r["config_id"]) for r in rows] == list(range(72))
    for r in rows:
        assert int(r["timesteps"]) == (3 if r["encoding"] == "rate_coded" else 1)
        assert int(r["d_ffn"]) == 2 * int(r["d_model"])
        assert len(r["val_recall_at_20"].split(".")[-1]) <= 4


# The original project's comparison format (its training/compare.py build_comparison), which
# its final-report reads: these keys with these types on every model.
ORIGINAL_MODEL_KEYS = {"name": str, "type": str, "phase": str, "metrics_mean": dict,
                       "metrics_std": dict, "n_seeds": int, "training_time_s": float,
                       "environment": str}


def test_top5_json_keeps_the_original_comparison_format(swept):
    report = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    assert isinstance(report["generated_at"], str) and isinstance(report["window_size"], int)
    assert isinstance(report["test_split_size"], int)
    for model in report["models"]:
        for key, kind in ORIGINAL_MODEL_KEYS.items():
            assert isinstance(model[key], kind), (key, model[key])
        assert set(model["metrics_mean"]) == set(model["metrics_std"]) == set(METRIC_KEYS)
        hosts = model["runtime"]["hosts"]  # c5snn's own facts sit under a key of their own
        assert model["environment"] == f"{', '.join(hosts)}: cpu"
        assert model["runtime"]["devices"] == ["cpu"] and model["runtime"]["torch"]
    # the tiny fixture scores every test window: the JSON says so, and states its budget
    config = swept["config"]
    assert report["test_windows"]["complete"] and report["test_windows"]["scored"] == (
        report["test_split_size"])
    assert report["smoke_scale"] is True
    assert report["budget"] == config.training.describe_budget()
    assert report["budget"] == "2 epochs x 1 batch of 16; val: first 32 windows per epoch; test: all windows"
    assert f"budget: {report['budget']} -- a smoke-scale run" in swept["out"]
    assert "test: the whole test split" in swept["out"]


def test_top5_json_format_and_statistics(swept):
    report = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    assert {"models", "generated_at", "window_size", "test_split_size"} <= set(report)
    assert report["window_size"] == 12 and len(report["models"]) == 5
    chance = report["chance"]
    assert chance["recall_at_20"] == 20 / 39
    assert chance["hit_at_20"] == 1 - comb(19, 5) / comb(39, 5)
    assert chance["recall_at_5"] == 5 / 39
    for i, model in enumerate(report["models"], 1):
        assert model["name"] == f"spiking_transformer_top{i}"
        assert (model["type"], model["phase"], model["n_seeds"]) == ("learned", "phase_c", 3)
        assert [s["seed"] for s in model["per_seed"]] == [42, 123, 7]
        for key in METRIC_KEYS:
            values = [s["metrics"][key] for s in model["per_seed"]]
            assert model["metrics_mean"][key] == pytest.approx(statistics.fmean(values))
            assert model["metrics_std"][key] == pytest.approx(statistics.pstdev(values))
        lo, hi = model["test_recall_at_20_ci95"]
        assert lo <= model["metrics_mean"]["recall_at_20"] <= hi
        assert model["above_chance"] == (lo > chance["recall_at_20"])
        assert {"environment", "config", "training_time_s"} <= set(model)
    base = report["frequency_baseline"]["metrics"]
    assert set(base) == set(METRIC_KEYS)
    vals = [m["screening_val_recall_at_20"] for m in (x["config"] for x in report["models"])]
    assert vals == sorted(vals, reverse=True)


def test_best_checkpoint_reloads_and_reproduces_test_recall(swept):
    report = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    best_dir = swept["results"] / "phase_c_best"
    assert sorted(p.name for p in best_dir.iterdir()) == [
        "best_model.pt", "config_snapshot.yaml", "metrics.csv", "pip_freeze.txt"]
    model, state = load_model(best_dir / "best_model.pt")
    assert state["seed"] == report["best"]["seed"]
    best_model = max(report["models"], key=lambda m: m["metrics_mean"]["recall_at_20"])
    assert report["best"]["model"] == best_model["name"]
    assert report["best"]["test_recall_at_20"] == max(
        s["metrics"]["recall_at_20"] for s in best_model["per_seed"])
    config = swept["config"]
    data = prepare(swept["tmp"] / "events.csv", config.window_size, config.split_ratios)
    logits, targets = [], []
    with torch.no_grad():
        for x, y in data.batches("test", config.training.batch_size,
                                 limit=config.training.limit_test_batches):
            logits.append(model(x))
            targets.append(y)
    got = compute_metrics(torch.cat(logits), torch.cat(targets))["recall_at_20"]
    assert got == report["best"]["test_recall_at_20"]


def test_promote_and_export_are_idempotent(swept):
    tmp, url = swept["tmp"], swept["url"]
    before = optuna.load_study(study_name=swept["config"].name + "-promote", storage=url).trials
    proc = run_cli("promote", "--config", str(tmp / "study.yaml"), "--storage", url, cwd=tmp)
    assert proc.returncode == 0 and "exists" in proc.stdout
    csv_before = (swept["results"] / "phase_c_sweep.csv").read_text()
    json_before = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    proc = run_cli("export", "--config", str(tmp / "study.yaml"), "--storage", url,
                   "--output", str(swept["results"] / "phase_c_sweep.csv"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    after = optuna.load_study(study_name=swept["config"].name + "-promote", storage=url).trials
    assert len(after) == len(before) == 15
    assert (swept["results"] / "phase_c_sweep.csv").read_text() == csv_before
    json_after = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    json_before.pop("generated_at")
    json_after.pop("generated_at")
    assert json_after == json_before
    other = run_cli("promote", "--config", str(tmp / "study.yaml"), "--storage", url,
                    "--top-k", "3", cwd=tmp)
    assert other.returncode == 1 and "already exists" in other.stderr


def test_export_plots(swept, tmp_path):
    proc = run_cli("export", "--config", str(swept["tmp"] / "study.yaml"), "--storage", swept["url"],
                   "--output", str(tmp_path / "phase_c_sweep.csv"), "--plots", cwd=swept["tmp"])
    assert proc.returncode == 0, proc.stderr
    html = sorted(p.name for p in tmp_path.glob("*.html"))
    assert html == ["phase_c_intermediate_values.html", "phase_c_parallel_coordinates.html",
                    "phase_c_param_importances.html", "phase_c_topk_test_recall.html"]
    figure = (tmp_path / "phase_c_topk_test_recall.html").read_text()
    assert "frequency baseline" in figure and "spiking_transformer_top5" in figure


def test_promote_before_screening_ends_is_a_clear_error(tmp_path, synthetic_csv):
    study = write_study(tmp_path / "s.yaml", study_dict(synthetic_csv, name="early"))
    url = f"sqlite:///{tmp_path / 'e.db'}"
    assert run_cli("study", "create", "--config", str(study), "--storage", url).returncode == 0
    proc = run_cli("promote", "--config", str(study), "--storage", url)
    assert proc.returncode == 1 and "0/72 points complete" in proc.stderr
    proc = run_cli("export", "--config", str(study), "--storage", url,
                   "--output", str(tmp_path / "r" / "x.csv"))
    assert proc.returncode == 1 and not (tmp_path / "r" / "x.csv").exists()


def test_rank_breaks_ties_by_lower_config_id():
    def trial(config_id, value):
        return create_trial(value=value, params={"x": 0.0},
                            distributions={"x": FloatDistribution(0, 1)},
                            user_attrs={"config_id": config_id}, state=TrialState.COMPLETE)

    ranked = rank([trial(5, 0.5), trial(2, 0.6), trial(1, 0.5), trial(9, 0.6)])
    assert [t.user_attrs["config_id"] for t in ranked] == [2, 9, 1, 5]


def test_screening_never_reads_the_test_split(tmp_path, synthetic_csv, monkeypatch):
    from c5snn.data import WindowData
    from c5snn.studies import create_screening

    grid = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.5],
            "encoding": ["direct", "rate_coded"]}
    config = load_config(write_study(tmp_path / "s.yaml", study_dict(synthetic_csv, grid=grid)))
    store = Store(f"sqlite:///{tmp_path / 'n.db'}")
    create_screening(config, store)
    seen = []
    for method in ("batches", "targets"):
        original = getattr(WindowData, method)

        def spy(self, split, *args, _original=original, **kwargs):
            seen.append(split)
            return _original(self, split, *args, **kwargs)

        monkeypatch.setattr(WindowData, method, spy)
    ran = Worker(config, store, name="w", artifacts=tmp_path / "a", echo=lambda _: None).run()
    assert ran == 2 and "val" in seen and "train" in seen and "test" not in seen


def test_postgres_4_workers_and_sqlite_1_worker_agree(swept, tmp_path):
    require_pg()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    write_study(tmp_path / "study.yaml",
                study_dict(swept["tmp"] / "events.csv", name=name, training=TRAINING))
    run_sweep(tmp_path, tmp_path / "results" / "phase_c_sweep.csv", PG_URL, 4)

    def metric_columns(path):
        with open(path) as fh:
            return [{k: r[k] for k in CSV_COLUMNS if k != "training_time_s"}
                    for r in csv.DictReader(fh)]

    assert metric_columns(tmp_path / "results" / "phase_c_sweep.csv") == metric_columns(
        swept["results"] / "phase_c_sweep.csv")
    pg = json.loads((tmp_path / "results" / "phase_c_top5.json").read_text())
    lite = json.loads((swept["results"] / "phase_c_top5.json").read_text())
    assert [m["config"]["config_id"] for m in pg["models"]] == [
        m["config"]["config_id"] for m in lite["models"]]
    assert [m["metrics_mean"] for m in pg["models"]] == [m["metrics_mean"] for m in lite["models"]]


def test_meta_names_the_data_by_content(swept):
    import hashlib

    meta = json.loads((swept["results"] / "phase_c_sweep_meta.json").read_text())
    events = swept["tmp"] / "events.csv"
    assert meta["data"]["sha256"] == hashlib.sha256(events.read_bytes()).hexdigest()
    assert meta["study"] == swept["config"].name and "password" not in json.dumps(meta)


def test_export_never_deletes_what_it_did_not_write(swept, tmp_path):
    common = ["--config", str(swept["tmp"] / "study.yaml"), "--storage", swept["url"]]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    proc = run_cli("export", *common, "--output", str(victim), cwd=tmp_path)
    assert proc.returncode == 1 and "is an existing folder" in proc.stderr
    assert (victim / "thesis.tex").read_text() == "years of work"
    # a foreign file inside <stem>_best/ is refused too; --force replaces
    out = tmp_path / "r" / "phase_c_sweep.csv"
    (tmp_path / "r" / "phase_c_best").mkdir(parents=True)
    (tmp_path / "r" / "phase_c_best" / "notes.txt").write_text("mine")
    proc = run_cli("export", *common, "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 1 and "notes.txt" in proc.stderr and not out.exists()
    assert (tmp_path / "r" / "phase_c_best" / "notes.txt").exists()
    proc = run_cli("export", *common, "--output", str(out), "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "r" / "phase_c_best").iterdir()) == sorted(
        ["best_model.pt", "config_snapshot.yaml", "metrics.csv", "pip_freeze.txt"])
    # stored run directories are absolute: export works from any working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("export", *common, "--output", str(tmp_path / "e" / "phase_c_sweep.csv"),
                   cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".export-")]


def test_two_one_shots_on_one_sqlite_file_both_finish(tmp_path, synthetic_csv):
    import subprocess
    import sys

    from conftest import ROOT

    grid = {"n_layers": [2], "n_heads": [2], "d_model": [64], "beta": [0.5],
            "encoding": ["direct", "rate_coded"]}
    study = write_study(tmp_path / "study.yaml", study_dict(
        synthetic_csv, name="twice", grid=grid, training=TRAINING,
        promote={"top_k": 1, "seeds": [42]}))
    args = [sys.executable, "-m", "c5snn", "phase-c-sweep", "--config", str(study), "--workers",
            "1", "--threads", "1", "--storage", f"sqlite:///{tmp_path / 'one.db'}",
            "--output", str(tmp_path / "results" / "phase_c_sweep.csv"),
            "--artifacts", str(tmp_path / "art")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    report = json.loads((tmp_path / "results" / "phase_c_top5.json").read_text())
    assert len(report["models"]) == 1 and report["models"][0]["n_seeds"] == 1


def test_artifacts_travel_to_a_machine_that_mounts_them_elsewhere(swept, tmp_path):
    """Run directories are recorded relative to the artifacts root: an export from another
    mount point writes the same outputs, a study an older c5snn wrote (absolute paths of the
    machine that ran it) still exports, and a missing run directory is one line naming the point
    and the path, with nothing written."""
    import shutil

    import sqlalchemy as sa

    tmp, url, config = swept["tmp"], swept["url"], swept["config"]
    promoted = optuna.load_study(study_name=config.name + "-promote", storage=url).trials
    assert all(not t.user_attrs["run_dir"].startswith("/") for t in promoted)
    original, moved, away = tmp / "artifacts", tmp_path / "mounted-elsewhere", tmp / "artifacts.away"
    shutil.copytree(original, moved)
    original.rename(away)  # the folder the workers wrote to is not on this machine
    try:
        def export(out, storage=url, **env):
            return run_cli("export", "--config", str(tmp / "study.yaml"), "--storage", storage,
                           "--output", str(out / "phase_c_sweep.csv"), cwd=tmp_path, env=env)

        def same_outputs(out):
            assert (out / "phase_c_sweep.csv").read_text() == (
                swept["results"] / "phase_c_sweep.csv").read_text()
            got, want = (json.loads((folder / "phase_c_top5.json").read_text())
                         for folder in (out, swept["results"]))
            for report in (got, want):
                report.pop("generated_at")
                report["best"].pop("run_dir")
            assert got == want
            for name in ("best_model.pt", "metrics.csv", "config_snapshot.yaml"):
                assert (out / "phase_c_best" / name).read_bytes() == (
                    swept["results"] / "phase_c_best" / name).read_bytes()

        proc = export(tmp_path / "a", C5SNN_ARTIFACTS=str(moved))
        assert proc.returncode == 0, proc.stderr
        same_outputs(tmp_path / "a")
        # a study written before: run_dir an absolute path of the machine that ran it
        old = tmp_path / "old.db"
        shutil.copy(tmp / "sweep.db", old)
        engine = sa.create_engine(f"sqlite:///{old}")
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE trial_user_attributes SET value_json = :v WHERE key = "
                                 "'run_dir'"), {"v": json.dumps("/gone/machine/artifacts/x/run")})
            conn.execute(sa.text("DELETE FROM trial_user_attributes WHERE key = 'artifacts_root'"))
        engine.dispose()
        proc = run_cli("export", "--config", str(tmp / "study.yaml"), "--storage", f"sqlite:///{old}",
                       "--output", str(tmp_path / "b" / "phase_c_sweep.csv"), "--artifacts",
                       str(moved), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        same_outputs(tmp_path / "b")
        # a run directory truly missing: one line, and no output folder
        gone = next(moved.glob("*-promote-*/point-003/run"))
        (gone / "test_logits.pt").unlink()
        proc = export(tmp_path / "c", C5SNN_ARTIFACTS=str(moved))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr
        assert "promote point 3" in lines[0] and f"no test_logits.pt in {gone}" in lines[0]
        assert not (tmp_path / "c").exists()
    finally:
        away.rename(original)
