#!/usr/bin/env python3
"""Measure what snapshots in node memory cost the training loop: the copy's stall and the writer thread's share.

    .venv/bin/python scripts/bench-snapshot.py [--steps 400] [--batch 256] [--every-s 5] [--threads 2] [--rounds 3]

Trains the reference ConvNet (the trainer's TorchEngine, fp32, CPU or the GPU) in one process, alternating
rounds without and with a snapshot every --every-s seconds written by train/snapshot.py's Store to a temporary
tmpfs folder, and prints one JSON line: step time each way (median of the rounds), the copy's stall (median of
every snapshot taken), and the stall as a share of the step time, spread over the steps between snapshots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from train import snapshot
from train.engines import TorchEngine
from train.model import ConvNet


def run(engine: TorchEngine, steps: int, x: torch.Tensor, y: torch.Tensor, store: snapshot.Store | None,
        every_s: float, stalls: list[float]) -> float:
    """Seconds per step over ``steps`` steps, snapshotting every ``every_s`` when a store is given."""
    last = time.monotonic()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        engine.train_step(x, y)
        if store is not None and time.monotonic() - last >= every_s:
            t0 = time.perf_counter()
            store.take(step, lambda step=step: engine.capture({"step": step}))
            stalls.append(time.perf_counter() - t0)
            last = time.monotonic()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--every-s", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    engine = TorchEngine(ConvNet().to(device), backend="ddp", device=device, precision="fp32", lr=1e-3)
    x, y = torch.randn(a.batch, 3, 32, 32, device=device), torch.randint(0, 10, (a.batch,), device=device)
    run(engine, 20, x, y, None, a.every_s, [])  # warm-up
    plain, snapped, stalls = [], [], []
    with tempfile.TemporaryDirectory(dir=snapshot.LOCAL_ROOT) as root:
        for _ in range(a.rounds):
            plain.append(run(engine, a.steps, x, y, None, a.every_s, []))
            store = snapshot.Store(f"{root}/store")
            snapped.append(run(engine, a.steps, x, y, store, a.every_s, stalls))
            store.close()
            store.clear()
    step_s, step_snap_s = statistics.median(plain), statistics.median(snapped)
    stall_s = statistics.median(stalls) if stalls else None
    state_bytes = sum(t.numel() * t.element_size() for t in engine.module.state_dict().values()) * 3
    print(json.dumps({
        "device": str(device), "threads": a.threads, "batch": a.batch, "every_s": a.every_s,
        "snapshots": len(stalls), "state_mb": round(state_bytes / 2**20, 2),
        "step_ms": round(step_s * 1e3, 2), "step_ms_with_snapshots": round(step_snap_s * 1e3, 2),
        "slowdown_pct": round((step_snap_s / step_s - 1) * 100, 2),
        "copy_stall_ms": None if stall_s is None else round(stall_s * 1e3, 3),
        "stall_pct_of_step_time": None if stall_s is None else round(stall_s / a.every_s * 100, 4),
    }))


if __name__ == "__main__":
    main()
