"""Write checkpoints atomically (temp folder, manifest, then rename) and choose the one a resume loads.

A checkpoint ``stepNNNNNNNN/`` is complete when its ``MANIFEST.json``, written last, lists every file with
its size and SHA-256 and the files still match. ``newest`` skips (and ``choose`` sets aside as
``.damaged-stepNNNNNNNN``) a checkpoint that was truncated or lost files after it was published, so a
resume falls back to the previous complete one; ``KEEP`` checkpoints are kept for that.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from hpc import checkpoints, dsconfig
from hpc.checkpoints import KEEP, REPLACED, complete, held, name_for, newest, recorded, replaced, size, write_manifest
from hpc.runfiles import STORAGE_ADVICE
from train.runtime import gathered

# A dp/ddp checkpoint's whole state, written by rank 0 (or a snapshot persisted in the background); DeepSpeed's
# files are its own.
TRAINER_FILE = "trainer.pt"


_locks: dict[Path, threading.RLock] = {}
_locks_guard = threading.Lock()


@contextmanager
def publishing(root: Path) -> Iterator[None]:
    """Held while this process publishes or prunes checkpoints in ``root``: the training loop's saves and the
    snapshot writer's persisted ones share the folder (staging names, pruning)."""
    with _locks_guard:
        lock = _locks.setdefault(Path(root).absolute(), threading.RLock())
    with lock:
        yield


class StorageError(OSError):
    """A checkpoint could not be written for want of space or write access; nothing half-written is left."""


def disk_full(root: Path, least: int = 1 << 20) -> bool:
    try:
        stats = os.statvfs(root)
    except OSError:
        return False
    # Out of inodes (tmpfs's nr_inodes) no file can be made, whatever the bytes free; f_files 0: none are counted.
    return stats.f_bavail * stats.f_frsize < least or 0 == stats.f_favail < stats.f_files


def put(obj: object, path: Path | str, zipfile: bool = True) -> None:
    """torch.save through a Python file: a failed write then keeps its OSError, errno and all, as the context of
    torch's RuntimeError (its own writer, given a path, says only "iostream error"). ``zipfile``: torch's format,
    else its legacy one (DeepSpeed's setting for its own files)."""
    with open(path, "wb") as file:
        try:
            torch.save(obj, file, _use_new_zipfile_serialization=zipfile)
        except RuntimeError as exc:
            # A Ctrl-C in the middle of a record: closing the zip then fails on the short record, and that error
            # would hide the interrupt (a user's stop, exit 130) as a crash.
            interrupt = next((e for e in _chain(exc) if isinstance(e, KeyboardInterrupt)), None)
            if interrupt is not None:
                raise interrupt from None
            raise


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling, each once: torch wraps the OSError of a write it
    made in a RuntimeError."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def storage_code(exc: BaseException, root: Path) -> int | None:
    """The errno of a failed write when the storage failed (no space, quota, read-only), not the training; else None."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in STORAGE_ADVICE:
            return error.errno
    # torch's own writer reports a full disk as "unexpected pos N vs M": the disk is asked, not the message.
    return errno.ENOSPC if disk_full(root) else None


def reason(exc: Exception) -> str:
    """Why a write failed, in a few words: its errno's, found where torch wrapped it too (a StorageError's own line,
    naming --run-dir, is the ending of a run whose checkpoint it was), else the error's own."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno:
            own = None if isinstance(error, StorageError) else error.strerror
            return own or os.strerror(error.errno)
    return str(exc)


def storage_error(code: int, root: Path, tag: str) -> StorageError:
    """The one line a full disk (or a quota, a file-size limit, a read-only mount) is reported by: path, free and needed
    bytes, and what clears ``code``."""
    try:
        room = f"{shutil.disk_usage(root).free:,} bytes free"
    except OSError:
        room = "free space unknown"
    last = newest(root)
    kept = (f", about {size(last):,} needed; the previous checkpoint ({last.name}) is intact" if last is not None
            else "; no earlier checkpoint is intact, so the size needed is unknown")
    return StorageError(code, f"{os.strerror(code).lower()} writing checkpoint {tag} in {root}: {room}{kept}: "
                              f"{STORAGE_ADVICE[code]}, then resubmit with --resume")


def choose(root: Path, *, rank: int, share: Callable[[object], object] = lambda x: x,
           say: Callable[[str], None] = print) -> Path | None:
    """Rank 0 picks the newest complete checkpoint (checksums included) and ``share`` hands its name to
    every rank; damaged newer ones are renamed ``.damaged-...`` so they are neither loaded nor pruned."""
    name = None
    if rank == 0:
        for old in replaced(root):  # then checked like any other: one damaged since is set aside below
            step = old.with_name(old.name.removeprefix(REPLACED))
            if os.path.lexists(step):
                os.rename(step, set_aside_as(step, checkpoints.damage(step), f"taking back its copy {old.name}", say))
            os.rename(old, step)
        skipped: list = []
        found = newest(root, skipped=skipped)
        for path, reason in skipped:
            os.rename(path, set_aside_as(path, reason, "falling back to the previous one", say))
        name = found.name if found is not None else None
    name = share(name)
    return Path(root) / name if name else None


def set_aside_as(path: Path, reason: str | None, then: str, say: Callable[[str], None]) -> Path:
    """What the damaged checkpoint ``path`` is renamed, said with ``reason`` and what the resume does ``then``:
    ``.damaged-NAME``, or ``.damaged-NAME.2``, ... when a run that went on wrote the step again and it was damaged
    again (a rename onto the first would fail, or replace it were it empty)."""
    aside = path.with_name(f".damaged-{path.name}")
    count = 1
    while os.path.lexists(aside):
        count += 1
        aside = path.with_name(f".damaged-{path.name}.{count}")
    say(f"resume: checkpoint {path} is damaged ({reason}); set aside as {aside.name}, {then}")
    return aside


def earlier_run(root: Path) -> list[str]:
    """The checkpoints (``stepN``, DeepSpeed's persisted ``.parts/part-I-of-N/stepN``) an earlier run left in ``root``,
    oldest step first."""
    return [str(p.relative_to(root)) for p in held(root)]


def resumes_from(root: Path) -> str:
    """Where a ``--resume`` goes on from, in words, by the names in ``root`` alone (no checksums: reading a large
    checkpoint would keep a Ctrl-C waiting)."""
    kept = earlier_run(root)
    return f"its checkpoint {kept[-1]}" if kept else "step 0 (no checkpoint was written yet)"


def save(root: Path, step: int, *, rank: int, write: Callable[[Path, str], None],
         agree: Agreement | None = None, trained_with: dict | None = None) -> Path:
    """Every rank of ``agree`` (default: this process alone) calls ``write(save_dir, tag)`` to fill
    ``save_dir/tag``; rank 0 then publishes it by rename, its manifest recording ``trained_with``
    (hpc.dsconfig.trained_with's) where given.

    Until the rename, the previous checkpoint stays the newest complete one, so a crash or a kill at
    any point leaves a loadable checkpoint behind. A failure on any rank is decided together (``Agreement``): no
    rank publishes, rank 0 removes the staging folder, and every rank raises.
    """
    root, agree, tag = Path(root), agree or Agreement(None), name_for(step)
    staging = root / f".tmp-{tag}"

    def prepare() -> None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier attempt
            (staging / tag).mkdir(parents=True)

    def publish() -> None:
        if rank == 0:
            _publish(root, staging, tag, step, trained_with)

    with publishing(root):
        try:
            for stage in (prepare, lambda: write(staging, tag), publish):
                together(stage, agree, rank, root, staging, tag)
        except KeyboardInterrupt:
            # A user's Ctrl-C, unlike a kill, leaves this process the moment to take its half-written folder away.
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return root / tag


def _publish(root: Path, staging: Path, tag: str, step: int, trained_with: dict | None) -> None:
    final, moved = root / tag, root / f"{REPLACED}{tag}"
    write_manifest(staging / tag, step, trained_with)
    if final.exists():  # the same step saved again, e.g. a resumed run that had nothing left to do
        shutil.rmtree(moved, ignore_errors=True)  # left by a kill before the rmtree below
        os.rename(final, moved)
    os.rename(staging / tag, final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(moved, ignore_errors=True)
    for old in complete(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


# A rank's vote that a Ctrl-C stopped its stage (a failure's vote is its errno or its error's "Type: message").
INTERRUPTED = "interrupted (SIGINT)"


def together(stage: Callable[[], None], agree: Agreement, rank: int, root: Path, staging: Path | None,
             tag: str) -> None:
    """Run ``stage``, then learn with every rank whether it failed on any: if so, rank 0 removes ``staging`` (what it
    was writing ``tag`` into, in ``root``) and every rank raises, for a storage failure the first failing rank's one
    line, for a Ctrl-C KeyboardInterrupt, else that rank its own error and the others an OSError naming it (a rank
    that left alone would keep the others waiting at the next collective)."""
    failed, outcome = None, None
    try:
        stage()
    except KeyboardInterrupt as exc:  # one rank's Ctrl-C: the others, waiting at the vote, stop with it (exit 130)
        failed, outcome = exc, (agree.rank, None, INTERRUPTED, str(root))
    except Exception as exc:  # noqa: BLE001 - voted on; a rank's own bug re-raised below
        code = storage_code(exc, root)
        named = f"{tag} on rank {agree.rank}" if agree.world > 1 else tag
        outcome = (agree.rank, code, storage_error(code, root, named).strerror if code else f"{type(exc).__name__}: "
                   f"{exc}", str(root))
        failed = None if code else exc
    if outcome is not None:
        # Outside the except: the failed write's frames (and its open file, whose blocks a deleted file keeps) are
        # gone, so rank 0's removal of the half-written folder frees its space for the ranks' error reports.
        gc.collect()
    first = next(filter(None, agree.votes(outcome)), None)
    if first is None:
        return
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    # Once more together: a full disk has room for every rank's error report only once rank 0 freed the folder.
    agree.votes(None)
    who, code, line, where = first
    if code:
        raise StorageError(code, line, where)
    if failed is not None:
        raise failed
    if line == INTERRUPTED:
        raise KeyboardInterrupt
    raise OSError(errno.ECANCELED, f"rank {who} could not write its share of checkpoint {tag} ({line})", where)


@dataclass(frozen=True)
class Agreement:
    """The ranks of ``group`` (None: this process alone) writing one checkpoint: their barriers are votes, so that a
    rank whose share could not be written meets the others at the next one and all give up there together
    (DeepSpeed's save is a collective: a rank that left it alone would keep the others waiting in it)."""

    group: Any

    @classmethod
    def of_every_rank(cls) -> Agreement:
        return cls(dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    def votes(self, mine: object) -> list:
        """Every rank's ``mine``, by its rank in the group."""
        return gathered(mine, self.world, self.group)


def check_loadable(folder: Path, backend: str, ds_config: dict | None) -> None:
    """Refuse, before anything is built or loaded, a checkpoint of the other backend family, or DeepSpeed's of a ZeRO
    stage or precision that ``ds_config``, the run's, cannot load (hpc.dsconfig.check_resume)."""
    # dp and ddp share the trainer's own file, DeepSpeed has its own.
    wrote = "dp/ddp" if (Path(folder) / TRAINER_FILE).exists() else "deepspeed"
    if wrote != ("dp/ddp" if ds_config is None else "deepspeed"):
        raise CheckpointError(f"{folder} was written by {wrote}, which --backend {backend} cannot load; resume with "
                              "the backend that wrote it, or pass another --run-dir")
    if ds_config is not None:
        dsconfig.check_resume(recorded(folder), ds_config, folder)


def regrouped(saved_world: int | None, world: int, global_batch: int) -> str:
    """What a resume on another number of ranks says (an elastic relaunch after a lost node, --elastic): the
    global batch, and so every step's samples and the losses, stay as they were."""
    if saved_world is None or saved_world == world:
        return ""
    return (f"; elastic: {world} rank(s), was {saved_world}: the global batch {global_batch} kept, "
            f"{global_batch // world} a rank")


def rng_state() -> dict:
    kind, keys, *rest = np.random.get_state()
    # numpy's state as plain numbers: loadable by the weights-only unpickler of every torch version.
    state = {"torch": torch.get_rng_state(), "numpy": (kind, keys.tolist(), *rest), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, rank: int | str) -> Path:
    return Path(folder) / f"rng-rank{rank}.pt"


class CheckpointError(ValueError):
    """A checkpoint this run cannot load: a file that is not the trainer's own data (tensors, numbers, text), or the
    other backend family's, or another model's; one line."""


def _earlier_numpy_state() -> list:
    """What an RNG file written before rng_state's plain numbers holds besides: numpy's uint32 array."""
    keys = np.random.get_state()[1]
    return [np.ndarray, np.dtype, type(keys.dtype), keys.__reduce__()[0]]


def load(path: Path, allowed: tuple = (), *, mmap: bool = False) -> dict:
    """A checkpoint file as data: the weights-only unpickler calls nothing a file names but ``allowed`` classes, so a
    planted or foreign checkpoint cannot run code in the job (``mmap``: tensors stay on disk, for a check)."""
    try:
        with torch.serialization.safe_globals([*_earlier_numpy_state(), *allowed]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - a foreign file fails inside the unpickler in many ways
        raise CheckpointError(f"checkpoint file {path} holds more than tensors, numbers and text "
                              f"({type(exc).__name__}), so it is not one this trainer wrote and is not loaded: move "
                              "its folder away to resume from the one before, or resume in another --run-dir") from None


def deepspeed_foreign(folder: Path, rank: int | None) -> str | None:
    """Why DeepSpeed's files in ``folder`` must not be loaded, or None: DeepSpeed unpickles them with
    weights_only=False, which calls whatever a planted file names, so each is first read as data naming only
    DeepSpeed's own record classes. Rank ``rank`` reads the files it loads; None reads all (a regrouping does)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for path in sorted(Path(folder).glob("*.pt")):
        owner = re.search(r"pp_rank_(\d+)_", path.name)
        if path.match(rng_file(folder, "*").name) or (rank is not None and owner and int(owner[1]) != rank):
            continue
        try:
            load(path, (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address), mmap=True)
        except CheckpointError as exc:
            return str(exc)
    return None
