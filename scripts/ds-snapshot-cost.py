"""What DeepSpeed's snapshots cost with two nodes: the ring between them included, which `hpcdist bench` (one node)
never runs.

    PYTHONPATH=. .venv/bin/python scripts/ds-snapshot-cost.py /tmp/ds-snap 5 1 0    # snapshots every 5 s, 1 s, none

Two trainer processes on this machine, each a node of one rank (as tests/conftest.py's ``node_memory`` launch:
its own SLURM_NODEID and snapshot folder), ZeRO-2, fp32, batch 256, 300 steps; prints per run the snapshots taken
and skipped, the seconds training waited for them and that as a share of the training time, and images/s.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 300, 256


def run(root: Path, every_s: str) -> dict:
    run_dir, job = root / f"run-{every_s}", str(random.randrange(10**6))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "train", "--run-dir", str(run_dir), "--backend", "deepspeed", "--zero-stage", "2",
            "--precision", "fp32", "--dataset", "synthetic", "--synthetic-size", "4096", "--batch-size", str(BATCH),
            "--threads", "1", "--max-steps", str(STEPS), "--epochs", "1000", "--log-every", "50",
            "--checkpoint-every-min", "0", "--persist-every-s", "0", "--snapshot-every-s", every_s]
    procs = []
    for node in range(2):
        memory = root / f"memory-{every_s}-{node}"
        memory.mkdir(mode=0o700, parents=True, exist_ok=True)
        node_env = {**env, "SLURM_PROCID": str(node), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                    "SLURM_NODEID": str(node), "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "1(x2)",
                    "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_JOB_ID": job,
                    "HPCDIST_SNAPSHOT_DIR": str(memory)}
        with open(root / f"log-{every_s}-{node}", "w") as log:
            procs.append(subprocess.Popen(argv, env=node_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    if [p.wait() for p in procs] != [0, 0]:
        raise SystemExit(f"a rank failed: see {root}/log-{every_s}-*")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    root = Path(sys.argv[1])
    for every_s in sys.argv[2:]:
        s = run(root, every_s)
        train_s = STEPS * BATCH / s["images_per_s"]
        stall = s.get("snapshot_stall_s") or 0.0
        print(f"every {every_s} s: {s.get('snapshots', 0)} snapshots ({s.get('snapshots_skipped', 0)} skipped), "
              f"{stall:.3f} s waited, {100 * stall / train_s:.2f}% of {train_s:.1f} s training, "
              f"{s['images_per_s']:,.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
