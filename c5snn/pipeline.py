"""The story's one-shot `phase-c-sweep`: create, screen, promote, re-run, export.

Every step is the service's own (study create, local workers, promote, export), so an
interrupted one-shot run continues the same studies when started again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from c5snn.config import StudyConfig
from c5snn.errors import NotReadyError, WorkersFailed
from c5snn.export import Paths, check_targets, export, leaderboard, top_table
from c5snn.launcher import check_count, launch, worker_args
from c5snn.lease import Timing
from c5snn.promote import promote
from c5snn.storage import Store
from c5snn.studies import SweepState, create_screening


def run_workers(config: StudyConfig, store: Store, *, n: int, gpus, threads, artifacts: Path,
                timing: Timing, echo) -> None:
    args = worker_args(config, timing, artifacts)
    if launch(args, n, gpus=gpus, threads=threads, echo=echo, storage_url=store.url):
        raise WorkersFailed("a worker process failed; see its [wN] lines above")


def phase_c_sweep(
    config: StudyConfig,
    store: Store,
    *,
    output: Path,
    top_k: int,
    seeds: tuple[int, ...],
    n_workers: int,
    gpus: list[str] | None,
    threads: int | None,
    artifacts: Path,
    timing: Timing,
    echo: Callable[[str], None],
) -> dict:
    """Run the whole sweep to its outputs; returns what `export` wrote."""
    check_count(n_workers, "--workers")  # before anything is written
    config.check_top_k(top_k)
    check_targets(Paths(output), force=False)
    _, created = create_screening(config, store)
    echo(f"{'created' if created else 'continuing'} study '{config.name}' in {store.masked}")
    workers = dict(n=n_workers, gpus=gpus, threads=threads, artifacts=artifacts, timing=timing,
                   echo=echo)
    echo(f"screening {config.n_points} points with {n_workers} worker(s)")
    run_workers(config, store, **workers)
    screening = SweepState.read(config, store, timing.budget).screening
    _require_finished(screening, "screening")
    echo(f"screening leaderboard (val, seed {config.screening_seed}):")
    echo(leaderboard(config, screening.complete_trials()))
    promote(config, store, top_k=top_k, seeds=seeds)
    echo(f"promote: top {top_k} x seeds {','.join(map(str, seeds))} on test")
    run_workers(config, store, **workers)
    _require_finished(SweepState.read(config, store, timing.budget).promote, "promote")
    written = export(config, store, output, artifacts=artifacts)
    echo(top_table(written["report"]))
    echo(f"wrote {written['csv']}, {written['top']}, {written['best']}, {written['meta']}")
    return written


def _require_finished(phase, what: str) -> None:
    """After the workers ended: every point done, or one line naming those given up."""
    if not phase.complete:
        given_up = phase.given_up_summary() or "none given up; start the workers again"
        raise NotReadyError(f"{what} ended with {phase.done}/{phase.n_points} points done; "
                            f"given up: {given_up}")
