"""Submit a rendered job directory: through submitit's SlurmExecutor, ``sbatch job.sbatch``, or locally.

The one place that turns a rendered spec into a submit request: submitit's parameters and the local
runner's geometry are derived here from the same spec job.sbatch was rendered from.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import os
import random
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from hpc import fileio, jobs, ranks, registry, task, vocab
from hpc.job import Job, follow
from hpc.slurm import commands
from hpc.slurm.runner import SlurmError
from hpc.spec import signal_name
from hpc.vocab import BATCH_LOG, TASK_LOG

if TYPE_CHECKING:
    import submitit

    from hpc.render import Rendered
    from hpc.spec import JobSpec

# The local runner's "no time limit" (Slurm's --time 0 or UNLIMITED): submitit's LocalExecutor needs a number.
LOCAL_NO_LIMIT_MIN = 100 * 365 * 24 * 60


class SubmitError(RuntimeError):
    """Slurm (or the local runner) refused the job; the message says why, in one line."""


def choose(via: str, executor: str, have_slurm: bool) -> str:
    """Where the job goes: "submitit", "sbatch" or "local"; ValueError for a combination that can't be (the
    command line's choices already refused an unknown --via or --executor)."""
    if executor == "local" or (executor == "auto" and not have_slurm):
        if via == "sbatch":
            raise ValueError("--via sbatch needs Slurm (sbatch on PATH); drop --via sbatch to run locally")
        return "local"
    if not have_slurm:
        raise ValueError("--executor slurm needs Slurm, but sbatch is not on PATH; use --executor local")
    return via


def slurm_parameters(rendered: Rendered) -> dict[str, Any]:
    """Keyword arguments for SlurmExecutor.update_parameters that give job.sbatch's allocation and step."""
    from hpc.templating import submitit_directive as directive

    spec, job_dir = rendered.spec, rendered.job_dir
    # submitit would ask for its own signal (USR2) and logs; the job's own win, as in job.sbatch.
    extra: dict[str, Any] = {"requeue": True, "no-kill": True, "signal": directive(spec.signal),
                             "output": str(job_dir / BATCH_LOG), "open-mode": "append"}
    # The same allocation options job.sbatch's #SBATCH lines carry (templates/sbatch-allocation.j2).
    extra.update({key: directive(value) for key, value in (("nodelist", spec.nodelist), ("exclude", spec.exclude),
                                                           ("dependency", spec.dependency)) if value})
    params = {
        "nodes": spec.allocation_nodes, "ntasks_per_node": spec.slurm_tasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "gpus_per_node": spec.gpus_per_node or None, "signal_delay_s": spec.signal_delay_s,
        # The exact --time job.sbatch asks for (not a minute count): 0 and UNLIMITED stay "no limit".
        "time": directive(spec.time), "partition": directive(spec.partition), "account": directive(spec.account),
        "job_name": directive(spec.job_name),
        # srun takes the last --output: the task logs land in logs/ beside job.sbatch's, stderr included.
        # The step's own geometry: the allocation may hold spare nodes (--spare-nodes) the step leaves free.
        # srun does not inherit the allocation's --cpus-per-task (Slurm 22.05+): asked again, as step.sh does.
        "srun_args": ["--kill-on-bad-exit=1", f"--nodes={spec.nodes}",
                      f"--ntasks={spec.nodes * spec.slurm_tasks_per_node}",
                      f"--ntasks-per-node={spec.slurm_tasks_per_node}", f"--cpus-per-task={spec.cpus_per_task}",
                      "--open-mode=append",
                      f"--output={job_dir / TASK_LOG}",
                      *rendered.step_options],
        "stderr_to_stdout": True, "setup": list(rendered.setup), "teardown": list(rendered.teardown),
        "additional_parameters": extra,
    }
    # submitit writes a parameter set to None not at all, and would otherwise add --wckey=submitit, a line
    # job.sbatch does not have: a site enforcing wckeys would refuse the job or charge it to that key.
    return {**{k: v for k, v in params.items() if v is not None}, "wckey": None}


def task_command(rendered: Rendered) -> tuple[str, ...]:
    """What each Slurm task runs under submitit: the job's task.sh."""
    return ("bash", str(rendered.job_dir / vocab.TASK_SH))


def local_geometry(spec: JobSpec) -> task.Geometry:
    """The allocation the local runner emulates: one Slurm task per rank (srun) or per node (launchers)."""
    return task.Geometry(spec.nodes, spec.slurm_tasks_per_node, spec.cpus_per_task or 1)


def local_command(rendered: Rendered) -> tuple[str, ...]:
    """One task's command under the local runner: templates/local-task.sh.j2's line (setup, then task.sh)."""
    return ("bash", "-c", rendered.local_task)


def record_for(rendered: Rendered, job_id: str, via: str, now: datetime.datetime) -> registry.Record:
    spec = rendered.spec
    return registry.Record(
        job_id=job_id, job_dir=str(rendered.job_dir), via=via,
        submitted=now.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
        job_name=spec.job_name, backend=spec.backend, launcher=spec.launcher, nodes=spec.nodes,
        spare_nodes=spec.spare_nodes, ntasks_per_node=spec.slurm_tasks_per_node, world_size=spec.world_size,
    )


# ---- side effects --------------------------------------------------------------------------------

def submit_submitit(rendered: Rendered) -> str:
    import submitit

    executor = submitit.SlurmExecutor(folder=rendered.job_dir / vocab.SUBMITIT_DIR)
    executor.update_parameters(**slurm_parameters(rendered))
    # What submitit's sbatch must not hand on (commands.new_job_environ).
    unset = dict.fromkeys(os.environ.keys() - commands.new_job_environ(os.environ).keys())
    try:
        # submitit prints sbatch's complaint itself; it is reported once, in SubmitError, instead.
        with contextlib.redirect_stderr(io.StringIO()), _environ(unset):
            job = executor.submit(task.run, task_command(rendered))
    except submitit.core.utils.FailedJobError as exc:
        raise SubmitError(f"sbatch refused the job: {_one_line(str(exc))}") from None
    return str(job.job_id)


def sbatch(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; its job id, or SubmitError."""
    try:
        return commands.sbatch(script, env=commands.new_job_environ(os.environ))
    except SlurmError as exc:
        raise SubmitError(str(exc)) from None


def submit_arrays(scripts: list[Path]) -> list[str]:
    """sbatch each job array script in order; if one is refused, scancel those queued already and raise.

    A sweep is submitted whole or not at all.
    """
    ids: list[str] = []
    try:
        for script in scripts:
            ids.append(sbatch(script))
    except SubmitError as exc:
        if ids and not commands.scancel(ids):
            raise SubmitError(f"{script.parent.name}: {exc}; the {len(ids)} array(s) queued before it could not be "
                              f"cancelled: run scancel {' '.join(ids)}") from None
        raise SubmitError(f"{script.parent.name}: {exc}; cancelled the {len(ids)} array(s) queued before it") from None
    return ids


@contextlib.contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """os.environ with ``values`` (None: unset) for the launch only: submitit's local controller reads its
    signal there, and its sbatch starts from it."""
    saved = {k: os.environ.get(k) for k in values}
    _put(values)
    try:
        yield
    finally:
        _put(saved)


def _put(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def submit_local(rendered: Rendered) -> submitit.Job[Any]:
    """Emulate the allocation here: nodes x tasks-per-node tasks of submitit's LocalExecutor."""
    import submitit

    spec = rendered.spec
    geometry = local_geometry(spec)
    folder = rendered.job_dir / vocab.SUBMITIT_DIR
    executor = submitit.LocalExecutor(folder=folder)
    minutes = spec.time_minutes
    executor.update_parameters(tasks_per_node=geometry.ntasks,
                               timeout_min=LOCAL_NO_LIMIT_MIN if minutes is None else minutes,
                               signal_delay_s=spec.signal_delay_s)
    with _environ({"SUBMITIT_PREEMPT_SIGNAL": signal_name(spec.signal)}), _job_signals(), \
            _output_to(rendered.job_dir / vocab.LOCAL_CONTROLLER_LOG):
        return executor.submit(task.run_local, local_command(rendered), geometry, str(folder),
                               str(rendered.job_dir / TASK_LOG), str(rendered.job_dir / BATCH_LOG), _free_port())


def _free_port() -> int:
    """A TCP port no socket here holds, among those ports are derived from (hpc.ranks: below the kernel's ephemeral
    range): a local job's MASTER_PORT (hpc.ranks.PICKED_MASTER_PORT)."""
    # Asked once, here, so that every task gets the same: a port derived from the job id (a pid) may be another live
    # local job's, or any program's. Not the kernel's pick (port 0): that comes from the ephemeral range, where an
    # outgoing connection (another job's gloo pairs) may take it before rank 0 listens.
    start = random.randrange(ranks.PORT_SPAN)
    for offset in range(ranks.PORT_SPAN):
        port = ranks.PORT_BASE + (start + offset) % ranks.PORT_SPAN
        try:
            with socket.socket() as probe:
                probe.bind(("", port))
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise SubmitError(f"no TCP port for the local job's rendezvous: binding one here failed "
                                  f"({exc.strerror}); let this user bind a local port, or submit the job to Slurm") \
                    from None
    raise SubmitError(f"no TCP port for the local job's rendezvous: every one of {ranks.PORT_BASE}-"
                      f"{ranks.PORT_BASE + ranks.PORT_SPAN - 1} is taken here; end some local jobs, or submit to Slurm")


@contextlib.contextmanager
def _job_signals() -> Iterator[None]:
    """Children started meanwhile (the local controller, and through it the task runners) ignore SIGINT and SIGHUP.

    The terminal's Ctrl-C reaches its whole foreground group: the controller would die of it in a traceback on the
    terminal and kill the runners 1 s later, cutting the ranks' checkpoint short. Only the waiter is to hear it,
    and it cancels the job as `hpcdist cancel` does (SIGTERM). SIGHUP, a closed terminal, would kill the
    controller and task runners but not the ranks (sessions of their own), left training where status and
    cancel cannot reach them: ignored, the job outlives its terminal as a Slurm job does. An ignored signal stays
    ignored across exec, so ignoring them here for the moment of the fork is enough.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, handler)


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Children started meanwhile write their stdout and stderr to ``log``, not to this process's terminal.

    The local controller outlives this command: stopped (`hpcdist cancel`, Ctrl-C), it ends with a
    KeyboardInterrupt traceback, which landed in the terminal that submitted the job, maybe long after.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):  # None where the descriptor was closed (`2>&-`)
        if stream is not None:
            stream.flush()
    saved = {fd: _copy(fd) for fd in (1, 2)}
    try:
        with fileio.open_own(log, append=True) as out:
            for fd in saved:
                os.dup2(out.fileno(), fd)
                os.set_inheritable(fd, True)  # dup2 onto itself (the log took a closed 2) keeps it private
            yield
    finally:
        for fd, copy in saved.items():
            if copy is None:  # closed before, closed again (the log itself may have taken its number)
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                os.dup2(copy, fd)
                os.close(copy)


def _copy(fd: int) -> int | None:
    """A copy of ``fd`` above 2, which the redirection leaves alone (os.dup would reuse a closed 2); None: closed."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        return None


def submit(rendered: Rendered, where: str, environ: Mapping[str, str]) -> Job:
    """Submit and register; the job, with the live submitit job of a local one as its handle. Raises SubmitError,
    OSError or registry.JobError (the job directory is then the caller's to remove)."""
    registry.writable(registry.registry_path(environ))
    handle = None
    if where == "sbatch":
        job_id = sbatch(rendered.job_dir / vocab.JOB_SBATCH)
    elif where == "submitit":
        job_id = submit_submitit(rendered)
    else:
        handle = submit_local(rendered)
        job_id = str(handle.job_id)
    record = record_for(rendered, job_id, where, datetime.datetime.now(datetime.timezone.utc))
    if handle is not None:
        _until_started(record, handle)
    registry.write_marker(record)
    registry.append(registry.registry_path(environ), record)
    return Job(record, handle)


def _until_started(record: registry.Record, handle: submitit.Job[Any], timeout_s: float = 30.0) -> None:
    """Return once the local controller runs its own program (or has ended).

    Until then its pid still shows the forking python's command line, and a status taken in that
    moment would read an ended job with no task statuses: FAILED.
    """
    follow(lambda: jobs.controller_pid(record) is not None or handle.done(), bool, 0.01, timeout_s)


def _one_line(text: str) -> str:
    """sbatch's error lines joined into one, without their repeated ``sbatch: error:`` prefix."""
    lines = [re.sub(r"^sbatch:\s*error:\s*", "", line.strip()) for line in text.strip().splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line)) or "no reason given"
