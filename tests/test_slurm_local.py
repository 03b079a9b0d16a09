"""Specifications of scripts/slurm-local.sh's node control, on the local cluster it runs: the drill and the node
death tests trust `kill-node` to leave the node dead and `revive` to bring it back, so both are checked for real."""

from __future__ import annotations

import subprocess
import time

import pytest
from slurm_fixtures import REPO, requires_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.kills_node, requires_slurm]

SCRIPT = ["bash", str(REPO / "scripts" / "slurm-local.sh")]
NODE = "n2"
PID_FILE = "/tmp/slurm-local/run/slurmd-n2.pid"


def slurmd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "-f", f"slurmd -N {NODE}"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def answering() -> bool:
    state = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%t"], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.endswith("*")


@pytest.fixture
def node_revived_after():
    yield
    subprocess.run([*SCRIPT, "revive", NODE], capture_output=True, check=False)


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
