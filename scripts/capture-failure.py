"""Save one attempt of a real job as a classifier fixture under tests/data/failures/NAME/.

    python scripts/capture-failure.py JOB_DIR NAME --attempt 0 [--job 'TimeLimit=00:01:00 RunTime=00:00:37']

Copies that attempt's part of the batch log, the tails of the task logs, the ranks' errors/ and hang.json
of that attempt, and writes case.json with what the batch shell saw (the expected ending is added by hand).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hpc import runfiles
from hpc.failures.evidence import attempt_segment
from hpc.slurm import parse

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "failures"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--attempt", type=int, default=0)
    p.add_argument("--job", default="", help="scontrol fields the batch shell saw, Key=Value ...")
    p.add_argument("--down", default="", help="nodes Slurm called down then, comma-separated")
    p.add_argument("--ranks-per-task", type=int, default=1)
    p.add_argument("--launcher", choices=("srun", "torchrun", "deepspeed"), default="srun")
    p.add_argument("--step-status", type=int)
    args = p.parse_args()
    out = DATA / args.name
    shutil.rmtree(out, ignore_errors=True)
    (out / "errors").mkdir(parents=True)
    batch = next((args.job_dir / "logs").glob("batch-*.out")).read_text(errors="replace")
    segment = attempt_segment(batch, args.attempt)
    # Without the classifier's own "attempt N ended" line: the batch shell had not printed it yet.
    (out / "batch.out").write_text(segment.split(f"hpcdist: attempt {args.attempt} ended")[0])
    for log in sorted((args.job_dir / "logs").glob("task-*.log")):
        (out / log.name).write_text("\n".join(log.read_text(errors="replace").splitlines()[-80:]) + "\n")
    for err in runfiles.read_errors(args.job_dir / "run"):
        if err.attempt == args.attempt:
            shutil.copy(args.job_dir / "run" / "errors" / f"rank-{err.rank}.json", out / "errors")
    hang = runfiles.read_hang(args.job_dir / "run", args.attempt)
    if hang:
        (out / "hang.json").write_text(json.dumps({k: hang[k] for k in ("rank", "node", "step", "since")
                                                   if k in hang}) + "\n")
    case = {"attempt": args.attempt, "step_status": args.step_status, "job": parse.keyvalues(args.job),
            "down_nodes": [n for n in args.down.split(",") if n], "ranks_per_task": args.ranks_per_task,
            "launcher": args.launcher, "preempted": False, "checkpoint_step": None, "expect": {}}
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")


if __name__ == "__main__":
    main()
