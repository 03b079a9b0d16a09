"""One heartbeat writer per node: ranks hand their beats over in node-local storage, local rank 0 publishes them.

Every rank replaces ``STAGE/rank-R.json`` (tmpfs: ``/dev/shm``, else ``$TMPDIR``; never the shared file
system) at each beat. The node's local rank 0 reads them all and publishes one node document
(hpc/beatfile.py) by rewriting ``RUN_DIR/heartbeat/node-N.json`` in place and, on a phase change or every
HISTORY_EVERY_S, appending it to ``node-N.jsonl``. Both files stay open, so a publish costs the shared file
system no create, rename or open at all: one write (two with a history line) and an fdatasync, so that a
client that caches writes (NFS) shows them to the other nodes. The namespace operations a node makes there
are opening its two files once and rotating the history once per HISTORY_BYTES.

The watchdog's reader on the node hands the run directory's lost.json and declared.json over in STAGE too
(train/watchdog.py), so the node's other ranks poll only node-local files.

STAGE is keyed by the run directory, the job, the attempt and the node rank, so two emulated nodes of a
local run, two jobs on one node and an attempt relaunched in place never mix their ranks. Local rank 0 removes it
at the run's end; a Slurm job's epilog removes what a killed one leaves (``hpcdist-beats-JOBID-*``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from hpc import beatfile, fileio

JOB_ID_VARS = ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "TORCHELASTIC_RUN_ID")
RELAYED = ("lost.json", "declared.json")  # the watchdog's files its node's reader hands over here
LOCAL_ROOTS = ("/dev/shm",)


def stage_dir(run_dir: Path, environ: Mapping[str, str], node: int, attempt: int) -> Path:
    """This node's hand-over folder (not created here): ``$HPCDIST_HEARTBEAT_STAGE`` or tmpfs, else the temp dir."""
    job = next((environ[v] for v in JOB_ID_VARS if environ.get(v)), "")
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{job}\0{attempt}\0{node}".encode()).hexdigest()[:20]
    root = environ.get("HPCDIST_HEARTBEAT_STAGE") or next(
        (r for r in LOCAL_ROOTS if os.access(r, os.W_OK | os.X_OK)), tempfile.gettempdir())
    # Named by a Slurm job's id, so that its epilog frees what a killed run left (rm -rf .../hpcdist-*-JOBID-*).
    slurm_job = environ.get("SLURM_JOB_ID", "")
    return Path(root) / f"hpcdist-beats-{slurm_job if slurm_job.isdigit() else 'local'}-{key}"


class StageError(ValueError):
    """This node's hand-over folder is not this user's alone (another user made its name first)."""


def claim(folder: Path) -> Path:
    """Make the hand-over folder, and refuse one that is not this user's alone: in shared tmpfs another user could
    make the name first, to read the node's beats or feed it false ones (a hang declared, a node lost)."""
    if fileio.private(folder) is None:
        raise StageError(f"the heartbeat's node-local folder {folder} is a link or another user's; remove it, or "
                         "set HPCDIST_HEARTBEAT_STAGE to a folder of yours")
    return folder


def stage(folder: Path, beat: Mapping[str, Any]) -> None:
    """Hand this rank's beat to its node's publisher: a local temp file renamed over the last one."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fileio.atomic_write(folder / f"rank-{beat['rank']}.json", json.dumps(beat))


def clear(folder: Path) -> None:
    """Remove what ranks wrote in this hand-over folder (their beats, the watchdog's relayed files), then the
    folder if that leaves it empty: tmpfs is shared, and a file of anyone else's stays where it is."""
    try:
        if not fileio.is_private(folder):
            return
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if (name.startswith("rank-") and name.endswith(".json")) or name in RELAYED:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def staged(folder: Path) -> dict[int, dict]:
    """Every beat handed over on this node, by rank; one caught mid-replace or foreign is skipped."""
    out = {}
    try:
        names = [n for n in os.listdir(folder) if n.startswith("rank-") and n.endswith(".json")]
    except OSError:
        return {}
    for name in names:
        try:
            beat = json.loads((folder / name).read_text())
            out[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


class Publisher:
    """Local rank 0's node files on the shared file system: the latest rewritten in place, the history appended."""

    def __init__(self, run_dir: Path, node: int, *, history_every_s: float = beatfile.HISTORY_EVERY_S,
                 history_bytes: int = beatfile.HISTORY_BYTES) -> None:
        self.latest_path = beatfile.node_path(run_dir, node)
        self.history_path = beatfile.history_path(run_dir, node)
        self.node, self.history_every_s, self.history_bytes = node, history_every_s, history_bytes
        self._latest: int | None = None
        self._history: int | None = None
        self._length = 0
        self._history_at = float("-inf")
        self._phases: dict[int, str] = {}

    def _open(self) -> None:
        if self._latest is None:
            self.latest_path.parent.mkdir(parents=True, exist_ok=True)
            self._latest = os.open(self.latest_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self._length = os.fstat(self._latest).st_size
        if self._history is None:
            self._history = os.open(self.history_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)

    def publish(self, hostname: str, attempt: int, now: float, beats: Mapping[int, Mapping[str, Any]]) -> None:
        """Write the node's beats as they stand: always the latest file; the history on a phase change or when due."""
        self._open()
        line = beatfile.encode(beatfile.node_document(self.node, hostname, attempt, now, list(beats.values())))
        # Blanks over whatever a longer document left, in the same write: readers see one line or a bad CRC.
        os.pwrite(self._latest, line + b" " * max(self._length - len(line), 0), 0)
        self._length = max(self._length, len(line))
        phases = {r: str(b.get("phase")) for r, b in beats.items()}
        if phases != self._phases or now - self._history_at >= self.history_every_s:
            if os.fstat(self._history).st_size + len(line) > self.history_bytes:
                self._rotate()
            os.write(self._history, line)
            self._phases, self._history_at = phases, now
        for fd in (self._latest, self._history):
            os.fdatasync(fd)

    def _rotate(self) -> None:
        os.close(self._history)
        os.replace(self.history_path, self.history_path.with_name(self.history_path.name + ".1"))
        self._history = os.open(self.history_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)

    def close(self) -> None:
        for fd in (self._latest, self._history):
            if fd is not None:
                os.close(fd)
        self._latest = self._history = None

