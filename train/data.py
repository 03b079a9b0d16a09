"""Load CIFAR-10 from its on-disk pickle batches, or make a learnable synthetic set of the same shape."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
DOWNLOAD_DONE = ".hpcdist-download-done"
CLASSES = 10


class DataError(ValueError):
    """The data set is missing or unreadable; the message names the path and the fix."""


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x 3 x 32 x 32 and labels as int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split


def cifar10_root(data_dir: Path) -> Path:
    """The folder holding the batches: DIR/cifar-10-batches-py, or DIR itself if the batches lie there."""
    nested = Path(data_dir) / CIFAR_FOLDER
    return nested if nested.is_dir() or not (Path(data_dir) / TEST_FILE).exists() else Path(data_dir)


def read_batch(path: Path) -> Split:
    """One pickled CIFAR-10 batch: a dict with b"data" (uint8 N x 3072, channel-major) and b"labels"."""
    fix = f"rerun with --download, or point --data-dir at the folder that holds {CIFAR_FOLDER}/"
    try:
        with open(path, "rb") as f:
            # CIFAR-10 ships as Python 2 pickles: encoding="bytes" keeps their str keys as b"data", b"labels".
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing: {fix}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file can fail inside pickle in many ways
        raise DataError(f"CIFAR-10 file {path} is corrupt ({type(exc).__name__}): delete it and {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 file {path} lacks b'data'/b'labels', so it is no CIFAR-10 batch; "
                        f"delete it and {fix}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"CIFAR-10 file {path} holds data of shape {data.shape} ({data.dtype}) and "
                        f"{len(labels)} labels, not uint8 N x 3072 with N labels; delete it and {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"CIFAR-10 file {path} has labels outside 0-9; delete it and {fix}")
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def read_cifar10(data_dir: Path) -> Dataset:
    root = cifar10_root(Path(data_dir))
    train = [read_batch(root / name) for name in TRAIN_FILES]
    test = read_batch(root / TEST_FILE)
    return Dataset("cifar10", Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train])), test)


def download_cifar10(data_dir: Path, local_rank: int, timeout_s: float) -> None:
    """Local rank 0 fetches the archive with torchvision; the node's other ranks wait for its marker."""
    marker = Path(data_dir) / DOWNLOAD_DONE
    if local_rank == 0:
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(root=str(data_dir), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network, disk or archive: each is the same advice
            raise DataError(f"downloading CIFAR-10 into {data_dir} failed ({exc}); fetch "
                            f"cifar-10-python.tar.gz by hand and unpack it there, then drop --download") from None
        marker.touch()
        return
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            raise DataError(f"waited {timeout_s:.0f}s for local rank 0 to download CIFAR-10 into {data_dir}; "
                            "check its log, or download once without --download on other ranks")
        time.sleep(1)


def synthetic(n_train: int, n_test: int, seed: int) -> Dataset:
    """CIFAR-shaped uint8 images: a fixed random pattern per class under heavy noise, so a ConvNet learns fast."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(CLASSES, 3, 32, 32, generator=g) * 255

    def split(n: int) -> Split:
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g) * 32
        images = (patterns[labels] + noise).round().clamp(0, 255).to(torch.uint8)
        return Split(images, labels)

    train = split(n_train)
    return Dataset("synthetic", train, split(n_test))
