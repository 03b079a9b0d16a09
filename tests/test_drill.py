"""`hpcdist drill` on the local 3-node Slurm: every fault really injected, classified, retried and resumed exactly.

The full cross product (5 scenarios x 2 backends x 3 launchers) takes over an hour on this 2-core machine, so
this is a covering set of six scenario runs: every scenario once, every launcher (srun, torchrun, DeepSpeed's)
and both backends (ddp, deepspeed) at least once. Each drill also runs its own uninterrupted reference job,
and checks (hpc/drill.py) the first attempt's ending and action, the excluded node, the resumed step, every
logged loss against the reference (fp32, 1e-6) and that a training step followed the fault.
"""

from __future__ import annotations

import json

import pytest
from slurm_fixtures import hpcdist, requires_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

# (job options, scenarios): the covering set.
RUNS = [
    (("--backend", "ddp", "--launcher", "srun"), "node_loss,hang"),
    (("--backend", "ddp", "--launcher", "torchrun"), "rank_kill,preempt"),
    (("--backend", "deepspeed", "--launcher", "deepspeed", "--zero-stage", "2"), "rank_kill"),
    (("--backend", "deepspeed", "--launcher", "srun", "--zero-stage", "1"), "time_limit"),
]
EXPECTED = {"preempt": ("preempted", "requeue"), "time_limit": ("time_limit", "requeue"),
            "rank_kill": ("rank_crashed", "retry"), "node_loss": ("node_failure", "retry"), "hang": ("hung", "retry")}


@pytest.mark.parametrize("options,scenarios", RUNS, ids=[f"{o[1]}-{o[3]}-{s}" for o, s in RUNS])
def test_the_drill_passes(tmp_path, options, scenarios):
    # A 20 s hang threshold instead of the trainer's 60 s keeps the hang scenario short; 600 steps keep the
    # time-limit job training until Slurm's --signal warning arrives (within ~30 s of the cut limit).
    proc = hpcdist(["drill", "--nodes", "2", *options, "--scenarios", scenarios, "--json", "--time-limit-steps",
                    "600", "--job-dir", str(tmp_path / "drill"), "--", "--hang-timeout-s", "20"], tmp_path / "home",
                   timeout=1500)
    print(proc.stderr)
    results = json.loads(proc.stdout)
    print(json.dumps(results, indent=1))
    assert [r["scenario"] for r in results] == scenarios.split(",")
    for r in results:
        assert (r["ending"], r["action"]) == EXPECTED[r["scenario"]], r
        assert r["ok"], r["problems"]
        assert r["losses_equal"] and r["final_state"] == "COMPLETED"
        if r["action"] == "retry":
            # Retried without the node the fault was on, from a checkpoint taken before the fault.
            assert r["retries"] == 1 and r["victim"].split(" on ")[1] in r["excluded"], r
        assert r["resumed_step"] is not None and r["recovery_s"] is not None
    assert proc.returncode == 0
