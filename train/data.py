"""Load CIFAR-10 from its on-disk pickle batches, or make a learnable synthetic set of the same shape."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpc import jobfiles, ranks, shown
from train.options import Options

CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
DOWNLOAD_DONE = ".hpcdist-download-done"
CLASSES = 10
# Every global CIFAR-10's batches name (Python 2 pickles of numpy 1 arrays): the one thing a pickle can call code
# through is a global it names, so a batch naming any other is refused unread.
CIFAR_GLOBALS = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")})


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
    train: Split
    test: Split


def cifar10_root(data_dir: Path) -> Path:
    """The folder holding the batches: DIR/cifar-10-batches-py, or DIR itself if the batches lie there."""
    nested = Path(data_dir) / CIFAR_FOLDER
    return nested if nested.is_dir() or not (Path(data_dir) / TEST_FILE).exists() else Path(data_dir)


class ForeignGlobal(pickle.UnpicklingError):
    """A pickle naming a global no CIFAR-10 batch names; its text is the name, escaped and cut short."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches hold: builtin values and the numpy globals in CIFAR_GLOBALS."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_GLOBALS:
            raise ForeignGlobal(shown.value(f"{module}.{name}"))
        return super().find_class(module, name)


def read_batch(path: Path) -> Split:
    """One pickled CIFAR-10 batch: a dict with b"data" (uint8 N x 3072, channel-major) and b"labels"."""
    fix = f"rerun with --download, or point --data-dir at the folder that holds {CIFAR_FOLDER}/"
    try:
        # Followed, since a data set is often a link, but a pipe or a device put there is refused, not waited on.
        with jobfiles.open_regular(path, follow=True) as f:
            # CIFAR-10 ships as Python 2 pickles: encoding="bytes" keeps their str keys as b"data", b"labels".
            batch = BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing: {fix}") from None
    except jobfiles.Damaged as exc:
        raise DataError(f"CIFAR-10 batch {exc}: {fix}") from None
    except ForeignGlobal as exc:
        raise DataError(f"CIFAR-10 file {path} calls {exc}, which no CIFAR-10 batch does, so it was not read (a pickle "
                        f"can run code): delete it and {fix}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file can fail inside pickle in many ways
        raise DataError(f"CIFAR-10 file {path} is corrupt ({type(exc).__name__}): delete it and {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 file {path} lacks b'data'/b'labels', so it is no CIFAR-10 batch; "
                        f"delete it and {fix}")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except ValueError:  # rows of unequal lengths
        raise DataError(f"CIFAR-10 file {path} holds ragged data or labels, not uint8 N x 3072 with N labels; "
                        f"delete it and {fix}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise DataError(f"CIFAR-10 file {path} holds data of shape {data.shape} ({data.dtype}) and labels of shape "
                        f"{labels.shape}, not uint8 N x 3072 with N labels; delete it and {fix}")
    if not len(data):
        raise DataError(f"CIFAR-10 file {path} holds no images; delete it and {fix}")
    # Floats would be cut to integers and text parsed as numbers: a label is an integer as written, or refused.
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= CLASSES:
        raise DataError(f"CIFAR-10 file {path} has labels that are not integers 0-9; delete it and {fix}")
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64)))


def read_cifar10(data_dir: Path) -> Dataset:
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        # Else each batch path runs through it and reads as a corrupt file to delete, which is not there.
        raise DataError(f"--data-dir {data_dir} is not a folder; point it at the folder that holds {CIFAR_FOLDER}/")
    root = cifar10_root(Path(data_dir))
    train = [read_batch(root / name) for name in TRAIN_FILES]
    test = read_batch(root / TEST_FILE)
    return Dataset(Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train])), test)


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


# The synthetic set's knobs (see synthetic()). Measured: `python -m train --backend ddp --synthetic-size 4096
# --epochs 1` (batch 256) reaches test accuracy 0.28, `--epochs 5` 0.84; one 5-epoch run evaluated after
# each epoch: 0.35, 0.63, 0.76, 0.82, 0.83.
TEMPLATE_GRID = 4        # class templates are random 4x4 colour grids, upsampled smoothly
MAX_SHIFT = 8            # each image is a random 32x32 window of its class's 40x40 template
TEMPLATE_AMPLITUDE = 24  # grey levels the template swings around mid-grey, before contrast
NOISE_STD = 80           # per-pixel Gaussian noise, grey levels: four times the template's swing
LABEL_NOISE = 0.05       # share of labels redrawn at random (in both splits): accuracy stays below ~0.95


def synthetic(n_train: int, n_test: int, seed: int) -> Dataset:
    """CIFAR-shaped uint8 images that take a ConvNet several epochs to learn and never let it reach 100%.

    Each class is a smooth random colour template; an image is a randomly shifted window of it, with random
    contrast and per-channel brightness, under Gaussian noise four times stronger than the template, and 5%
    of labels are redrawn at random. Deterministic from ``seed``; about 0.1-0.3 s for 4096 + 1024 images on
    one CPU thread. Expected test accuracy (ddp, 1 rank, 4096 images, batch 256, Adam 1e-3): about 0.25-0.4
    after one epoch, 0.75-0.85 after five, below 0.95 (the label noise) however long it trains.
    """
    g = torch.Generator().manual_seed(seed)
    side = 32 + MAX_SHIFT
    grid = torch.rand(CLASSES, 3, TEMPLATE_GRID, TEMPLATE_GRID, generator=g) * 2 - 1
    templates = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    # Every 32x32 window of every template as one strided view: [class, dy, dx, channel, row, col].
    windows = templates.contiguous().as_strided(
        (CLASSES, MAX_SHIFT + 1, MAX_SHIFT + 1, 3, 32, 32), (3 * side * side, side, 1, side * side, side, 1))

    def split(n: int) -> Split:
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        dy, dx = torch.randint(0, MAX_SHIFT + 1, (2, n), generator=g)
        contrast = torch.rand(n, 1, 1, 1, generator=g) * 1.2 + 0.4
        brightness = torch.randn(n, 3, 1, 1, generator=g) * 20 + 128
        images = torch.randn(n, 3, 32, 32, generator=g).mul_(NOISE_STD)
        images += windows[labels, dy, dx] * (contrast * TEMPLATE_AMPLITUDE) + brightness
        relabel = torch.rand(n, generator=g) < LABEL_NOISE
        labels = torch.where(relabel, torch.randint(0, CLASSES, (n,), generator=g), labels)
        return Split(images.clamp_(0, 255).to(torch.uint8), labels)

    return Dataset(split(n_train), split(n_test))  # in this order: both splits draw from g


def load_dataset(opts: Options, env: ranks.DistEnv) -> Dataset:
    if opts.dataset == "synthetic":
        return synthetic(opts.synthetic_size, max(opts.synthetic_size // 4, 1), opts.seed)
    if opts.download:
        download_cifar10(opts.data_dir, env.local_rank, opts.timeout_s)
    return read_cifar10(opts.data_dir)
