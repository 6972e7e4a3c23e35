"""Export: the story's outputs, read back from the studies in storage.

    phase_c_sweep.csv       all screening points, ordered by config_id
    phase_c_top5.json       top-K x seeds on test, in the original comparison format, plus
                            per-seed metrics, chance levels, a frequency baseline and a
                            bootstrap interval of each model's test recall@20
    phase_c_best/           best config (mean test recall@20), best seed within it
    phase_c_sweep_meta.json grid, window, seeds, top-k, storage (no password), wall times

Everything is written into a temporary folder first and moved into place at the end, so a
failed export leaves the previous outputs as they were.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import platform
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from optuna.trial import FrozenTrial

from c5snn.artifacts import BEST_FILES
from c5snn.config import StudyConfig
from c5snn.data import WindowData, prepare
from c5snn.errors import ArtifactError, NotReadyError
from c5snn.metrics import METRIC_KEYS, chance_metrics, compute_metrics, per_window_metrics
from c5snn.plots import write_plots
from c5snn.promote import rank
from c5snn.storage import Store
from c5snn.studies import PhaseState, SweepState

CSV_COLUMNS = [
    "config_id", "d_model", "n_heads", "n_layers", "d_ffn", "beta", "encoding", "timesteps",
    "val_recall_at_20", "val_hit_at_20", "val_mrr", "training_time_s", "best_epoch",
]
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Paths:
    csv: Path

    @property
    def folder(self) -> Path:
        return self.csv.parent

    @property
    def stem(self) -> str:  # "phase_c" for phase_c_sweep.csv
        name = self.csv.stem
        return name[: -len("_sweep")] if name.endswith("_sweep") else name

    @property
    def top(self) -> Path:
        return self.folder / f"{self.stem}_top5.json"

    @property
    def best(self) -> Path:
        return self.folder / f"{self.stem}_best"

    @property
    def meta(self) -> Path:
        return self.folder / f"{self.stem}_sweep_meta.json"


def sweep_rows(config: StudyConfig, trials: list[FrozenTrial]) -> list[dict]:
    rows = []
    for t in trials:
        p = config.model_params(t.params)
        rows.append({
            "config_id": t.user_attrs["config_id"], "d_model": p.d_model, "n_heads": p.n_heads,
            "n_layers": p.n_layers, "d_ffn": p.d_ffn, "beta": p.beta, "encoding": p.encoding,
            "timesteps": p.timesteps, "val_recall_at_20": round(t.value, 4),
            "val_hit_at_20": round(t.user_attrs["val_hit_at_20"], 4),
            "val_mrr": round(t.user_attrs["val_mrr"], 4),
            "training_time_s": round(t.user_attrs["training_time_s"], 1),
            "best_epoch": t.user_attrs["best_epoch"],
        })
    return rows


def leaderboard(config: StudyConfig, trials: list[FrozenTrial]) -> str:
    """All screening points, best first, with a mark on silent networks."""
    lines = ["rank  id  model                                     val_r@20  val_hit@20  val_mrr"]
    for i, t in enumerate(rank(trials), 1):
        p = config.model_params(t.params)
        silent = "  silent (frequency baseline in disguise)" if t.user_attrs.get("silent") else ""
        lines.append(
            f"{i:>4} {t.user_attrs['config_id']:>3}  {p.describe():<40}  {t.value:.4f}    "
            f"{t.user_attrs['val_hit_at_20']:.4f}      {t.user_attrs['val_mrr']:.4f}{silent}"
        )
    return "\n".join(lines)


def frequency_baseline(data: WindowData, n_windows: int | None = None) -> dict[str, float]:
    """Parts ranked by how often they were targets in train, scored on the (first n) test windows."""
    freq = data.part_frequencies("train").float()  # (39,)
    targets = data.targets("test", n_windows)
    return compute_metrics(freq.expand(targets.shape[0], -1), targets)


def _bootstrap_ci(per_window: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(per_window)
    idx = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    means = per_window[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _population_std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def promote_models(config: StudyConfig, promote: PhaseState, data: WindowData,
                   dirs: dict[tuple[int, int], Path]) -> tuple[list[dict], dict]:
    """The top-K models (JSON-ready, best first by rank) and the chosen best run; `dirs` are
    the promote points' run directories (`PhaseState.run_dirs`)."""
    points = promote.study.user_attrs["points"]
    done = {(t.user_attrs["config_id"], t.user_attrs["seed"]): t
            for t in promote.complete_trials()}
    # Test logits of every run cover the same windows: all of test, or the first ones when
    # training.limit_test_batches caps evaluation. Baseline and intervals use exactly those.
    logits = {key: torch.load(path / "test_logits.pt", weights_only=True)
              for key, path in dirs.items()}
    n_windows = next(iter(logits.values())).shape[0]
    chance = chance_metrics()
    baseline = frequency_baseline(data, n_windows)
    targets = data.targets("test", n_windows)
    models, best = [], None
    for rank_ in sorted({p["rank"] for p in points}):
        group = [p for p in points if p["rank"] == rank_]
        trials = [done[(p["config_id"], p["seed"])] for p in group]
        per_seed = [
            {"seed": t.user_attrs["seed"], "trial": t.number,
             "metrics": {k: t.user_attrs["test_metrics"][k] for k in METRIC_KEYS},
             "val_recall_at_20": t.user_attrs["val_recall_at_20"],
             "best_epoch": t.user_attrs["best_epoch"], "epochs_run": t.user_attrs["epochs_run"],
             "training_time_s": t.user_attrs["training_time_s"],
             "spike_rate": t.user_attrs["spike_rate"]}
            for t in trials
        ]
        per_window = np.mean([
            per_window_metrics(logits[(p["config_id"], p["seed"])], targets)["recall_at_20"].numpy()
            for p in group
        ], axis=0)  # (n_windows,) recall@20 per test window, averaged over seeds
        lo, hi = _bootstrap_ci(per_window)
        first = trials[0]
        params = config.model_params(first.params)
        runtime = {"python": platform.python_version(), "torch": torch.__version__,
                   "devices": sorted({t.user_attrs["device"] for t in trials}),
                   "hosts": sorted({t.user_attrs["host"] for t in trials})}
        model = {
            "name": f"spiking_transformer_top{rank_}",
            "type": "learned",
            "phase": "phase_c",
            "metrics_mean": {k: statistics.fmean(s["metrics"][k] for s in per_seed)
                             for k in METRIC_KEYS},
            "metrics_std": {k: _population_std([s["metrics"][k] for s in per_seed])
                            for k in METRIC_KEYS},
            "n_seeds": len(per_seed),
            "training_time_s": statistics.fmean(s["training_time_s"] for s in per_seed),
            "environment": environment_summary(runtime),
            "runtime": runtime,
            "config": {"config_id": group[0]["config_id"], "model_type": "spiking_transformer",
                       **params.__dict__, "window_size": config.window_size,
                       "screening_val_recall_at_20": group[0]["screening_val_recall_at_20"]},
            "per_seed": per_seed,
            "test_recall_at_20_ci95": [lo, hi],
            "above_chance": lo > chance["recall_at_20"],
            "above_frequency_baseline": lo > baseline["recall_at_20"],
        }
        models.append(model)
        best_seed = max(per_seed, key=lambda s: s["metrics"]["recall_at_20"])  # first on ties
        key = (-model["metrics_mean"]["recall_at_20"], group[0]["config_id"])
        if best is None or key < best["key"]:
            best = {"key": key, "model": model["name"], "seed": best_seed["seed"],
                    "run_dir": dirs[(group[0]["config_id"], best_seed["seed"])],
                    "test_recall_at_20": best_seed["metrics"]["recall_at_20"]}
    return models, {"baseline": baseline, "chance": chance, "best": best, "n_windows": n_windows}


def environment_summary(runtime: dict) -> str:
    """Where a model's runs ran, as the one string the original comparison format holds
    (it wrote "local" or "runpod"): hosts and devices, e.g. "gpubox: cuda, cuda:1"."""
    return f"{', '.join(runtime['hosts'])}: {', '.join(runtime['devices'])}"


def _wall(trials: list[FrozenTrial]) -> dict:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not starts or not ends:
        return {}
    return {"start": min(starts).isoformat(), "end": max(ends).isoformat(),
            "wall_s": round((max(ends) - min(starts)).total_seconds(), 1),
            "trials": len(trials),
            "trial_time_s_sum": round(sum(t.user_attrs.get("training_time_s", 0) for t in trials), 1)}


def check_targets(paths: Paths, force: bool) -> None:
    """Refuse to replace what export did not write: a folder where a file goes (`--output
    results/`), or files in `<stem>_best/` other than the four export puts there."""
    if force:
        return
    for target in (paths.csv, paths.top, paths.meta):
        if target.is_dir():
            raise ArtifactError(f"{target} is an existing folder; export writes a file there "
                                "(choose another --output, or --force to replace it)")
    if paths.best.exists() and not paths.best.is_dir():
        raise ArtifactError(f"{paths.best} exists and is not export's folder (--force replaces it)")
    if paths.best.is_dir():
        foreign = sorted(p.name for p in paths.best.iterdir() if p.name not in BEST_FILES)
        if foreign:
            raise ArtifactError(f"{paths.best} holds files export did not write "
                                f"({', '.join(foreign[:3])}); move them, or --force to replace")


def export(config: StudyConfig, store: Store, csv_path: Path, *, artifacts: Path,
           plots: bool = False, force: bool = False, require_promote: bool = False) -> dict:
    """Write every output that the studies' progress allows; returns what was written.

    The promote runs' files are read under `artifacts`, wherever this machine mounts the folder
    the workers wrote to. Outputs are staged in a private folder and moved into place at the
    end, so a failed export leaves the previous outputs as they were and concurrent exports do
    not meet. With `require_promote`, an unfinished promote phase is an error (NotReadyError)
    rather than a CSV alone: what a scheduler's dependent job needs to fail visibly.
    """
    paths = Paths(Path(csv_path))
    check_targets(paths, force)
    state = SweepState.read(config, store)
    trials = state.screening.require_complete("the CSV needs all of them")
    promoted = state.promote is not None and state.promote.complete
    if require_promote and not promoted:
        progress = (f"{state.promote.done}/{state.promote.n_points} points done" if state.promote
                    else "no promote study yet")
        raise NotReadyError(f"promote of '{config.name}' is not complete ({progress}); "
                            "see c5snn status")
    dirs = state.promote.run_dirs(artifacts) if promoted else {}  # before anything is written
    paths.folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{paths.stem}-", dir=paths.folder))
    written = {"csv": paths.csv, "leaderboard": leaderboard(config, trials)}
    try:
        with open(staging / paths.csv.name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(sweep_rows(config, trials))
        if promoted:
            data = prepare(config.data_path, config.window_size, config.split_ratios)
            models, extra = promote_models(config, state.promote, data, dirs)
            report = {
                "models": models,
                "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "window_size": config.window_size,
                "test_split_size": extra["n_windows"],
                "test_split_dates": [data.splits["test"].first_target, data.splits["test"].last_target],
                "test_windows": {"scored": extra["n_windows"], "split": data.splits["test"].size,
                                 "complete": extra["n_windows"] == data.splits["test"].size},
                "budget": config.training.describe_budget(),
                "smoke_scale": not config.training.is_full,
                "chance": extra["chance"],
                "frequency_baseline": {"name": "frequency_baseline", "type": "baseline",
                                       "description": "parts ranked by train-split frequency",
                                       "metrics": extra["baseline"]},
                "best": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in extra["best"].items() if k != "key"},
            }
            (staging / paths.top.name).write_text(json.dumps(report, indent=2))
            best_dir = staging / paths.best.name
            best_dir.mkdir()
            for name in BEST_FILES:
                shutil.copy2(extra["best"]["run_dir"] / name, best_dir / name)
            promote_attrs = state.promote.study.user_attrs
            screening_attrs = state.screening.study.user_attrs
            meta = {
                "study": config.name, "study_hash": config.content_hash,
                "data": {"path": screening_attrs["data_path"],
                         "sha256": screening_attrs["data_sha256"]},
                "storage": store.masked, "backend": store.backend,
                "grid": {k: list(v) for k, v in config.grid.items()},
                "window_size": config.window_size, "screening_seed": config.screening_seed,
                "seeds": promote_attrs["seeds"], "top_k": promote_attrs["top_k"],
                "screening": _wall(trials),
                "promote": _wall(state.promote.complete_trials()),
            }
            (staging / paths.meta.name).write_text(json.dumps(meta, indent=2))
            written.update(top=paths.top, best=paths.best, meta=paths.meta, report=report)
        if plots:
            written["plots"] = write_plots(state.screening.study, staging, paths.stem,
                                           written.get("report"))
        for item in sorted(staging.iterdir()):
            target = paths.folder / item.name
            if target.is_dir():  # export's own <stem>_best/ (check_targets), or --force
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def top_table(report: dict) -> str:
    """The top-K table: mean ± std on test beside chance and the frequency baseline."""
    chance, base = report["chance"], report["frequency_baseline"]["metrics"]
    lines = [f"{'model':<37} test_r@20         test_hit@20       test_mrr          "
             "95% CI r@20       > chance  > baseline"]
    for m in report["models"]:
        mean, std = m["metrics_mean"], m["metrics_std"]
        lo, hi = m["test_recall_at_20_ci95"]
        silent = any(s["spike_rate"] and s["spike_rate"][-1] == 0.0 for s in m["per_seed"])
        name = m["name"] + (" (silent)" if silent else "")
        lines.append(
            f"{name:<37} {mean['recall_at_20']:.4f}±{std['recall_at_20']:.4f}   "
            f"{mean['hit_at_20']:.4f}±{std['hit_at_20']:.4f}   {mean['mrr']:.4f}±{std['mrr']:.4f}   "
            f"[{lo:.4f}, {hi:.4f}]  {'yes' if m['above_chance'] else 'no':<8}  "
            f"{'yes' if m['above_frequency_baseline'] else 'no'}"
        )
    lines.append(f"{'frequency_baseline':<37} {base['recall_at_20']:.4f}            "
                 f"{base['hit_at_20']:.4f}            {base['mrr']:.4f}")
    lines.append(f"{'chance (uniform ranking)':<37} {chance['recall_at_20']:.4f}            "
                 f"{chance['hit_at_20']:.4f}            {chance['mrr']:.4f}")
    scored = report["test_windows"]
    coverage = ("the whole test split" if scored["complete"] else
                f"the FIRST {scored['scored']} of {scored['split']} test windows only")
    lines.append(f"test: {coverage} (split {report['test_split_dates'][0]} .. "
                 f"{report['test_split_dates'][1]}), window {report['window_size']}")
    if any("(silent)" in line for line in lines):
        lines.append("(silent): the last block never fired in some seed's run, so it ranks by its "
                     "readout bias -- a frequency baseline in disguise")
    smoke = (" -- a smoke-scale run; the full study is studies/phase_c.yaml"
             if report["smoke_scale"] else "")
    lines.append(f"budget: {report['budget']}{smoke}")
    return "\n".join(lines)
