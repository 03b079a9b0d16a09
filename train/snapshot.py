"""Keep the newest training state in node-local memory, written in the background, for a relaunch to resume from.

    store = snapshot.open_store(run_dir, os.environ, every_s=5, rank=rank, local_rank=local_rank, ...)
    store.take(step, lambda: engine.capture(state))  # at a step boundary: the copy, the only stall
    held = store.newest()                       # at a resume: this node's newest complete snapshot, or None

A snapshot is a checkpoint folder (``stepNNNNNNNN/``, ``MANIFEST.json`` last, published by train/checkpoint.py's
``save``) in tmpfs, ``/dev/shm`` or ``$HPCDIST_SNAPSHOT_DIR``, written by each node's local rank 0.
Serialising, checksumming and publishing run in a thread while training goes on; a snapshot still being written
when the next is due makes that one skipped, never waited for. Rank 0 times them on the step vote, so every
node holds the same steps: for replicated training (dp, ddp) each node's snapshot is a whole copy of the state,
and the other nodes' copies are what survives a node's death. DeepSpeed's partitioned state is train/dssnapshot.py's.

The folder is named by the Slurm job and keyed by the run directory and the host: a rank relaunched in the
allocation or a requeued job on the same node finds it, another job never does. The trainer removes it when the
run completes; the site's epilog removes a failed job's (``/dev/shm/hpcdist-snap-JOBID-HOST-*``). Since anyone
may make a name in /dev/shm first, nothing is written, read or removed in a folder that is not this user's own
real folder, closed to others (``hpc.fileio.is_private``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from hpc import fileio
from hpc.checkpoints import NAME, SNAPSHOT_EVERY_S, complete, name_for, newest
from train import checkpoint, dssnapshot, runtime

ROOT_ENV = "HPCDIST_SNAPSHOT_DIR"
LOCAL_ROOT = "/dev/shm"
STATE_FILE = "state.pt"
# What names the folder of a run outside Slurm that asked for snapshots (a benchmark): its run directory and host.
NO_JOB = "local"


def store_dir(run_dir: Path, environ: Mapping[str, str], hostname: str) -> Path | None:
    """This node's snapshot folder for the run (not created here); None without tmpfs or with a job id that is not
    one."""
    job = environ.get("SLURM_JOB_ID", NO_JOB)
    root = environ.get(ROOT_ENV) or (LOCAL_ROOT if os.access(LOCAL_ROOT, os.W_OK | os.X_OK) else "")
    if not re.fullmatch(r"\d+|" + NO_JOB, job) or not root:
        return None
    host = re.sub(r"[^A-Za-z0-9.-]", "_", hostname)
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{hostname}".encode()).hexdigest()[:16]
    return Path(root) / f"hpcdist-snap-{job}-{host}-{key}"


def every_s(given: float | None, environ: Mapping[str, str]) -> float:
    """Seconds between snapshots, 0 for none, the same answer on every rank. By default a Slurm job's run keeps
    them, every SNAPSHOT_EVERY_S, since its epilog frees what a killed run leaves in memory; elsewhere only a run
    that asks (a benchmark, a test)."""
    if given is None:
        return SNAPSHOT_EVERY_S if "SLURM_JOB_ID" in environ else 0.0
    return given


@dataclass(frozen=True)
class Persist:
    """Snapshots also written to disk, every ``every_s`` (0: never), as dp/ddp checkpoints in ``root``: what a new
    job on other nodes resumes from when the allocation, and the memory its snapshots were in, is gone."""

    root: Path
    every_s: float


def open_store(run_dir: Path, environ: Mapping[str, str], *, every_s: float, rank: int, local_rank: int, fresh: bool,
               on_written: Callable[[int], None], persist: Persist | None = None,
               partitioned_on_node: int | None = None) -> Store | dssnapshot.Parts | None:
    """This rank's snapshot store, None without one: for dp/ddp the node's one writer, its local rank 0 (None
    elsewhere), rank 0's also persisting; for DeepSpeed (``partitioned_on_node``, the node's index) every rank's
    share of its node's part, each node's persisted by its local rank 0 (a collective). A fresh run first removes an
    earlier run's of this job here."""
    if every_s <= 0:
        return None
    folder = store_dir(run_dir, environ, socket.gethostname())
    if partitioned_on_node is not None:
        return dssnapshot.open_parts(folder, node=partitioned_on_node, local_rank=local_rank, fresh=fresh,
                                     on_written=on_written, persist=persist)
    if folder is None or local_rank != 0:
        return None
    store = Store(folder, on_written=on_written, persist=persist if rank == 0 else None)
    if fresh:
        store.clear()
    return store


def newest_held(store: Store | None, rank: int, world: int, disk_step: int | None) -> tuple[dict, str] | None:
    """(state, path) of the newest snapshot any rank's node holds, if newer than the disk's checkpoint; every rank
    calls it. The first rank holding it loads it and hands it to all (a spare node holds none, and a dead node's
    went with it)."""
    mine = store.newest() if store is not None else None
    offers = runtime.gathered((step_of(mine), str(mine)), world)
    steps = [step for step, _ in offers if step is not None]
    if not steps or (disk_step is not None and max(steps) <= disk_step):
        return None
    holder = next(r for r, (step, _) in enumerate(offers) if step == max(steps))
    box = [load(mine) if rank == holder else None]
    if world > 1:
        dist.broadcast_object_list(box, src=holder)
    return box[0], offers[holder][1]


def cpu_copy(value):
    """``value`` with every tensor copied to the host: the live ones change in place at the next step."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


class Store:
    """One node's snapshots, written by one thread; ``error`` says why writing stopped, if it did."""

    def __init__(self, folder: Path, on_written: Callable[[int], None] = lambda step: None,
                 say: Callable[[str], None] = lambda line: print(f"warning: {line}", file=sys.stderr, flush=True),
                 persist: Persist | None = None) -> None:
        self.folder, self.on_written, self.say, self.persist = Path(folder), on_written, say, persist
        self.error: str | None = None
        # Snapshots copied, those skipped since the writer was still busy, and the seconds the copies stalled training.
        self.taken, self.skipped, self.stall_s = 0, 0, 0.0
        # The first snapshot is persisted at once: a run that loses its allocation in its first minute loses seconds.
        self._persisted_at = float("-inf")
        self._pending: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None

    def take(self, step: int, capture: Callable[[], dict]) -> bool:
        """Copy the state (``capture``, the only stall, timed into ``stall_s``) and hand it to the writer; False,
        with no copy made, when the writer is still busy with the last one (or has failed)."""
        if self.error is not None or self._pending.full():
            self.skipped += self.error is None
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_all, name="hpcdist-snapshot", daemon=True)
            self._thread.start()
        began = time.perf_counter()
        state = capture()
        self.stall_s, self.taken = self.stall_s + time.perf_counter() - began, self.taken + 1
        # Only the training thread puts, and the writer only takes: the slot seen free above is still free.
        self._pending.put_nowait((step, state))
        return True

    def close(self) -> None:
        """Wait for the snapshot being written, then stop the writer."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None

    def drop(self) -> None:
        """At the run's end, when a checkpoint on disk holds everything the snapshots did: tmpfs is memory."""
        self.close()
        self.clear()

    def newest(self) -> Path | None:
        """The newest snapshot whose files all match their manifest, in a folder only this user can write."""
        try:
            return newest(self.folder) if fileio.is_private(self.folder) else None
        except OSError:
            return None

    def clear(self) -> None:
        """Remove the snapshots this store wrote, then the folder if that empties it (tmpfs is shared)."""
        try:
            if not fileio.is_private(self.folder):
                return
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if NAME.fullmatch(name.removeprefix(".tmp-")):
                shutil.rmtree(self.folder / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)

    def _write_all(self) -> None:
        while (item := self._pending.get()) is not None:
            step, state = item
            try:
                self._write(step, state)
            except (OSError, RuntimeError) as exc:
                # Memory for snapshots ran out (or the folder went away; torch's writer says a file size limit or a
                # quota as a RuntimeError): training goes on with its disk checkpoints, and close awaits no dead writer.
                self.error = f"{checkpoint.reason(exc)} writing a snapshot in {self.folder}"
                if fileio.is_private(self.folder):
                    shutil.rmtree(self.folder / f".tmp-{name_for(step)}", ignore_errors=True)
                self.say(f"snapshots stopped: {self.error}; resumes use the disk checkpoints")
                return
            self.on_written(step)
            if self.persist and self.persist.every_s and time.monotonic() - self._persisted_at >= self.persist.every_s:
                self._persist(step)

    def _write(self, step: int, state: dict) -> None:
        if fileio.private(self.folder) is None:
            raise OSError(errno.EPERM, f"{self.folder} is not a folder of this user's alone (a link, or another "
                                       "user's)")
        # Published as a checkpoint is, by its one writer: staged, manifest last, renamed, the newest KEEP kept.
        checkpoint.save(self.folder, step, rank=0,
                        write=lambda staging, tag: checkpoint.put(state, staging / tag / STATE_FILE))

    def _persist(self, step: int) -> None:
        # The snapshot's file as written, copied (by the kernel, outside the GIL): not pickled a second time while
        # the training thread wants the interpreter.
        written = self.folder / name_for(step) / STATE_FILE
        persist, self._persisted_at = self.persist, time.monotonic()
        try:
            with checkpoint.publishing(persist.root):
                saved = complete(persist.root)
                if saved and step_of(saved[-1]) >= step:  # the training loop saved this step or a later one
                    return
                checkpoint.save(persist.root, step, rank=0, write=lambda staging, tag: shutil.copyfile(
                    written, staging / tag / checkpoint.TRAINER_FILE))
        except OSError as exc:
            # The loop's own checkpoints name a full disk as the run's ending; here it only ends the persisting.
            self.persist = None
            self.say(f"snapshots no longer persisted: {exc}; the loop's disk checkpoints go on")


def take(store: Store | dssnapshot.Parts | None, engine, trainer_state: dict, rank: int, pace=None) -> None:
    """A snapshot of the state at ``trainer_state["step"]`` in this rank's store, if it has one (every rank calls
    it at the step the ranks agreed on); ``pace``, the snapshot clock, is slowed to keep DeepSpeed's waits short."""
    step = trainer_state["step"]
    if isinstance(store, dssnapshot.Parts):
        store.take(step, lambda save_dir, tag: engine.write(save_dir, tag, rank, trainer_state), engine.trained_with)
        if pace is not None:
            pace.every_s = store.spaced(pace.every_s)
    elif store is not None:
        store.take(step, lambda: engine.capture(trainer_state))


def stats(store: Store | None) -> dict[str, float | int]:
    """What summary.json says of a node's snapshots: how many were taken and skipped (the one before still being
    written or handed on) and the seconds their copies stalled training (``hpcdist bench`` divides by the training
    time); nothing for a run that kept none."""
    return {} if store is None else {"snapshots": store.taken, "snapshots_skipped": store.skipped,
                                     "snapshot_stall_s": round(store.stall_s, 6)}


def load(folder: Path) -> dict:
    return checkpoint.load(Path(folder) / STATE_FILE)


def step_of(folder: Path | None) -> int | None:
    match = NAME.fullmatch(folder.name) if folder is not None else None
    return int(match.group(1)) if match else None
