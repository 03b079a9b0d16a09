"""Save one attempt of a real job as a classifier fixture: tests/data/failures/NAME/ (or --out DIR).

    python scripts/capture-failure.py JOB_DIR NAME --attempt 0 [--expect ending=rank_crashed]

Copies that attempt's part of the batch log and of the task logs (their tails), the ranks' errors/ of that attempt,
and writes case.json: the context the batch shell saw when it classified the attempt (Slurm's view, hang.json,
lost.json: its attempts.jsonl line keeps it), what it classified it as (`recorded`), and what the test expects
(`expect`: the recorded ending with its rank and node, or the --expect given). scripts/drill-matrix.py
--capture calls it for every cell of the drill.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from hpc import runfiles
from hpc.failures import record as records
from hpc.failures.evidence import attempt_segment
from hpc.vocab import LOGS_DIR, RUN_DIR

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "failures"
RECORDED = ("ending", "rank", "node", "signal", "exit_code", "detail", "action", "excluded")
TASK_LOG_LINES = 80


def capture(job_dir: Path, out: Path, attempt: int, expect: dict | None = None) -> dict:
    """Write the fixture of ``attempt`` of the job in ``job_dir`` to ``out``; returns its case."""
    line = next((a for a in records.load(job_dir) if a["attempt"] == attempt), None)
    if line is None or "context" not in line:
        raise SystemExit(f"capture-failure: {job_dir} has no line with its context for attempt {attempt} "
                         "(only the batch shell records them); nothing written")
    if out.exists():
        shutil.rmtree(out)
    (out / "errors").mkdir(parents=True)
    batch = next((job_dir / LOGS_DIR).glob("batch-*.out")).read_text(errors="replace")
    # Without the classifier's own "attempt N ended" line: the batch shell had not printed it yet.
    (out / "batch.out").write_text(attempt_segment(batch, attempt).split(f"hpcdist: attempt {attempt} ended")[0])
    for log in sorted((job_dir / LOGS_DIR).glob("task-*.log")):
        tail = attempt_segment(log.read_text(errors="replace"), attempt).splitlines()[-TASK_LOG_LINES:]
        (out / log.name).write_text("\n".join(tail) + "\n")
    run_dir = job_dir / RUN_DIR
    for err in runfiles.read_errors(run_dir):
        if err.attempt == attempt:
            shutil.copy(run_dir / "errors" / f"rank-{err.rank}.json", out / "errors")
    recorded = {k: line.get(k) for k in RECORDED}
    case = {"attempt": attempt, "context": line["context"], "recorded": recorded,
            "expect": expect or {k: recorded[k] for k in ("ending", "rank", "node") if recorded[k] is not None}}
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    return case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job_dir", type=Path)
    p.add_argument("name")
    p.add_argument("--attempt", type=int, default=0)
    p.add_argument("--out", type=Path, help=f"the fixture's folder (default {DATA}/NAME)")
    p.add_argument("--expect", action="append", default=[], metavar="KEY=VALUE",
                   help="what the test expects instead of the recorded ending (an integer value is read as one)")
    args = p.parse_args()
    expect = {k: int(v) if v.lstrip("-").isdigit() else v for k, _, v in (e.partition("=") for e in args.expect)}
    case = capture(args.job_dir, args.out or DATA / args.name, args.attempt, expect or None)
    print(json.dumps(case["recorded"]), file=sys.stderr)


if __name__ == "__main__":
    main()
