"""Turn SIGUSR1/SIGTERM into a flag from the first moment, and agree on stop/checkpoint votes one step late.

A user's Ctrl-C (SIGINT) stays an interrupt (``KeyboardInterrupt``), taken once: it stops the run, which is no
failure of it, so ``train/__main__.py`` ends it in one line, exit 130, its heartbeat ``stopped``, no rank error.

Importing this module installs flag-only handlers, so ``train/__main__.py`` imports it before torch: a
signal during torch's import, the rendezvous or DeepSpeed's set-up is remembered, not fatal. Slurm's
``--signal=USR1@120`` and a time limit's SIGTERM both mean "checkpoint, then exit 75".

The per-step vote ``[stop, due]`` (due: SNAPSHOT or CHECKPOINT by rank 0's clocks) is all-reduced (MAX)
asynchronously after each step and read one step later, so no rank ever waits for its device to drain: on
GPUs the result reaches pinned host memory behind a CUDA event of the previous step. Every rank reads the
same reduced vote at the same step, so all of them checkpoint (or snapshot) at the same step, and resuming
stays exact.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Callable, Iterator

from hpc.vocab import CHECKPOINT_SIGNALS, EXIT_INTERRUPTED

SIGNALS = tuple(signal.Signals["SIG" + name] for name in CHECKPOINT_SIGNALS)
SNAPSHOT, CHECKPOINT = 1, 2  # what a step vote can call for; the larger is the stronger
_received: list[int] = []


def _note(signum, frame) -> None:
    # Only a flag: the step in flight finishes, then every rank checkpoints at the same step.
    _received.append(signum)


def _interrupt(signum, frame) -> None:
    # Once: a second Ctrl-C would cut short the clean-up the first unwinds through (a checkpoint's staging
    # folder, the final heartbeat), leaving it half done and a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def install(interrupt: bool = False) -> dict:
    """Flag-only handlers for SIGUSR1 and SIGTERM, and with ``interrupt`` (the trainer's main, not whoever imports
    this module) a Ctrl-C taken once; returns the handlers found, SIGINT's included, for ``restore``."""
    found = {sig: signal.signal(sig, _note) for sig in SIGNALS}
    found[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    if interrupt and found[signal.SIGINT] is not signal.SIG_IGN:  # a background job's SIGINT stays ignored
        signal.signal(signal.SIGINT, _interrupt)
    return found


_ORIGINAL = install()


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """The trainer's imports: a Ctrl-C in the seconds torch takes to import ends the process as one after them does
    (``train/__main__.py``), in one line with exit 130, not a traceback; nothing is written yet to clean up."""
    try:
        yield
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # taken once, as _interrupt does
        print(f"hpcdist-train: interrupted (SIGINT) while starting, exit {EXIT_INTERRUPTED}: nothing was trained yet",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def received() -> int | None:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


def restore() -> None:
    """Put back the handlers found before this module was imported, so a caller keeps its own, and clear the flag
    (a notebook running train.main twice)."""
    _received.clear()
    for sig, handler in _ORIGINAL.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a worker must outlive its rank's checkpoint, so it ignores stop signals
    (srun signals every process of the step; a worker dying first would break the rank's next batch)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def blocked_while_forking():
    """Hold stop signals pending while DataLoader workers fork: a child inherits the mask, so a signal
    cannot reach a worker before ``ignore_in_worker`` ran; the parent gets its pending ones afterwards."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class WallClock:
    """Rank 0's "a checkpoint (or snapshot) is due" by wall time: True once ``every_s`` passed since the last
    save, then False until ``saved()`` (the vote is read a step later, so it must not be cast twice)."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.last, self.voted = clock(), False

    def due(self) -> bool:
        if self.every_s <= 0 or self.voted or self.clock() - self.last < self.every_s:
            return False
        self.voted = True
        return True

    def saved(self) -> None:
        self.last, self.voted = self.clock(), False


class Agreement:
    """All ranks' ``[stop, due]`` votes, MAX-reduced; ``exchange`` posts this step's and returns the previous
    step's result. ``due`` is what rank 0's clocks call for (0 nothing, SNAPSHOT, CHECKPOINT): the maximum is the
    stronger. One process needs no collective and answers at once."""

    def __init__(self, world_size: int, device, waited: Callable[[], contextlib.AbstractContextManager] | None = None):
        import torch

        self.world_size, self.device = world_size, device
        self.waited = waited or contextlib.nullcontext
        self.cuda = device.type == "cuda"
        self.slots = [torch.zeros(2, device=device) for _ in range(2)]
        if self.cuda:
            self.pinned_in = [torch.zeros(2).pin_memory() for _ in range(2)]
            self.pinned_out = [torch.zeros(2).pin_memory() for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
        self.slot, self.pending = 0, None

    def exchange(self, stop: bool, due: int) -> tuple[bool, int]:
        if self.world_size == 1:
            return stop, due
        previous = self._collect()
        self._post(stop, due)
        return previous

    def now(self, stop: bool, due: int = 0) -> tuple[bool, int]:
        """Agree at once, waiting for the result (set-up and the end of training, never per step)."""
        earlier = self.exchange(stop, due)
        current = self._collect()
        return earlier[0] or current[0], max(earlier[1], current[1])

    def drain(self) -> tuple[bool, int]:
        """The outstanding vote's result, so no all-reduce is left in flight before other collectives."""
        return self._collect()

    def _post(self, stop: bool, due: int) -> None:
        import torch.distributed as dist

        slot = self.slots[self.slot]
        if self.cuda:
            self.pinned_in[self.slot][0], self.pinned_in[self.slot][1] = float(stop), float(due)
            slot.copy_(self.pinned_in[self.slot], non_blocking=True)
            work = dist.all_reduce(slot, op=dist.ReduceOp.MAX, async_op=True)
            work.wait()  # NCCL: the current stream waits for the reduce; the host does not
            self.pinned_out[self.slot].copy_(slot, non_blocking=True)
            self.events[self.slot].record()
            self.pending = (self.slot, None)
        else:
            slot[0], slot[1] = float(stop), float(due)
            self.pending = (self.slot, dist.all_reduce(slot, op=dist.ReduceOp.MAX, async_op=True))
        self.slot ^= 1

    def _collect(self) -> tuple[bool, int]:
        if self.pending is None:
            return False, 0
        index, work = self.pending
        self.pending = None
        if self.cuda:
            # Waits for the previous step only; this step's kernels are queued behind the event.
            self.events[index].synchronize()
            values = self.pinned_out[index]
        else:
            with self.waited():
                work.wait()
            values = self.slots[index]
        return bool(values[0] > 0), int(values[1])
