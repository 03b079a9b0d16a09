"""Keep DeepSpeed's partitioned state in node memory with a copy of each node's part on the next node, and turn
the newest complete one into a disk checkpoint when a relaunch resumes.

    parts = dssnapshot.open_parts(folder, node=..., local_rank=..., fresh=..., on_written=..., persist=...)
    parts.take(step, lambda save_dir, tag: engine.write(save_dir, tag, rank, dict(state)), engine.trained_with)
    found, source = dssnapshot.assemble(parts, run.checkpoints, rank, world, found, config)  # every rank, at a resume

A ZeRO rank's optimizer partition (and under ZeRO-3 its parameters) exists nowhere else, so unlike dp/ddp no node
holds the whole state: each node keeps its own ranks' files, as DeepSpeed's ``save_checkpoint`` writes them, in
``part-I-of-N/stepNNNNNNNN/`` of its snapshot folder (train/snapshot.py's ``store_dir``), and its local rank 0 sends
them to the next node's (a ring over a gloo group of the nodes' local ranks 0), which keeps them as its own
``part-(I-1)-of-N``. Any one node's death leaves every part on the others. At a resume the ranks agree on the newest
step whose N parts all verify somewhere; the holders copy them into one checkpoint in the run directory, published
as any other, which every rank then loads as it loads a disk checkpoint (on fewer ranks through the universal
conversion). Training waits while its node's part is written into tmpfs (DeepSpeed's save, timed into ``stall_s``,
which ``hpcdist bench`` checks against its 2% target; ``spaced`` keeps the snapshots far enough apart to meet it);
the part is handed to the next node in a thread, and a snapshot due while one is still on its way is skipped.
Every ``--persist-every-s`` each node's local rank 0 also copies its part to ``checkpoints/.parts/`` in a thread, the
same step on every node (decided in the snapshot's vote): what a new job resumes from when the allocation and its
nodes' memory are gone (the batch host died).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from hpc import dsconfig, fileio
from hpc.checkpoints import (
    MANIFEST,
    NAME,
    PART,
    PARTS,
    complete,
    held_in,
    inside,
    name_for,
    newest_whole,
    recorded,
    size,
)
from train import checkpoint
from train.runtime import gathered

# Free memory a node keeps for other uses beyond two parts: a snapshot that would eat into it is not taken.
HEADROOM = 256 << 20
# Training waits while a part is written and sent: by default snapshots are spaced so that the waits stay under this
# share of the time (bench's target is 2%; here half of it, since the rate varies).
STALL_SHARE = 0.01


class Parts:
    """This rank's view of its node's DeepSpeed snapshots; the node's local rank 0 writes the folders."""

    def __init__(self, folder: Path, *, node: int, nodes: int, leaders: list[int], local_rank: int,
                 group, on_written: Callable[[int], None] = lambda step: None, persist=None,
                 say: Callable[[str], None] = lambda line: print(f"warning: {line}", file=sys.stderr, flush=True)):
        self.folder, self.node, self.nodes, self.leaders = Path(folder), node, nodes, leaders
        self.leader, self.group, self.on_written, self.say = local_rank == 0, group, on_written, say
        self.taken, self.skipped, self.stall_s, self.last_s, self.stopped = 0, 0, 0.0, 0.0, False
        # train.snapshot.Persist: every ``every_s`` the node's local rank 0 copies its part to ``root``/PARTS.
        self.on_disk = Path(persist.root) / PARTS if persist is not None else None
        self.persist = persist if self.leader and persist is not None and persist.every_s > 0 else None
        # The first part is persisted at once: a run that loses its allocation in its first minute loses seconds.
        self._persisted_at, self._persisting = float("-inf"), None
        # The local rank 0's thread handing its newest part round the ring; what broke it, for the next vote.
        self._handing: threading.Thread | None = None
        self._broken = ""

    def part(self, node: int) -> Path:
        return self.folder / PART.format(node, self.nodes)

    def take(self, step: int, write: Callable[[Path, str], None], trained_with: dict | None = None) -> None:
        """Every rank: write this node's part (DeepSpeed's collective save into tmpfs, the only wait); the nodes'
        local ranks 0 then hand it round the ring in a thread while training goes on. Skipped on every rank alike
        while a node still hands on the one before, and stopped for good, on every rank alike, when a node lacks the
        memory for another or a rank could not write its share."""
        if self.stopped:
            return
        began = time.perf_counter()
        room, idle, persist = self._vote()
        if not room:
            return self._stop(f"a node has too little free memory in {self.folder.parent} for another, or its "
                              f"folder is not this user's alone{self._broken}")
        if not idle:
            self.skipped += 1
            return
        try:  # a failure on any rank (node memory ran out, or a quota) is raised on every rank alike
            checkpoint.save(self.part(self.node), step, rank=0 if self.leader else 1, write=write,
                            agree=checkpoint.Agreement(self.group.every if self.group is not None else None),
                            trained_with=trained_with)
        except (OSError, RuntimeError) as exc:
            # Only the failing rank's node may know its folder: the vote's errors name it.
            where = getattr(exc, "filename", None) or self.folder
            return self._stop(f"{checkpoint.reason(exc)} writing a snapshot in {where}")
        self.last_s = time.perf_counter() - began
        self.stall_s, self.taken = self.stall_s + self.last_s, self.taken + 1
        if self.leader:
            self._handing = threading.Thread(target=self._hand_on, args=(step, persist),
                                             name="hpcdist-snapshot-ring", daemon=True)
            self._handing.start()

    def _stop(self, why: str) -> None:
        # Every rank stops at the same vote and says so: only a node's own ranks may know why its memory failed.
        self.stopped = True
        self.say(f"snapshots stopped: {why}; resumes use the disk checkpoints")

    def spaced(self, every_s: float) -> float:
        """Seconds to the next snapshot: ``every_s``, or more when the last one's wait was over STALL_SHARE of it."""
        return max(every_s, self.last_s / STALL_SHARE)

    def offer(self) -> dict[str, list[int]]:
        """Part name -> the steps of it this node holds whole; nothing unless the node's local rank 0 and its folder
        is this user's own."""
        return held_in(self.folder) if self.leader and fileio.is_private(self.folder) else {}

    def forget_after(self, step: int) -> None:
        """The node's local rank 0 removes the parts of steps after ``step``, where a relaunch resumed, from its memory
        (node 0's also from the run directory): they belong to a run that did not go on, and the new one's parts of
        the same steps must never meet them."""
        if not self.leader:
            return
        folders = [self.folder] if fileio.is_private(self.folder) else []
        folders += [self.on_disk] if self.node == 0 and self.on_disk is not None else []
        for part in (p for folder in folders for p in parts_in(folder)):
            for held in complete(part):
                if int(NAME.fullmatch(held.name).group(1)) > step:
                    shutil.rmtree(held, ignore_errors=True)

    def clear(self) -> None:
        """The node's local rank 0 removes the parts it wrote in memory and the folder if that empties it, and node 0's
        the parts persisted in the run directory: at a fresh start, and at the run's end, when a checkpoint on disk
        holds everything the parts did."""
        if not self.leader:
            return
        folders = [self.on_disk] if self.node == 0 and self.on_disk is not None else []
        for folder in folders + ([self.folder] if fileio.is_private(self.folder) else []):
            # Only the parts the nodes wrote: anything else someone put in the folder stays, and so does the folder.
            for part in parts_in(folder):
                shutil.rmtree(part, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.rmdir()

    def drop(self) -> None:
        """Every rank, at the run's end: once no node is still handing on or persisting a part, clear."""
        if self._handing is not None:
            self._handing.join()
        if self._persisting is not None:  # read after the hand-on ended: it may have started one
            self._persisting.join()
        if self.group is not None and self.group.every is not None:
            dist.barrier(group=self.group.every)
        self.clear()

    def _persist_due(self) -> bool:
        """This node's say in the vote: its period has passed and its last part is on disk."""
        busy = self._persisting is not None and self._persisting.is_alive()
        return self.persist is not None and not busy and time.monotonic() - self._persisted_at >= self.persist.every_s

    def _start_persist(self, step: int) -> None:
        self._persisted_at = time.monotonic()
        self._persisting = threading.Thread(target=self._persist, args=(step,), name="hpcdist-persist", daemon=True)
        self._persisting.start()

    def _persist(self, step: int) -> None:
        # A copy of the published part, while training goes on; a later snapshot may prune it meanwhile (then this
        # one is skipped), never change it.
        held = self.part(self.node) / name_for(step)
        try:
            # Real folders: pruning the KEEP newest through a link at .parts or its part would remove step folders
            # of some other run. A failed save has removed its staging folder itself (checkpoint.together).
            self.on_disk.parent.mkdir(parents=True, exist_ok=True)  # checkpoints/, which may be a link of the user's
            into = fileio.folder(self.on_disk.parent, self.on_disk.name, self.part(self.node).name)
            checkpoint.save(into, step, rank=0, write=lambda staging, tag: copy_part(held, staging / tag),
                            trained_with=recorded(held))
        except OSError as exc:
            if held.is_dir():
                self.persist = None
                self.say(f"snapshot parts no longer persisted: {exc}; the loop's disk checkpoints go on")

    def _hand_on(self, step: int, persist: bool) -> None:
        # The ring's buffers go over the leaders' own gloo group, which nothing else uses while training goes on.
        try:
            if len(self.leaders) > 1:
                self._pass_on(step)
        except (OSError, ValueError) as exc:
            self._broken = f" (its part could not be handed on: {checkpoint.reason(exc)})"
            return
        self.on_written(step)
        if persist:
            self._start_persist(step)

    def _vote(self) -> tuple[bool, bool, bool]:
        """(every node has room and its part was handed on, no node still hands one on, every node is due to persist
        this one). Nodes that each persisted when their own clock said so would keep different steps, and KEEP of
        each may share none: the step a new job resumes from must be one every node persisted."""
        room = idle = due = 1.0
        if self.leader:
            newest = complete(self.part(self.node))
            need = 2 * (size(newest[-1]) if newest else 0) + HEADROOM
            try:
                room = float(not self._broken and fileio.private(self.folder) is not None
                             and shutil.disk_usage(self.folder).free >= need)
            except OSError:
                room = 0.0
            idle = float(self._handing is None or not self._handing.is_alive())
            due = float(self._persist_due())
        vote = torch.tensor([room, idle, due])
        dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group.every)
        return bool(vote[0].item()), bool(vote[1].item()), bool(vote[2].item())

    def _pass_on(self, step: int) -> None:
        mine = self.part(self.node) / name_for(step)
        received = unpack(exchange(pack(mine), self.leaders, self.group.leaders))
        before = (self.node - 1) % self.nodes

        def write(staging: Path, tag: str) -> None:
            for name, data in received.items():
                target = staging / tag / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

        # The previous node's part of the step was written by the same run as this node's, with the same config.
        checkpoint.save(self.part(before), step, rank=0, write=write, trained_with=recorded(mine))


def parts_in(folder: Path) -> list[Path]:
    """The part folders in ``folder``, where the folder and each part are real folders: what the nodes wrote, never
    what a link leads to."""
    if folder.is_symlink():
        return []
    return [part for part in folder.glob(PART.format("*", "*")) if not part.is_symlink()]


@dataclass(frozen=True)
class Groups:
    """The gloo groups a snapshot speaks over: every rank (a CPU vote even when training runs NCCL) and the
    nodes' local ranks 0 (the ring); None where there is no one else."""

    every: Any
    leaders: Any


def open_parts(folder: Path | None, *, node: int, local_rank: int, fresh: bool,
               on_written: Callable[[int], None], persist=None) -> Parts | None:
    """Every rank calls it (it makes groups, a collective); None where a node has no snapshot folder."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    places = gathered((node, local_rank, folder is not None), world)
    if not all(has for _, _, has in places):
        return None
    leaders = [rank for rank, (_, local, _) in sorted(enumerate(places), key=lambda x: x[1][0]) if local == 0]
    nodes = len(leaders)
    groups = Groups(dist.new_group(backend="gloo") if world > 1 else None,
                    dist.new_group(ranks=leaders, backend="gloo") if nodes > 1 else None)
    parts = Parts(folder, node=node, nodes=nodes, leaders=leaders, local_rank=local_rank, group=groups,
                  on_written=on_written, persist=persist)
    if fresh:
        parts.clear()
    return parts


def assemble(parts: Parts, root: Path, rank: int, world: int, found: Path | None,
             config: dict | None = None) -> tuple[Path | None, str]:
    """Every rank: the checkpoint to resume from and where its state was, ``(found, "")`` when the checkpoint on disk
    is the newest, else one made in ``root`` from the newest snapshot whose every part some node holds in memory
    or persisted (each part copied there by the lowest rank holding it in memory, else by rank 0 from the disk).
    Parts of later steps are forgotten: the run goes on from here. Refused first, touching nothing, where ``config``
    (the run's DeepSpeed config; None: not checked) cannot load the state it would go on from."""
    offers = gathered((parts.offer(), held_in(Path(root) / PARTS) if rank == 0 else {}), world)
    step, layout = newest_whole([offer for pair in offers for offer in pair])
    disk_step = int(NAME.fullmatch(found.name).group(1)) if found is not None else -1
    if step is None or step <= disk_step:
        if found is not None and config is not None:
            checkpoint.check_loadable(found, "deepspeed", config)
        parts.forget_after(max(disk_step, 0))
        return found, ""
    sources = {}
    for name in layout:
        holder = next((r for r, (memory, _) in enumerate(offers) if step in memory.get(name, ())), None)
        sources[name] = ((holder, parts.folder / name / name_for(step)) if holder is not None
                         else (0, Path(root) / PARTS / name / name_for(step)))
    # Each part's record is read where it is held: a node's memory is its own.
    mine = [(str(held), recorded(held)) for holder, held in sources.values() if holder == rank]
    where, saved = next(entry for entries in gathered(mine, world) for entry in entries)
    if config is not None:
        dsconfig.check_resume(saved, config, f"snapshot part {where}")
    parts.forget_after(step)

    def write(staging: Path, tag: str) -> None:
        for holder, held in sources.values():
            if holder == rank:
                copy_part(held, staging / tag)

    agree = checkpoint.Agreement.of_every_rank()
    made = checkpoint.save(root, step, rank=rank, write=write, agree=agree, trained_with=saved)
    in_memory = all(Path(root) not in held.parents for _, held in sources.values())
    return made, "node memory" if in_memory else "the parts its nodes persisted"


def copy_part(held: Path, into: Path) -> None:
    """The files of a published part into ``into`` (its manifest left out: where it goes gets its own)."""
    for path in held.rglob("*"):
        if path.is_file() and path.name != MANIFEST:
            target = into / path.relative_to(held)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def pack(folder: Path) -> bytes:
    """A checkpoint folder's files (its manifest left out: the receiver writes its own) as one buffer."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    header = json.dumps([[str(p.relative_to(folder)), p.stat().st_size] for p in files]).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *(p.read_bytes() for p in files)])


def unpack(blob: bytes) -> dict[str, bytes]:
    (length,) = struct.unpack_from("<Q", blob)
    files, at = {}, 8 + length
    for name, length_of in json.loads(blob[8:at]):
        if not inside(name):
            raise ValueError(f"a snapshot part names {name!r}, outside its folder")
        files[name], at = blob[at:at + length_of], at + length_of
    return files


def exchange(blob: bytes, leaders: list[int], group) -> bytes:
    """Send ``blob`` to the next node's local rank 0 and receive the previous one's, at once (no rank waits on
    another's send)."""
    me = leaders.index(dist.get_rank())
    after, before = leaders[(me + 1) % len(leaders)], leaders[(me - 1) % len(leaders)]
    sizes = torch.tensor([len(blob)], dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    for work in (dist.isend(sizes[0], after, group=group), dist.irecv(sizes[1], before, group=group)):
        work.wait()
    out, into = torch.frombuffer(bytearray(blob), dtype=torch.uint8), torch.empty(int(sizes[1]), dtype=torch.uint8)
    for work in (dist.isend(out, after, group=group), dist.irecv(into, before, group=group)):
        work.wait()
    return into.numpy().tobytes()

