"""Inject real faults into small jobs on a Slurm cluster and check that each is classified, retried and resumed.

    hpcdist drill --nodes 2 --backend ddp                          # all five scenarios, one after another
    hpcdist drill --nodes 2 --backend deepspeed --launcher deepspeed --scenarios rank_kill,hang --json

Each scenario submits the same small job (fp32, a loss logged every step, a checkpoint every 5 steps),
waits for step FAULT_STEP, injects its fault, waits for the job to end and checks: the first attempt's ending
class and action, the excluded node, the step the next attempt resumed from, that every logged loss equals
an uninterrupted reference run's, and the time from the fault to the next training step. ``check`` and
``summarise`` are pure; the rest reaches the cluster (scancel, scontrol, /proc).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hpc import attempts
from hpc.vocab import CHECKPOINTS, HEARTBEAT, METRICS, RUN_DIR, batch_log, task_log

SCENARIOS = ("preempt", "time_limit", "rank_kill", "node_loss", "hang")
FAULT_STEP = 10
CHECKPOINT_EVERY = 5
LOSS_TOLERANCE = 1e-6
# The trainer's arguments for every drill job (fp32 and one thread per rank keep the sums in one order, so
# a resumed run's losses equal the reference's exactly); --epochs is large so that --max-steps decides.
TRAIN_ARGS = ("--epochs", "1000", "--log-every", "1", "--dataset", "synthetic", "--synthetic-size", "1024",
              "--batch-size", "64", "--threads", "1", "--checkpoint-every", str(CHECKPOINT_EVERY),
              "--timeout-s", "120")
# Slurm keeps a time limit in whole minutes and acts on a cut one at its next check (every ~30 s), so the
# time-limit job must still be training this long after the fault: its steps come from the measured rate.
TIME_LIMIT_REACH_S = 45
# The reference job runs until the drill has every step it needs (then it is cancelled).
REFERENCE_STEPS_CAP = 1_000_000
POLL_S = 0.2
# States in which a drill's job has ended for good (a requeued job passes through none of them).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
# Every backend x launcher the trainer runs (ddp cannot run under DeepSpeed's launcher), with the options that
# make it a drill of its own: ZeRO stages differ per launcher so that sharded optimizer state (1, 2) and
# sharded parameters (3) are each drilled once.
MATRIX = {
    "ddp/srun": ("--backend", "ddp", "--launcher", "srun"),
    "ddp/torchrun": ("--backend", "ddp", "--launcher", "torchrun"),
    "deepspeed/srun": ("--backend", "deepspeed", "--launcher", "srun", "--zero-stage", "1"),
    "deepspeed/torchrun": ("--backend", "deepspeed", "--launcher", "torchrun", "--zero-stage", "3"),
    "deepspeed/deepspeed": ("--backend", "deepspeed", "--launcher", "deepspeed", "--zero-stage", "2"),
}


def diagonal() -> dict[str, str]:
    """One scenario per backend x launcher pair and one pair per scenario (pair -> scenario): every scenario
    and every pair drilled once, a fifth of the whole matrix (scripts/drill-matrix.py runs all of it)."""
    return dict(zip(MATRIX, SCENARIOS))


@dataclass(frozen=True)
class Expect:
    """What a scenario must end as: the first attempt's ending and action, and whether a node is excluded."""

    ending: str
    action: str
    excludes: bool


EXPECT = {
    "preempt": Expect("preempted", "requeue", False),
    "time_limit": Expect("time_limit", "requeue", False),
    "rank_kill": Expect("rank_crashed", "relaunch", False),
    "node_loss": Expect("node_failure", "retry", True),
    "hang": Expect("hung", "relaunch", False),
}
# With a spare node held, every failure is relaunched inside the allocation on the spare, off the failed node.
EXPECT_WITH_SPARE = {**EXPECT, **{s: Expect(EXPECT[s].ending, "relaunch", True) for s in ("rank_kill", "node_loss",
                                                                                          "hang")}}


def expect(scenario: str, spare_nodes: int = 0) -> Expect:
    return (EXPECT_WITH_SPARE if spare_nodes else EXPECT)[scenario]
FAULTS = {
    "preempt": "SIGUSR1 to every rank (scancel --signal=USR1), as Slurm's --signal warning sends",
    "time_limit": "the job's time limit cut to the minute it is in (scontrol update TimeLimit): Slurm's "
                  "--signal warning, else SIGTERM and SIGKILL after KillWait, at its next check",
    "rank_kill": "SIGKILL to the last rank's process",
    "node_loss": "the last rank's node dies: with --node-control, its slurmd and every process on it SIGKILLed "
                 "and nobody setting it DOWN (revived afterwards); without, SIGKILL to the job's processes there "
                 "and the node set DOWN, as an admin would (resumed afterwards)",
    "hang": "SIGSTOP to the last rank's process (SIGCONT afterwards)",
}


@dataclass
class Observed:
    """What the drill saw of one scenario's job."""

    scenario: str
    job_id: str = ""
    job_dir: str = ""
    victim_rank: int | None = None
    victim_node: str | None = None
    fault_at: float | None = None          # unix time the fault was injected (the time limit: when it struck)
    fault_step: int | None = None          # the newest logged step at the fault
    next_step_at: float | None = None      # unix time of the first training step after the fault's attempt
    back_at: float | None = None           # unix time a later attempt logged the fault's step again
    recorded_at: float | None = None       # when the faulted attempt's line appeared in attempts.jsonl
    restarted_at: float | None = None      # when the next attempt's batch shell started (its batch-log line)
    final_state: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    resumed_step: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """One scenario's verdict, as printed and as ``--json`` writes it."""

    scenario: str
    ok: bool
    job_id: str
    ending: str | None
    expected: str
    action: str | None
    retries: int
    requeues: int
    excluded: list[str]
    victim: str | None
    resumed_step: int | None
    losses_equal: bool | None
    compared_steps: int
    max_loss_diff: float | None
    recovery_s: float | None
    lost_s: float | None                   # the time lost: fault -> a later attempt back at the fault's step
    phases: dict[str, float]               # recovery split: classified (fault -> attempt recorded),
                                           # restarted (-> next batch shell), first_step (-> next step)
    final_state: str
    detail: str
    problems: list[str]


# ---- pure parts ----------------------------------------------------------------------------------

def logged_steps(text: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run appends, so the last record of a step wins."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        try:
            data = json.loads(line)
            out[int(data["step"])] = float(data["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def resumed_from(rank0_log: str) -> int | None:
    """The step the first resumed attempt (the one after the fault) started from (``resumed from DIR at step
    N``), if any did."""
    found = re.findall(r"resumed from \S+ at step (\d+)", rank0_log)
    return int(found[0]) if found else None


def compare(losses: Mapping[int, float], reference: Mapping[int, float], upto: int) -> tuple[bool, int, float | None]:
    """(equal, steps compared, largest difference) over steps 1..upto; a step missing on either side differs."""
    steps = range(1, upto + 1)
    missing = [s for s in steps if s not in losses or s not in reference]
    diffs = [abs(losses[s] - reference[s]) for s in steps if s in losses and s in reference]
    worst = max(diffs) if diffs else None
    return (not missing and worst is not None and worst <= LOSS_TOLERANCE), len(diffs), worst


def check(seen: Observed, reference: Mapping[int, float], steps: int, spare_nodes: int = 0) -> Result:
    """The verdict on one scenario from what was observed and the reference run's losses."""
    expected = expect(seen.scenario, spare_nodes)
    problems = list(seen.problems)
    first = seen.attempts[0] if seen.attempts else {}
    ending, action = first.get("ending"), first.get("action")
    if not seen.attempts:
        problems.append("no attempt was recorded in attempts.jsonl")
    elif ending != expected.ending:
        problems.append(f"first attempt ended {ending}, expected {expected.ending}")
    if seen.attempts and action != expected.action:
        problems.append(f"first attempt's action was {action}, expected {expected.action}")
    excluded = list(first.get("excluded") or [])
    if expected.excludes and seen.victim_node and seen.victim_node not in excluded:
        problems.append(f"node {seen.victim_node} was not excluded (excluded: {excluded or 'none'})")
    if not expected.excludes and excluded:
        problems.append(f"{', '.join(excluded)} excluded, though the job could go on in place")
    if expected.ending == "hung" and seen.victim_rank is not None and first.get("rank") != seen.victim_rank:
        problems.append(f"the hang was blamed on rank {first.get('rank')}, not the stopped rank {seen.victim_rank}")
    if seen.final_state != "COMPLETED":
        problems.append(f"the job ended {seen.final_state or 'unknown'}, not COMPLETED")
    if seen.resumed_step is None:
        problems.append("no attempt resumed from a checkpoint")
    upto = min(max(seen.losses, default=0), max(reference, default=0))
    equal, compared, worst = compare(seen.losses, reference, upto) if upto else (False, 0, None)
    if seen.final_state == "COMPLETED" and max(seen.losses, default=0) < steps:
        problems.append(f"only {max(seen.losses, default=0)} of {steps} steps were logged")
    if seen.resumed_step is not None and upto <= seen.resumed_step:
        problems.append(f"the reference stops at step {upto}, before the resume at {seen.resumed_step}")
    if not equal:
        problems.append(f"losses differ from the uninterrupted run (largest difference {worst}, "
                        f"{compared} of {upto} steps compared)")
    recovery = (seen.next_step_at - seen.fault_at) if seen.next_step_at and seen.fault_at else None
    marks = [("classified", seen.recorded_at), ("restarted", seen.restarted_at), ("first_step", seen.next_step_at)]
    phases, last = {}, seen.fault_at
    for name, at in marks:
        if at is not None and last is not None:
            phases[name] = round(at - last, 1)
            last = at
    if recovery is None:
        problems.append("no training step was seen after the fault's attempt ended")
    return Result(
        scenario=seen.scenario, ok=not problems, job_id=seen.job_id, ending=ending, expected=expected.ending,
        action=action, retries=sum(a.get("action") in ("retry", "relaunch") for a in seen.attempts),
        requeues=sum(a.get("action") == "requeue" for a in seen.attempts), excluded=excluded,
        victim=(f"rank {seen.victim_rank} on {seen.victim_node}" if seen.victim_node else None),
        resumed_step=seen.resumed_step, losses_equal=equal, compared_steps=compared, max_loss_diff=worst,
        recovery_s=round(recovery, 1) if recovery is not None else None,
        lost_s=round(seen.back_at - seen.fault_at, 1) if seen.back_at and seen.fault_at else None, phases=phases,
        final_state=seen.final_state,
        detail=str(first.get("detail") or ""), problems=problems)


def table(results: Sequence[Result]) -> str:
    """The drill's report: one row per scenario."""
    head = ("scenario", "ok", "ending", "action", "retries", "excluded", "resumed", "losses", "recovery_s", "lost_s",
            "job")
    rows = [head]
    for r in results:
        losses = "-" if r.losses_equal is None else (f"equal ({r.compared_steps})" if r.losses_equal else "DIFFER")
        rows.append((r.scenario, "ok" if r.ok else "FAIL", r.ending or "-", r.action or "-", str(r.retries),
                     ",".join(r.excluded) or "-", "-" if r.resumed_step is None else str(r.resumed_step), losses,
                     "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
                     "-" if r.lost_s is None else f"{r.lost_s:.1f}", r.job_id))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        if r.detail:
            lines.append(f"{r.scenario}: {r.detail}")
        lines += [f"{r.scenario}: FAIL: {p}" for p in r.problems]
    return "\n".join(lines)


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

def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Job:
    """A drill job being followed: its files and Slurm's view, polled."""

    def __init__(self, job_id: str, job_dir: Path) -> None:
        self.job_id, self.job_dir = job_id, Path(job_dir)
        self.run_dir = self.job_dir / RUN_DIR

    def losses(self) -> dict[int, float]:
        try:
            return logged_steps((self.run_dir / METRICS).read_text())
        except OSError:
            return {}

    def newest_step(self) -> int:
        return max(self.losses(), default=0)

    def rate(self) -> float | None:
        try:
            return step_rate((self.run_dir / METRICS).read_text())
        except OSError:
            return None

    def metric_lines(self) -> int:
        try:
            return (self.run_dir / METRICS).read_text().count("\n")
        except OSError:
            return 0

    def steps_after(self, line: int) -> list[int]:
        """The steps logged after the first ``line`` lines of metrics.jsonl (a later attempt's)."""
        try:
            text = (self.run_dir / METRICS).read_text()
        except OSError:
            return []
        return list(logged_steps("\n".join(text.splitlines()[line:])))

    def state(self) -> str:
        proc = _run(["squeue", "-h", "-j", self.job_id, "-o", "%T"])
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()[0]
        proc = _run(["sacct", "-X", "-n", "-P", "-j", self.job_id, "-o", "State"])
        rows = [r.split()[0] for r in proc.stdout.splitlines() if r.strip()]
        return rows[-1] if rows else "UNKNOWN"

    def attempts(self) -> list[dict[str, Any]]:
        return attempts.load(self.job_dir)


def wait_for_step(job: Job, step: int, timeout_s: float) -> int:
    """Block until the job has logged ``step``; raise if it ends or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while time.monotonic() < deadline:
        newest = job.newest_step()
        if newest >= step:
            return newest
        polls += 1
        if polls % 25 == 0 and job.state() in ENDED:
            raise RuntimeError(f"job {job.job_id} ended before step {step}")
        time.sleep(POLL_S)
    raise RuntimeError(f"job {job.job_id} did not reach step {step} within {timeout_s:.0f} s")


def victim(job: Job, timeout_s: float = 30) -> Proc:
    """The highest rank's process (on the last node: never the batch host when the job spans nodes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ranks = [p for p in job_processes(job.job_id) if p.rank is not None]
        if ranks:
            return max(ranks, key=lambda p: p.rank)
        time.sleep(POLL_S)
    raise RuntimeError(f"no rank of job {job.job_id} found in /proc")


def first_step_after(job: Job, attempt: int) -> float | None:
    """A heartbeat's own time of the first training step of ``attempt`` (contract 1's marks), if written."""
    times = []
    for path in (job.run_dir / HEARTBEAT).glob("rank-*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if int(beat.get("attempt", -1)) >= attempt and (beat.get("marks") or {}).get("first_step_done"):
            times.append(float(beat["marks"]["first_step_done"]))
    return min(times) if times else None


def follow(job: Job, seen: Observed, timeout_s: float, during: Callable[[], None] = lambda: None) -> None:
    """Wait for the job to end, starting a requeued job at once (as ``submit --wait`` does) and noting when the
    first training step after the faulted attempt appears in metrics.jsonl."""
    deadline = time.monotonic() + timeout_s
    lines_at_end = None
    lines, grew_at = job.metric_lines(), time.time()
    while time.monotonic() < deadline:
        during()
        state = job.state()
        pending = state in ("PENDING", "REQUEUED")
        history = attempts.reconcile(job.job_dir, job.job_id) if pending else job.attempts()
        if lines_at_end is None and job.metric_lines() > lines:
            lines, grew_at = job.metric_lines(), time.time()
        if history and lines_at_end is None:
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
        if pending:
            attempts.nudge(job.job_id, history)
        if state in (*ENDED, "OUT_OF_MEMORY", "BOOT_FAIL"):
            seen.final_state = state
            break
        time.sleep(POLL_S)
    else:
        seen.problems.append(f"the job did not end within {timeout_s:.0f} s")
        _run(["scancel", job.job_id])
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
        _run(["scancel", "--signal=USR1", job.job_id], timeout=30)
        seen.victim_rank = seen.victim_node = None
        return lambda: None
    if scenario == "time_limit":
        shown = attempts.parse_keyvalues(_run(["scontrol", "show", "job", "-o", job.job_id]).stdout)
        original = shown.get("TimeLimit", "")
        run_s = _seconds(shown.get("RunTime", "0"))
        minutes = run_s // 60 + 1
        _run(["scontrol", "update", f"JobId={job.job_id}", f"TimeLimit={minutes}"])
        out(f"  time limit cut from {original} to {minutes} min (the job has run {run_s} s)")
        seen.victim_rank = seen.victim_node = None
        restored = []

        def restore() -> None:
            # The rerun gets the job's real limit back, before it starts.
            if not restored and job.attempts():
                _run(["scontrol", "update", f"JobId={job.job_id}", f"TimeLimit={original}"])
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
        done = _run([*shlex.split(node_control), "kill-node", node])
        if done.returncode != 0:
            raise RuntimeError(f"{node_control} kill-node {node} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        out(f"  node {node} killed for real at step {seen.fault_step}: its slurmd and every process on it")
        return lambda: None
    if scenario == "node_loss":
        node = target.node
        procs = [p for p in job_processes(job.job_id) if p.node == node]
        for p in sorted(procs, key=lambda p: p.rank is None):
            _signal(p.pid, signal.SIGKILL)
        _run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=hpcdist-drill"])
        out(f"  node {node} set DOWN after SIGKILL to its {len(procs)} process(es) of the job")
        return lambda: None
    raise ValueError(f"unknown scenario {scenario!r}")


def resume_node(node: str, node_control: str | None = None) -> None:
    """Bring a node the drill killed or set DOWN back; Slurm may have returned it already (ReturnToService)."""
    if node_control:
        _run([*shlex.split(node_control), "revive", node])
        return
    state = _run(["sinfo", "-h", "-n", node, "-o", "%T"]).stdout.strip().lower()
    if state.startswith(("down", "drain", "fail")):
        _run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])


def _seconds(runtime: str) -> int:
    """Slurm's ``[D-]HH:MM:SS`` as seconds."""
    days, _, rest = runtime.rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def run_scenario(scenario: str, submit: Callable[[str, int], tuple[str, Path]], steps: int,
                 out: Callable[[str], None], timeout_s: float = 600, node_control: str | None = None) -> Observed:
    """Submit the scenario's job, fault it at FAULT_STEP, follow it to the end, collect what it did."""
    seen = Observed(scenario)
    job_id, job_dir = submit(scenario, steps)
    seen.job_id, seen.job_dir = job_id, str(job_dir)
    job = Job(job_id, job_dir)
    out(f"{scenario}: job {job_id} submitted ({job_dir}); fault at step {FAULT_STEP}: {FAULTS[scenario]}")
    node_down = None
    try:
        wait_for_step(job, FAULT_STEP, timeout_s=300)
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
                                            or (job.state() == "RUNNING" and first_step_after(job, 1)))
                if node_down and (moved or (not node_control and time.monotonic() > resume_after)):
                    resume_node(node_down, node_control)
                    node_down = None
            during = during_node_loss
        follow(job, seen, timeout_s, during)
    except RuntimeError as exc:
        seen.problems.append(str(exc))
        _run(["scancel", job_id])
    finally:
        if node_down:
            resume_node(node_down, node_control)
        if scenario == "hang" and seen.victim_rank is not None:
            for p in job_processes(job_id):
                _signal(p.pid, signal.SIGCONT)
    seen.attempts = attempts.reconcile(job.job_dir, job_id)
    seen.losses = job.losses()
    try:
        seen.resumed_step = resumed_from((job.job_dir / task_log(0)).read_text(errors="replace"))
        seen.restarted_at = restart_time((job.job_dir / batch_log(job_id)).read_text(errors="replace"), 1)
    except OSError:
        pass
    return seen


def restart_time(batch_text: str, attempt: int) -> float | None:
    """When attempt ``attempt``'s batch shell started: its ``hpcdist: attempt N started on NODE at T`` line."""
    m = re.search(rf"^hpcdist: attempt {attempt} started on \S+ at (\S+)", batch_text, re.M)
    if not m:
        return None
    try:
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def reference_losses(job: Job, steps: int, timeout_s: float) -> dict[int, float]:
    """The reference's losses once it has logged ``steps`` (or ended); the caller cancels it. A node that
    really died may have taken the reference's ranks too: it was retried, resumes exactly, and is started
    as soon as it can be, as any waiter does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job.state()
        if job.newest_step() >= steps or state in ENDED:
            break
        if state in ("PENDING", "REQUEUED"):
            attempts.nudge(job.job_id, attempts.reconcile(job.job_dir, job.job_id))
        time.sleep(1.0)
    return job.losses()


def step_rate(metrics_text: str) -> float | None:
    """Steps per second from metrics.jsonl lines (``step``, ``time_s``), past the first step's start-up."""
    rows = []
    for line in metrics_text.splitlines():
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), float(row["time_s"])))
        except (ValueError, KeyError, TypeError):
            continue
    rows = [r for r in rows if r[0] > 5]  # the first steps carry start-up and warm-up
    if len(rows) < 2 or rows[-1][1] <= rows[0][1]:
        return None
    return (rows[-1][0] - rows[0][0]) / (rows[-1][1] - rows[0][1])


def time_limit_steps(rate: float, least: int) -> int:
    """Steps for the time-limit job: still training TIME_LIMIT_REACH_S after the fault at this rate."""
    return max(least, FAULT_STEP + int(rate * TIME_LIMIT_REACH_S) + 2 * CHECKPOINT_EVERY)


def checkpoints_of(run_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(Path(run_dir) / CHECKPOINTS))
    except OSError:
        return []


def cancel_all(job_ids: Iterable[str]) -> None:
    """scancel the drill's own jobs that are still queued or running (a drill interrupted half-way)."""
    live = [j for j in job_ids if j and Job(j, Path(".")).state() in ("PENDING", "RUNNING", "REQUEUED",
                                                                      "COMPLETING", "SUSPENDED")]
    if live:
        _run(["scancel", *live])


def as_json(results: Iterable[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
