"""Print what the trainer's heartbeat costs: the per-step hook and one heartbeat write, against a step time.

    PYTHONPATH=. python scripts/heartbeat-cost.py [--step-ms 50] [--heartbeat-s 2]

The end-to-end check is `hpcdist bench --grid ddp:1:t1,ddp:1:t1:nohb --repeat 3` (heartbeat on vs off);
on a shared CPU its run-to-run spread is larger than the cost, which this script isolates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from train import heartbeat, nodebeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, default=50.0, help="a training step's time to compare with")
    p.add_argument("--heartbeat-s", type=float, default=2.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        beat = heartbeat.Heartbeat(Path(folder), every_s=args.heartbeat_s)
        beat.identity = {"rank": 0, "local_rank": 0, "node_rank": 0, "world_size": 1, "hostname": "bench",
                         "pid": 0, "attempt": 0}  # no identify(): its thread would write beside the timing
        beat.stage = Path(folder) / "stage"                              # local rank 0: hand over, then publish
        beat.publisher = nodebeat.Publisher(Path(folder), 0)
        beat.plan(total_steps=10**6, local_batch=64)
        beat.step_clock.begin()
        steps, writes = 200_000, 500
        started = time.perf_counter()
        for step in range(steps):
            beat.stepped(step)
        per_step = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        for _ in range(writes):
            beat.write(force=True)
        per_write = (time.perf_counter() - started) / writes
    step_s = args.step_ms / 1000
    share = per_step / step_s + per_write / args.heartbeat_s
    print("| what | time | share of a step |")
    print("|---|---:|---:|")
    print(f"| `stepped()` per step | {per_step * 1e6:.2f} µs | {per_step / step_s:.4%} |")
    print(f"| one heartbeat write (every {args.heartbeat_s:g} s, background thread) | {per_write * 1e3:.2f} ms "
          f"| {per_write / args.heartbeat_s:.4%} of a core |")
    print(f"| total at {args.step_ms:g} ms per step | | {share:.3%} |")


if __name__ == "__main__":
    main()
