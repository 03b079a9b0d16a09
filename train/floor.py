"""The bare-PyTorch training loop hpcdist's trainer is measured against: its images/s is the floor.

    python -m train.floor --batch-size 256 --max-steps 220 --warmup 20
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m train.floor --batch-size 256

The trainer's ConvNet, seed, Adam (lr 1e-3), loss, global batch, data size and threads per rank, and nothing
else: the images sit in memory already normalised, batches are plain index gathers, and there is no
DataLoader, logging or checkpoint. Rank 0 prints one JSON line: images/s over the steps after --warmup.
"""

from __future__ import annotations

import time

# Taken before torch is imported, so time to first step includes the import, as it does for the trainer.
START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hpc import ranks  # noqa: E402
from train.model import ConvNet  # noqa: E402


def owned_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped images already normalised (zero mean, unit variance) and their labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,), generator=g)


def batches(samples: int, per_rank: int, rank: int, world: int, seed: int):
    """Index tensors of fixed size, endlessly: each epoch a fresh permutation, dealt round-robin to ranks."""
    epoch = 0
    while True:
        perm = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world]
        for start in range(0, len(mine) - per_rank + 1, per_rank):
            yield mine[start:start + per_rank]
        epoch += 1


def peak_memory_bytes() -> int:
    # ru_maxrss is KiB on Linux: the process's resident high-water mark, what the trainer reports on CPU.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256, help="global batch over all ranks")
    ap.add_argument("--max-steps", type=int, default=220, help="steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of images/s")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per rank; 0: the rank's share")
    ap.add_argument("--samples", type=int, default=4096, help="synthetic images held in memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=0, help="ignored: the environment wins")
    args = ap.parse_args(argv)

    try:
        dist = ranks.resolve(os.environ)
    except ranks.RankError as exc:
        print(f"floor: {exc}", file=sys.stderr)
        return 2
    per_rank = args.batch_size // dist.world_size
    if (args.batch_size % dist.world_size or args.samples // dist.world_size < per_rank
            or args.max_steps <= args.warmup or args.warmup < 1):
        print(f"floor: need --batch-size a multiple of {dist.world_size} ranks, --samples at least "
              f"--batch-size, and --max-steps > --warmup >= 1", file=sys.stderr)
        return 2
    threads = args.threads or ranks.threads_per_rank(os.environ, owned_cpus(), dist)
    torch.set_num_threads(threads)

    if dist.distributed:
        os.environ.update(dist.torch_env())
        torch.distributed.init_process_group("gloo")

    torch.manual_seed(args.seed)
    model = ConvNet()
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = synthetic(args.samples, args.seed)
    feed = batches(args.samples, per_rank, dist.rank, dist.world_size, args.seed)

    first_step_s = t_warm = 0.0
    for step in range(1, args.max_steps + 1):
        idx = next(feed)
        x, y = images[idx], labels[idx]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 1:
            first_step_s = time.time() - START
        if step == args.warmup:
            t_warm = time.perf_counter()
    t_last = time.perf_counter()

    report = {"backend": "floor", "world_size": dist.world_size, "threads": threads,
              "batch_size": args.batch_size, "steps": args.max_steps, "warmup": args.warmup,
              "images_per_s": (args.max_steps - args.warmup) * args.batch_size / (t_last - t_warm),
              "time_to_first_step_s": first_step_s, "wall_s": time.time() - START}
    mine = {"rank": dist.rank, "peak_memory_bytes": peak_memory_bytes()}
    if dist.distributed:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, mine)
        torch.distributed.destroy_process_group()
    else:
        gathered = [mine]
    if dist.rank == 0:
        print(json.dumps({**report, "ranks": gathered}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
