"""Run one Slurm task's command as a child process group, forwarding preemption signals to it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from hpc import fileio, ranks
from hpc.slurm import commands

# torchrun and the DeepSpeed launcher do not pass USR1/USR2 on to their workers, and a python parent
# (submitit's task runner) would swallow them, so the task hands each one to the whole child group.
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# The local runner's KillWait: after SIGTERM (a cancel, Ctrl-C, a failed peer) a rank may still be writing its
# checkpoint, then it is killed. Slurm's default is 30 s; a rehearsal's CPU ranks need far less (the quick start's
# DeepSpeed ranks agree, checkpoint and exit 0.6 s after a cancel), and 10 s leaves room for a bigger model on a
# slow disk while a failed job still ends within seconds.
STOP_GRACE_S = 10.0
POLL_S = 0.2
# Emulated nodes get loopback addresses 127.0.0.1, 127.0.0.2, ...: all reach this machine, and each
# still has its own name the way cluster nodes do.
LOCAL_NODE_PREFIX = "127.0.0."
MAX_LOCAL_NODES = 254
# Every emulated task is a process on this one machine; past this many it is a fork bomb, not a rehearsal.
MAX_LOCAL_TASKS = 1024


class TaskFailed(SystemExit):
    """The command exited non-zero; exiting with this carries that same status to Slurm.

    A SystemExit (not an Exception) so that submitit's runner does not turn it into exit status 1:
    Slurm's --kill-on-bad-exit, sacct's ExitCode and a requeue on 75 then see what task.sh returned,
    exactly as on the ``--via sbatch`` path.
    """

    def __init__(self, command: Sequence[str], returncode: int, reason: str = "") -> None:
        status = returncode if returncode >= 0 else 128 - returncode
        super().__init__(status)
        self.command = tuple(command)
        self.returncode = returncode
        self.reason = reason

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{' '.join(self.command)} exited with status {self.code}{why}"


@dataclass(frozen=True)
class Geometry:
    """The allocation a local run emulates: Slurm's nodes, tasks per node and CPUs per task."""

    nodes: int
    ntasks_per_node: int
    cpus_per_task: int = 1

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node


def check_local(geometry: Geometry) -> None:
    """Refuse, before anything is written or started, a geometry this machine cannot emulate."""
    from hpc.spec import SpecError

    local_nodelist(geometry.nodes)
    if geometry.ntasks > MAX_LOCAL_TASKS:
        raise SpecError(f"--executor local would start {geometry.ntasks} tasks on this machine, over its limit of "
                        f"{MAX_LOCAL_TASKS}; use fewer nodes or tasks per node, or submit to Slurm")


def local_nodelist(nodes: int) -> str:
    """``127.0.0.[1-N]``: a nodelist whose every host resolves to this machine; SpecError past the addresses there
    are (asked by render's ranks.txt too, before the submit path's own check)."""
    from hpc.spec import SpecError

    if not 1 <= nodes <= MAX_LOCAL_NODES:
        raise SpecError(f"--executor local emulates at most {MAX_LOCAL_NODES} nodes (loopback addresses "
                        f"{LOCAL_NODE_PREFIX}1-{MAX_LOCAL_NODES}), not --nodes {nodes}; use fewer nodes or "
                        "submit to Slurm")
    return f"{LOCAL_NODE_PREFIX}1" if nodes == 1 else f"{LOCAL_NODE_PREFIX}[1-{nodes}]"


def local_env(geometry: Geometry, index: int, job_id: str) -> dict[str, str]:
    """The Slurm variables srun would give task ``index`` of ``geometry`` (block distribution)."""
    if not 0 <= index < geometry.ntasks:
        raise ValueError(f"task {index} is outside the {geometry.ntasks} tasks of {geometry}")
    node = index // geometry.ntasks_per_node
    tasks_per_node = (str(geometry.ntasks_per_node) if geometry.nodes == 1
                      else f"{geometry.ntasks_per_node}(x{geometry.nodes})")
    nodelist = local_nodelist(geometry.nodes)
    return {
        **dict.fromkeys(("SLURM_JOB_ID", "SLURM_JOBID"), job_id),
        **dict.fromkeys(("SLURM_STEP_ID", "SLURM_STEPID"), "0"),
        "SLURM_PROCID": str(index),
        "SLURM_LOCALID": str(index % geometry.ntasks_per_node),
        "SLURM_NODEID": str(node),
        **dict.fromkeys(("SLURM_NTASKS", "SLURM_NPROCS"), str(geometry.ntasks)),
        **dict.fromkeys(("SLURM_NNODES", "SLURM_JOB_NUM_NODES"), str(geometry.nodes)),
        **dict.fromkeys(("SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"), tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(geometry.ntasks_per_node),
        "SLURM_CPUS_PER_TASK": str(geometry.cpus_per_task),
        **dict.fromkeys(("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"), nodelist),
        "SLURMD_NODENAME": f"{LOCAL_NODE_PREFIX}{node + 1}",
    }


def emulated_environ(environ: Mapping[str, str], geometry: Geometry, index: int, job_id: str,
                     port: int) -> dict[str, str]:
    """What a new job submitted from ``environ`` starts from (commands.new_job_environ), plus the emulated task's
    Slurm variables and the job's rendezvous ``port``."""
    # SLURM_CONF stays, as it does for sbatch: it names the cluster this machine's Slurm commands ask, not a job,
    # so a rank that runs one (hpcdist submit, scontrol) reaches the cluster the submitting shell would.
    return {**commands.new_job_environ(environ), **local_env(geometry, index, job_id),
            ranks.PICKED_MASTER_PORT: str(port)}


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


def stop(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's group, then SIGKILL whatever is left after ``grace_s``."""
    _signal_group(child, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace_s)
    # A rank that ignores SIGTERM outlives its launcher's exit, and would hold its CPUs and ports.
    _signal_group(child, signal.SIGKILL)
    child.wait()


def run(command: Sequence[str], env: Mapping[str, str] | None = None, abort_file: Path | None = None,
        output: Path | None = None, kill_wait_s: float | None = None) -> int:
    """Run ``command``; return 0, or raise TaskFailed with its exit status.

    ``abort_file`` emulates srun's --kill-on-bad-exit where no srun exists: once a failing task created it
    (run_local), every task that sees it stops its own command, so one dead rank never leaves the others
    waiting in a collective until the time limit. ``output`` (appended to) plays srun's --output.
    ``kill_wait_s`` plays slurmd's KillWait where no slurmd exists: a SIGTERM passed on is followed by SIGKILL.
    """
    command = tuple(str(c) for c in command)
    with fileio.open_own(output, append=True) if output is not None else contextlib.nullcontext() as log:
        # A session of its own makes the command's processes one group, which a signal reaches whole.
        child = subprocess.Popen(command, env=dict(env) if env is not None else None, start_new_session=True,
                                 stdout=log, stderr=subprocess.STDOUT if log else None)
    killed_at: list[float] = []  # when KillWait ends, once a SIGTERM came

    def forward(signum: int, _frame: object) -> None:
        _signal_group(child, signum)
        if signum == signal.SIGTERM and kill_wait_s is not None and not killed_at:
            killed_at.append(time.monotonic() + kill_wait_s)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    polled = abort_file is not None or kill_wait_s is not None
    try:
        while True:
            try:
                code = child.wait(timeout=POLL_S if polled else None)
                break
            except subprocess.TimeoutExpired:
                if killed_at and time.monotonic() >= killed_at[0]:
                    _signal_group(child, signal.SIGKILL)
                elif abort_file is not None and abort_file.exists():
                    stop(child, STOP_GRACE_S)
                    raise TaskFailed(command, child.returncode if child.returncode else 1,
                                     "stopped because another task failed") from None
    except BaseException:
        if child.returncode is None:
            stop(child, 0.5)  # submitit's own stop (the time limit's) kills this runner 1 s after its SIGINT
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        # Ranks of a failed command may linger (a launcher's workers); they would hold ports and CPUs.
        _signal_group(child, signal.SIGKILL)
        raise TaskFailed(command, code, "stopped by SIGTERM" if killed_at else "")
    return 0


def _abort(abort_file: Path, batch_log: Path, index: int, node: str, returncode: int) -> None:
    """Stop every task; the first to fail also says so in the batch log, in srun's words: the tasks stopped
    because of it die of SIGTERM or SIGKILL too, and a rank the OOM killer ended is known by this line alone."""
    try:
        abort_file.open("x").close()
    except FileExistsError:
        return
    how = (signal.strsignal(-returncode) or f"signal {-returncode}") if returncode < 0 else \
        f"Exited with exit code {returncode}"
    with contextlib.suppress(OSError):
        fileio.append_line(batch_log, f"srun: error: {node}: task {index}: {how}")


def run_local(command: Sequence[str], geometry: Geometry, folder: str, output: str, batch_log: str,
              port: int) -> int:
    """What each task of submitit's LocalExecutor runs: ``command`` as an emulated Slurm task.

    ``folder`` is submitit's folder (the task's exit status goes there as ``JOBID_INDEX_exit``);
    ``output`` is the task's log path, with ``%t`` standing for its index as in srun's --output, and ``batch_log``
    the job's (``%j``: its id), where the task that fails first is named. ``port``: the job's rendezvous port,
    the same for every task.
    """
    # The controller ignores the terminal's Ctrl-C (hpc.submit._job_signals), and so would this runner; but its
    # SIGINT is how the controller stops the tasks at the time limit. A group of its own keeps the terminal's out.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    index = int(os.environ["SUBMITIT_LOCAL_GLOBALID"])
    job_id = os.environ["SUBMITIT_LOCAL_JOB_ID"]
    env = emulated_environ(os.environ, geometry, index, job_id, port)
    status_file = Path(folder) / f"{job_id}_{index}_exit"
    abort_file = Path(folder) / f"{job_id}_abort"
    try:
        run(command, env=env, abort_file=abort_file, kill_wait_s=STOP_GRACE_S,
            output=Path(output.replace("%t", str(index)).replace("%j", job_id)))
    except TaskFailed as failed:
        if not failed.reason:  # its own command failed, rather than stopped because another did
            _abort(abort_file, Path(batch_log.replace("%j", job_id)), index, env["SLURMD_NODENAME"], failed.returncode)
        fileio.atomic_write(status_file, f"{failed.code}\n")
        raise
    fileio.atomic_write(status_file, "0\n")
    return 0

