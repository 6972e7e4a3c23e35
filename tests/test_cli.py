"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, nothing written."""

import ctypes.util

import pandas as pd
import torch
import yaml
from conftest import run_cli, study_dict, write_study

PIN = ["--set", "d_model=64", "--set", "n_heads=2", "--set", "n_layers=2", "--set", "beta=0.95",
       "--set", "encoding=direct"]


def _one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_everywhere():
    for args in ([], ["data"], ["data", "validate"], ["data", "synth"], ["train"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout


def test_data_validate_and_synth(tmp_path):
    out = tmp_path / "s.csv"
    assert run_cli("data", "synth", "--out", str(out), "--rows", "50").returncode == 0
    proc = run_cli("data", "validate", str(out))
    assert proc.returncode == 0 and "OK, 50 rows" in proc.stdout
    frame = pd.read_csv(out)
    frame.loc[9, "m_2"] = 99
    frame.to_csv(out, index=False)
    _one_line_error(run_cli("data", "validate", str(out)), str(out), "line 11", "1..39")


def test_train_writes_run_directory(study_file, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "--config", str(study_file), *PIN, "--seed", "5",
                   "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and "best epoch" in proc.stdout
    # CPU training restarts itself on jemalloc where the machine has it (runtime.py)
    expected = "jemalloc" if ctypes.util.find_library("jemalloc") else "glibc"
    assert f"on cpu ({expected} allocator)" in proc.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best_model.pt", "config_snapshot.yaml", "metrics.csv", "pip_freeze.txt"]
    ckpt = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "best_val_recall_at_20",
            "config", "seed"} <= set(ckpt)
    assert ckpt["seed"] == 5 and ckpt["config"]["model"]["d_model"] == 64
    assert yaml.safe_load((run_dir / "config_snapshot.yaml").read_text())["seed"] == 5
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 2
    assert "torch==" in (run_dir / "pip_freeze.txt").read_text()


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, synthetic_csv):
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.csv"
    frame = pd.read_csv(synthetic_csv)
    frame.loc[3, "date"] = frame.loc[1, "date"]
    frame.to_csv(bad, index=False)
    cases = [
        (study_dict(bad), [str(bad), "line 5", "strictly increasing"]),
        (study_dict(synthetic_csv, grid={"n_heads": [3]}), ["grid.n_heads", "does not divide"]),
        (study_dict(synthetic_csv, training={"epochz": 1}), ["training.epochz", "unknown key"]),
        (study_dict(synthetic_csv, data={"window_size": 298}, model={"max_window_size": 400}),
         ["at least one window each"]),
    ]
    for i, (study, fragments) in enumerate(cases):
        path = write_study(tmp_path / f"s{i}.yaml", study)
        pins = PIN if i != 1 else PIN[:2] + PIN[4:]  # keep the file's n_heads
        proc = run_cli("train", "--config", str(path), *pins, "--run-dir", str(run_dir))
        _one_line_error(proc, *fragments)
        assert not run_dir.exists()
    _one_line_error(run_cli("data", "validate", str(tmp_path / "missing.csv")), "no such file")
    # a study on bad data: no database file, no study, no results
    url = f"sqlite:///{tmp_path / 'db' / 'c5snn.db'}"
    path = write_study(tmp_path / "bad_study.yaml", study_dict(bad))
    for args in (["study", "create"], ["phase-c-sweep", "--output", str(tmp_path / "r/x.csv")]):
        _one_line_error(run_cli(*args, "--config", str(path), "--storage", url), "line 5")
    assert not (tmp_path / "db").exists() and not (tmp_path / "r").exists()


def test_cuda_only_speed_options_fail_before_any_work(tmp_path, synthetic_csv):
    path = write_study(tmp_path / "s.yaml", study_dict(synthetic_csv, training={"precision": "tf32"}))
    url = f"sqlite:///{tmp_path / 'db' / 'c5snn.db'}"
    proc = run_cli("worker", "--config", str(path), "--storage", url, "--device", "cpu")
    _one_line_error(proc, "training.precision", "tf32 needs a CUDA device")
    assert not (tmp_path / "db").exists()  # nothing opened, nothing claimed
    proc = run_cli("train", "--config", str(path), *PIN, "--set", "training.precision=fp32",
                   "--set", "training.lif_kernel=triton", "--run-dir", str(tmp_path / "run"))
    _one_line_error(proc, "training.lif_kernel", "triton needs a CUDA device")
    assert not (tmp_path / "run").exists()


def test_train_with_the_snntorch_backend(study_file, tmp_path):
    """The reference backend trains end to end and writes a checkpoint the fast path loads."""
    from c5snn.artifacts import load_model

    run_dir = tmp_path / "run"
    proc = run_cli("train", "--config", str(study_file), *PIN, "--set", "encoding=rate_coded",
                   "--set", "training.lif_kernel=snntorch", "--set", "training.epochs=1",
                   "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout
    model, state = load_model(run_dir / "best_model.pt")  # fast path, strict load
    assert state["config"]["training"]["lif_kernel"] == "snntorch"
