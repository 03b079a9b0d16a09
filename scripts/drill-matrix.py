"""Run `hpcdist drill` over every backend x launcher the trainer supports and tabulate each scenario's verdict.

    PYTHONPATH=. .venv/bin/python scripts/drill-matrix.py                       # all 5 x 7, ~25 min on 2 cores
    PYTHONPATH=. .venv/bin/python scripts/drill-matrix.py --combos ddp/srun,deepspeed/deepspeed --out m.md
    PYTHONPATH=. .venv/bin/python scripts/drill-matrix.py --job-defaults --out m.md  # the time lost with defaults

Each combination is one drill (its own uninterrupted reference run, then the seven faults one after another),
2-node jobs holding `--spare-nodes` (1) on the local 3-node cluster, node_loss and batch_host_loss killing their
node for real (scripts/slurm-local.sh kill-node: slurmd and every process SIGKILLed, nobody setting it DOWN),
disk_full filling the cluster's small file system (/tmp/slurm-local/small-disk); the Markdown
table has one row per combination and scenario: ending, action, excluded node, resumed step, losses after
resume equal to the reference (fp32), recovery (fault -> next training step) and its parts, the time lost
(fault -> a later attempt back at the fault's step), and the drill's verdict. The raw `--json` of every drill
is kept next to the table. Exits non-zero if any scenario failed.

    PYTHONPATH=. .venv/bin/python scripts/drill-matrix.py --capture tests/data/failures

also keeps each cell's faulted attempt as a classifier fixture, drill-COMBO-SCENARIO/ (scripts/capture-failure.py):
tests/test_failures_rules.py classifies them again, offline, on every test run (all but batch_host_loss, whose
ending its waiter names, not the batch shell).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc.drill import BATCH_CLASSIFIED, MATRIX, SCENARIOS

NODE_CONTROL = f"bash {Path(__file__).resolve().parent / 'slurm-local.sh'}"
SMALL_DISK = "/tmp/slurm-local/small-disk"


def _capture_failure():
    """scripts/capture-failure.py as a module (its file name is a command's, not an identifier)."""
    spec = importlib.util.spec_from_file_location("capture_failure", Path(__file__).parent / "capture-failure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def capture(combo: str, results: list[dict], root: Path, into: Path) -> None:
    """Keep each scenario's first attempt, expected to end as the drill says it must, as a fixture in ``into``."""
    capture_failure = _capture_failure()
    for r in results:
        if r["scenario"] not in BATCH_CLASSIFIED:
            continue
        job_dir = root / combo.replace("/", "-") / r["scenario"]
        out = into / f"drill-{combo.replace('/', '-')}-{r['scenario']}"
        expect = {"ending": r["expected"]}
        victim = re.fullmatch(r"rank (\d+) on (\S+)", r.get("victim") or "")
        if victim and r["scenario"] in ("rank_kill", "hang"):
            expect["rank"] = int(victim.group(1))
        if victim and r["scenario"] in ("rank_kill", "node_loss"):
            expect["node"] = victim.group(2)
        try:
            capture_failure.capture(job_dir, out, 0, expect)
        except (SystemExit, OSError, StopIteration) as exc:
            print(f"{combo} {r['scenario']}: not captured: {exc}", file=sys.stderr, flush=True)


def drill(combo: str, scenarios: str, root: Path, hang_timeout_s: str | None, spare_nodes: str,
          ntasks_per_node: str, job_defaults: bool) -> tuple[list[dict], str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hpc", "drill", "--nodes", "2", "--spare-nodes", spare_nodes,
                           "--ntasks-per-node", ntasks_per_node, "--node-control", NODE_CONTROL, "--small-disk",
                           SMALL_DISK, *MATRIX[combo], *(["--job-defaults"] if job_defaults else []),
                           "--scenarios", scenarios, "--json", "--job-dir", str(root / combo.replace("/", "-")),
                           *(["--", "--hang-timeout-s", hang_timeout_s] if hang_timeout_s else [])],
                          capture_output=True, text=True)
    try:
        results = json.loads(proc.stdout)
    except ValueError:
        results = [{"scenario": s, "ok": False, "problems": [f"drill printed no JSON (exit {proc.returncode})"]}
                   for s in scenarios.split(",")]
    return results, proc.stderr, time.monotonic() - started


def split(phases: dict) -> str:
    """Recovery's parts: fault -> classified, -> the next batch shell, -> its first training step."""
    parts = [phases.get(k) for k in ("classified", "restarted", "first_step")]
    return "-" if None in parts else " + ".join(f"{x:.1f}" for x in parts)


def row(combo: str, r: dict) -> str:
    def cell(key: str, fmt: str = "{}") -> str:
        value = r.get(key)
        return "-" if value in (None, "", []) else fmt.format(",".join(value) if isinstance(value, list) else value)
    verdict = "ok" if r.get("ok") else "FAIL: " + "; ".join(r.get("problems") or ())
    stage = MATRIX[combo][MATRIX[combo].index("--zero-stage") + 1] if "--zero-stage" in MATRIX[combo] else None
    return "| " + " | ".join([combo + (f" (ZeRO {stage})" if stage else ""), r["scenario"],
                              cell("ending"), cell("action"), cell("excluded"), cell("resumed_step"),
                              "equal" if r.get("losses_equal") else "DIFFER", cell("recovery_s", "{:.1f}"),
                              split(r.get("phases") or {}), cell("lost_s", "{:.1f}"), verdict]) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--combos", default=",".join(MATRIX), help="backend/launcher pairs, comma-separated")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--hang-timeout-s", help="the trainer's hang threshold [20; with --job-defaults the trainer's own]")
    p.add_argument("--job-defaults", action="store_true", help="the jobs keep the trainer's checkpoint and snapshot "
                   "defaults, each fault half a snapshot interval after a snapshot (hpcdist drill --job-defaults)")
    p.add_argument("--spare-nodes", default="1", help="spare nodes each job holds (0: the queue fallback)")
    p.add_argument("--ntasks-per-node", default="1", help="ranks a node (2: a node's other rank learns of a fault "
                   "from its node's reader)")
    p.add_argument("--out", type=Path, help="also write the table (and NAME.json with every result) here")
    p.add_argument("--capture", type=Path, help="keep every cell's faulted attempt as a classifier fixture here")
    args = p.parse_args()
    hang = args.hang_timeout_s or (None if args.job_defaults else "20")
    cadence = "the trainer defaults, faults after a snapshot" if args.job_defaults else "checkpoints every 5 steps"
    lines = [f"Drill matrix, 2 nodes x {args.ntasks_per_node} ranks + {args.spare_nodes} spare, "
             f"hang threshold {f'{hang} s' if hang else 'the trainer default'}, {cadence}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| backend/launcher | scenario | ending | action | excluded | resumed | losses | recovery s "
             "| classified + restarted + first step | lost s | verdict |",
             "|---|---|---|---|---|---:|---|---:|---|---:|---|"]
    everything, failed = {}, False
    with tempfile.TemporaryDirectory(prefix="drill-matrix-") as tmp:
        for combo in args.combos.split(","):
            results, stderr, took = drill(combo, args.scenarios, Path(tmp), hang, args.spare_nodes,
                                          args.ntasks_per_node, args.job_defaults)
            everything[combo] = {"results": results, "wall_s": round(took, 1)}
            if args.capture:
                capture(combo, results, Path(tmp), args.capture)
            failed |= not all(r.get("ok") for r in results)
            lines += [row(combo, r) for r in results]
            print(f"{combo}: {sum(bool(r.get('ok')) for r in results)}/{len(results)} ok in {took:.0f} s",
                  file=sys.stderr, flush=True)
            if not all(r.get("ok") for r in results):
                print(stderr[-4000:], file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(everything, indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
