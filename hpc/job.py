"""One job handle: its state (live from the controller, accounting after), its attempts, and the one follow loop
every waiter makes (a requeued job reconciled and nudged at each poll)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

from hpc import jobs, registry
from hpc.failures import reconcile
from hpc.failures import record as records
from hpc.slurm import states
from hpc.slurm.runner import Runner, run

T = TypeVar("T")


def follow(step: Callable[[], T], done: Callable[[T], bool], poll_s: float, timeout_s: float | None = None,
           on_poll: Callable[[T], None] | None = None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> T:
    """The one follow loop: ``step`` at every poll until ``done`` says so or ``timeout_s`` has passed (the last
    step is returned either way); ``on_poll`` sees every step's result while it goes on."""
    deadline = None if timeout_s is None else clock() + timeout_s
    while True:
        current = step()
        if done(current) or (deadline is not None and clock() > deadline):
            return current
        if on_poll is not None:
            on_poll(current)
        sleep(poll_s)


class Poll(NamedTuple):
    """What one poll of a job found: its state, and its attempt lines (oldest first)."""

    state: jobs.JobState
    attempts: list[dict[str, Any]]


@dataclass(frozen=True)
class Job:
    """A submitted job, asked about through Slurm's ``runner`` (or the local runner's files)."""

    record: registry.Record
    handle: Any = None  # submitit's Job of a local job this process started: polling it reaps the controller
    runner: Runner = run
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def job_dir(self) -> Path:
        return Path(self.record.job_dir)

    def state(self) -> jobs.JobState:
        """Live from the controller, accounting after; a local job we started runs while its controller does
        (asking reaps it: it never lingers as a zombie, read as FAILED)."""
        if self.handle is not None and not self.handle.done():
            return jobs.JobState(self.job_id, "RUNNING")
        return jobs.state(self.record, self.runner)

    def attempts(self, accounted: bool = False) -> list[dict[str, Any]]:
        """Its attempt lines, oldest first; ``accounted``: with the runs accounting saw end unrecorded added."""
        return histories([self], [accounted])[0]

    def poll(self) -> Poll:
        """One poll of whoever waits on the job: its state and attempts, a requeued job reconciled and nudged."""
        now = self.state()
        if self.record.via == "local" or states.base(now.state) not in states.REQUEUED:
            return Poll(now, records.load(self.job_dir))
        history = reconcile.reconcile_all([(self.job_dir, self.job_id)], self.runner)[0]
        reconcile.nudge(self.job_id, history, self.runner)
        return Poll(now, history)

    def wait(self, poll_s: float = 1.0, timeout_s: float | None = None, on_poll: Callable[[Poll], None] | None = None,
             until: Callable[[Poll], bool] | None = None) -> jobs.JobState:
        """Poll until the job reaches a final state (a requeued job keeps being waited for), ``until`` holds, or
        ``timeout_s`` has passed; ``on_poll`` sees every poll while it runs. Returns the last state seen."""
        return follow(self.poll, lambda now: now.state.done or (until is not None and until(now)), poll_s, timeout_s,
                      on_poll, self.clock, self.sleep).state


def histories(jobs: Sequence[Job], accounted: Sequence[bool]) -> list[list[dict[str, Any]]]:
    """Each job's ``attempts(accounted)``, asking accounting once for all of them (through the first job's runner)."""
    asked = [a and j.record.via != "local" and j.job_dir.is_dir() for j, a in zip(jobs, accounted)]
    found = iter(reconcile.reconcile_all([(j.job_dir, j.job_id) for j, a in zip(jobs, asked) if a],
                                         jobs[0].runner if jobs else run))
    return [next(found) if a else records.load(j.job_dir) for j, a in zip(jobs, asked)]
