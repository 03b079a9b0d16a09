"""Run the drill on the cluster: submit each scenario's job, wait for the fault step, inject the fault for real,
follow the job to its end, and collect what hpc/drill.py checks.

    results = run_drill(["rank_kill", "hang"], submit, steps=40, say=print, timeout_s=600)

Everything here reaches the cluster: Slurm (through hpc/slurm), the job directories, and through
hpc/drill_faults.py the ranks' processes and a site's node-control command for a real node death.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hpc import drill, drill_faults, jobs, monitor, registry, rescue
from hpc import job as handle
from hpc.registry import Record
from hpc.slurm import commands, states
from hpc.vocab import METRICS, RUN_DIR, batch_log, task_log

STATE_EVERY_S = 5.0


class Job(handle.Job):
    """A drill job being followed (hpc.job.Job), and what only the drill reads of it: its metrics."""

    @property
    def run_dir(self) -> Path:
        return self.job_dir / RUN_DIR

    def metrics(self) -> str:
        """Its run's metrics.jsonl ("" until there is one)."""
        try:
            return (self.run_dir / METRICS).read_text()
        except OSError:
            return ""

    def losses(self) -> dict[int, float]:
        return drill.logged_steps(self.metrics())

    def newest_step(self) -> int:
        return max(self.losses(), default=0)

    def metric_lines(self) -> int:
        return self.metrics().count("\n")

    def steps_after(self, line: int) -> list[int]:
        """The steps logged after the first ``line`` lines of metrics.jsonl (a later attempt's)."""
        return list(drill.logged_steps("\n".join(self.metrics().splitlines()[line:])))


def wait_for_step(job: Job, step: int, timeout_s: float, beside: Callable[[], None] = lambda: None) -> int:
    """Block until the job has logged ``step``; raise if it ends or the time runs out first. The metrics are read
    at every poll, Slurm asked at most every STATE_EVERY_S: a Slurm command five times a second would take the
    CPU the job trains on. ``beside`` runs at every poll too."""
    asked = [float("-inf")]

    def look() -> tuple[int, bool]:
        beside()
        newest, ended = job.newest_step(), False
        if newest < step and job.clock() - asked[0] >= STATE_EVERY_S:
            asked[0] = job.clock()
            ended = job.state().done
        return newest, ended
    newest, ended = handle.follow(look, lambda seen: seen[0] >= step or seen[1], drill.POLL_S, timeout_s,
                                  clock=job.clock, sleep=job.sleep)
    if newest < step:
        raise RuntimeError(f"job {job.job_id} ended before step {step}" if ended else
                           f"job {job.job_id} did not reach step {step} within {timeout_s:.0f} s")
    return newest


def first_step_after(job: Job, attempt: int) -> float | None:
    """A heartbeat's own time of the first training step of ``attempt`` (contract 1's marks), if written."""
    return min((b.marks["first_step_done"] for b in monitor.read_heartbeats(job.run_dir).values()
                if b.attempt >= attempt and b.marks.get("first_step_done")), default=None)


def follow(job: Job, seen: drill.Observed, timeout_s: float, during: Callable[[], None] = lambda: None) -> Job:
    """Wait for the job to end as every waiter does (hpc/rescue.py: a requeued job started at once, a dead batch
    host's run started again as a new job), noting when the first training step after the faulted attempt
    appears in metrics.jsonl; returns the job followed last."""
    lines_at_end = None
    lines, grew_at = job.metric_lines(), time.time()

    def observe(now: handle.Poll) -> None:
        nonlocal lines_at_end, lines, grew_at
        if lines_at_end is None and job.metric_lines() > lines:
            lines, grew_at = job.metric_lines(), time.time()
        if now.attempts and lines_at_end is None:
            lines_at_end = job.metric_lines()
            seen.recorded_at = time.time()
            if seen.scenario == "time_limit":
                # Slurm signals when it checks the limit, not when the drill cut it: the fault is the
                # attempt's last training step.
                seen.fault_at = grew_at
        elif lines_at_end is not None and seen.next_step_at is None and job.metric_lines() > lines_at_end:
            seen.next_step_at = time.time()
        if lines_at_end is not None and seen.back_at is None and seen.fault_step is not None and any(
                s >= seen.fault_step for s in job.steps_after(lines_at_end)):
            seen.back_at = time.time()

    during()
    last, final = rescue.wait(job, drill.POLL_S, timeout_s, on_poll=lambda _, now: (observe(now), during()),
                              follow_as=lambda record: Job(record, clock=job.clock, sleep=job.sleep))
    if final.done:
        observe(handle.Poll(final, last.attempts()))
        seen.final_state = final.state
    else:
        seen.problems.append(f"the job did not end within {timeout_s:.0f} s")
        commands.scancel([last.job_id])
    beat = first_step_after(job, 1)
    if beat and seen.fault_at and beat > seen.fault_at:
        seen.next_step_at = beat
    return last


def _reviver(job: Job, scenario: str, node: str, node_control: str | None) -> Callable[[], bool]:
    """What brings a lost node back as soon as the job has moved off it (other users share this cluster): True
    once it did. A node that really died stays dead until then: a retry through the queue waits for Slurm to
    notice (SlurmdTimeout), as it would at 3 a.m."""
    resume_after = time.monotonic() + 20

    def moved() -> bool:
        history = job.attempts()
        if not history or not node_control or scenario == "batch_host_loss":  # a new job runs without it
            return bool(history)
        return (history[-1].get("action") == "relaunch"
                or bool(job.state().state == "RUNNING" and first_step_after(job, 1)))

    def revive() -> bool:
        if moved() or (not node_control and time.monotonic() > resume_after):
            drill_faults.revive(node, node_control)
            return True
        return False
    return revive


def run_scenario(scenario: str, submit: Callable[[str, int], Record], steps: int,
                 out: Callable[[str], None], timeout_s: float = 600, node_control: str | None = None,
                 beside: Callable[[], None] = lambda: None, ready: Callable[[], bool] = lambda: True,
                 after_snapshot: bool = False) -> drill.Observed:
    """Submit the scenario's job once ``ready``, fault it at FAULT_STEP (``after_snapshot``: then half a snapshot
    interval after a snapshot), follow it to the end, collect what it did; ``beside`` runs at every poll."""
    seen = drill.Observed(scenario)
    handle.follow(lambda: (beside(), ready())[1], bool, drill.POLL_S, 600)
    job = last = Job(submit(scenario, steps))
    seen.job_id, seen.job_dir = job.job_id, job.record.job_dir
    when = (f"step {drill.FAULT_STEP}"
            + (f", then {drill.SNAPSHOT_PHASE_S:g} s after a snapshot" if after_snapshot else ""))
    out(f"{scenario}: job {job.job_id} submitted ({job.job_dir}); fault at {when}: {drill.FAULTS[scenario]}")
    node_down = None
    try:
        wait_for_step(job, drill.FAULT_STEP, timeout_s=300, beside=beside)
        if after_snapshot:
            wait_for_snapshot(job, timeout_s=60, beside=beside)
        seen.fault_step = job.newest_step()
        during = drill_faults.inject(scenario, job, seen, out, node_control)
        if scenario in ("node_loss", "batch_host_loss"):
            node_down, revive = seen.victim_node, _reviver(job, scenario, seen.victim_node, node_control)

            def during() -> None:
                nonlocal node_down
                if node_down and revive():
                    node_down = None
        last = follow(job, seen, timeout_s, lambda: (during(), beside()))
    except RuntimeError as exc:
        seen.problems.append(str(exc))
        commands.scancel([job.job_id])
    finally:
        if node_down:
            try:
                drill_faults.revive(node_down, node_control)
            except RuntimeError as exc:
                seen.problems.append(str(exc))
        if scenario == "hang" and seen.victim_rank is not None:
            for p in drill_faults.job_processes(job.job_id):
                drill_faults.signal_process(p.pid, signal.SIGCONT)
        if scenario == "disk_full":
            drill_faults.empty_disk(job.job_dir)
            seen.problems += drill_faults.storage_left(job.job_dir)
    seen.attempts = last.attempts(accounted=True)
    seen.losses = job.losses()
    with contextlib.suppress(OSError):
        seen.resumed_step = drill.resumed_from((job.job_dir / task_log(0)).read_text(errors="replace"))
        seen.restarted_at = drill.restart_time((job.job_dir / batch_log(last.job_id)).read_text(errors="replace"), 1)
    return seen


def cancel_all(job_ids: Iterable[str], job_dirs: Iterable[str | Path] = ()) -> None:
    """scancel the drill's own jobs that are still queued or running (a drill interrupted half-way), and the new
    jobs their batch shells submitted the runs in ``job_dirs`` again as (each directory's marker names its newest)."""
    newest = [marker.job_id for d in job_dirs if d and (marker := registry.read_marker(Path(d))) is not None]
    wanted = list(dict.fromkeys(j for j in [*job_ids, *newest] if j))
    # scancel runs nothing for an empty list.
    commands.scancel([j for j, s in jobs.slurm_states(wanted).items() if s.state in states.LIVE])


def _steps_by_rate(ref: Job, scenarios: Sequence[str], steps: int, time_limit_steps: int | None,
                   job_defaults: bool, say: Callable[[str], None], timeout_s: float) -> dict[str, int]:
    """Each scenario's steps: ``steps``, but the time-limit job's as asked, else as many as the reference trains
    here while Slurm acts, and with the job's defaults as many as it trains past a snapshot and the recovery."""
    steps_of = dict.fromkeys(scenarios, steps)
    by_rate = [s for s in scenarios if (s == "time_limit" and not time_limit_steps)
               or (job_defaults and s in drill.FROM_HELD_STATE)]
    if "time_limit" in scenarios and time_limit_steps:
        steps_of["time_limit"] = max(steps, time_limit_steps)
    if not by_rate:
        return steps_of
    wait_for_step(ref, 4 * drill.FAULT_STEP, timeout_s)
    rate = drill.step_rate(ref.metrics()) or 0.0
    for s in by_rate:
        reach_s = drill.TIME_LIMIT_REACH_S if s == "time_limit" else drill.DEFAULTS_REACH_S
        steps_of[s] = drill.steps_at(rate, steps, reach_s)
    say(f"reference trains {rate:.1f} steps/s: " + ", ".join(f"{s} runs {steps_of[s]} steps" for s in by_rate))
    return steps_of


def wait_for_snapshot(job: Job, timeout_s: float, beside: Callable[[], None] = lambda: None) -> None:
    """Block until a node of the job has published a snapshot, then SNAPSHOT_PHASE_S more (a fault then costs
    what one at a random moment costs on average); raise if none comes in time."""
    def held() -> bool:
        beside()
        return any(b.snapshot_step for b in monitor.read_heartbeats(job.run_dir).values())
    if not handle.follow(held, bool, drill.POLL_S, timeout_s, clock=job.clock, sleep=job.sleep):
        raise RuntimeError(f"job {job.job_id} published no snapshot within {timeout_s:.0f} s")
    after = job.clock() + drill.SNAPSHOT_PHASE_S
    handle.follow(lambda: (beside(), job.clock() >= after)[1], bool, drill.POLL_S, drill.SNAPSHOT_PHASE_S + 1,
                  clock=job.clock, sleep=job.sleep)


def run_drill(scenarios: Sequence[str], submit: Callable[[str, int], Record], steps: int, *, say: Callable[[str], None],
              timeout_s: float, node_control: str | None = None, time_limit_steps: int | None = None,
              spare_nodes: int = 0, job_defaults: bool = False) -> list[drill.Result]:
    """Each scenario's job faulted and followed, beside one uninterrupted reference job; every job the drill
    submitted is cancelled at the end, whatever happens. ``submit(label, steps)`` -> the job's record;
    ``job_defaults``: the jobs run with the trainer's own checkpoint and snapshot defaults (drill.CADENCE)."""
    ref = Job(submit("reference", drill.REFERENCE_STEPS_CAP))
    observed: list[drill.Observed] = []
    try:
        steps_of = _steps_by_rate(ref, scenarios, steps, time_limit_steps, job_defaults, say, timeout_s)
        reference_steps = max(steps_of.values())
        say(f"reference: job {ref.job_id}, {reference_steps} uninterrupted steps ({ref.job_dir})")
        released = []

        def release() -> None:
            # Once it has every step needed the reference goes: it shares the CPUs with the scenario's job, or
            # (several ranks a node) holds the CPUs that job is queued for.
            if not released and ref.newest_step() >= reference_steps:
                cancel_all([ref.job_id], [ref.job_dir])
                released.append(True)
        for scenario in scenarios:
            # A dead batch host may be the reference's too, which no waiter would start again: its job starts once
            # the reference has every step it needs.
            first = scenario == "batch_host_loss"
            seen = run_scenario(scenario, submit, steps_of[scenario], say, timeout_s, node_control, beside=release,
                                ready=lambda first=first: not first or bool(released),
                                after_snapshot=job_defaults and scenario in drill.FROM_HELD_STATE)
            observed.append(seen)
            say(f"{scenario}: job {seen.job_id} ended {seen.final_state}")
        # Its losses once it has logged every step needed (or ended). A node that really died may have taken its
        # ranks too: it was retried, resumes exactly, and is started as soon as it can be, as any waiter does.
        ref.wait(1.0, timeout_s, until=lambda _: ref.newest_step() >= reference_steps)
        reference = ref.losses()
    finally:
        cancel_all([ref.job_id] + [o.job_id for o in observed], [ref.job_dir, *(o.job_dir for o in observed)])
    return [drill.check(seen, reference, steps_of[seen.scenario], spare_nodes, bool(node_control)) for seen in observed]
