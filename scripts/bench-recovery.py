"""Benchmark: time from an injected fault to the next training step, per scenario, on the local Slurm cluster.

    PYTHONPATH=. .venv/bin/python scripts/bench-recovery.py                 # ddp/srun, all five scenarios
    PYTHONPATH=. .venv/bin/python scripts/bench-recovery.py --launcher torchrun --scenarios rank_kill,node_loss

Runs `hpcdist drill --json` and prints a Markdown table: recovery (fault -> next training step) and its split
into classified (fault -> the attempt's line in attempts.jsonl), restarted (-> the next attempt's batch shell
starts) and first step (-> its first training step: start-up, rendezvous, checkpoint load). Not a test: the
numbers move with the machine's load; the target is <= 30 s for node_loss and rank_kill.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="preempt,time_limit,rank_kill,node_loss,hang")
    p.add_argument("--backend", default="ddp")
    p.add_argument("--launcher", default="srun")
    p.add_argument("--nodes", default="2")
    p.add_argument("--hang-timeout-s", default="60", help="the trainer's hang threshold (its default: 60)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as root:
        extra = ["--zero-stage", "2"] if args.backend == "deepspeed" else []
        proc = subprocess.run([sys.executable, "-m", "hpc", "drill", "--nodes", args.nodes, "--backend", args.backend,
                               "--launcher", args.launcher, *extra, "--scenarios", args.scenarios, "--json",
                               "--job-dir", f"{root}/drill", "--", "--hang-timeout-s", args.hang_timeout_s],
                              capture_output=True, text=True)
    if not proc.stdout.strip():
        sys.exit(f"drill printed nothing:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    print(f"{args.backend} under {args.launcher}, {args.nodes} nodes; hang threshold {args.hang_timeout_s} s\n")
    print("| scenario | ending | action | recovery s | classified s | restarted s | first step s | ok |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in results:
        ph = r.get("phases") or {}
        cells = [r["scenario"], r["ending"] or "-", r["action"] or "-",
                 "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}",
                 *(f"{ph[k]:.1f}" if k in ph else "-" for k in ("classified", "restarted", "first_step")),
                 "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])]
        print("| " + " | ".join(cells) + " |")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
