"""CA5 events: load and validate the CSV, build windows and chronological splits, batch on device.

The event matrix `P` is `(rows, 39)` multi-hot. Window `t` is `P[t : t+W]` with target `P[t+W]`,
so `N = rows - W` windows. Windows are never materialized as an `(N, W, 39)` tensor: a batch is an
index gather `P[idx[:, None] + arange(W)]` straight from the device-resident matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from c5snn.errors import DataError, first_line
from c5snn.files import atomic_path

N_PARTS = 39
N_PICKS = 5
M_COLS = [f"m_{i}" for i in range(1, N_PICKS + 1)]
P_COLS = [f"P_{i}" for i in range(1, N_PARTS + 1)]
MATRIX_HEADER = ["date", *M_COLS, *P_COLS]
DATE_HEADER = ["date", *M_COLS]
SHOW_ROWS = 5  # how many offending line numbers each failed rule lists


@dataclass(frozen=True)
class Events:
    """Validated events: `dates[i]` is the day of row i, `matrix[i]` its 39-part multi-hot row."""

    path: Path
    dates: np.ndarray  # (rows,) datetime64[D]
    matrix: np.ndarray  # (rows, 39) uint8

    @property
    def rows(self) -> int:
        return len(self.dates)

    def summary(self) -> dict:
        counts = self.matrix.sum(axis=0)
        rarest, commonest = int(counts.argmin()), int(counts.argmax())
        return {
            "file": str(self.path),
            "rows": self.rows,
            "first_date": str(self.dates[0]),
            "last_date": str(self.dates[-1]),
            "rarest_part": (rarest + 1, int(counts[rarest])),
            "commonest_part": (commonest + 1, int(counts[commonest])),
        }


def _lines(mask: np.ndarray) -> str:
    """Line numbers in the file (header is line 1) of the rows where `mask` is True."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i + 2) for i in idx[:SHOW_ROWS])
    more = f" and {len(idx) - SHOW_ROWS} more" if len(idx) > SHOW_ROWS else ""
    return f"line{'s' if len(idx) > 1 else ''} {shown}{more}"


def _parse_dates(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Parse `M/D/YYYY` strictly; returns (datetime64[D] array, bad-row mask)."""
    parts = text.str.fullmatch(r"\s*(\d{1,2})/(\d{1,2})/(\d{4})\s*")
    ok = parts.fillna(False).to_numpy(dtype=bool, copy=True)
    out = np.full(len(text), np.datetime64("NaT"), dtype="datetime64[D]")
    for i in np.flatnonzero(ok):
        m, d, y = (int(v) for v in text.iat[i].strip().split("/"))
        try:
            out[i] = np.datetime64(date(y, m, d))
        except ValueError:
            ok[i] = False
    return out, ~ok


def _int_columns(frame: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Columns as int64 with a mask of rows holding a non-integer cell (those cells become 0)."""
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, copy=True)
    bad = ~np.isfinite(values) | (values != np.round(values))
    values[bad] = 0
    return values.astype(np.int64), bad.any(axis=1)


def load_events(path: str | Path) -> Events:
    """Read a CA5 CSV (`date,m_1..m_5[,P_1..P_39]`) and check every rule of DESIGN §1.

    Raises `DataError` listing each failed rule with the first offending line numbers.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({first_line(exc)})") from None
    header = [c.strip() for c in frame.columns]
    frame.columns = header
    if header not in (MATRIX_HEADER, DATE_HEADER):
        raise DataError(
            f"{path}: header must be 'date,m_1..m_5' (6 columns) or 'date,m_1..m_5,P_1..P_39' "
            f"(45 columns); got {len(header)} columns starting {','.join(header[:3])}"
        )
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows")

    errors: list[str] = []
    dates, bad_date = _parse_dates(frame["date"])
    if bad_date.any():
        errors.append(f"{_lines(bad_date)}: date is not a valid M/D/YYYY date")
    valid = ~bad_date
    order = np.zeros(len(frame), dtype=bool)
    vd = np.flatnonzero(valid)
    if len(vd) > 1:
        order[vd[1:][dates[vd[1:]] <= dates[vd[:-1]]]] = True
    if order.any():
        errors.append(f"{_lines(order)}: date is not after the previous row's (strictly increasing)")

    picks, bad_int = _int_columns(frame, M_COLS)
    if bad_int.any():
        errors.append(f"{_lines(bad_int)}: m_1..m_5 must be integers")
    out_of_range = ((picks < 1) | (picks > N_PARTS)).any(axis=1) & ~bad_int
    if out_of_range.any():
        errors.append(f"{_lines(out_of_range)}: m_1..m_5 must lie in 1..39")
    sorted_picks = np.sort(picks, axis=1)
    duplicate = (sorted_picks[:, 1:] == sorted_picks[:, :-1]).any(axis=1) & ~bad_int
    if duplicate.any():
        errors.append(f"{_lines(duplicate)}: m_1..m_5 must be five distinct parts")

    good = ~(bad_int | out_of_range | duplicate)
    from_m = np.zeros((len(frame), N_PARTS), dtype=np.uint8)
    rows = np.repeat(np.flatnonzero(good), N_PICKS)
    from_m[rows, (picks[good] - 1).reshape(-1)] = 1

    if header == MATRIX_HEADER:
        p, bad_p_int = _int_columns(frame, P_COLS)
        not_binary = bad_p_int | ((p != 0) & (p != 1)).any(axis=1)
        if not_binary.any():
            errors.append(f"{_lines(not_binary)}: P_1..P_39 must be 0 or 1")
        bad_sum = ~not_binary & (p.sum(axis=1) != N_PICKS)
        if bad_sum.any():
            errors.append(f"{_lines(bad_sum)}: P_1..P_39 must sum to 5")
        mismatch = good & ~not_binary & ~bad_sum & (p != from_m).any(axis=1)
        if mismatch.any():
            errors.append(f"{_lines(mismatch)}: P_i must be 1 exactly for the five m values")

    if errors:
        raise DataError(f"{path}: " + "; ".join(errors))
    return Events(path=path, dates=dates, matrix=from_m)


@dataclass(frozen=True)
class Split:
    """A contiguous, chronological range of window indices and the dates of their targets."""

    name: str
    start: int
    stop: int
    first_target: str
    last_target: str

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_splits(
    events: Events, window: int, ratios: tuple[float, float, float]
) -> dict[str, Split]:
    """Chronological train/val/test split of the `rows - window` windows (DESIGN §1)."""
    n = events.rows - window
    n_train = int(n * ratios[0])
    n_val = int(n * ratios[1])
    n_test = n - n_train - n_val
    if window < 1:
        raise DataError(f"{events.path}: window_size must be >= 1, got {window}")
    if min(n_train, n_val, n_test) < 1:
        raise DataError(
            f"{events.path}: {events.rows} rows give {max(n, 0)} windows of size {window}; "
            f"the splits {ratios} need at least one window each (train {n_train}, val {n_val}, "
            f"test {max(n_test, 0)})"
        )
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    return {
        name: Split(
            name,
            start,
            stop,
            str(events.dates[start + window]),
            str(events.dates[stop - 1 + window]),
        )
        for name, (start, stop) in bounds.items()
    }


class WindowData:
    """The event matrix on the training device and the window index ranges of each split.

    Memory is `(rows, 39)` floats whatever W is. `batches()` gathers `(B, W, 39)` windows by
    index on the device; the only host->device traffic is one shuffled index vector per epoch.
    """

    def __init__(self, events: Events, window: int, splits: dict[str, Split], device: str):
        self.window = window
        self.splits = splits
        self.device = torch.device(device)
        self.matrix = torch.as_tensor(events.matrix, dtype=torch.float32, device=self.device)
        self._offsets = torch.arange(window, device=self.device)  # (W,)

    def windows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows and targets for window indices `idx` (B,): `(B, W, 39)` and `(B, 39)`."""
        x = self.matrix[idx[:, None] + self._offsets]  # (B, W, 39)
        y = self.matrix[idx + self.window]  # (B, 39)
        return x, y

    def all_windows(self) -> torch.Tensor:
        """Every window as a strided view `(N, W, 39)` of the matrix (no copy)."""
        n = self.matrix.shape[0] - self.window
        return self.matrix.as_strided((n, self.window, N_PARTS), (N_PARTS, N_PARTS, 1))

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(x, y)` batches of a split; shuffled when a (CPU) generator is given."""
        s = self.splits[split]
        if generator is not None:
            order = torch.randperm(s.size, generator=generator).to(self.device) + s.start
        else:
            order = torch.arange(s.start, s.stop, device=self.device)
        n_batches = -(-s.size // batch_size)
        if limit is not None:
            n_batches = min(n_batches, limit)
        for b in range(n_batches):
            yield self.windows(order[b * batch_size : (b + 1) * batch_size])

    def targets(self, split: str, limit_windows: int | None = None) -> torch.Tensor:
        """The `(n, 39)` targets of a split (first `limit_windows` only, if given)."""
        s = self.splits[split]
        stop = s.stop if limit_windows is None else min(s.stop, s.start + limit_windows)
        return self.matrix[s.start + self.window : stop + self.window]

    def part_frequencies(self, split: str) -> torch.Tensor:
        """How often each part is a target in a split: `(39,)`."""
        return self.targets(split).sum(dim=0)


def prepare(path: Path, window: int, ratios, device: str = "cpu") -> WindowData:
    """Load, validate and split the events; returns the device-resident window data."""
    events = load_events(path)
    return WindowData(events, window, make_splits(events, window, ratios), device)


def synthesize(rows: int, seed: int) -> pd.DataFrame:
    """A synthetic, uniformly random 5-of-39 event table in CA5_matrix_binary format."""
    if rows < 1:
        raise DataError(f"--rows must be >= 1, got {rows}")
    rng = np.random.default_rng(seed)
    picks = np.sort(np.argsort(rng.random((rows, N_PARTS)), axis=1)[:, :N_PICKS] + 1, axis=1)
    start = np.datetime64("1992-02-04")
    days = start + np.arange(rows) * 2
    matrix = np.zeros((rows, N_PARTS), dtype=np.int64)
    np.put_along_axis(matrix, picks - 1, 1, axis=1)
    frame = pd.DataFrame(matrix, columns=P_COLS)
    for i, col in enumerate(M_COLS):
        frame.insert(i, col, picks[:, i])
    dates = pd.to_datetime(days)
    frame.insert(0, "date", [f"{d.month}/{d.day}/{d.year}" for d in dates])
    return frame


def write_synthetic(out: Path, rows: int, seed: int) -> Path:
    """Write `synthesize(rows, seed)` to `out` atomically (no half-written file on failure)."""
    if not Path(out).parent.is_dir():
        raise DataError(f"{out}: folder {Path(out).parent} does not exist")
    frame = synthesize(rows, seed)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    return out


def file_sha256(path: Path) -> str:
    """The file's content hash: what names a data file, wherever it lies."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()
