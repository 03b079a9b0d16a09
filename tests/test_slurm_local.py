"""Specifications of scripts/slurm-local.sh's node control, on the local cluster it runs: the drill and the node
death tests trust `kill-node` to leave the node dead and `revive` to bring it back, so both are checked for real."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from slurm_fixtures import REPO, requires_slurm

SCRIPT = ["bash", str(REPO / "scripts" / "slurm-local.sh")]
NODE = "n2"
PID_FILE = "/tmp/slurm-local/run/slurmd-n2.pid"


def slurmd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "-f", f"slurmd -N {NODE}"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def answering() -> bool:
    state = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%t"], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.endswith("*")


def on_the_cluster(test):
    """A specification run on the shared local cluster, killing one of its nodes."""
    for mark in (pytest.mark.slurm, pytest.mark.kills_node, requires_slurm):
        test = mark(test)
    return test


def functions(*names: str) -> str:
    """The script's own definitions of these shell functions, to run them apart from its commands."""
    text = (REPO / "scripts" / "slurm-local.sh").read_text()
    return "\n".join(re.search(rf"^{name}\(\) \{{(?:[^\n]*; \}}$|.*?^\}}$)", text, re.M | re.S).group(0)
                     for name in names)


@pytest.fixture
def node_revived_after():
    yield
    subprocess.run([*SCRIPT, "revive", NODE], capture_output=True, check=False)


@on_the_cluster
def test_a_killed_node_has_no_slurmd_left_when_kill_node_returns_and_revive_brings_one_back_that_answers(
        node_revived_after):
    before = slurmd_pid()
    assert before is not None, f"no slurmd for {NODE}: start the cluster (bash scripts/slurm-local.sh start multi)"
    subprocess.run([*SCRIPT, "kill-node", NODE], check=True, capture_output=True)
    assert slurmd_pid() is None
    revived = subprocess.run([*SCRIPT, "revive", NODE], check=True, capture_output=True, text=True)
    assert "revived" in revived.stderr
    after = slurmd_pid()
    assert after not in (None, before)
    assert answering()


@on_the_cluster
def test_revive_starts_slurmd_though_another_process_now_has_the_dead_slurmds_pid(tmp_path, node_revived_after):
    # pid_max is 32768 here and torch's threads take pids fast: a killed slurmd's pid soon names a stranger.
    subprocess.run([*SCRIPT, "kill-node", NODE], check=True, capture_output=True)
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        with open(PID_FILE, "w") as pid_file:
            pid_file.write(f"{stranger.pid}\n")
        revived = subprocess.run([*SCRIPT, "revive", NODE], check=True, capture_output=True, text=True)
        assert "already up" not in revived.stderr, revived.stderr
        assert slurmd_pid() is not None and answering()
        time.sleep(0.2)
        assert stranger.poll() is None, "the stranger with the old pid was signalled"
    finally:
        stranger.kill()


def test_stop_waits_for_a_daemon_that_removes_its_pid_file_before_it_has_exited(tmp_path):
    # As a daemon may on SIGTERM: its pid file gone at once, the process a while later.
    daemon = tmp_path / "daemon.sh"
    daemon.write_text('echo $$ > "$1"; trap \'rm -f "$1"; sleep 2; exit 0\' TERM; while :; do sleep 0.1; done\n')
    pid_file = tmp_path / "daemon.pid"
    shell = functions("log", "alive", "daemon_of", "alive_pidfile", "kill_pidfile") + f"""
bash {daemon} {pid_file} & pid=$!
until [ -s {pid_file} ]; do sleep 0.1; done
kill_pidfile {pid_file} 10
grep -q '^State:[[:space:]]*[^Z]' /proc/$pid/status 2>/dev/null && echo "$pid still runs"; wait $pid
"""
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr
