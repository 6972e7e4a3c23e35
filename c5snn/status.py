"""`c5snn status`: where each phase of a study stands, read from Optuna and the claim table."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from c5snn.config import StudyConfig
from c5snn.storage import ClaimRow, Store
from c5snn.sweep import load_study, phases, point_states


@dataclass
class PhaseStatus:
    study: str
    kind: str
    n_points: int
    done: int
    trial_states: dict[str, int]
    running: list[ClaimRow]
    failed: list[tuple[int, int, str]]  # (point, failed attempts, last error)
    given_up: list[int]
    eta_s: float | None


def study_status(config: StudyConfig, store: Store, max_attempts: int) -> list[PhaseStatus]:
    out = []
    for phase in phases(config, store):
        study = load_study(store, phase.study)
        rows = store.attempts(phase.study)
        states = point_states(rows, len(phase.points))
        trial_states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        running = [r for r in rows if r.state == "running"]
        durations = [r.finished - r.started for r in rows if r.state == "done" and r.finished]
        remaining = sum(1 for s in states if not s.done and s.failures < max_attempts)
        eta = None
        if durations and remaining:
            eta = sum(durations) / len(durations) * remaining / max(len(running), 1)
        out.append(PhaseStatus(
            study=phase.study, kind=phase.kind, n_points=len(phase.points),
            done=sum(s.done for s in states), trial_states=dict(trial_states), running=running,
            failed=[(i, s.failures, s.errors[-1] if s.errors else "") for i, s in enumerate(states)
                    if s.failures and not s.done],
            given_up=[i for i, s in enumerate(states) if not s.done and s.failures >= max_attempts],
            eta_s=eta,
        ))
    return out


def format_status(statuses: list[PhaseStatus], storage: str) -> str:
    lines = [f"storage: {storage}"]
    now = time.time()
    for s in statuses:
        states = ", ".join(f"{k} {v}" for k, v in sorted(s.trial_states.items())) or "no trials"
        eta = f", ETA {s.eta_s / 60:.1f} min" if s.eta_s is not None else ""
        lines.append(f"{s.kind} study '{s.study}': {s.done}/{s.n_points} done ({states}){eta}")
        for r in s.running:
            lines.append(
                f"  running point {r.point} (trial {r.trial_number}) on {r.worker}@{r.host} "
                f"[{r.device}] epoch {r.epoch}, heartbeat {now - r.heartbeat:.0f}s ago"
            )
        for point, failures, error in s.failed:
            gave_up = " GIVEN UP" if point in s.given_up else ""
            lines.append(f"  point {point}: {failures} failed attempt(s){gave_up}: {error}")
    return "\n".join(lines)
