import itertools
from pathlib import Path

import pytest
from conftest import ROOT, study_dict, write_study

from c5snn.config import GRID_KEYS, load_config
from c5snn.errors import StudyFileError


def test_phase_c_study_is_the_story_grid():
    config = load_config(ROOT / "studies" / "phase_c.yaml")
    points = config.grid_points()
    assert len(points) == 72 and config.window_size == 90
    expected = list(itertools.product([2, 4, 6], [2, 4], [64, 128], [0.5, 0.8, 0.95],
                                      ["direct", "rate_coded"]))
    assert [tuple(p[k] for k in GRID_KEYS) for p in points] == expected
    assert config.config_id(points[37]) == 37
    p = config.model_params(points[1])
    assert (p.d_ffn, p.timesteps, p.encoding) == (128, 10, "rate_coded")
    assert config.model_params(points[0]).timesteps == 1
    assert (config.top_k, config.seeds, config.screening_seed) == (5, (42, 123, 7), 42)
    assert load_config(ROOT / "studies" / "quickstart.yaml").n_points == 72


BAD = [
    (lambda s: s["training"].update(lr=1), "training.lr", "unknown key"),
    (lambda s: s.update(extra={}), "extra", "unknown section"),
    (lambda s: s["grid"].update(n_heads=[3]), "grid.n_heads", "does not divide"),
    (lambda s: s["data"].update(window_size=101), "data.window_size", "max_window_size"),
    (lambda s: s["data"].update(split_ratios=[0.5, 0.5, 0.5]), "data.split_ratios", "sum to 1"),
    (lambda s: s["grid"].update(encoding=["poisson"]), "grid.encoding", "must be one of"),
    (lambda s: s["training"].update(epochs="ten"), "training.epochs", "must be int"),
    (lambda s: s["promote"].update(seeds=[1, 1]), "promote.seeds", "duplicates"),
    (lambda s: s["study"].pop("name"), "study.name", "missing"),
    (lambda s: s["training"].update(precision="fp16"), "training.precision", "must be one of"),
    (lambda s: s["training"].update(compile="fast"), "training.compile", "must be one of"),
    (lambda s: s["training"].update(lif_kernel="cuda"), "training.lif_kernel", "must be one of"),
]


@pytest.mark.parametrize("mutate,key,rule", BAD, ids=[b[1] for b in BAD])
def test_study_file_mistakes_name_the_key(tmp_path, mutate, key, rule):
    study = study_dict(tmp_path / "x.csv")
    mutate(study)
    path = write_study(tmp_path / "s.yaml", study)
    with pytest.raises(StudyFileError) as info:
        load_config(path)
    assert str(path) in str(info.value) and f"'{key}'" in str(info.value)
    assert rule in str(info.value)


def test_overrides_and_content_hash(tmp_path, synthetic_csv):
    path = write_study(tmp_path / "s.yaml", study_dict(synthetic_csv))
    base = load_config(path)
    pinned = load_config(path, ["d_model=64", "training.epochs=7"])
    assert pinned.grid["d_model"] == (64,) and pinned.training.epochs == 7
    assert pinned.content_hash != base.content_hash
    assert load_config(path).content_hash == base.content_hash
    # the data by content, not by path; neither storage URL nor output folder count
    moved = tmp_path / "elsewhere" / "renamed.csv"
    moved.parent.mkdir()
    moved.write_bytes(synthetic_csv.read_bytes())
    other = study_dict(moved, study={"name": "t", "storage": "sqlite:///other.db"},
                       output={"dir": "/somewhere"})
    assert load_config(write_study(tmp_path / "m.yaml", other)).content_hash == base.content_hash
    moved.write_bytes(synthetic_csv.read_bytes().replace(b"\n1/", b"\n01/", 1))
    assert load_config(tmp_path / "m.yaml").content_hash != base.content_hash
    with pytest.raises(StudyFileError, match="'training.nope'"):
        load_config(path, ["training.nope=1"])


def test_speed_options_default_off_and_parse(tmp_path):
    path = write_study(tmp_path / "s.yaml", study_dict(tmp_path / "x.csv"))
    plain = load_config(path).training
    assert (plain.precision, plain.compile, plain.lif_kernel) == ("fp32", None, "torch")
    fast = load_config(path, ["training.precision=bf16", "training.compile=reduce-overhead",
                             "training.lif_kernel=triton"]).training
    assert (fast.precision, fast.compile, fast.lif_kernel) == ("bf16", "reduce-overhead", "triton")


def test_paths_in_a_study_file_are_relative_to_its_folder(tmp_path, monkeypatch, synthetic_csv):
    folder = tmp_path / "project" / "studies"
    folder.mkdir(parents=True)
    study = study_dict("../events.csv", study={"name": "rel", "storage": "sqlite:///../db/x.db"},
                       output={"dir": "../results"})
    path = write_study(folder / "s.yaml", study)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part
    config = load_config(path)
    assert config.data_path == tmp_path / "project" / "events.csv"
    assert config.storage == f"sqlite:///{tmp_path / 'project' / 'db' / 'x.db'}"
    assert config.sweep_csv(None) == tmp_path / "project" / "results" / "phase_c_sweep.csv"
    assert config.sweep_csv(tmp_path / "o.csv") == tmp_path / "o.csv"
    absolute = write_study(folder / "a.yaml", study_dict(synthetic_csv))
    assert load_config(absolute).data_path == synthetic_csv  # absolute paths are unchanged
    study.pop("output")  # output.dir is optional: export then writes to ./results
    assert load_config(write_study(folder / "b.yaml", study)).sweep_csv(None) == (
        Path("results") / "phase_c_sweep.csv")


def test_missing_data_file_error_names_the_resolved_path(tmp_path):
    from conftest import run_cli

    folder = tmp_path / "studies"
    folder.mkdir()
    path = write_study(folder / "s.yaml", study_dict("../nowhere.csv"))
    proc = run_cli("study", "create", "--config", str(path),
                   "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path.parent)
    assert proc.returncode == 1
    assert f"{tmp_path / 'nowhere.csv'}: no such file" in proc.stderr
    assert not (tmp_path / "x.db").exists()
