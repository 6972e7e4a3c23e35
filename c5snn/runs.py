"""Single runs from a study file: `c5snn train`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from c5snn.artifacts import write_run_dir
from c5snn.config import GRID_KEYS, check_seed, load_config, snapshot
from c5snn.data import prepare
from c5snn.errors import StudyFileError
from c5snn.runtime import allocator, check_device, configure_threads, tune_cpu_allocator
from c5snn.train import RunResult, train_run


def train_one(
    config_path: Path,
    overrides: list[str],
    *,
    seed: int,
    device: str,
    threads: int | None,
    run_dir: Path,
    echo: Callable[[str], None],
) -> RunResult:
    """Train the single grid point that `overrides` pin and write its run directory."""
    configure_threads(threads)  # first: torch's threads copy its settings when they start
    config = load_config(config_path, overrides)
    points = config.grid_points()
    if len(points) != 1:
        loose = [k for k in GRID_KEYS if len(config.grid[k]) > 1]
        raise StudyFileError(
            f"{config_path}: train needs one grid point; pin {', '.join(loose)} with --set KEY=VALUE"
        )
    params = config.model_params(points[0])
    check_seed(seed, "--seed")
    check_device(config.training, device)  # before the data is put on it
    if device == "cpu":
        tune_cpu_allocator()
    data = prepare(config.data_path, config.window_size, config.split_ratios, device)
    echo(f"spiking_transformer {params.describe()} seed={seed} on {device} ({allocator()} allocator)")
    result = train_run(
        params, config.training, data, seed=seed,
        on_epoch=lambda r: echo(r.line(config.training.epochs)),
    )
    write_run_dir(run_dir, result, snapshot(config, params, seed, result.backend))
    return result
