"""`hpcdist drill` on the local 3-node Slurm: every fault really injected, classified, retried and resumed exactly.

The diagonal of the matrix (hpc.drill.DIAGONAL): each of the seven scenarios (preempt, time_limit, rank_kill,
node_loss, hang, batch_host_loss, disk_full) once, each under the backend x launcher pair where it costs least
(ddp and deepspeed under srun, torchrun and DeepSpeed's launcher, hpc.drill.MATRIX), so every
scenario and every pair is drilled in CI, about a minute each here; a pair's cells run in one drill, sharing its
reference run. The whole 5 x 7 matrix is
`scripts/drill-matrix.py` (~20 min), rerun before a change to failure handling lands; the endings of the real
failures captured from it and earlier runs are classified offline on every run (tests/test_failures_rules.py,
tests/data/failures/). Each drill also runs one uninterrupted reference job, and checks (hpc/drill.py) the
first attempt's ending and action, the excluded node, the resumed step, every logged loss against the reference
(fp32, 1e-6) and that a training step followed the fault (a full disk: that the job failed saying so, every kept
checkpoint whole, nothing half-written).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from slurm_fixtures import REPO, hpcdist, read_bytes, requires_slurm

from hpc.drill import DIAGONAL, MATRIX, expect

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]


SMALL_DISK = Path(os.environ.get("SLURM_LOCAL_BASE", "/tmp/slurm-local")) / "small-disk"


def by_pair() -> list[tuple[str, str]]:
    """The diagonal's cells drilled one drill per backend x launcher pair, its scenarios in order: a pair's cells
    share one uninterrupted reference run."""
    pairs: dict[str, list[str]] = {}
    for pair, scenario in DIAGONAL:
        pairs.setdefault(pair, []).append(scenario)
    return [(pair, ",".join(scenarios)) for pair, scenarios in pairs.items()]


@pytest.mark.parametrize("pair,scenarios", [
    pytest.param(*cell, marks=[pytest.mark.kills_node] if {"node_loss", "batch_host_loss"} & set(cell[1].split(","))
                 else []) for cell in by_pair()], ids=lambda v: v)
def test_every_scenario_is_classified_retried_and_resumed_exactly(tmp_path, pair, scenarios):
    # A 12 s hang threshold instead of the trainer's 60 s keeps the hang scenario short (the matrix uses 20 s). The
    # job holds a spare node (3 of the cluster's 3), and node_loss kills its node for real: slurmd and every process,
    # no DOWN. The hang runs two ranks a node: a node's other rank learns of it only from its node's watchdog reader.
    if "disk_full" in scenarios and not os.path.ismount(SMALL_DISK):
        pytest.skip(f"{SMALL_DISK} is not mounted (scripts/slurm-local.sh start mounts it)")
    ranks = ["--ntasks-per-node", "2"] if "hang" in scenarios else []
    # 20 steps, the least the drill takes: the fault at 10, a checkpoint at 5 and 15, losses compared to 20.
    proc = hpcdist(["drill", "--nodes", "2", "--steps", "20", *ranks, "--spare-nodes", "1", *MATRIX[pair],
                    "--scenarios", scenarios,
                    "--json", "--node-control", f"bash {REPO / 'scripts/slurm-local.sh'}", "--small-disk",
                    str(SMALL_DISK), "--job-dir", str(tmp_path / "drill"), "--", "--hang-timeout-s", "12"],
                   tmp_path / "home", timeout=1800)
    print(proc.stderr)
    results = json.loads(proc.stdout)
    print(json.dumps(results, indent=1))
    assert [r["scenario"] for r in results] == scenarios.split(",")
    for r in results:
        expected = expect(r["scenario"], spare_nodes=1)
        assert (r["ending"], r["action"]) == (expected.ending, expected.action), r
        assert r["ok"], r["problems"]
        assert r["losses_equal"] and r["final_state"] == ("COMPLETED" if expected.recovers else "FAILED")
        if expected.excludes:
            # Relaunched on the spare (a new job, when the batch host died) without the node the fault was on,
            # from a checkpoint taken before the fault.
            assert r["retries"] == 1 and r["victim"].split(" on ")[1] in r["excluded"], r
        if expected.recovers:
            assert r["resumed_step"] is not None and r["recovery_s"] is not None
        else:
            # No blind retry: the line says where and how much room there was and was needed.
            assert r["retries"] == 0 and r["resumed_step"] is None and "bytes free, about" in r["detail"], r
    if "batch_host_loss" in scenarios:
        # Exactly one run of the job directory goes on: the old job was cancelled (never requeued), nothing of it
        # runs on, and the registry links the new job to it.
        old = next(r["job_id"] for r in results if r["scenario"] == "batch_host_loss")
        shown = subprocess.run(["scontrol", "show", "job", "-o", old], capture_output=True, text=True).stdout
        assert not shown.strip() or (re.search(r"JobState=(CANCELLED|COMPLETING) ", shown) and " Restarts=0 " in shown)
        environs = Path("/proc").glob("[0-9]*/environ")
        assert not [p for p in environs if f"SLURM_JOB_ID={old}\0".encode() in read_bytes(p)]
        registered = [json.loads(x) for x in (tmp_path / "home" / "jobs.jsonl").read_text().splitlines()]
        assert [r["previous"] for r in registered if r["job_dir"].endswith("/batch_host_loss")] == ["", old]
    if "disk_full" in scenarios:
        assert (tmp_path / "drill" / "disk_full" / "run" / "checkpoints").is_dir()  # moved off the small disk
        assert not [p for p in SMALL_DISK.iterdir() if p.name.startswith(("hpcdist-drill-", ".hpcdist-drill"))]
    if "hang" in scenarios:
        # Every rank learnt of the hang in time to leave its stack, the frozen one's read by py-spy on its node.
        stacks = sorted((tmp_path / "drill" / "hang" / "run" / "stacks").glob("rank-*.txt"))
        assert [p.name for p in stacks] == [f"rank-{r}.txt" for r in range(4)]
        assert [p.name for p in stacks if p.read_text().startswith("no stack")] == []
    assert proc.returncode == 0
