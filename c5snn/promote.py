"""Promote: the top-K screening configurations, each re-run with every promote seed on test.

`promote()` only *creates* the promote study: a fixed list of (configuration, seed) points stored
in the study's user attrs. The same workers that ran screening then pull those points through
the same claim, heartbeat, retry and resume machinery (`c5snn.worker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from c5snn.config import StudyConfig
from c5snn.errors import NotReadyError, StudyMismatchError
from c5snn.lease import Budget
from c5snn.storage import Store
from c5snn.studies import PROMOTE, PROMOTE_METRIC, SweepState, describe_study, promote_study_name


def rank(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Best val recall@20 first; ties broken by the lower config_id."""
    return sorted(trials, key=lambda t: (-t.value, t.user_attrs["config_id"]))


def promote(
    config: StudyConfig, store: Store, *, top_k: int, seeds: tuple[int, ...],
    allow_partial: bool = False,
) -> tuple[optuna.Study, bool]:
    """Create the promote study (idempotent); returns (study, created)."""
    state = SweepState.read(config, store)
    if allow_partial:
        trials = state.screening.complete_trials()
    else:
        trials = state.screening.require_complete(
            "wait for the workers or pass --allow-partial")
    if top_k < 1 or top_k > len(trials):
        raise NotReadyError(f"--top-k must be between 1 and {len(trials)} (complete points), got {top_k}")
    points = [
        {"rank": r + 1, "config_id": t.user_attrs["config_id"], "params": t.params, "seed": seed,
         "screening_trial": t.number, "screening_val_recall_at_20": t.value}
        for r, t in enumerate(rank(trials)[:top_k])
        for seed in seeds
    ]
    name = promote_study_name(config)
    if state.promote is not None:
        if state.promote.study.user_attrs["points"] != points:
            raise StudyMismatchError(
                f"promote study '{name}' already exists with other points (top-k, seeds or "
                "screening results differ); export it, or use a new study.name"
            )
        return state.promote.study, False
    study = optuna.create_study(study_name=name, storage=store.optuna, direction="maximize",
                                load_if_exists=True)
    if "points" in study.user_attrs and study.user_attrs["points"] != points:
        raise StudyMismatchError(f"promote study '{name}' was just created with other points")
    attrs = {
        "kind": PROMOTE, "screening_study": config.name, "c5snn_hash": config.content_hash,
        "top_k": top_k, "seeds": list(seeds), "points": points,
        "objective": "test_recall_at_20 with the best val epoch's weights",
    }
    describe_study(study, PROMOTE_METRIC, attrs, (
        f"**c5snn promote study** of screening study `{config.name}`: the top {top_k} "
        f"configurations by val recall@20 (ties: lower config_id), each trained with seeds "
        f"{', '.join(map(str, seeds))} and scored on the **test** split (objective: test "
        "recall@20 with the best val epoch's weights)."
    ))
    return study, True


def wait_for_promote(config: StudyConfig, store: Store, *, budget: Budget, artifacts: Path,
                     poll_s: float = 5.0, echo: Callable[[str], None] = print) -> int:
    """Block until every promote point is done and its run directory is readable under
    `artifacts` (what `export` reads next); returns their number.

    Ends with NotReadyError (naming each given-up point and its last error) as soon as no point
    is left to run but some were given up: waiting longer would be waiting forever.
    """
    reported = -1
    while True:
        state = SweepState.read(config, store, budget).promote
        if state is None:
            raise NotReadyError(f"no promote study for '{config.name}'; run `c5snn promote` first")
        if state.complete:
            state.run_dirs(artifacts)  # ArtifactError naming a point whose files are not there
            return state.n_points
        if state.finished:
            raise NotReadyError(
                f"promote of '{config.name}' cannot finish ({state.done}/{state.n_points} done); "
                f"given up: {state.given_up_summary()}"
            )
        if state.done != reported:
            echo(f"promote: {state.done}/{state.n_points} done")
            reported = state.done
        time.sleep(poll_s)
