"""What a waiter, ``status`` and ``list`` show of a job while it runs: progress, stale ranks, stragglers.

    follower = Follower(record, sys.stdout)      # submit --wait: a bar on a terminal, plain lines in a pipe
    follower.poll(); ...; follower.finish(waited_s)
    beats = Pace(every_s=2.0).read(lambda: monitor.read_heartbeats(run_dir))   # None until a read is due
    status_lines(record, ended=False)            # "progress: step 40/100 ...", "stale: rank 3 ..."
    list_cells(record)                           # ("1", "40/100", "812") for hpcdist list
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable, TextIO, TypeVar

from hpc import jobfiles, monitor, progress, registry, telemetry, vocab

# A waiter (submit --wait, watch) spends at most this share of its time reading heartbeats: at 4,096 nodes x 8 a
# read takes about a second, which at a poll a second would keep a login node's core busy for each waiting user.
READ_SHARE = 0.1
T = TypeVar("T")


class Pace:
    """When a waiter reads the node files again: ``every_s`` after its last read began, or later when reads are
    slow, so that reading takes at most READ_SHARE of its time."""

    def __init__(self, every_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.read_at = self.next_at = float("-inf")

    def read(self, reader: Callable[[], T]) -> T | None:
        """``reader()``'s answer when a read is due (``read_at``: when it began), else None."""
        started = self.clock()
        if started < self.next_at:
            return None
        value = reader()
        self.read_at, self.next_at = started, started + max(self.every_s, (self.clock() - started) / READ_SHARE)
        return value


class Follower:
    """Shows a waited-for job's progress: a bar redrawn in place on a terminal, plain lines in a pipe."""

    def __init__(self, record: registry.Record, out: TextIO, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record, self.out = record, out
        self.tty = out.isatty() if tty is None else tty
        self.last: progress.Progress | None = None
        self.last_at = 0.0
        self.drawn = False
        self.watch = monitor.Watch()
        self.stragglers: list[dict[str, Any]] = []
        self.pace = Pace(clock=clock)

    def poll(self, *_: Any) -> None:
        try:
            rdir = telemetry.run_dir(self.record)
        except registry.JobError:  # a linked run/ shows no progress; the wait goes on
            return
        beats = self.pace.read(lambda: monitor.read_heartbeats(rdir))
        if beats is None:
            return
        tick, now = self.pace.read_at, time.time()
        self.watch.see(beats, now)
        board = monitor.judge(beats, now, progress_at=self.watch.progress_at, polled=self.watch.polled)
        if any(v.beat.phase == "train" for v in board.ranks):
            self.stragglers = [monitor.straggler_json(v) for v in board.stragglers]
        current = progress.of(beats, None if beats else telemetry.last_metric(rdir / vocab.METRICS))
        if current is None:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r" + progress.bar(current, width) + "\x1b[K")
            self.out.flush()
            self.drawn = True
        elif progress.changed(self.last, current, tick - self.last_at):
            self.out.write(progress.line(current) + "\n")
            self.out.flush()
            self.last_at = tick
        self.last = current

    def finish(self, waited_s: float) -> None:
        if self.drawn:
            self.out.write("\n")
        try:
            rdir = telemetry.run_dir(self.record)
        except registry.JobError as exc:
            self.out.write(f"hpcdist: {exc}\n")
            return
        histories = telemetry.histories_of(rdir)
        found = monitor.run_stragglers(histories) if histories else self.stragglers
        summary = jobfiles.json_object(rdir / vocab.SUMMARY)
        for text in progress.summary(summary, telemetry.attempts_of(self.record), found, waited_s):
            self.out.write(text + "\n")
        self.out.flush()


def status_lines(record: registry.Record, ended: bool = False, seen: telemetry.Seen | None = None) -> list[str]:
    """What ``status`` adds for a job with heartbeats: rank 0's progress, and any straggler; while it runs
    any stale rank, once it ``ended`` how its ranks last reported (a heartbeat stops with its process).
    ``seen``: telemetry.seen_of(record), when the caller has read it already."""
    rdir = telemetry.run_dir(record)
    seen = seen or telemetry.seen_of(record)  # read once: at 4,096 nodes each read of the node files costs ~0.8 s
    beats = seen.beats
    out = []
    current = progress.of(beats, None if beats else telemetry.last_metric(rdir / vocab.METRICS))
    if current is not None:
        out.append("progress: " + progress.line(current))
    board = None
    if ended:
        out += [line for line in [monitor.ending_line(beats)] if line]
    else:
        board = monitor.judge(beats, time.time(), histories=seen.histories)
        out += [line for line in monitor.straggler_lines(board) if line.startswith("stale")]
    out += progress.summary(None, stragglers=telemetry.stragglers_of(record, seen, board))
    return out


def list_cells(record: registry.Record) -> tuple[str, str, str]:
    """(attempt, step/total, images/s) for ``hpcdist list``; "-" where the job has no heartbeat yet or its run/ is
    a link (one job's refusal must not end the list)."""
    try:
        current = progress.of(monitor.read_heartbeats(telemetry.run_dir(record)))
    except registry.JobError:
        current = None
    if current is None:
        return "-", "-", "-"
    rate = f"{current.images_per_s:.0f}" if current.images_per_s is not None else "-"
    return str(current.attempt), progress.step_text(current).removeprefix("step "), rate

