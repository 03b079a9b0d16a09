"""With no Slurm on PATH, `hpcdist submit` emulates the allocation here with submitit's LocalExecutor."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixtures import TINY_TRAIN, check_training, environ, hpcdist, job_id_of, path_without_slurm

from hpc import dsconfig, logs, profiles, ranks, render, submit
from hpc.job import Job
from hpc.spec import JobSpec

# A stand-in task.sh: what a rank sees, then an optional failure or wait (no trainer needed).
STANDIN = """#!/bin/bash
set -eu
echo "rank=$SLURM_PROCID of $SLURM_NTASKS node=$SLURM_NODEID nodes=$SLURM_JOB_NODELIST job=$SLURM_JOB_ID"
if [ "$SLURM_PROCID" = "${FAIL_RANK:-none}" ]; then echo "rank $SLURM_PROCID fails" >&2; exit 3; fi
if [ "$SLURM_PROCID" = "${KILL_RANK:-none}" ]; then echo "rank $SLURM_PROCID is killed" >&2; kill -KILL $$; fi
[ -z "${CHECKPOINT_S:-}" ] || trap 'sleep "$CHECKPOINT_S"; echo "rank $SLURM_PROCID checkpointed"; exit 75' TERM
sleep "${SLEEP_S:-0}"
[ -z "${SHOW_PORT:-}" ] || "$HPCDIST_PYTHON" -m hpc env --shell | grep MASTER_PORT
"""


def submit_standin(tmp_path, monkeypatch, nodes: int = 2, time_limit: str = "5", **env: str) -> Job:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = JobSpec(job_dir=str(tmp_path / "job"), nodes=nodes, python=sys.executable, time=time_limit,
                   train_args=("--batch-size", "60"))
    rendered = render.render(spec, profiles.load("local"))
    rendered = dataclasses.replace(rendered, files={**rendered.files, "task.sh": STANDIN})
    render.write(rendered)
    return submit.submit(rendered, "local", {"HPCDIST_HOME": str(tmp_path / "home")})


def test_local_tasks_see_the_emulated_slurm_geometry(tmp_path, monkeypatch):
    submitted = submit_standin(tmp_path, monkeypatch, nodes=3)
    final = submitted.wait(poll_s=0.2, timeout_s=120)
    assert final.ok, final
    job_id = submitted.record.job_id
    for index in range(3):
        log = (tmp_path / "job" / "logs" / f"task-{index}.log").read_text()
        assert log == f"rank={index} of 3 node={index} nodes=127.0.0.[1-3] job={job_id}\n"


def test_a_local_job_rendezvouses_on_a_port_the_os_called_free_at_submit_not_on_one_derived_from_its_id(
        tmp_path, monkeypatch):
    """Local job ids are pids: two live jobs whose ids differ by 20,000 derived one port, and nothing checked it."""
    submitted = submit_standin(tmp_path, monkeypatch, nodes=2, SHOW_PORT="1")
    assert submitted.wait(poll_s=0.2, timeout_s=120).ok
    ports = {(tmp_path / "job" / "logs" / f"task-{index}.log").read_text().splitlines()[-1] for index in range(2)}
    derived = ranks.port_for_job(submitted.record.job_id)
    assert len(ports) == 1 and ports != {f"export MASTER_PORT={derived}"}, (ports, derived)


def test_a_local_jobs_port_is_a_free_one_below_the_ephemeral_range_where_no_outgoing_connection_takes_it(
        monkeypatch):
    """The kernel's own pick (bind to port 0) comes from its ephemeral range (32768-60999 here), which any outgoing
    connection may take between submit and rank 0's listen; the derived ports stay below it, and so does this one."""
    import random
    import socket

    with socket.socket() as held:
        for offset in range(100, ranks.PORT_SPAN):  # a port of the range a socket here holds: the search starts there
            try:
                held.bind(("", ranks.PORT_BASE + offset))
                break
            except OSError:
                continue
        held.listen()
        monkeypatch.setattr(random, "randrange", lambda span: offset)
        port = submit._free_port()
    assert ranks.PORT_BASE <= port < ranks.PORT_BASE + ranks.PORT_SPAN and port != ranks.PORT_BASE + offset


def test_a_local_job_refused_a_port_by_the_os_is_refused_in_one_line_naming_the_port_and_the_fix(
        tmp_path, monkeypatch):
    """Where this user may bind no TCP port (a sandbox's seccomp, EACCES) submit said only "[Errno 13] Permission
    denied", naming neither what it asked for nor what to do."""
    import socket

    def refuse(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(submit.SubmitError) as refused:
        submit_standin(tmp_path, monkeypatch)
    line = str(refused.value)
    assert "\n" not in line and "rendezvous" in line and "Permission denied" in line and "Slurm" in line
    assert not (tmp_path / "home" / "jobs.jsonl").exists()


@pytest.mark.parametrize("time_limit", ["0", "UNLIMITED"])
def test_no_time_limit_lets_a_local_job_run(tmp_path, monkeypatch, time_limit):
    """Slurm reads --time 0 as no limit; the local runner once read it as zero minutes and stopped at once."""
    submitted = submit_standin(tmp_path, monkeypatch, nodes=1, time_limit=time_limit, SLEEP_S="2")
    final = submitted.wait(poll_s=0.2, timeout_s=120)
    assert final.ok, final


@pytest.mark.timed  # stopped, or cancelled, within seconds
def test_a_failing_local_task_stops_the_others(tmp_path, monkeypatch):
    started = time.monotonic()
    submitted = submit_standin(tmp_path, monkeypatch, FAIL_RANK="1", SLEEP_S="60")
    final = submitted.wait(poll_s=0.2, timeout_s=120)
    assert time.monotonic() - started < 30, "rank 0 should have been stopped, not left sleeping"
    assert (final.state, final.exit_code) == ("FAILED", 3)
    report = logs.failure_report(submitted.record)
    assert "task-1.log (the failing task)" in report and "rank 1 fails" in report


@pytest.mark.timed  # stopped within seconds
def test_a_local_rank_killed_outright_is_named_as_the_one_that_failed_first(tmp_path, monkeypatch):
    """A rank the OOM killer ends dies of SIGKILL, as the ranks stopped because of it die of SIGTERM or SIGKILL: its
    exit status alone cannot tell it from them. The local runner says which task failed first, as srun does."""
    submitted = submit_standin(tmp_path, monkeypatch, KILL_RANK="1", SLEEP_S="60")
    final = submitted.wait(poll_s=0.2, timeout_s=120)
    assert (final.state, final.exit_code) == ("FAILED", 128 + signal.SIGKILL)
    report = logs.failure_report(submitted.record)
    assert "task 1 (rank 1) on 127.0.0.2 failed first: Killed" in report and "rank 1 is killed" in report


@pytest.mark.timed  # stopped, or cancelled, within seconds
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_cancel_and_status_of_a_local_job(tmp_path, monkeypatch, sigint):
    home = tmp_path / "home"
    # Ignored: as in a command that a script started with `&` or nohup, as some CI runners do.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint == "ignored" else None
    try:
        submitted = submit_standin(tmp_path, monkeypatch, SLEEP_S="120")
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)
    job_id = submitted.record.job_id
    deadline = time.monotonic() + 60
    while not (tmp_path / "job" / "logs" / "task-1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "RUNNING" in hpcdist(["status", job_id], home).stdout
    assert hpcdist(["cancel", job_id], home).returncode == 0
    final = submitted.wait(poll_s=0.2, timeout_s=60)
    assert final.state == "CANCELLED"
    assert hpcdist(["status", str(tmp_path / "job")], home).stdout.startswith(f"{job_id}  CANCELLED")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _ranks(controller: int, count: int = 2) -> set[int]:
    """The ranks of a local job, once each of its task runners started one (a task's log is opened just before
    its rank starts, so a log alone does not say so)."""
    deadline = time.monotonic() + 60
    while True:
        ranks = {pid for runner in _children(controller) for pid in _children(runner)}
        if len(ranks) >= count or time.monotonic() > deadline:
            return ranks
        time.sleep(0.1)


def _in_sessions(sessions: set[int]) -> list[int]:
    """The live processes of these sessions (a task's command is a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.timed  # cancelled within seconds
def test_cancelling_a_local_job_gives_its_ranks_time_to_checkpoint(tmp_path, monkeypatch):
    """As Slurm's KillWait does: a rank that checkpoints on SIGTERM (2 s here) finishes before SIGKILL. The local
    runner once gave it 0.5 s, and submitit killed the runner itself after 1 s."""
    home = tmp_path / "home"
    submitted = submit_standin(tmp_path, monkeypatch, SLEEP_S="120", CHECKPOINT_S="2")
    _ranks(int(submitted.record.job_id))
    time.sleep(0.5)  # the trap is set once the rank's first line is out
    started = time.monotonic()
    assert hpcdist(["cancel", submitted.record.job_id], home).returncode == 0
    assert time.monotonic() - started < 5, "cancel returns at once, as scancel does"
    assert submitted.wait(poll_s=0.2, timeout_s=60).state == "CANCELLED"
    for index in range(2):
        assert f"rank {index} checkpointed" in (tmp_path / "job" / "logs" / f"task-{index}.log").read_text()
    # Stopped, not failed: no rank is named as the one that failed first.
    assert not list((tmp_path / "job" / "logs").glob("batch-*"))


@pytest.mark.timed  # cancelled within seconds
def test_a_local_job_outlives_the_terminal_that_submitted_it_and_stays_cancellable(tmp_path, monkeypatch):
    """Closing the terminal of `submit --wait` hangs up its process group, the job's controller and task runners
    with it: they must not die of it and leave the ranks (sessions of their own) running where status and cancel
    cannot see them. The job runs on, as a Slurm job does."""
    home = tmp_path / "home"
    submitted = submit_standin(tmp_path, monkeypatch, SLEEP_S="120")
    job_id = submitted.record.job_id
    deadline = time.monotonic() + 60
    while not (tmp_path / "job" / "logs" / "task-1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = _ranks(int(job_id))
    runners = _children(int(job_id))
    for pid in [int(job_id), *runners]:
        os.kill(pid, signal.SIGHUP)
    time.sleep(1)
    assert "RUNNING" in hpcdist(["status", job_id], home).stdout
    assert hpcdist(["cancel", job_id], home).returncode == 0
    assert submitted.wait(poll_s=0.2, timeout_s=60).state == "CANCELLED"
    deadline = time.monotonic() + 10
    while _in_sessions(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(ranks) == 2 and _in_sessions(ranks) == []


# `hpcdist submit --wait` of a stand-in job, as run from a terminal: SIGINT's default action, a session of its own.
WAITER = """
import dataclasses, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from hpc import profiles, render, submit
from hpc.commands.submit import _wait
from hpc.spec import JobSpec
job_dir, home, standin = sys.argv[1:]
spec = JobSpec(job_dir=job_dir, nodes=2, python=sys.executable, time="5", train_args=("--batch-size", "60"))
rendered = render.render(spec, profiles.load("local"))
rendered = dataclasses.replace(rendered, files={**rendered.files, "task.sh": standin})
render.write(rendered)
submitted = submit.submit(rendered, "local", {"HPCDIST_HOME": home})
print(submitted.record.job_id, flush=True)
_wait(submitted)
"""


@pytest.mark.timed  # interrupted within seconds
def test_ctrl_c_during_wait_cancels_a_local_job_stops_its_ranks_and_exits_130(tmp_path):
    """Ctrl-C at the terminal interrupts the waiter alone, which cancels the job as `hpcdist cancel` does: it is
    CANCELLED (not FAILED), its ranks get their time to checkpoint, and the waiter says so in one line and exits
    130, as an interrupted command does (it once printed 'Aborted!' and exited 1, then under the job controller's
    own KeyboardInterrupt traceback)."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(job_dir), str(home), STANDIN],
                              env=environ(home, SLEEP_S="120", CHECKPOINT_S="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    job_id = waiter.stdout.readline().strip()
    ranks = _ranks(int(job_id))
    time.sleep(0.5)  # the trap is set once the rank's first line is out
    os.killpg(waiter.pid, signal.SIGINT)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 130, out + err
    assert err == f"hpcdist: interrupted: job {job_id} cancelled, its ranks stopped\n"
    assert hpcdist(["status", job_id], home).stdout.startswith(f"{job_id}  CANCELLED")
    assert len(ranks) == 2 and _in_sessions(ranks) == []
    for index in range(2):
        assert f"rank {index} checkpointed" in (job_dir / "logs" / f"task-{index}.log").read_text()


# `hpcdist submit` of a stand-in job without --wait, as run from a terminal: it returns, the job runs on.
SUBMITTER = WAITER.replace("_wait(submitted)", "")


@pytest.mark.timed  # cancelled within seconds
def test_a_cancelled_local_job_writes_nothing_to_the_terminal_that_submitted_it(tmp_path):
    """The job's controller outlives `hpcdist submit`, which has returned: stopped by `hpcdist cancel` (or Ctrl-C),
    it printed a KeyboardInterrupt traceback into the terminal that submitted the job, maybe long after. Whatever
    the controller says goes to the job directory's submitit/controller.log instead."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    submitter = subprocess.Popen([sys.executable, "-c", SUBMITTER, str(job_dir), str(home), STANDIN],
                                 env=environ(home, SLEEP_S="120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
    job_id = submitter.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while not (job_dir / "logs" / "task-1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hpcdist(["cancel", job_id], home).returncode == 0
    out, err = submitter.communicate(timeout=60)  # the controller held the pipes, so this waited for its end
    deadline = time.monotonic() + 60
    while Path(f"/proc/{job_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out, err) == ("", "")
    assert (job_dir / "submitit" / "controller.log").is_file()
    assert hpcdist(["status", job_id], home).stdout.startswith(f"{job_id}  CANCELLED")


@pytest.mark.timed  # cancelled within seconds
def test_a_local_job_is_submitted_from_a_command_whose_stderr_is_closed(tmp_path):
    """`hpcdist submit ... 2>&-`: the controller's output goes to its log whether or not there was a terminal."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    submitter = subprocess.Popen([sys.executable, "-c", SUBMITTER, str(job_dir), str(home), STANDIN],
                                 env=environ(home, SLEEP_S="120"), stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: os.close(2))
    job_id = submitter.stdout.readline().strip()
    assert submitter.wait(timeout=60) == 0 and job_id.isdigit()
    _ranks(int(job_id))  # running: a cancel in the controller's first moments is another test
    assert hpcdist(["cancel", job_id], home).returncode == 0
    deadline = time.monotonic() + 60
    while Path(f"/proc/{job_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (job_dir / "submitit" / "controller.log").is_file()
    assert hpcdist(["status", job_id], home).stdout.startswith(f"{job_id}  CANCELLED")


@pytest.mark.slow
@pytest.mark.parametrize("backend,launcher", [("ddp", "srun"), ("deepspeed", "deepspeed")])
def test_submit_without_slurm_runs_the_job_here(tmp_path, backend, launcher):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    env = environ(home, PATH=path_without_slurm(tmp_path))
    args = ["submit", "--nodes", "2", "--backend", backend, "--launcher", launcher, "--time", "10",
            "--job-dir", str(job_dir), "--wait"]
    started = time.monotonic()
    proc = hpcdist([*args, "--", *TINY_TRAIN], home, env=env, timeout=600)
    print(f"TIMING local backend={backend} launcher={launcher} submit->done {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = job_id_of(proc.stdout)
    assert f"Submitted job {job_id} (local)" in proc.stdout
    summary = check_training(job_dir, world_size=2, hosts=None, master="127.0.0.1")
    assert {r["node_rank"] for r in summary["ranks"]} == {0, 1}
    if backend == "deepspeed":
        # --precision auto, decided at render for this machine's CPU (the local executor runs here): bf16 where
        # it is native, and what the dry run shows is what trained.
        config = json.loads((job_dir / "deepspeed.json").read_text())
        expected = "bf16" if dsconfig.this_cpu().bf16 else "fp32"
        assert summary["precision"] == dsconfig.precision_of(config) == expected
        assert f"in {expected}" in (job_dir / "job.sbatch").read_text()
        assert f"--precision auto → {expected}" in proc.stderr
    assert hpcdist(["list"], home, env=env).stdout.count(" local ") == 1


@pytest.mark.slow
def test_a_local_torchrun_job_whose_master_port_is_taken_fails_at_once_not_after_the_rendezvous_timeout(tmp_path):
    """torch's own guess let the node that found MASTER_PORT taken join the port's holder as a client: the job hung
    silently until the rendezvous timed out. Told it hosts (rdzv_conf is_host=1), that node fails at once."""
    import socket

    home, job_dir = tmp_path / "home", tmp_path / "job"
    squatter = socket.socket()
    squatter.bind(("", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    site = tmp_path / "site.yaml"
    site.write_text(f"extends: local\nenv:\n  MASTER_PORT: '{port}'\n")
    try:
        proc = hpcdist(["submit", "--cluster", str(site), "--nodes", "2", "--backend", "ddp", "--launcher",
                        "torchrun", "--time", "5", "--job-dir", str(job_dir), "--wait", "--", *TINY_TRAIN,
                        "--threads", "1"], home, env=environ(home, PATH=path_without_slurm(tmp_path)), timeout=120)
    finally:
        squatter.close()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    said = "".join(p.read_text(errors="replace") for p in (job_dir / "logs").glob("task-0*"))
    assert "RendezvousConnectionError" in said, said[-2000:]
