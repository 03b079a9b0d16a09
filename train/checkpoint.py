"""Write checkpoints atomically (temp folder, manifest, then rename) and find the newest one that verifies.

A checkpoint ``stepNNNNNNNN/`` is complete when its ``MANIFEST.json``, written last, lists every file with
its size and SHA-256 and the files still match. ``newest`` skips (and ``choose`` sets aside as
``.damaged-stepNNNNNNNN``) a checkpoint that was truncated or lost files after it was published, so a
resume falls back to the previous complete one; ``KEEP`` checkpoints are kept for that.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

NAME = re.compile(r"step(\d{8})")
MANIFEST = "MANIFEST.json"
KEEP = 2  # complete checkpoints kept; the older one covers a newest that turns out unreadable


def name_for(step: int) -> str:
    return f"step{step:08d}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only a finished rename creates a ``stepNNNNNNNN`` folder."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """List every file of ``folder`` with size and SHA-256, fsync them all, then write the manifest last."""
    files = {}
    for f in _files(folder):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST)


def damage(folder: Path, checksums: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when every listed file is there and matches."""
    try:
        listed = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    for name, want in listed.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if checksums and _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def newest(root: Path, checksums: bool = True, skipped: list | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is appended to ``skipped``
    as ``(path, reason)``."""
    for candidate in reversed(complete(Path(root))):
        reason = damage(candidate, checksums)
        if reason is None:
            return candidate
        if skipped is not None:
            skipped.append((candidate, reason))
    return None


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
