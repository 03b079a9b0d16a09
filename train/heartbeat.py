"""Hand this rank's heartbeat (docs/CONTRACTS.md, contract 1) to its node: phase, progress, step-time split, memory.

    beat = Heartbeat(run_dir, every_s=2.0, marks={"process_start": t0})
    beat.identify(env, os.environ)                 # beats flow from here on
    beat.plan(total_steps=..., local_batch=...)
    beat.phase("train"); clock.begin()
    ...; beat.stepped(step, loss)   # per step: a few attribute stores, no I/O, no device sync
    beat.finish("done")

A daemon thread hands the beat over in node-local storage every ``every_s`` seconds and at every phase
change; the node's local rank 0 publishes its node's beats as one file on the run directory at most once
per ``every_s`` (train/nodebeat.py, hpc/beatfile.py), so the shared file system sees one writer per node.
A beat's ``time`` says its process is alive while ``step``/``step_at`` say it progresses. ``loss`` is this
rank's loss at its newest step: the step hands over its (detached) loss tensor and the daemon thread reads
its value when it writes, so on a GPU the training thread never waits for it; the writer waits for at most
the step in flight.

Step time split. ``comm_s`` is the time this rank's training thread spent waiting for collectives in a
step, as seen from the host: the trainer's own collectives (the one-step-late preemption flag, the loss
mean at log steps) plus, for DDP, the backward's tail, from the moment the last gradient bucket was
handed to the all-reduce until the last all-reduce finished (what the backward then waits for; the
overlapped part is not waiting; CPU/gloo only). DeepSpeed's own reductions inside ``engine.backward/step``
are counted as compute. On GPUs the times are host times taken without any device synchronisation, so
queued device work is not seen and ``comm_s`` is the host's waits only; the one-step-late vote keeps the
host at most a step ahead of the device, so ``step_time_s`` is the device's pace in steady state.
``compute_s`` is the rest of the step (data, forward, backward, optimizer). Both are medians over the
last ``WINDOW`` steps; ``recent_compute_s`` is the ring's newest ``beatfile.RING``, for straggler detection from
one snapshot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Mapping

from hpc import beatfile, ranks, vocab
from train import nodebeat

WINDOW = 16
SETTLE_S = 10.0  # the most local rank 0 waits at its end for its node's other ranks to hand over their last beat


def read_all(run_dir: Path, stage: Path | None = None) -> dict[int, dict]:
    """Every rank's newest beat by rank, each with ``published``: when its node's file was last written. The
    beats handed over on this node (``stage``) are newer than the node file and override it."""
    found = {}
    for document in beatfile.read_latest(run_dir).values():
        for beat in beatfile.beats_of(document):
            if isinstance(beat.get("rank"), int):
                found[beat["rank"]] = {**beat, "published": document.get("time")}
    for rank, beat in (nodebeat.staged(stage) if stage is not None else {}).items():
        found[rank] = {**beat, "published": beat.get("time")}
    return found


def rss_bytes() -> int:
    """Resident set size from /proc (one small read, no syscalls into torch); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StepClock:
    """Per-step wall time split into compute and time spent waiting in collectives (see the module doc)."""

    def __init__(self, window: int = WINDOW, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.step_times: deque[float] = deque(maxlen=window)
        self.comm_times: deque[float] = deque(maxlen=window)
        self.compute_times: deque[float] = deque(maxlen=window)
        self._last_end: float | None = None
        self._comm = 0.0
        # DDP bucket all-reduces of the step in flight: when the last was launched and when the last finished.
        self._launched = self._finished = None

    def begin(self) -> None:
        self._last_end, self._comm, self._launched, self._finished = self.clock(), 0.0, None, None

    @contextlib.contextmanager
    def waited(self):
        """``with clock.waited(): work.wait()`` counts the block's time as communication."""
        started = self.clock()
        try:
            yield
        finally:
            self._comm += self.clock() - started

    def bucket_launched(self) -> None:
        self._launched = self.clock()

    def bucket_finished(self) -> None:
        self._finished = self.clock()

    def end_step(self) -> None:
        now = self.clock()
        if self._last_end is None:
            self._last_end = now
            return
        comm = self._comm
        if self._launched is not None and self._finished is not None:
            comm += max(self._finished - self._launched, 0.0)
        total = now - self._last_end
        comm = min(comm, total)
        self.step_times.append(total)
        self.comm_times.append(comm)
        self.compute_times.append(total - comm)
        self._last_end, self._comm, self._launched, self._finished = now, 0.0, None, None

    def summary(self) -> dict:
        def median(values):
            return round(statistics.median(values), 6) if values else None
        return {"step_time_s": median(list(self.step_times)), "compute_s": median(list(self.compute_times)),
                "comm_s": median(list(self.comm_times)),
                "recent_compute_s": [round(v, 6) for v in list(self.compute_times)[-beatfile.RING:]]}


class Heartbeat:
    """This rank's heartbeat; ``every_s`` 0 turns heartbeats off (nothing is written, no thread runs)."""

    def __init__(self, run_dir: Path, *, every_s: float = 2.0, marks: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.run_dir, self.every_s, self.now = Path(run_dir), every_s, clock
        self.step_clock = StepClock()
        self.marks = dict(marks or {})
        self.peak_memory: Callable[[], int] = lambda: 0  # the trainer's, once its device is known
        self.identity: dict | None = None
        self.phase_name, self.step, self.step_at, self.loss = "setup", 0, None, None  # loss: a 0-dim tensor
        self.total_steps = self.local_batch = self.start_step = self.snapshot_step = None
        self.stage: Path | None = None                       # the node-local hand-over folder
        self.publisher: nodebeat.Publisher | None = None     # local rank 0's: the node's files on the run dir
        self.published_at = float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stoppers: list[Callable[[], None]] = []

    @property
    def enabled(self) -> bool:
        return self.every_s > 0

    def identify(self, env, environ: Mapping[str, str], *, hostname: str | None = None) -> None:
        """Name this rank (``env`` is hpc.ranks.DistEnv) and start beating: the setup phase shows from here."""
        self.identity = {"rank": env.rank, "local_rank": env.local_rank, "node_rank": env.node_rank,
                         "world_size": env.world_size, "hostname": hostname or socket.gethostname(),
                         "pid": os.getpid(), "attempt": ranks.attempt_of(environ)}
        if not self.enabled:
            return
        self.stage = nodebeat.claim(nodebeat.stage_dir(self.run_dir, environ, env.node_rank, self.identity["attempt"]))
        if env.local_rank == 0:
            self.publisher = nodebeat.Publisher(self.run_dir, env.node_rank)
        self.write()
        self._thread = threading.Thread(target=self._beat, name="hpcdist-heartbeat", daemon=True)
        self._thread.start()

    def plan(self, *, total_steps: int, local_batch: int, step: int = 0) -> None:
        self.total_steps, self.local_batch, self.step, self.start_step = total_steps, local_batch, step, step

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, self.now() if at is None else at)

    def phase(self, name: str) -> None:
        if name not in vocab.PHASES:
            raise ValueError(f"unknown heartbeat phase {name!r}; one of {', '.join(vocab.PHASES)}")
        if name == self.phase_name:
            return
        self.phase_name = name
        self.step_at = self.now()  # a phase change is progress too: a long checkpoint write is not a hang
        # Local rank 0 publishes its own phase change at once, so that it reaches the node's history even
        # between two publishes (a checkpoint shorter than a beat): a write and an fdatasync per change, no
        # namespace operation. Another rank's change waits for the next publish, as its beats do.
        self.write(force=True)

    def snapshot_written(self, step: int) -> None:
        """The node's snapshot writer finished one: published at once, since the batch side reads from the node's
        file where a relaunch will resume (one write and an fdatasync a snapshot, no namespace operation)."""
        self.snapshot_step = step
        self.write(force=True)

    def stepped(self, step: int, loss=None) -> None:
        """The hot path: called once per optimizer step, with the step's loss (a detached tensor, not read here)."""
        self.step_clock.end_step()
        self.step, self.step_at = step, self.now()
        if loss is not None:
            self.loss = loss

    def watch(self, watcher) -> None:
        """Start ``watcher`` (train.watchdog.Watchdog) with this heartbeat and stop it at ``finish``."""
        watcher.start()
        self._stoppers.append(watcher.stop)

    def finish(self, phase: str) -> None:
        for stop in self._stoppers:
            stop()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.phase(phase)
        if self.publisher is not None:
            # The node's last word: wait (bounded) until its other ranks handed over their own final beat.
            settled = self._settle()
            self.write(force=True)
            self.publisher.close()
            if settled and self.stage is not None:
                nodebeat.clear(self.stage)

    def _settle(self) -> bool:
        deadline = time.monotonic() + min(2 * self.every_s, SETTLE_S)
        while True:
            now = self.now()
            beats = nodebeat.staged(self.stage) if self.stage is not None else {}
            if all(b.get("phase") in vocab.FINAL_PHASES or now - (b.get("time") or 0) > 3 * self.every_s
                   for b in beats.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.every_s / 4, 0.2))

    def snapshot(self) -> dict:
        split = self.step_clock.summary()
        step_time = split["step_time_s"]
        values = dict(self.identity or {}, phase=self.phase_name, step=self.step, start_step=self.start_step,
                      total_steps=self.total_steps, time=round(self.now(), 3), step_at=self.step_at, **split,
                      images_per_s=(round(self.local_batch / step_time, 1)
                                    if step_time and self.local_batch else None),
                      loss=None if self.loss is None else float(self.loss),
                      rss_bytes=rss_bytes(), peak_memory_bytes=self.peak_memory(), marks=dict(self.marks),
                      snapshot_step=self.snapshot_step)
        # The schema is hpc.beatfile's: every field, in its order (a rank not yet identified has no identity).
        return {k: values[k] for k in beatfile.FIELDS if k in values}

    def write(self, force: bool = False) -> None:
        """Hand this beat over on the node; local rank 0 then publishes the node's, at most once per ``every_s``."""
        if self.stage is None:
            return  # not identified, or heartbeats off
        with self._lock:
            beat = self.snapshot()
            try:
                nodebeat.stage(self.stage, beat)
                if self.publisher is not None and (force or beat["time"] - self.published_at >= self.every_s):
                    self.publisher.publish(self.identity["hostname"], self.identity["attempt"], beat["time"],
                                           nodebeat.staged(self.stage))
                    self.published_at = beat["time"]
            except OSError:
                return  # a full or vanished disk must not stop training; the beat's age will tell

    def _beat(self) -> None:
        while True:
            due = self.every_s if self.publisher is None else self.published_at + self.every_s - self.now()
            if self._stop.wait(min(max(due, 0.01), self.every_s)):
                return
            self.write()


def time_ddp_buckets(net, clock: StepClock) -> None:
    """Have a CPU DDP module report its bucket all-reduces to ``clock``; nothing is done for any other.

    The hook is torch's default all-reduce (divide by the world size, sum) with two timestamps around it,
    so gradients are bitwise what the built-in reducer gives. On GPUs NCCL's futures complete on the
    stream, not on the host, so host timestamps would say nothing there: DDP keeps its C++ reducer path.
    """
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(net, DistributedDataParallel) or net.device_type == "cuda":
        return

    def timed_allreduce(state, bucket):
        clock.bucket_launched()

        def finished(fut):
            clock.bucket_finished()
            return fut.value()[0]

        return allreduce_hook(state, bucket).then(finished)

    net.register_comm_hook(dist.group.WORLD, timed_allreduce)
