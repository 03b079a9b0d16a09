"""Top-1 accuracy of the trained model on the test split, every rank evaluating its shard.

    accuracy = evaluate_accuracy(engine, data, rank, world, device)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from train.data import Dataset
from train.engines import Engine
from train.loader import normalize, shard

EVAL_BATCH = 1024


@torch.no_grad()
def evaluate_accuracy(engine: Engine, data: Dataset, rank: int, world: int, device: torch.device) -> float:
    """Top-1 accuracy on the test split, sharded over ranks; every rank runs the same number of batches,
    since under ZeRO-3 each forward is a collective."""
    n = len(data.test)
    positions = shard(torch.arange(math.ceil(n / world) * world), rank, world)
    correct = torch.zeros(2, dtype=torch.float64)
    for chunk in positions.split(EVAL_BATCH):
        real = chunk < n  # positions past the end pad the last rank's share and must not count
        x = normalize(data.test.images[chunk % n].to(device))
        hits = (engine.predict(x).cpu() == data.test.labels[chunk % n]) & real
        correct += torch.tensor([hits.sum().item(), real.sum().item()], dtype=torch.float64)
    if world > 1:
        correct = correct.to(device)
        dist.all_reduce(correct)
    return float(correct[0] / correct[1])
