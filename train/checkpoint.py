"""Write checkpoints atomically (temp folder, then rename) and find the newest complete one."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

NAME = re.compile(r"step(\d{8})")
LATEST = "latest"
KEEP = 2  # complete checkpoints kept; the older one covers a newest that turns out unreadable


def name_for(step: int) -> str:
    return f"step{step:08d}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only a finished rename creates a ``stepNNNNNNNN`` folder."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def newest(root: Path) -> Path | None:
    found = complete(Path(root))
    return found[-1] if found else None


def save(root: Path, step: int, *, rank: int, write: Callable[[Path, str], None],
         barrier: Callable[[], None] = lambda: None) -> Path:
    """Every rank calls ``write(save_dir, tag)`` to fill ``save_dir/tag``; rank 0 then publishes it by rename.

    Until the rename, the previous checkpoint stays the newest complete one, so a crash or a kill at
    any point leaves a loadable checkpoint behind.
    """
    root, tag = Path(root), name_for(step)
    staging = root / f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier attempt
        (staging / tag).mkdir(parents=True)
    barrier()
    write(staging, tag)
    barrier()
    final = root / tag
    if rank == 0:
        for f in (staging / tag).iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():  # the same step saved again, e.g. a resumed run that had nothing left to do
            os.rename(final, root / f".old-{tag}")
        os.rename(staging / tag, final)
        _point_latest(root, tag)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root / f".old-{tag}", ignore_errors=True)
        for old in complete(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _point_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng-rank{rank}.pt"


def load(path: Path) -> dict:
    # Our own files hold numpy RNG states and Python tuples, which the weights-only unpickler refuses.
    return torch.load(path, map_location="cpu", weights_only=False)
