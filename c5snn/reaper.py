"""Reaping: what a dead or frozen worker left behind, found and settled by any other process.

An attempt moves through these steps, each one committed on its own: its claim is inserted
(RUNNING); its Optuna trial is created (RUNNING, naming the claim in `user_attrs["claim"]`); the
trial is recorded on the claim; epochs are reported; the trial is finished; the claim is
finished. A worker killed between any two of them leaves one of a few states, each settled here:

- a RUNNING claim whose heartbeat is older than the grace period (on the database's clock): it
  is marked STALE by compare-and-set, and its trial FAILed ("heartbeat lost");
- a RUNNING trial whose claim is not RUNNING -- the worker died before it recorded the trial on
  the claim, or lost its lease before it created the trial: the trial is FAILed and recorded on
  its claim, so that claims and trials agree one to one (no trial stays RUNNING for good);
- a STALE claim whose trial COMPLETEd just as the lease ran out: the claim is DONE.

Workers reap each phase as they look for work (`c5snn.worker`); `c5snn status --repair` does it
once for a study that no worker serves now (or that an older c5snn left inconsistent), printing
one line per fix.
"""

from __future__ import annotations

from optuna.trial import TrialState

from c5snn.storage import Claim, ClaimRow, ClaimState, Store

HEARTBEAT_LOST = "heartbeat lost"  # the FAIL reason of an attempt whose worker died or froze


def reap(store: Store, study: str, grace_s: float, rows: list[ClaimRow]) -> list[str]:
    """Settle the attempts of `study` whose workers are gone; returns one line per fix.

    `rows` is the study's attempts as the caller has just read them.
    """
    fixes = []
    for row in store.mark_stale(study, grace_s, rows):
        fixes.append(f"{study} point {row.point} attempt {row.attempt} ({row.worker}): no "
                     f"heartbeat for {grace_s:g}s, claim stale")
        if row.trial_id is not None:
            fixes += _fail(store, study, row, row.trial_id, row.trial_number, HEARTBEAT_LOST)
    return fixes + reconcile(store, study)


def reconcile(store: Store, study: str, *, thorough: bool = False) -> list[str]:
    """FAIL every RUNNING trial of `study` whose claim is not RUNNING; with `thorough`, also mark
    DONE the STALE claims whose trial COMPLETEd (an older or interrupted reaper's leftovers).

    Trials are read before claims: a claim is inserted before its trial is created, so every
    claim a trial read here names is in the rows read after it.
    """
    trials = store.running_trials(study)
    if not trials and not thorough:
        return []
    rows = {r.id: r for r in store.attempts(study)}
    fixes = []
    for trial in trials:
        row = rows.get(trial.user_attrs.get("claim"))
        if row is not None and row.state == ClaimState.RUNNING:
            continue  # a live attempt (perhaps between creating its trial and recording it)
        reason = (HEARTBEAT_LOST if row is not None and row.state == ClaimState.STALE
                  else f"orphaned: its claim is {row.state if row is not None else 'missing'}")
        trial_id = store.trial_id(study, trial.number)
        if row is not None and row.trial_id is None:
            store.attach_trial(Claim(row.id, study, row.point, row.attempt), trial_id, trial.number)
        fixes += _fail(store, study, row, trial_id, trial.number, reason)
    if thorough:
        for row in rows.values():
            if (row.state == ClaimState.STALE and row.trial_id is not None
                    and store.trial(row.trial_id).state == TrialState.COMPLETE):
                fixes += _complete(store, study, row)
    return fixes


def _fail(store: Store, study: str, row: ClaimRow | None, trial_id: int,
          number: int | None, reason: str) -> list[str]:
    """FAIL a RUNNING trial (compare-and-set); if it COMPLETEd meanwhile, its stale claim is DONE."""
    where = f"point {row.point} attempt {row.attempt}" if row is not None else "no claim"
    if store.finish_trial(trial_id, TrialState.FAIL, user_attrs={"error": reason}):
        return [f"{study} trial {number} ({where}): RUNNING without a live worker, FAILed "
                f"({reason})"]
    if row is not None and store.trial(trial_id).state == TrialState.COMPLETE:
        return _complete(store, study, row)
    return []


def _complete(store: Store, study: str, row: ClaimRow) -> list[str]:
    if store.finish(Claim(row.id, study, row.point, row.attempt), ClaimState.DONE,
                    from_state=ClaimState.STALE):
        return [f"{study} point {row.point} attempt {row.attempt}: its trial "
                f"{row.trial_number} had COMPLETEd as the lease ran out, claim done"]
    return []
