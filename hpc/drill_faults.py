"""Inject the drill's faults for real and undo them: signals to ranks, a time limit cut, a node killed, a disk
filled.

    during = drill_faults.inject("rank_kill", job, seen, say, node_control)   # call during() at every poll
    drill_faults.revive(node, node_control) ; drill_faults.empty_disk(job.job_dir)

Everything here acts on the cluster: Slurm (through hpc/slurm), the ranks' processes (/proc, signals), a site's
node-control command, and the file system a job directory is on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hpc import checkpoints, vocab
from hpc import job as handle
from hpc.drill import POLL_S, Observed
from hpc.slurm import commands, grammar, parse

# Written beside the job directory on the small file system; the room it leaves is half a checkpoint.
FILLER = ".hpcdist-drill-filler"
# slurm-local.sh's revive alone waits up to 30 s for slurmd and 30 s more for it to answer the controller.
NODE_CONTROL_S = 120
FILL_TRIES = 5  # measures of the free space the filling may take, the job writing on meanwhile
_filled: set[Path] = set()  # the fillers this process made: the only ones it removes


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
        rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0) if is_trainer(argv) else None
        out.append(Proc(int(entry.name), rank, env.get("SLURMD_NODENAME", "")))
    return out


def _node_control(command: str, action: str, node: str, failed: str) -> None:
    """``COMMAND kill-node|revive NODE``: the site's way to kill a node for real and bring it back; RuntimeError in
    one line, ``failed`` said, when it fails or does not finish."""
    try:
        done = subprocess.run([*shlex.split(command), action, node], capture_output=True, text=True,
                              timeout=NODE_CONTROL_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{command} {action} {node} did not finish in {NODE_CONTROL_S:g} s, {failed}") from None
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[-300:]
        raise RuntimeError(f"{command} {action} {node} failed, {failed}: {said}")


def signal_process(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def victim(job: handle.Job, timeout_s: float = 30, first: bool = False) -> Proc:
    """The highest rank's process (on the last node: never the batch host when the job spans nodes), or with
    ``first`` rank 0's."""
    ranks = handle.follow(lambda: [p for p in job_processes(job.job_id) if p.rank is not None], bool, POLL_S, timeout_s)
    if not ranks:
        raise RuntimeError(f"no rank of job {job.job_id} found in /proc")
    return (min if first else max)(ranks, key=lambda p: p.rank)


def inject(scenario: str, job: handle.Job, seen: Observed, out: Callable[[str], None],
           node_control: str | None = None) -> Callable[[], None]:
    """Inject the scenario's fault now (``seen.fault_step`` is the step it comes at); returns what to call while
    following the job. ``node_control``: a command that kills a node for real (``CMD kill-node NODE``) and revives
    it (``CMD revive NODE``), as scripts/slurm-local.sh does; without it a lost node is an admin's DOWN."""
    target = victim(job, first=scenario == "batch_host_loss")
    seen.victim_rank, seen.victim_node = target.rank, target.node
    seen.fault_at = time.time()
    if scenario in ("preempt", "time_limit", "disk_full"):
        seen.victim_rank = seen.victim_node = None  # the whole job is faulted, no rank or node of it
    if scenario in ("rank_kill", "hang"):
        signal_process(target.pid, signal.SIGKILL if scenario == "rank_kill" else signal.SIGSTOP)
        # A hung rank gets its SIGCONT in run_scenario's cleanup: the hang must last until it is named.
        out(f"  rank {target.rank} (pid {target.pid}) on {target.node} "
            f"{'killed' if scenario == 'rank_kill' else 'stopped'} at step {seen.fault_step}")
    elif scenario == "preempt":
        commands.scancel([job.job_id], signal="USR1")
    elif scenario == "time_limit":
        return _cut_time_limit(job, out)
    elif scenario == "disk_full":
        written = between_saves(job, lambda: fill_disk(job.job_dir))
        out(f"  {written:,} bytes written beside {job.job_dir} at step {seen.fault_step}: less room than a checkpoint")
    elif scenario in ("node_loss", "batch_host_loss"):
        node = (target.node if scenario == "node_loss"
                else parse.keyvalues(commands.show("job", job.job_id)).get("BatchHost", ""))
        _lose_node(job, node, node_control, out, f"at step {seen.fault_step}")
        seen.victim_node = node
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return lambda: None


def _cut_time_limit(job: handle.Job, out: Callable[[str], None]) -> Callable[[], None]:
    shown = parse.keyvalues(commands.show("job", job.job_id))
    original = shown.get("TimeLimit", "")
    run_s = grammar.duration_s(shown.get("RunTime", "")) or 0
    minutes = run_s // 60 + 1
    commands.update("job", job.job_id, TimeLimit=str(minutes))
    out(f"  time limit cut from {original} to {minutes} min (the job has run {run_s} s)")
    restored = []

    def restore() -> None:
        # The rerun gets the job's real limit back, before it starts.
        if not restored and job.attempts():
            commands.update("job", job.job_id, TimeLimit=original)
            restored.append(True)
    return restore


def _lose_node(job: handle.Job, node: str, node_control: str | None, out: Callable[[str], None], when: str) -> None:
    """Kill ``node`` for real, or without node control SIGKILL the job's processes there and set it DOWN."""
    if node_control:
        _node_control(node_control, "kill-node", node, "the node may be half killed")
        out(f"  node {node} killed for real {when}: its slurmd and every process on it")
        return
    procs = [p for p in job_processes(job.job_id) if p.node == node]
    for p in sorted(procs, key=lambda p: p.rank is None):
        signal_process(p.pid, signal.SIGKILL)
    commands.update("node", node, State="DOWN", Reason="hpcdist-drill")
    out(f"  node {node} set DOWN after SIGKILL to its {len(procs)} process(es) of the job")


def revive(node: str, node_control: str | None = None) -> None:
    """Bring a node the drill killed or set DOWN back; Slurm may have returned it already (ReturnToService).
    Raises RuntimeError when the node control could not: a node left dead would hold up every later job."""
    if node_control:
        _node_control(node_control, "revive", node, "the node may still be dead")
        return
    state = parse.node_states(commands.sinfo_nodes(nodes=[node])).get(node, "")
    if state.startswith(("down", "drain", "fail")):
        commands.update("node", node, State="RESUME")


def between_saves(job: handle.Job, act: Callable[[], int], tries: int = 50) -> int:
    """``act()`` with the job's processes stopped (SIGSTOP) between two checkpoints: none half written, none
    waiting to be pruned. A disk filled while a save was in flight would let that save finish and prune an older
    one, which leaves room for every later save: the full disk never met."""
    root = job.job_dir / vocab.RUN_DIR / vocab.CHECKPOINTS
    for _ in range(tries):
        stopped = [p.pid for p in job_processes(job.job_id)]
        for pid in stopped:
            signal_process(pid, signal.SIGSTOP)
        try:
            staged = root.is_dir() and any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())
            if not staged and len(checkpoints.complete(root)) <= checkpoints.KEEP:
                return act()
        finally:
            for pid in stopped:
                signal_process(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise RuntimeError(f"job {job.job_id} was in the middle of a checkpoint at each of {tries} looks")


def fill_disk(job_dir: Path) -> int:
    """Fill ``job_dir``'s file system up to half of its newest checkpoint's size, so the next checkpoint cannot
    fit; the bytes written (into FILLER beside it: never inside a directory of the user's)."""
    newest = checkpoints.newest(job_dir / vocab.RUN_DIR / vocab.CHECKPOINTS, checksums=False)
    if newest is None:
        raise RuntimeError(f"no checkpoint in {job_dir} to size the filling by")
    leave = checkpoints.size(newest) // 2
    filler = job_dir.parent / FILLER
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _filled.add(filler)
    try:
        # The job writes on meanwhile (a checkpoint, a persisted snapshot): a measure the job made stale is taken
        # again, until the rest fits.
        for _ in range(FILL_TRIES):
            size = shutil.disk_usage(job_dir).free - leave
            if size <= 0:
                break
            try:
                os.posix_fallocate(fd, 0, size)
                return size
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return 0


def empty_disk(job_dir: Path) -> None:
    """Remove the filler fill_disk made beside ``job_dir`` in this process; a file of that name it did not make
    (O_EXCL refused it) is left alone."""
    filler = Path(job_dir).parent / FILLER
    if filler in _filled:
        filler.unlink(missing_ok=True)
        _filled.discard(filler)


def storage_left(job_dir: Path) -> list[str]:
    """What a storage fault must not leave in the job's checkpoints: a half-written one, a kept one that no longer
    verifies, or none kept at all (problems, as the drill reports them)."""
    root = Path(job_dir) / vocab.RUN_DIR / vocab.CHECKPOINTS
    names = sorted(os.listdir(root)) if root.is_dir() else []
    problems = [f"{root / n} was left half-written" for n in names if n.startswith(".tmp-")]
    kept = checkpoints.complete(root)
    problems += [f"kept checkpoint {p} is damaged: {why}" for p in kept if (why := checkpoints.damage(p))]
    return problems + ([] if kept else [f"no checkpoint was kept in {root}"])
