"""`c5snn status`: where each phase of a study stands, from one `SweepState` snapshot."""

from __future__ import annotations

from collections import Counter

from c5snn.storage import ClaimState
from c5snn.studies import PhaseState, SweepState


def eta_s(phase: PhaseState) -> float | None:
    """Seconds until the phase ends at the mean duration of its done attempts, or None."""
    durations = [r.finished - r.started for r in phase.attempts
                 if r.state == ClaimState.DONE and r.finished]
    remaining = sum(1 for s in phase.points if not s.done and not s.given_up(phase.max_attempts))
    if not durations or not remaining:
        return None
    return sum(durations) / len(durations) * remaining / max(len(phase.running), 1)


def format_status(state: SweepState, storage: str) -> str:
    lines = [f"storage: {storage}"]
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
        for i, s in enumerate(p.points):
            if s.failures and not s.done:
                gave_up = " GIVEN UP" if s.given_up(p.max_attempts) else ""
                error = s.errors[-1] if s.errors else ""
                lines.append(f"  point {i}: {s.failures} failed attempt(s){gave_up}: {error}")
    return "\n".join(lines)
