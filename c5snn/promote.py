"""Promote: the top-K screening configurations, each re-run with every promote seed on test.

`promote()` only *creates* the promote study: a fixed list of (configuration, seed) points stored
in the study's user attrs. The same workers that ran screening then pull those points through
the same claim, heartbeat, retry and resume machinery (`c5snn.sweep`).
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from c5snn.config import StudyConfig
from c5snn.dashboard import write_note
from c5snn.errors import NotReadyError, StudyMismatchError
from c5snn.storage import Store
from c5snn.sweep import PROMOTE_METRIC, open_screening, promote_study_name, set_metric_name


def completed_screening(config: StudyConfig, store: Store) -> list[FrozenTrial]:
    """The COMPLETE screening trials, one per config_id, ordered by config_id."""
    study = open_screening(config, store)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return sorted(trials, key=lambda t: t.user_attrs["config_id"])


def rank(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Best val recall@20 first; ties broken by the lower config_id."""
    return sorted(trials, key=lambda t: (-t.value, t.user_attrs["config_id"]))


def promote(
    config: StudyConfig, store: Store, *, top_k: int, seeds: tuple[int, ...],
    allow_partial: bool = False,
) -> tuple[optuna.Study, bool]:
    """Create the promote study (idempotent); returns (study, created)."""
    trials = completed_screening(config, store)
    if len(trials) < config.n_points and not allow_partial:
        raise NotReadyError(
            f"screening of '{config.name}' has {len(trials)}/{config.n_points} points complete; "
            "wait for the workers (c5snn status) or pass --allow-partial"
        )
    if top_k < 1 or top_k > len(trials):
        raise NotReadyError(f"--top-k must be between 1 and {len(trials)} (complete points), got {top_k}")
    top = rank(trials)[:top_k]
    points = [
        {"rank": r + 1, "config_id": t.user_attrs["config_id"], "params": t.params, "seed": seed,
         "screening_trial": t.number, "screening_val_recall_at_20": t.value}
        for r, t in enumerate(top)
        for seed in seeds
    ]
    name = promote_study_name(config)
    try:
        study = optuna.load_study(study_name=name, storage=store.optuna)
    except KeyError:
        study = None
    if study is not None:
        stored = study.user_attrs.get("points")
        if stored != points:
            raise StudyMismatchError(
                f"promote study '{name}' already exists with other points (top-k, seeds or "
                "screening results differ); export it, or use a new study.name"
            )
        return study, False
    study = optuna.create_study(study_name=name, storage=store.optuna, direction="maximize",
                                load_if_exists=True)
    if "points" in study.user_attrs and study.user_attrs["points"] != points:
        raise StudyMismatchError(f"promote study '{name}' was just created with other points")
    set_metric_name(study, PROMOTE_METRIC)
    attrs = {
        "kind": "promote", "screening_study": config.name, "c5snn_hash": config.content_hash,
        "top_k": top_k, "seeds": list(seeds), "points": points,
        "objective": "test_recall_at_20 with the best val epoch's weights", "created": time.time(),
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    write_note(study, (
        f"**c5snn promote study** of screening study `{config.name}`: the top {top_k} "
        f"configurations by val recall@20 (ties: lower config_id), each trained with seeds "
        f"{', '.join(map(str, seeds))} and scored on the **test** split (objective: test "
        "recall@20 with the best val epoch's weights)."
    ))
    return study, True
