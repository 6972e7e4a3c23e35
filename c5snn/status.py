"""`c5snn status`: where each phase of a study stands, from one `SweepState` snapshot; and
`status --repair`, which settles what dead workers (or an older c5snn) left inconsistent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optuna.trial import TrialState

from c5snn.artifacts import point_dir
from c5snn.config import StudyConfig
from c5snn.reaper import reap, reconcile
from c5snn.storage import ClaimState, Store
from c5snn.studies import PhaseState, SweepState, phases


def eta_s(phase: PhaseState) -> float | None:
    """Seconds until the phase ends at the mean duration of its done attempts, or None."""
    durations = [r.finished - r.started for r in phase.attempts
                 if r.state == ClaimState.DONE and r.finished]
    remaining = sum(1 for s in phase.points if not s.done and not s.given_up(phase.budget))
    if not durations or not remaining:
        return None
    return sum(durations) / len(durations) * remaining / max(len(phase.running), 1)


def orphans(phase: PhaseState) -> list[str]:
    """RUNNING trials whose claim is not RUNNING: no worker will ever finish them."""
    live = {r.id for r in phase.attempts if r.state == ClaimState.RUNNING}
    states = {r.id: r.state for r in phase.attempts}
    return [f"  trial {t.number}: RUNNING without a live worker (claim "
            f"{states.get(t.user_attrs.get('claim'), 'missing')}); `c5snn status --repair` "
            "FAILs it" for t in phase.trials
            if t.state == TrialState.RUNNING and t.user_attrs.get("claim") not in live]


def format_status(state: SweepState, storage: str, artifacts: Path) -> str:
    budget = state.screening.budget
    lines = [f"storage: {storage}", f"artifacts: {artifacts}",
             f"budgets per point: {budget.max_attempts} failed attempts (the trial's own fault), "
             f"{budget.max_disruptions} disrupted (its worker died or froze)"]
    for p in state.phases:
        counts = Counter(t.state.name for t in p.trials)
        states = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no trials"
        eta = eta_s(p)
        eta_text = f", ETA {eta / 60:.1f} min" if eta is not None else ""
        lines.append(f"{p.phase.kind} study '{p.phase.study}': {p.done}/{p.n_points} done "
                     f"({states}){eta_text}")
        for r in p.running:
            lines.append(
                f"  running point {r.point} (trial {r.trial_number}) on {r.worker}@{r.host} "
                f"[{r.device}] epoch {r.epoch}, heartbeat {state.now - r.heartbeat:.0f}s ago"
            )
        lines += orphans(p)
        for i, s in enumerate(p.points):
            if (s.failures or s.disruptions) and not s.done:
                gave_up = " GIVEN UP" if s.given_up(p.budget) else ""
                error = s.errors[-1] if s.errors else ""
                resume = _checkpoint_note(artifacts, p.phase.study, i) if not s.running else ""
                lines.append(f"  point {i}: {s.failures}/{p.budget.max_attempts} failed, "
                             f"{s.disruptions}/{p.budget.max_disruptions} disrupted"
                             f"{gave_up}{resume}: {error}")
    return "\n".join(lines)


def _checkpoint_note(artifacts: Path, study: str, point: int) -> str:
    """', resumes from its checkpoint' where the point left one under `artifacts`."""
    return ", resumes from its checkpoint" if (
        point_dir(artifacts, study, point) / "checkpoint.pt").is_file() else ""


def repair_study(config: StudyConfig, store: Store, grace_s: float) -> list[str]:
    """Settle every phase of the study once, as workers do while they run (`c5snn.reaper`):
    attempts silent for `grace_s` become stale, RUNNING trials without a live claim FAIL,
    stale claims whose trial COMPLETEd become done. Returns one line per fix."""
    fixes = []
    for phase in store.call(lambda: phases(config, store)):
        fixes += reap(store, phase.study, grace_s, store.attempts(phase.study))
        fixes += reconcile(store, phase.study, thorough=True)
    return fixes
