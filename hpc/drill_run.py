"""Run the drill on the cluster: submit each scenario's job, wait for the fault step, inject the fault for real,
follow the job to its end, and collect what hpc/drill.py checks.

    results = run_drill(["rank_kill", "hang"], submit, steps=40, say=print, timeout_s=600)

Everything here reaches the cluster: Slurm (through hpc/slurm), the ranks' processes (/proc, signals), and
a site's node-control command for a real node death.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hpc import drill, jobs, monitor
from hpc import job as handle
from hpc.drill import (
    FAULT_STEP,
    FAULTS,
    POLL_S,
    REFERENCE_STEPS_CAP,
    Observed,
    Result,
    check,
    logged_steps,
    restart_time,
    resumed_from,
    step_rate,
)
from hpc.registry import Record
from hpc.slurm import commands, grammar, parse, states
from hpc.vocab import METRICS, RUN_DIR, batch_log, task_log

STATE_EVERY_S = 5.0


def proc_environ(data: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in data.decode(errors="replace").split("\0") if "=" in item)


def is_trainer(argv: Sequence[str]) -> bool:
    """``python [-u] -m train ...``: a rank, not its launcher (torchrun's agent carries the same variables)."""
    modules = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-m"]
    # Only the interpreter's own module counts: torchrun's agent is ``python -m torch.distributed.run ... -m train``.
    return modules[:1] == ["train"]


@dataclass(frozen=True)
class Proc:
    pid: int
    rank: int | None       # None: not a rank (a launcher, the task's shell)
    node: str


def job_processes(job_id: str, proc_root: Path = Path("/proc")) -> list[Proc]:
    """Every process of the job visible here, with its rank (RANK from a launcher, else SLURM_PROCID)."""
    out = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = proc_environ((entry / "environ").read_bytes())
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") != job_id:
            continue
        rank = None
        if is_trainer(argv):
            rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0)
        out.append(Proc(int(entry.name), rank, env.get("SLURMD_NODENAME", "")))
    return out


# ---- side effects --------------------------------------------------------------------------------

def _node_control(command: str, action: str, node: str) -> subprocess.CompletedProcess[str]:
    """``COMMAND kill-node|revive NODE``: the site's way to kill a node for real and bring it back."""
    return subprocess.run([*shlex.split(command), action, node], capture_output=True, text=True, timeout=60)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


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
        return logged_steps(self.metrics())

    def newest_step(self) -> int:
        return max(self.losses(), default=0)

    def rate(self) -> float | None:
        return step_rate(self.metrics())

    def metric_lines(self) -> int:
        return self.metrics().count("\n")

    def steps_after(self, line: int) -> list[int]:
        """The steps logged after the first ``line`` lines of metrics.jsonl (a later attempt's)."""
        return list(logged_steps("\n".join(self.metrics().splitlines()[line:])))


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
    newest, ended = handle.follow(look, lambda seen: seen[0] >= step or seen[1], POLL_S, timeout_s,
                                  clock=job.clock, sleep=job.sleep)
    if newest < step:
        raise RuntimeError(f"job {job.job_id} ended before step {step}" if ended else
                           f"job {job.job_id} did not reach step {step} within {timeout_s:.0f} s")
    return newest


def victim(job: Job, timeout_s: float = 30) -> Proc:
    """The highest rank's process (on the last node: never the batch host when the job spans nodes)."""
    ranks = handle.follow(lambda: [p for p in job_processes(job.job_id) if p.rank is not None], bool, POLL_S, timeout_s)
    if not ranks:
        raise RuntimeError(f"no rank of job {job.job_id} found in /proc")
    return max(ranks, key=lambda p: p.rank)


def first_step_after(job: Job, attempt: int) -> float | None:
    """A heartbeat's own time of the first training step of ``attempt`` (contract 1's marks), if written."""
    times = [b.marks["first_step_done"] for b in monitor.read_heartbeats(job.run_dir).values()
             if b.attempt >= attempt and b.marks.get("first_step_done")]
    return min(times) if times else None


def follow(job: Job, seen: Observed, timeout_s: float, during: Callable[[], None] = lambda: None) -> None:
    """Wait for the job to end, starting a requeued job at once (as ``submit --wait`` does) and noting when the
    first training step after the faulted attempt appears in metrics.jsonl."""
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
    final = job.wait(POLL_S, timeout_s, on_poll=lambda now: (observe(now), during()))
    if final.done:
        observe(handle.Poll(final, job.attempts()))
        seen.final_state = final.state
    else:
        seen.problems.append(f"the job did not end within {timeout_s:.0f} s")
        commands.scancel([job.job_id])
    beat = first_step_after(job, 1)
    if beat and seen.fault_at and beat > seen.fault_at:
        seen.next_step_at = beat


def inject(scenario: str, job: Job, seen: Observed, out: Callable[[str], None],
           node_control: str | None = None) -> Callable[[], None]:
    """Inject the scenario's fault now; returns what to call while following the job (cleanup included).
    ``node_control``: a command that kills a node for real (``CMD kill-node NODE``) and revives it
    (``CMD revive NODE``), as scripts/slurm-local.sh does; without it a lost node is an admin's DOWN."""
    target = victim(job)
    seen.victim_rank, seen.victim_node = target.rank, target.node
    seen.fault_step = job.newest_step()
    seen.fault_at = time.time()
    if scenario == "preempt":
        commands.scancel([job.job_id], signal="USR1")
        seen.victim_rank = seen.victim_node = None
        return lambda: None
    if scenario == "time_limit":
        shown = parse.keyvalues(commands.show("job", job.job_id))
        original = shown.get("TimeLimit", "")
        run_s = grammar.duration_s(shown.get("RunTime", "")) or 0
        minutes = run_s // 60 + 1
        commands.update("job", job.job_id, TimeLimit=str(minutes))
        out(f"  time limit cut from {original} to {minutes} min (the job has run {run_s} s)")
        seen.victim_rank = seen.victim_node = None
        restored = []

        def restore() -> None:
            # The rerun gets the job's real limit back, before it starts.
            if not restored and job.attempts():
                commands.update("job", job.job_id, TimeLimit=original)
                restored.append(True)
        return restore
    if scenario == "rank_kill":
        _signal(target.pid, signal.SIGKILL)
        out(f"  rank {target.rank} (pid {target.pid}) on {target.node} killed at step {seen.fault_step}")
        return lambda: None
    if scenario == "hang":
        _signal(target.pid, signal.SIGSTOP)
        out(f"  rank {target.rank} (pid {target.pid}) on {target.node} stopped at step {seen.fault_step}")
        return lambda: None  # SIGCONT in run_scenario's cleanup: the hang must last until it is named
    if scenario == "node_loss" and node_control:
        node = target.node
        done = _node_control(node_control, "kill-node", node)
        if done.returncode != 0:
            raise RuntimeError(f"{node_control} kill-node {node} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        out(f"  node {node} killed for real at step {seen.fault_step}: its slurmd and every process on it")
        return lambda: None
    if scenario == "node_loss":
        node = target.node
        procs = [p for p in job_processes(job.job_id) if p.node == node]
        for p in sorted(procs, key=lambda p: p.rank is None):
            _signal(p.pid, signal.SIGKILL)
        commands.update("node", node, State="DOWN", Reason="hpcdist-drill")
        out(f"  node {node} set DOWN after SIGKILL to its {len(procs)} process(es) of the job")
        return lambda: None
    raise ValueError(f"unknown scenario {scenario!r}")


def resume_node(node: str, node_control: str | None = None) -> None:
    """Bring a node the drill killed or set DOWN back; Slurm may have returned it already (ReturnToService)."""
    if node_control:
        _node_control(node_control, "revive", node)
        return
    state = parse.node_states(commands.sinfo_nodes(nodes=[node])).get(node, "")
    if state.startswith(("down", "drain", "fail")):
        commands.update("node", node, State="RESUME")


def run_scenario(scenario: str, submit: Callable[[str, int], Record], steps: int,
                 out: Callable[[str], None], timeout_s: float = 600, node_control: str | None = None,
                 beside: Callable[[], None] = lambda: None) -> Observed:
    """Submit the scenario's job, fault it at FAULT_STEP, follow it to the end, collect what it did; ``beside``
    runs at every poll of the job."""
    seen = Observed(scenario)
    job = Job(submit(scenario, steps))
    seen.job_id, seen.job_dir = job.job_id, job.record.job_dir
    out(f"{scenario}: job {job.job_id} submitted ({job.job_dir}); fault at step {FAULT_STEP}: {FAULTS[scenario]}")
    node_down = None
    try:
        wait_for_step(job, FAULT_STEP, timeout_s=300, beside=beside)
        during = inject(scenario, job, seen, out, node_control)
        if scenario == "node_loss":
            node_down = seen.victim_node
            resume_after = time.monotonic() + 20

            def during_node_loss() -> None:
                nonlocal node_down
                # Back as soon as the job has moved off it: other users share this cluster. A node that really
                # died stays dead until the job runs elsewhere: a retry through the queue waits for Slurm to
                # notice (SlurmdTimeout) as it would at 3 a.m.
                moved = job.attempts() and (not node_control or job.attempts()[-1].get("action") == "relaunch"
                                            or (job.state().state == "RUNNING" and first_step_after(job, 1)))
                if node_down and (moved or (not node_control and time.monotonic() > resume_after)):
                    resume_node(node_down, node_control)
                    node_down = None
            during = during_node_loss
        follow(job, seen, timeout_s, lambda: (during(), beside()))
    except RuntimeError as exc:
        seen.problems.append(str(exc))
        commands.scancel([job.job_id])
    finally:
        if node_down:
            resume_node(node_down, node_control)
        if scenario == "hang" and seen.victim_rank is not None:
            for p in job_processes(job.job_id):
                _signal(p.pid, signal.SIGCONT)
    seen.attempts = job.attempts(accounted=True)
    seen.losses = job.losses()
    try:
        seen.resumed_step = resumed_from((job.job_dir / task_log(0)).read_text(errors="replace"))
        seen.restarted_at = restart_time((job.job_dir / batch_log(job.job_id)).read_text(errors="replace"), 1)
    except OSError:
        pass
    return seen


def reference_losses(job: Job, steps: int, timeout_s: float) -> dict[int, float]:
    """The reference's losses once it has logged ``steps`` (or ended); the caller cancels it. A node that
    really died may have taken the reference's ranks too: it was retried, resumes exactly, and is started
    as soon as it can be, as any waiter does."""
    job.wait(1.0, timeout_s, until=lambda _: job.newest_step() >= steps)
    return job.losses()


def cancel_all(job_ids: Iterable[str]) -> None:
    """scancel the drill's own jobs that are still queued or running (a drill interrupted half-way)."""
    wanted = [j for j in job_ids if j]
    live = [j for j, s in jobs.slurm_states(wanted).items() if s.state in states.LIVE]
    if live:
        commands.scancel(live)


def _steps_for_time_limit(ref: Job, steps: int, wanted: int | None, say: Callable[[str], None],
                          timeout_s: float) -> int:
    """Steps of the time-limit job: as asked, else as many as the reference trains here while Slurm acts."""
    if wanted:
        return max(steps, wanted)
    wait_for_step(ref, 4 * FAULT_STEP, timeout_s)
    rate = ref.rate() or 0.0
    chosen = drill.time_limit_steps(rate, steps)
    say(f"reference trains {rate:.1f} steps/s: the time-limit job runs {chosen} steps")
    return chosen


def run_drill(scenarios: Sequence[str], submit: Callable[[str, int], Record], steps: int, *,
              say: Callable[[str], None], timeout_s: float, node_control: str | None = None,
              time_limit_steps: int | None = None, spare_nodes: int = 0) -> list[Result]:
    """Each scenario's job faulted and followed, beside one uninterrupted reference job; every job the drill
    submitted is cancelled at the end, whatever happens. ``submit(label, steps)`` -> the job's record."""
    ref = Job(submit("reference", REFERENCE_STEPS_CAP))
    ref_id = ref.job_id
    observed: list[Observed] = []
    limit_steps = steps
    try:
        if "time_limit" in scenarios:
            limit_steps = _steps_for_time_limit(ref, steps, time_limit_steps, say, timeout_s)
        reference_steps = max(steps, limit_steps)
        say(f"reference: job {ref_id}, {reference_steps} uninterrupted steps ({ref.job_dir})")
        released = []

        def release() -> None:
            # Once it has every step needed the reference goes: it shares the CPUs with the scenario's job, or
            # (several ranks a node) holds the CPUs that job is queued for.
            if not released and ref.newest_step() >= reference_steps:
                cancel_all([ref_id])
                released.append(True)
        for scenario in scenarios:
            seen = run_scenario(scenario, submit, limit_steps if scenario == "time_limit" else steps, say,
                                timeout_s, node_control, beside=release)
            observed.append(seen)
            say(f"{scenario}: job {seen.job_id} ended {seen.final_state}")
        reference = reference_losses(ref, reference_steps, timeout_s)
    finally:
        cancel_all([ref_id] + [o.job_id for o in observed])
    return [check(seen, reference, limit_steps if seen.scenario == "time_limit" else steps, spare_nodes)
            for seen in observed]
