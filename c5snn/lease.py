"""Lease settings and attempt budgets: how workers beat, when silence means death, when a point
is given up. Plain values with their defaults, defined once here for the workers, the read side
(`status`, `promote --wait`) and the command line.

Two budgets, because two kinds of lost attempt mean different things:
- a *failure* is the trial's own fault (training raised, CUDA ran out of memory, the loss
  diverged): the same point would fail again, so few are allowed (`max_attempts`);
- a *disruption* is an attempt whose worker died or froze past its grace (SIGKILL, a lost node,
  the system's OOM killer, a preemption without notice): routine on a cluster and no verdict on
  the point, so more are allowed (`max_disruptions`), yet not infinitely many, so that a point
  that kills its worker every time still ends.
A released attempt (SIGTERM, a worker's own environment failing) counts toward neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from c5snn.errors import OptionError

DEFAULT_OUTAGE_TOLERANCE_S = 600.0  # how long a worker rides out an unreachable database


@dataclass(frozen=True)
class Budget:
    """Lost attempts a point may have before it is given up, by kind."""

    max_attempts: int = 3  # failed attempts: the trial's own fault
    max_disruptions: int = 10  # attempts lost to a dead or frozen worker

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise OptionError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        if self.max_disruptions < 1:
            raise OptionError(f"--max-disruptions must be >= 1, got {self.max_disruptions}")


@dataclass(frozen=True)
class Timing:
    """Lease settings: how often a worker beats, how long silence means death, its budgets."""

    heartbeat_s: float = 15.0
    grace_s: float = 180.0  # independent of epoch length: the heartbeat runs in a thread
    poll_s: float = 5.0
    db_outage_tolerance_s: float = DEFAULT_OUTAGE_TOLERANCE_S
    budget: Budget = field(default_factory=Budget)

    def __post_init__(self) -> None:
        """Settings that would break exactly-once are refused before anything runs: a grace
        shorter than a few heartbeats lets live leases be taken over."""
        if not self.heartbeat_s > 0:
            raise OptionError(f"--heartbeat must be > 0 seconds, got {self.heartbeat_s}")
        if not self.grace_s >= 3 * self.heartbeat_s:
            raise OptionError(f"--grace must be at least 3 x --heartbeat ({3 * self.heartbeat_s:g}"
                              f" s), got {self.grace_s}")
        if not self.db_outage_tolerance_s >= 0:
            raise OptionError(f"--db-outage-tolerance must be >= 0, got {self.db_outage_tolerance_s}")
