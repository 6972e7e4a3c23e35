import hashlib

import pandas as pd
import pytest
import torch
from conftest import ROOT

from c5snn.data import load_events, make_splits, prepare, synthesize, write_synthetic
from c5snn.errors import DataError


def _corrupt(tmp_path, frame: pd.DataFrame, name="bad.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def frame():
    return synthesize(40, seed=3)


def test_both_formats_load_identically(tmp_path, frame):
    full = _corrupt(tmp_path, frame, "full.csv")
    short = _corrupt(tmp_path, frame.iloc[:, :6], "short.csv")
    a, b = load_events(full), load_events(short)
    assert a.rows == b.rows == 40
    assert (a.matrix == b.matrix).all() and (a.matrix.sum(axis=1) == 5).all()


RULES = [
    ("date", lambda f: f.__setitem__("date", f["date"].where(f.index != 4, "13/45/2001")),
     "line 6", "M/D/YYYY"),
    ("order", lambda f: f.__setitem__("date", f["date"].where(f.index != 7, f["date"][2])),
     "line 9", "strictly increasing"),
    ("range", lambda f: f.__setitem__("m_3", f["m_3"].where(f.index != 2, 40)), "line 4", "1..39"),
    ("integer", lambda f: f.__setitem__("m_1", f["m_1"].astype(object).where(f.index != 3, "x")),
     "line 5", "integers"),
    ("distinct", lambda f: f.__setitem__("m_2", f["m_2"].where(f.index != 5, f["m_1"])),
     "line 7", "distinct"),
    ("binary", lambda f: f.__setitem__("P_1", f["P_1"].where(f.index != 8, 2)), "line 10", "0 or 1"),
    ("sum", lambda f: f.__setitem__("P_39", 1 - f["P_39"]), "line", "sum to 5"),
]


@pytest.mark.parametrize("rule,breaker,where,message", RULES, ids=[r[0] for r in RULES])
def test_each_rule_is_reported_with_its_line(tmp_path, frame, rule, breaker, where, message):
    breaker(frame)
    path = _corrupt(tmp_path, frame)
    with pytest.raises(DataError) as info:
        load_events(path)
    text = str(info.value)
    assert str(path) in text and where in text and message in text


def test_p_columns_must_match_m_values(tmp_path, frame):
    row = frame.index[10]
    on = [c for c in frame.columns[6:] if frame.at[row, c] == 1][0]
    off = [c for c in frame.columns[6:] if frame.at[row, c] == 0][0]
    frame.at[row, on], frame.at[row, off] = 0, 1
    with pytest.raises(DataError, match="line 12: P_i must be 1 exactly for the five m values"):
        load_events(_corrupt(tmp_path, frame))


def test_all_failures_are_reported_together(tmp_path, frame):
    frame.loc[1, "m_1"] = 0
    frame.loc[2, "date"] = "yesterday"
    with pytest.raises(DataError) as info:
        load_events(_corrupt(tmp_path, frame))
    assert "line 3" in str(info.value) and "line 4" in str(info.value)


def test_header_is_checked(tmp_path, frame):
    with pytest.raises(DataError, match="header"):
        load_events(_corrupt(tmp_path, frame.rename(columns={"m_1": "m1"})))


def test_windows_are_views_and_splits_chronological(tmp_path):
    events = load_events(write_synthetic(tmp_path / "e.csv", rows=300, seed=0))
    splits = make_splits(events, 90, (0.7, 0.15, 0.15))
    n = 300 - 90
    assert [s.size for s in splits.values()] == [int(n * 0.7), int(n * 0.15),
                                                 n - int(n * 0.7) - int(n * 0.15)]
    assert splits["train"].stop == splits["val"].start and splits["val"].stop == splits["test"].start
    assert splits["val"].first_target == str(events.dates[splits["val"].start + 90])
    data = prepare(tmp_path / "e.csv", 90, (0.7, 0.15, 0.15))
    windows = data.all_windows()
    assert windows.shape == (n, 90, 39)
    assert windows.untyped_storage().data_ptr() == data.matrix.untyped_storage().data_ptr()
    x, y = data.windows(torch.tensor([5, 17]))
    assert torch.equal(x[1], windows[17]) and torch.equal(y[1], data.matrix[17 + 90])


def test_shuffled_batches_are_a_seeded_permutation(tmp_path):
    data = prepare(write_synthetic(tmp_path / "e.csv", rows=200, seed=0), 10, (0.7, 0.15, 0.15))

    def targets(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in data.batches("train", 16, generator=gen)])

    ordered = torch.cat([y for _, y in data.batches("train", 16)])
    assert torch.equal(targets(1), targets(1)) and not torch.equal(targets(1), targets(2))
    assert torch.equal(ordered, data.targets("train"))
    assert sorted(map(tuple, targets(1).tolist())) == sorted(map(tuple, ordered.tolist()))


def test_too_short_for_window_and_splits(tmp_path):
    events = load_events(write_synthetic(tmp_path / "e.csv", rows=95, seed=0))
    with pytest.raises(DataError, match="at least one window each"):
        make_splits(events, 90, (0.7, 0.15, 0.15))


def test_the_shipped_ca5_file_is_the_real_data():
    """The one test that reads data/: the file `make demo` and studies/phase_c.yaml use."""
    path = ROOT / "data" / "CA5_matrix_binary.csv"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "43c61caf7d47a2ba25c0cdfc015c74d20e7ffe05c162cd05b96405fa81d6b7ab")
    events = load_events(path)
    assert events.rows == 11_692
    assert (str(events.dates[0]), str(events.dates[-1])) == ("1992-02-04", "2026-01-28")
    assert {k: s.size for k, s in make_splits(events, 90, (0.7, 0.15, 0.15)).items()} == {
        "train": 8121, "val": 1740, "test": 1741}
