"""hpc.task: the local Slurm-environment emulation (pure) and running a task's command (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpc import fileio, nodelist, ranks, submit, task
from hpc.slurm import commands
from hpc.spec import JobSpec

pytestmark = pytest.mark.timed  # signals to running commands, bounded in seconds


def test_local_env_two_nodes_one_task_each():
    env = task.local_env(task.Geometry(nodes=2, ntasks_per_node=1, cpus_per_task=2), 1, "4242")
    assert env["SLURM_PROCID"] == "1"
    assert env["SLURM_NTASKS"] == "2"
    assert env["SLURM_LOCALID"] == "0"
    assert env["SLURM_NODEID"] == "1"
    assert env["SLURM_STEP_ID"] == "0"
    assert env["SLURM_JOB_ID"] == "4242"
    assert env["SLURM_NNODES"] == "2"
    assert env["SLURM_TASKS_PER_NODE"] == "1(x2)"
    assert env["SLURM_CPUS_PER_TASK"] == "2"
    assert env["SLURM_JOB_NODELIST"] == "127.0.0.[1-2]"
    assert env["SLURMD_NODENAME"] == "127.0.0.2"


def test_local_env_one_node_many_tasks():
    env = task.local_env(task.Geometry(1, 4), 3, "7")
    assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"]) == ("3", "3", "0")
    assert env["SLURM_TASKS_PER_NODE"] == "4"
    assert env["SLURM_JOB_NODELIST"] == "127.0.0.1"


@pytest.mark.parametrize("index", [-1, 4])
def test_local_env_rejects_a_task_outside_the_geometry(index):
    with pytest.raises(ValueError):
        task.local_env(task.Geometry(2, 2), index, "1")


def test_local_nodelist_bounds():
    with pytest.raises(ValueError):
        task.local_nodelist(0)
    with pytest.raises(ValueError):
        task.local_nodelist(task.MAX_LOCAL_NODES + 1)


def test_check_local_accepts_what_local_nodelist_can_name_and_no_more():
    task.check_local(task.Geometry(task.MAX_LOCAL_NODES, 4))
    task.check_local(task.Geometry(1, task.MAX_LOCAL_TASKS))
    with pytest.raises(ValueError, match="at most 254 nodes"):
        task.check_local(task.Geometry(task.MAX_LOCAL_NODES + 1, 1))
    with pytest.raises(ValueError, match="over its limit of 1024"):
        task.check_local(task.Geometry(2, task.MAX_LOCAL_TASKS // 2 + 1))


@given(nodes=st.integers(1, 16), per_node=st.integers(1, 8), cpus=st.integers(1, 4), data=st.data(),
       job=st.integers(1, 10**8))
def test_every_emulated_task_resolves_like_a_slurm_task(nodes, per_node, cpus, data, job):
    geometry = task.Geometry(nodes, per_node, cpus)
    index = data.draw(st.integers(0, geometry.ntasks - 1))
    dist = ranks.resolve(task.local_env(geometry, index, str(job)))
    assert dist.source == "slurm"
    assert dist.rank == index
    assert dist.world_size == nodes * per_node
    assert dist.node_rank == index // per_node
    assert dist.local_rank == index % per_node
    assert dist.local_world_size == per_node
    assert dist.master_addr == "127.0.0.1"
    assert dist.master_port == ranks.port_for_job(str(job))


@given(nodes=st.integers(1, task.MAX_LOCAL_NODES))
def test_every_emulated_node_is_a_distinct_loopback_address(nodes):
    hosts = nodelist.expand(task.local_nodelist(nodes))
    assert len(hosts) == len(set(hosts)) == nodes
    assert all(h.startswith("127.0.0.") and 1 <= int(h.rsplit(".", 1)[1]) <= 254 for h in hosts)


def test_emulated_environ_drops_inherited_slurm_variables():
    inherited = {"PATH": "/usr/bin", "SLURM_MEM_PER_NODE": "100", "SLURM_PROCID": "9", "SLURMD_NODENAME": "x"}
    env = task.emulated_environ(inherited, task.Geometry(1, 2), 1, "5", 40000)
    assert env["PATH"] == "/usr/bin"
    assert "SLURM_MEM_PER_NODE" not in env
    assert env["SLURM_PROCID"] == "1"
    assert env["SLURMD_NODENAME"] == "127.0.0.1"


def test_emulated_environ_leaves_out_a_stale_jobs_variables_and_keeps_the_cluster_slurm_conf_names():
    inherited = {"PATH": "/usr/bin", "SLURM_CONF": "/etc/slurm/site.conf", "SLURM_JOB_ID": "7",
                 **dict.fromkeys(commands.HPCDIST_JOB_VARIABLES, "3")}
    env = task.emulated_environ(inherited, task.Geometry(1, 2), 1, "5", 40000)
    assert {k: env[k] for k in commands.HPCDIST_JOB_VARIABLES if k in env} == {"HPCDIST_MASTER_PORT": "40000"}
    assert env["SLURM_CONF"] == "/etc/slurm/site.conf"
    assert env["SLURM_JOB_ID"] == "5"
    assert env["PATH"] == "/usr/bin"


def test_every_task_of_a_local_job_rendezvouses_on_the_port_its_runner_was_handed():
    geometry = task.Geometry(2, 2)
    stale = {"HPCDIST_MASTER_PORT": "12345"}  # a local task's shell submitting again
    ports = {ranks.resolve(task.emulated_environ(stale, geometry, i, "22255", 40123)).master_port for i in range(4)}
    assert ports == {40123}
    assert "HPCDIST_MASTER_PORT" not in commands.new_job_environ(stale)


@pytest.mark.parametrize("launcher,tasks_per_node", [("srun", 3), ("torchrun", 1), ("deepspeed", 1)])
def test_geometry_of_a_spec_counts_slurm_tasks(launcher, tasks_per_node):
    spec = JobSpec(job_dir="/j", nodes=2, ntasks_per_node=3, cpus_per_task=2, backend="deepspeed",
                   launcher=launcher, gpus_per_node=0)
    assert submit.local_geometry(spec) == task.Geometry(2, tasks_per_node, 2)


# ---- running a command -----------------------------------------------------------------------------

def test_run_returns_zero_on_success():
    assert task.run(["true"]) == 0


@pytest.mark.parametrize("status", [1, 3, 75])
def test_run_raises_with_the_commands_own_status(status):
    with pytest.raises(task.TaskFailed) as failed:
        task.run(["sh", "-c", f"exit {status}"])
    assert failed.value.code == status
    assert failed.value.returncode == status
    assert isinstance(failed.value, SystemExit)


def test_a_command_killed_by_a_signal_fails_with_128_plus_the_signal():
    with pytest.raises(task.TaskFailed) as failed:
        task.run(["sh", "-c", "kill -KILL $$"])
    assert failed.value.code == 128 + signal.SIGKILL


def test_run_passes_the_environment_and_appends_output(tmp_path):
    log = tmp_path / "task-0.log"
    log.write_text("earlier\n")
    task.run(["sh", "-c", 'echo "value=$HPCDIST_TEST_VALUE"; echo err >&2'],
             env={**os.environ, "HPCDIST_TEST_VALUE": "42"}, output=log)
    assert log.read_text() == "earlier\nvalue=42\nerr\n"


def test_a_task_log_that_is_a_link_is_refused_and_what_it_points_at_is_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("a user's file\n")
    (tmp_path / "task-0.log").symlink_to(elsewhere)
    with pytest.raises(fileio.UnsafePath, match="is a symbolic link"):
        task.run(["sh", "-c", "echo written"], output=tmp_path / "task-0.log")
    assert elsewhere.read_text() == "a user's file\n"


def _signal_self_when(ready: Path, signum: int) -> threading.Thread:
    def fire():
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_signals_reach_the_commands_children(tmp_path, signum):
    """Like torchrun's workers: a grandchild gets the signal although its parent passes nothing on."""
    ready, got = tmp_path / "ready", tmp_path / "got"
    name = signal.Signals(signum).name[3:]
    grandchild = (f"import signal, sys, time, pathlib\n"
                  f"signal.signal(signal.SIG{name}, lambda *a: (pathlib.Path({str(got)!r}).write_text('{name}'), "
                  f"sys.exit(75)))\n"
                  f"pathlib.Path({str(ready)!r}).touch()\n"
                  f"time.sleep(30)\n")
    # The parent shell ignores the signal and only waits, as the launchers do with USR1.
    parent = f"trap '' {name}; {sys.executable} -c {_sh_quote(grandchild)} & wait $!; exit $?"
    before = signal.getsignal(signum)
    thread = _signal_self_when(ready, signum)
    with pytest.raises(task.TaskFailed) as failed:
        task.run(["bash", "-c", parent])
    thread.join()
    assert got.read_text() == name
    assert failed.value.code == 75
    assert signal.getsignal(signum) == before


def test_abort_file_stops_a_running_command(tmp_path):
    abort = tmp_path / "abort"
    threading.Timer(0.5, abort.touch).start()
    started = time.monotonic()
    with pytest.raises(task.TaskFailed) as failed:
        task.run(["sleep", "30"], abort_file=abort)
    assert time.monotonic() - started < 10
    assert "another task failed" in str(failed.value)


def test_a_command_that_outlives_sigterm_by_kill_wait_is_killed(tmp_path):
    """The local runner plays slurmd: a cancel's SIGTERM leaves the ranks KillWait to checkpoint, not forever."""
    ready = tmp_path / "ready"
    thread = _signal_self_when(ready, signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(task.TaskFailed) as failed:
        task.run(["bash", "-c", f"trap '' TERM; touch {ready}; sleep 30"], kill_wait_s=1)
    thread.join()
    assert failed.value.code == 128 + signal.SIGKILL
    assert time.monotonic() - started < 10


def test_run_local_emulates_a_slurm_task_and_records_its_status(tmp_path):
    script = ("from hpc import task\n"
              "task.run_local(('sh', '-c',\n"
              "                'echo $SLURM_PROCID/$SLURM_NTASKS@$SLURM_JOB_NODELIST:$HPCDIST_MASTER_PORT'),\n"
              f"               task.Geometry(2, 1), {str(tmp_path)!r}, {str(tmp_path / 'task-%t.log')!r},\n"
              f"               {str(tmp_path / 'batch-%j.out')!r}, 40123)\n")
    env = {**os.environ, "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_JOB_ID": "99", "SLURM_PROCID": "7",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    assert (tmp_path / "task-1.log").read_text() == "1/2@127.0.0.[1-2]:40123\n"
    assert (tmp_path / "99_1_exit").read_text() == "0\n"


def test_run_local_records_a_failure_stops_the_others_and_names_itself_in_the_batch_log(tmp_path):
    script = ("from hpc import task\n"
              f"task.run_local(('sh', '-c', 'exit 3'), task.Geometry(1, 2), {str(tmp_path)!r}, "
              f"{str(tmp_path / 'task-%t.log')!r}, {str(tmp_path / 'batch-%j.out')!r}, 40123)\n")
    env = {**os.environ, "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_JOB_ID": "98",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert proc.returncode == 3
    assert (tmp_path / "98_0_exit").read_text() == "3\n"
    assert (tmp_path / "98_abort").exists()
    assert (tmp_path / "batch-98.out").read_text() == "srun: error: 127.0.0.1: task 0: Exited with exit code 3\n"


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
