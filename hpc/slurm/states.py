"""Slurm's job states, grouped by what hpcdist does with them: wait, stop waiting, or count a requeue."""

from __future__ import annotations

# After these a job never runs again (REQUEUED and PENDING are not among them). LEFT_QUEUE is ours, not
# Slurm's: the job is no longer queued but accounting cannot say how it ended; a waiter stops there.
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE", "REVOKED", "LEFT_QUEUE"})
# The controller still holds the job: it may yet run (again).
LIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING",
                  "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})
# Requeued and not yet started again.
REQUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"})
# Holding nodes: the job's processes may still be running.
ON_NODES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "SIGNALING", "STAGE_OUT"})
# Not ended, even when accounting shows a later run after it (a stale row): never recorded as an attempt.
UNFINISHED = frozenset({"PENDING", "RUNNING", "COMPLETING"})


def base(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``: sacct adds who, squeue abbreviates nothing we read."""
    return state.split(" ")[0].strip().upper()
