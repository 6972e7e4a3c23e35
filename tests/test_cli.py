"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, nothing written."""

import ctypes.util
from concurrent.futures import ThreadPoolExecutor

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


def _files(root):
    return {p for p in root.rglob("*")}


def test_every_command_refuses_bad_values_with_one_line_and_writes_nothing(tmp_path, synthetic_csv):
    study = write_study(tmp_path / "s.yaml", study_dict(synthetic_csv, name="bad-values"))
    long_name = write_study(tmp_path / "long.yaml", study_dict(synthetic_csv, name="x" * 513))
    big_top = write_study(tmp_path / "top.yaml", study_dict(synthetic_csv,
                                                            promote={"top_k": 73}))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(study.read_bytes().replace(b"bad-values", "bäd".encode("latin-1")))
    s, run = ["--config", str(study)], ["--run-dir", str(tmp_path / "run")]
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    cases = [
        (["workers", *s, "-n", "0"], "--workers/-n must be >= 1"),
        (["workers", *s, "-n", "-1"], "--workers/-n must be >= 1"),
        (["workers", *s, "--gpus", "9"], "GPU 9 does not exist"),
        (["workers", *s, "--gpus", "abc"], "'abc' is not a GPU id"),
        (["workers", *s, "--grace", "-1"], "--grace must be at least 3 x --heartbeat"),
        (["workers", *s, "--grace", "2", "--heartbeat", "15"], "--grace must be at least 3 x"),
        (["workers", *s, "--heartbeat", "0"], "--heartbeat must be > 0"),
        (["worker", *s, "--max-attempts", "0"], "--max-attempts must be >= 1"),
        (["worker", *s, "--db-outage-tolerance", "-1"], "--db-outage-tolerance must be >= 0"),
        (["worker", *s, "--device", "tpu:7"], "--device tpu:7"),
        (["worker", *s, "--device", "cuda:0"], "no usable CUDA device"),
        (["worker", *s, "--threads", "0"], "--threads must be >= 1"),
        (["train", *s, *PIN, *run, "--device", "cuda:0"], "no usable CUDA device"),
        (["train", *s, *PIN, *run, "--seed", "-5"], "--seed must lie in 0.."),
        (["train", *s, *PIN, *run, "--seed", str(2**64)], "--seed must lie in 0.."),
        (["train", *s, *PIN, *run, "--set", "training.learning_rate=.nan"], "finite number > 0"),
        (["train", *s, *PIN, *run, "--set", "training.learning_rate=.inf"], "finite number > 0"),
        (["train", *s, *PIN, *run, "--set", "training.epochs=[1"], "not a YAML value"),
        (["train", "--config", str(latin1), *PIN, *run], "not UTF-8"),
        (["train", *s, *PIN, *run, "--nope"], "No such option: --nope"),
        (["phase-c-sweep", *s, "--workers", "0", "--storage", missing], "--workers must be >= 1"),
        (["phase-c-sweep", *s, "--seeds", "1,x", "--storage", missing], "--seeds"),
        (["phase-c-sweep", *s, "--top-k", "80", "--storage", missing], "got 80"),
        (["phase-c-sweep", *s, "--storage", missing, "--output", str(tmp_path)], "existing folder"),
        (["study", "create", "--config", str(long_name)], "at most 512 characters"),
        (["study", "create", "--config", str(big_top)], "must lie in 1..72 (the grid's points), got 73"),
        (["study", "create", *s, "--storage", "postgresql+psycopg://u@127.0.0.1:abc/db"],
         "not a valid SQLAlchemy storage URL"),
        (["study", "create", *s, "--storage", "sqlite:////dev/null/c5snn.db"], "cannot open storage"),
        (["status", *s, "--storage", missing], "does not exist"),
        (["status", *s, "--storage", missing, "--watch", "abc"], "Invalid value for '--watch'"),
        (["promote", *s, "--storage", missing], "does not exist"),
        (["export", *s, "--storage", missing], "does not exist"),
        (["dashboard", *s, "--storage", missing, "--port", "99999"], "--port must lie in 1..65535"),
        (["data", "synth", "--out", str(tmp_path / "no" / "x.csv")], "does not exist"),
        (["data", "synth", "--out", str(tmp_path / "x.csv"), "--rows", "0"], "--rows must be >= 1"),
    ]
    before = _files(tmp_path)
    with ThreadPoolExecutor(2) as pool:  # two at a time: each is a process that imports torch
        procs = list(pool.map(lambda case: run_cli(*case[0], cwd=tmp_path), cases))
    for (args, fragment), proc in zip(cases, procs, strict=True):
        assert proc.returncode != 0, (args, proc.stdout[-500:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)
        assert fragment in lines[0], (args, lines[0])
    assert _files(tmp_path) == before, _files(tmp_path) - before  # the paths name the command
