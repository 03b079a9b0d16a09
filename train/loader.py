"""Feed each rank its disjoint shard of a fresh permutation every epoch, resident on the device or classic."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from train import preemption
from train.data import Split

# Per-channel mean and std of CIFAR-10's training images.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Batch:
    step: int
    epoch: int
    index: int  # position of this batch within its epoch
    x: torch.Tensor
    y: torch.Tensor


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers, so (seed, epoch) and (seed', epoch') never share a stream."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of all n examples in one epoch; every rank draws the same one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of ``order``, as DistributedSampler takes it: padded from the start, then strided."""
    per_rank = math.ceil(len(order) / world_size)
    total = per_rank * world_size
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world_size]


@functools.cache
def _channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them per batch is a blocking host-to-device copy on every step,
    # which stalls the CPU until the GPU drains its queue.
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images to zero-mean, unit-variance floats, per CIFAR-10 channel."""
    mean, std = _channel_stats(images.device)
    return ((images.float() - mean) / std).to(dtype)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded 40x40 image and a random horizontal flip, per image."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator, device=generator.device).to(images.device)
    dx = torch.randint(0, 9, (n,), generator=generator, device=generator.device).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    crops = padded[torch.arange(n, device=images.device)[:, None, None, None],
                   torch.arange(c, device=images.device)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator, device=generator.device).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class ResidentLoader:
    """The whole split lives on the device as uint8; batches are gathered, augmented and normalised there."""

    def __init__(self, split: Split, *, rank: int, world_size: int, local_batch: int, seed: int,
                 device: torch.device, augment: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.rank, self.world_size, self.local_batch, self.seed = rank, world_size, local_batch, seed
        self.device, self.augment, self.dtype = device, augment, dtype
        # Only whole batches, so every rank takes the same number of steps and no collective waits forever.
        self.steps_per_epoch = math.ceil(len(split) / world_size) // local_batch

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from global step ``start_step`` on; a resumed run sees exactly what the interrupted one would."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            order = epoch_permutation(len(self.labels), self.seed, epoch)
            mine = shard(order, self.rank, self.world_size).to(self.device)
            for index in range(skip, self.steps_per_epoch):
                take = mine[index * self.local_batch:(index + 1) * self.local_batch]
                x = self.images[take]
                if self.augment:
                    # Seeded by position, not by a running stream, so resuming mid-epoch needs no saved state.
                    g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, index, self.rank))
                    x = augment(x, g)
                x = normalize(x, self.dtype)
                yield Batch(epoch * self.steps_per_epoch + index, epoch, index, x, self.labels[take])
            epoch, skip = epoch + 1, 0


class _TransformedSplit(torch.utils.data.Dataset):
    """Items are (image index, epoch); the random transforms draw from a stream seeded by both."""

    def __init__(self, split: Split, augment: bool, seed: int) -> None:
        from torchvision import transforms

        self.images, self.labels = split.images.permute(0, 2, 3, 1).numpy(), split.labels
        self.augment, self.seed = augment, seed
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        self.transform = transforms.Compose([transforms.ToTensor(), *steps, transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]):
        i, epoch = item
        if not self.augment:
            return self.transform(self.images[i]), self.labels[i]
        # Seeded by the image and epoch, not by a worker's running stream (which a resume mid-epoch starts afresh), so a
        # resumed run draws the crops and flips the uninterrupted run drew; the global RNG torchvision uses is kept.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, i))
            return self.transform(self.images[i]), self.labels[i]


class ClassicLoader:
    """torchvision-style: a DataLoader over a DistributedSampler (set_epoch every epoch), transforms per image."""

    def __init__(self, split: Split, *, rank: int, world_size: int, local_batch: int, seed: int,
                 device: torch.device, augment: bool = False, num_workers: int = 2) -> None:
        self.dataset = _TransformedSplit(split, augment, seed)
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                                           shuffle=True, seed=seed)
        self.local_batch, self.device, self.num_workers = local_batch, device, num_workers
        self.steps_per_epoch = len(self.sampler) // local_batch

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)[skip * self.local_batch:self.steps_per_epoch * self.local_batch]
            batch_sampler = torch.utils.data.BatchSampler([(i, epoch) for i in order], self.local_batch, drop_last=True)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler,
                                                 num_workers=self.num_workers,
                                                 pin_memory=self.device.type == "cuda",
                                                 worker_init_fn=preemption.ignore_in_worker)
            # Workers fork here: a stop signal must find them ignoring it, or they die before the checkpoint.
            with preemption.blocked_while_forking():
                batches = iter(loader)
            for index, (x, y) in enumerate(batches, start=skip):
                x = x.to(self.device, non_blocking=True)
                yield Batch(epoch * self.steps_per_epoch + index, epoch, index, x, y.to(self.device))
            epoch, skip = epoch + 1, 0
