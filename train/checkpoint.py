"""Write checkpoints atomically (temp folder, manifest, then rename) and choose the one a resume loads.

A checkpoint ``stepNNNNNNNN/`` is complete when its ``MANIFEST.json``, written last, lists every file with
its size and SHA-256 and the files still match. ``newest`` skips (and ``choose`` sets aside as
``.damaged-stepNNNNNNNN``) a checkpoint that was truncated or lost files after it was published, so a
resume falls back to the previous complete one; ``KEEP`` checkpoints are kept for that.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hpc.checkpoints import complete, name_for, newest, write_manifest

KEEP = 2  # complete checkpoints kept; the older one covers a newest that turns out unreadable


def choose(root: Path, *, rank: int, share: Callable[[object], object] = lambda x: x,
           say: Callable[[str], None] = print) -> Path | None:
    """Rank 0 picks the newest complete checkpoint (checksums included) and ``share`` hands its name to
    every rank; damaged newer ones are renamed ``.damaged-...`` so they are neither loaded nor pruned."""
    name = None
    if rank == 0:
        skipped: list = []
        found = newest(root, skipped=skipped)
        for path, reason in skipped:
            say(f"resume: checkpoint {path} is damaged ({reason}); set aside as .damaged-{path.name}, "
                "falling back to the previous one")
            os.rename(path, path.with_name(f".damaged-{path.name}"))
        name = found.name if found is not None else None
    name = share(name)
    return Path(root) / name if name else None


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
        write_manifest(staging / tag, step)
        if final.exists():  # the same step saved again, e.g. a resumed run that had nothing left to do
            os.rename(final, root / f".old-{tag}")
        os.rename(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root / f".old-{tag}", ignore_errors=True)
        for old in complete(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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
