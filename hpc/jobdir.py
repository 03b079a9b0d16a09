"""Write the directories hpcdist owns, all at once, and guard them: the marker it leaves in each, and where it
never writes or replaces.

    write_tree(Path("/scratch/job"), {"job.sbatch": "..."}, dirs=("logs", "run"), force=True)
    discard(Path("/scratch/job"))       # only a directory holding hpcdist's job marker goes (or "sweep"'s)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

from hpc import jobfiles

# One error kind for the whole of render-and-write, so a caller catches a single one.
from hpc.templating import RenderError

# Written into every job (and sweep) directory hpcdist renders, naming its kind and every path it wrote:
# --force replaces only a directory whose marker says so and that holds nothing more (it never ran).
MARKER = ".hpcdist-job"
MARKER_NOTE = ("This directory was written by hpcdist; `--force` replaces it only while it holds exactly the paths "
               "below (a job that never ran).")
_MARKER_MAX_BYTES = 64 << 20


def refuse_protected(target: Path, what: str, environ: Mapping[str, str], cwd: str) -> None:
    """RenderError when ``target`` is /, the home or current directory or one above them: hpcdist never
    writes a job (or sweep) there, since replacing it would remove everything of the user's inside."""
    protected = {"/"}
    for base in (cwd, environ.get("HOME")):
        if base:
            real = Path(os.path.realpath(base))
            protected.update(str(p) for p in (real, *real.parents))
    if os.path.realpath(target) in protected:
        raise RenderError(f"{what} {target} is /, the home or current directory or one above them; "
                          f"pick a new directory for the {what.split()[0]}")


def refuse_target(target: Path, what: str, force: bool, environ: Mapping[str, str], cwd: str) -> None:
    """RenderError unless ``target`` may become the job (or sweep) directory (see ``write_tree``)."""
    refuse_protected(target, what, environ, cwd)
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise RenderError(f"{what} {target} exists and is not a directory; pick another --job-dir")
    if not any(target.iterdir()):
        return
    if not force:
        raise RenderError(f"{what} {target} already exists; pass another --job-dir, or --force to "
                          f"replace a {what} hpcdist wrote")
    refusal = unreplaceable(target, what.split()[0])
    if refusal:
        raise RenderError(f"--force {refusal}; pick another --job-dir")


def marker_text(kind: str, paths: Iterable[str]) -> str:
    """The marker of a ``kind`` ("job" or "sweep") directory holding ``paths`` (relative; folders end in /)."""
    return json.dumps({"hpcdist": MARKER_NOTE, "kind": kind, "paths": sorted(paths)}, indent=0) + "\n"


def read_marker(path: Path) -> tuple[str, frozenset[str]] | None:
    """(kind, paths) from the marker in ``path``, or None: no marker, a link, not ours, or damaged."""
    try:
        data = jobfiles.read_json(Path(path) / MARKER, _MARKER_MAX_BYTES)
    except (OSError, jobfiles.Damaged):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return None
    paths = data.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    return data["kind"], frozenset(paths)


def unreplaceable(target: Path, kind: str) -> str | None:
    """Why ``target`` may not be replaced as a ``kind`` directory, or None when it is exactly what hpcdist
    wrote: its marker names that kind, and it holds no path the marker does not list (nothing ran there)."""
    marker = None if Path(target).is_symlink() else read_marker(target)
    if marker is None:
        return (f"replaces only a {kind} directory hpcdist wrote (one holding a readable {MARKER}), and "
                f"{target} is not one")
    if marker[0] != kind:
        return f"of a {kind} never replaces a {marker[0]} directory, and {target} is one"
    found = _unlisted(Path(target), marker[1])
    if found:
        shown = ", ".join(ascii(p)[1:-1] for p in found[:3]) + (", ..." if len(found) > 3 else "")
        return (f"replaces only a {kind} that never ran, and {target} holds what was made since it was written "
                f"({shown})")
    return None


def _unlisted(root: Path, listed: frozenset[str], most: int = 4) -> list[str]:
    """Up to ``most`` paths under ``root`` that ``listed`` does not name (links are not followed)."""
    found: list[str] = []
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for name in sorted(dirs) + sorted(files):
            path = name if rel == "." else f"{rel}/{name}"
            if name == MARKER and name in files:
                continue
            if (f"{path}/" if name in dirs and not os.path.islink(os.path.join(top, name)) else path) not in listed:
                found.append(path)
                if len(found) >= most:
                    return found
        dirs[:] = [d for d in dirs if (f"{d}/" if rel == "." else f"{rel}/{d}/") in listed]
    return found


def is_job_dir(path: Path, kind: str = "job") -> bool:
    """Whether ``path`` is a ``kind`` ("job" or "sweep") directory hpcdist wrote: it holds that kind's marker
    (not a link to one)."""
    marker = None if Path(path).is_symlink() else read_marker(path)
    return marker is not None and marker[0] == kind


def written_paths(files: Iterable[str], dirs: Iterable[str]) -> set[str]:
    """Every path ``write_tree`` makes for ``files`` and ``dirs``: each file, and each folder with a /."""
    out: set[str] = set()
    for name in (*files, *(f"{d}/" for d in dirs)):
        out.add(name)
        out.update(f"{parent}/" for parent in PurePosixPath(name.rstrip("/")).parents[:-1])  # "." is the root itself
    out.discard(MARKER)
    return out


# ---- writing: this module's only side effects ------------------------------------------------

def write_tree(target: Path, files: Mapping[str, str], *, dirs: Iterable[str] = (), what: str = "job directory",
               force: bool = False, environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Path:
    """Write a directory hpcdist owns all at once: into a temporary sibling, then renamed into place.

    ``files`` maps paths relative to ``target`` to their text (scripts become executable); ``dirs`` are
    empty folders to create. ``target`` gets ``MARKER``, naming ``what``'s kind and every path written. A
    failure leaves nothing behind. ``force`` replaces an existing directory, but only one that hpcdist wrote
    as this kind and that holds nothing since (see ``unreplaceable``); nothing else is ever removed, and
    ``target`` is never /, the home or current directory or one above them (``environ``'s HOME, ``cwd``).
    """
    refuse_target(target, what, force, os.environ if environ is None else environ,
                   os.getcwd() if cwd is None else cwd)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A short name of our own: the directory's name may already use most of the 255 bytes.
        staging = Path(tempfile.mkdtemp(prefix=".hpcdist-new-", dir=target.parent))
    except OSError as exc:
        raise RenderError(f"cannot write the {what} under {target.parent}: {exc.strerror or exc}; "
                          "pick a writable --job-dir") from None
    old = None
    try:
        os.chmod(staging, 0o755)
        (staging / MARKER).write_text(marker_text(what.split()[0], written_paths(files, dirs)))
        for sub in dirs:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
        # Only what refuse_target let --force replace is moved aside: a directory another command (a second
        # submit in the same second, with the same default name) wrote since then makes the rename fail instead.
        if force and target.exists():
            old = Path(tempfile.mkdtemp(prefix=".hpcdist-old-", dir=target.parent))
            target.rename(old / "replaced")
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            (old / "replaced").rename(target)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RenderError(f"{what} {target} already exists (another command wrote it just now); pass "
                              "another --job-dir") from None
        raise RenderError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def discard(job_dir: Path, kind: str = "job") -> None:
    """Remove a ``kind`` ("job" or "sweep") directory that was just written but will not run (a refused
    submission).

    Only a directory holding hpcdist's marker of that kind goes; anything else is left as it is.
    """
    if is_job_dir(job_dir, kind):
        shutil.rmtree(job_dir, ignore_errors=True)
