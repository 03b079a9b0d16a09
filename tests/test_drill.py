"""`hpcdist drill` on the local 3-node Slurm: every fault really injected, classified, retried and resumed exactly.

The whole matrix: the five scenarios (preempt, time_limit, rank_kill, node_loss, hang) for ddp and deepspeed
under each launcher that runs them (srun, torchrun, DeepSpeed's; hpc.drill.MATRIX), one drill per pair, about
3-4 minutes each here. Each drill also runs its own uninterrupted reference job, and checks (hpc/drill.py) the
first attempt's ending and action, the excluded node, the resumed step, every logged loss against the
reference (fp32, 1e-6) and that a training step followed the fault.
"""

from __future__ import annotations

import json

import pytest
from slurm_fixtures import hpcdist, requires_slurm

from hpc.drill import EXPECT, MATRIX, SCENARIOS

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]


@pytest.mark.parametrize("pair", list(MATRIX))
def test_every_scenario_is_classified_retried_and_resumed_exactly(tmp_path, pair):
    # A 20 s hang threshold instead of the trainer's 60 s keeps the hang scenario short.
    proc = hpcdist(["drill", "--nodes", "2", *MATRIX[pair], "--scenarios", ",".join(SCENARIOS), "--json",
                    "--job-dir", str(tmp_path / "drill"), "--", "--hang-timeout-s", "20"], tmp_path / "home",
                   timeout=1800)
    print(proc.stderr)
    results = json.loads(proc.stdout)
    print(json.dumps(results, indent=1))
    assert [r["scenario"] for r in results] == list(SCENARIOS)
    for r in results:
        expect = EXPECT[r["scenario"]]
        assert (r["ending"], r["action"]) == (expect.ending, expect.action), r
        assert r["ok"], r["problems"]
        assert r["losses_equal"] and r["final_state"] == "COMPLETED"
        if expect.excludes:
            # Retried without the node the fault was on, from a checkpoint taken before the fault.
            assert r["retries"] == 1 and r["victim"].split(" on ")[1] in r["excluded"], r
        assert r["resumed_step"] is not None and r["recovery_s"] is not None
    assert proc.returncode == 0
