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

from hpc import fileio

NAME = re.compile(r"step(\d{8})")
MANIFEST = "MANIFEST.json"


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


def size(folder: Path) -> int:
    """Bytes of every file in a checkpoint folder: what the next one will need about as much of."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_manifest(folder: Path, step: int) -> None:
    """List every file of ``folder`` with size and SHA-256, fsync them all, then write the manifest last."""
    files = {}
    for f in _files(folder):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(f.relative_to(folder))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    fileio.atomic_write(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1) + "\n", durable=True)


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
