"""The bare training loops hpcdist's trainer is measured against: their images/s is the floor.

    python -m tools.floor --batch-size 256 --max-steps 220 --warmup 20
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tools.floor --batch-size 256
    python -m tools.floor --engine deepspeed --zero-stage 2 --precision bf16 --batch-size 256

The trainer's ConvNet, seed, loss, global batch, synthetic images and threads per rank, on the GPU when there
is one, and nothing else: the images sit on the device already normalised, batches are plain index gathers,
and there is no loader, logging or checkpoint. ``--engine torch`` is Adam (lr 1e-3, fused on GPU) in fp32
under DDP for several ranks; ``--engine deepspeed`` is a bare deepspeed.initialize / backward / step loop
on the same DeepSpeed config the trainer resolves. Rank 0 prints one JSON line: images/s over the steps
after --warmup.
"""

from __future__ import annotations

import time

# Taken before torch is imported, so time to first step includes the import, as it does for the trainer.
START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hpc import dsconfig, ranks  # noqa: E402
from train.data import synthetic  # noqa: E402
from train.engines import DTYPES  # noqa: E402
from train.loader import normalize  # noqa: E402
from train.model import ConvNet  # noqa: E402
from train.runtime import (  # noqa: E402
    device_name,
    init_process_group,
    peak_memory_bytes,
    pick_device,
    prepare_deepspeed_environment,
)

TIMEOUT_S = 600.0  # the trainer's default --timeout-s


def batches(samples: int, per_rank: int, rank: int, world: int, seed: int, device: torch.device):
    """Index tensors of fixed size, endlessly: each epoch a fresh permutation, dealt round-robin to ranks."""
    epoch = 0
    while True:
        perm = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world].to(device)
        for start in range(0, len(mine) - per_rank + 1, per_rank):
            yield mine[start:start + per_rank]
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256, help="global batch over all ranks")
    ap.add_argument("--max-steps", type=int, default=220, help="steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of images/s")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per rank; 0: the rank's share")
    ap.add_argument("--samples", type=int, default=4096, help="synthetic images held in memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="--engine deepspeed")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="--engine deepspeed")
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
    threads = args.threads or ranks.threads_per_rank(os.environ, len(os.sched_getaffinity(0)), dist)
    torch.set_num_threads(threads)
    # Device and process group as the trainer sets them up: outside the timed loop, so not what is measured.
    backend = "deepspeed" if args.engine == "deepspeed" else "ddp"
    device = pick_device(backend, dist)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.engine == "deepspeed":
        prepare_deepspeed_environment(os.environ, cuda=device.type == "cuda")
        import deepspeed
    if args.engine == "deepspeed" or dist.distributed:
        init_process_group(backend, dist, device, TIMEOUT_S)

    torch.manual_seed(args.seed)
    model = ConvNet().to(device)
    if args.engine == "deepspeed":
        config = dsconfig.resolve(dsconfig.load(dsconfig.base_path()), world_size=dist.world_size,
                                  gpu=device.type == "cuda", zero_stage=args.zero_stage, precision=args.precision,
                                  global_batch=args.batch_size)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        dtype = DTYPES[args.precision]

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if dist.distributed else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        dtype = torch.float32

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss

    # The trainer's own synthetic training split (its --synthetic-size and seed), normalised once up front.
    train = synthetic(args.samples, max(args.samples // 4, 1), args.seed).train
    images, labels = normalize(train.images.to(device), dtype), train.labels.to(device)
    feed = batches(args.samples, per_rank, dist.rank, dist.world_size, args.seed, device)

    first_step_s = t_warm = 0.0
    for n in range(1, args.max_steps + 1):
        idx = next(feed)
        loss = step(images[idx], labels[idx])
        if n == 1:
            loss.item()  # waits for the device
            first_step_s = time.time() - START
        if n == args.warmup:
            loss.item()
            t_warm = time.perf_counter()
    loss.item()
    t_last = time.perf_counter()

    report = {"backend": "floor", "engine": args.engine, "device": device_name(device),
              "world_size": dist.world_size, "threads": threads,
              "batch_size": args.batch_size, "steps": args.max_steps, "warmup": args.warmup,
              "images_per_s": (args.max_steps - args.warmup) * args.batch_size / (t_last - t_warm),
              "time_to_first_step_s": first_step_s, "wall_s": time.time() - START}
    mine = {"rank": dist.rank, "peak_memory_bytes": peak_memory_bytes(device)}
    gathered: list = [mine]
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, mine)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if dist.rank == 0:
        print(json.dumps({**report, "ranks": gathered}), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as train.__main__.cli: no interpreter teardown racing a c10d store thread
