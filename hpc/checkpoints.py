"""Which checkpoints in a run directory are complete: their manifest, written last, matches every file (torch-free,
so the batch shell names the checkpoint a retry will resume from as the trainer will choose it).

    newest(run_dir / "checkpoints")      # the newest stepNNNNNNNN/ that verifies (sizes and SHA-256), or None
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from hpc import fileio

NAME = re.compile(r"step(\d{8})")
MANIFEST = "MANIFEST.json"
# DeepSpeed's snapshots (train/dssnapshot.py): node I's share of one, in node memory or persisted in PARTS of the run's
# checkpoints folder (beside stepNNNNNNNN/, which complete() never takes it for).
PART = "part-{}-of-{}"
PARTS = ".parts"
# Seconds between snapshots in node memory in a Slurm job by default (train/snapshot.py; the drill times its faults
# by it).
SNAPSHOT_EVERY_S = 5.0
KEEP = 2  # complete checkpoints kept; the older one covers a newest that turns out unreadable
# Saving a step again moves its published copy aside under this prefix, renames the new one in, then removes the copy.
REPLACED = ".old-"


def name_for(step: int) -> str:
    return f"step{step:08d}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only a finished rename creates a ``stepNNNNNNNN`` folder."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def replaced(root: Path, checksums: bool = True) -> list[Path]:
    """The copies ``.old-stepN`` a resume takes back as ``stepN`` (train.checkpoint.choose): a kill between the two
    renames of a step saved again left the step's checkpoint under that name with no ``stepN`` beside it, or one
    before the copy's removal left it complete beside a ``stepN`` that does not verify."""
    root = Path(root)
    olds = root.glob(f"{REPLACED}step*") if root.is_dir() else []
    copies = [(p, root / p.name.removeprefix(REPLACED)) for p in olds
              if p.is_dir() and NAME.fullmatch(p.name.removeprefix(REPLACED))]
    return sorted(p for p, step in copies if not os.path.lexists(step)
                  or damage(step, checksums) is not None and damage(p, checksums) is None)


def held(root: Path) -> list[Path]:
    """Every complete checkpoint in ``root`` (``stepN``, and DeepSpeed's persisted ``.parts/part-I-of-N/stepN``),
    oldest step first: what a run leaves behind for the next to resume from."""
    root = Path(root)
    found = complete(root) + [step for part in (root / PARTS).glob(PART.format("*", "*")) for step in complete(part)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size(folder: Path) -> int:
    """Bytes of every file in a checkpoint folder: what the next one will need about as much of."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_manifest(folder: Path, step: int, trained_with: Mapping[str, Any] | None = None) -> None:
    """List every file of ``folder`` with size and SHA-256, fsync them all, then write the manifest last; with
    ``trained_with`` (hpc.dsconfig.trained_with: what a resume must match to load DeepSpeed's files)."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"step": step, "files": files, **({"trained_with": dict(trained_with)} if trained_with else {})}
    fileio.atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n", durable=True)


def recorded(folder: Path) -> dict[str, Any] | None:
    """What ``folder``'s manifest records of how its state was trained; None where it records nothing (a dp/ddp
    checkpoint, or one written before the record)."""
    try:
        record = json.loads((Path(folder) / MANIFEST).read_text()).get("trained_with")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def inside(name: str) -> bool:
    """Whether a file name a manifest or a snapshot part lists stays inside its folder (no absolute path, no '..')."""
    return not (Path(name).is_absolute() or ".." in Path(name).parts)


def damage(folder: Path, checksums: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when every listed file is there and matches."""
    try:
        listed = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    if not isinstance(listed, dict) or not all(
            isinstance(want, dict) and type(want.get("size")) is int and isinstance(want.get("sha256"), str)
            for want in listed.values()):
        return f"unreadable {MANIFEST} (its files are not names with a size and a SHA-256)"
    for name, want in listed.items():
        if not inside(name):  # write_manifest lists only the folder's own files: vouching elsewhere is no checkpoint
            return f"{MANIFEST} names {name}, outside its folder"
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


def held_in(folder: Path, checksums: bool = True) -> dict[str, list[int]]:
    """Part name -> the steps of it in ``folder`` that verify (sizes, and SHA-256 with ``checksums``)."""
    return {part.name: steps for part in sorted(Path(folder).glob(PART.format("*", "*")))
            if (steps := [int(NAME.fullmatch(p.name).group(1)) for p in complete(part)
                          if damage(p, checksums) is None])}


def newest_whole(offers: list[dict[str, list[int]]]) -> tuple[int | None, list[str]]:
    """The newest step for which some offer (``held_in``'s, one per node or folder) holds each of the N parts of its
    layout, with the parts' names."""
    best: tuple[int | None, list[str]] = (None, [])
    names = {name for offer in offers for name in offer}
    for nodes in {int(name.rsplit("-", 1)[1]) for name in names}:
        layout = [PART.format(i, nodes) for i in range(nodes)]
        held = [set().union(*(offer.get(name, ()) for offer in offers)) for name in layout]
        whole = set.intersection(*held)
        if whole and (best[0] is None or max(whole) > best[0]):
            best = (max(whole), layout)
    return best


def resumable_step(root: Path) -> int | None:
    """The step a resume from the disk alone starts at: the newest checkpoint whose manifest lists every file at
    its size, or the newest step whose every DeepSpeed part the nodes persisted so, whichever is newer; None for
    neither. Sizes alone: the batch shell asks within Slurm's KillWait, where hashing a checkpoint of many GB gets
    it killed; the trainer checks the SHA-256s when it resumes and falls back past one that fails them."""
    found = newest(Path(root), checksums=False)
    steps = [int(NAME.fullmatch(found.name).group(1))] if found is not None else []
    steps += [int(NAME.fullmatch(p.name.removeprefix(REPLACED)).group(1)) for p in replaced(root, checksums=False)
              if damage(p, checksums=False) is None]
    persisted = newest_whole([held_in(Path(root) / PARTS, checksums=False)])[0]
    return max(steps + ([persisted] if persisted is not None else []), default=None)
