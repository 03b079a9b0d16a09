"""Read what a job reports about itself (heartbeats, metrics, attempts, sacct's times) as plain values.

    board_of(record)          # the per-rank board behind `hpcdist top`
    seen = seen_of(record)    # the heartbeat files, read once for the readers below
    stragglers_of(record, seen)   # live while it trains, from the whole newest attempt after
    waterfalls(record, seen=seen) # each rank's start-up waterfall per attempt

The side-effect edge of top, timeline, report and the progress of submit --wait: these functions read the job
directory (and ask sacct); hpc.monitor, hpc.timeline, hpc.progress and hpc.report judge what they return.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hpc import beatfile, jobfiles, logs, monitor, registry, timeline, vocab
from hpc.failures import record as records
from hpc.slurm import commands, grammar


def run_dir(record: registry.Record) -> Path:
    """The job's run/; JobError where it is a symbolic link (logs.own_folder): top would show, and report chart,
    whatever run directory it points at, another user's included."""
    return logs.own_folder(record, vocab.RUN_DIR)


def last_metric(path: Path) -> dict[str, Any] | None:
    """The newest line of metrics.jsonl, reading only its end; a damaged last line leaves the one before."""
    rows = jobfiles.json_lines(jobfiles.tail_text(path, 65536))
    return rows[-1] if rows else None


def attempts_of(record: registry.Record) -> list[dict[str, Any]]:
    return records.load(Path(record.job_dir))


def sacct_attempts(record: registry.Record) -> list[dict[str, float | None]]:
    if record.via == "local" or not commands.available(os.environ, "sacct"):
        return []
    text = commands.sacct([record.job_id], timeline.SACCT_TIMES, duplicates=True)
    return timeline.parse_sacct_attempts(text, record.job_id) if text is not None else []


def histories_of(rdir: Path) -> dict[int, list[monitor.Heartbeat]]:
    """Every rank's heartbeat history up to monitor.HISTORY_NODES nodes; past that, rank 0's node's alone."""
    nodes = jobfiles.folder(beatfile.folder(rdir), "node-*.json", most=monitor.HISTORY_NODES + 1)
    return monitor.read_histories(rdir, (0,) if len(nodes) > monitor.HISTORY_NODES else None)


@dataclass(frozen=True)
class Seen:
    """The heartbeat files as one reader saw them: each rank's newest beat and the histories read. At 4,096
    nodes a read of them takes a second, so a report reads them once for all of its parts."""

    beats: Mapping[int, monitor.Heartbeat]
    histories: Mapping[int, list[monitor.Heartbeat]]


def seen_of(record: registry.Record) -> Seen:
    rdir = run_dir(record)
    return Seen(monitor.read_heartbeats(rdir), histories_of(rdir))


def board_of(record: registry.Record, now: float | None = None, watch: monitor.Watch | None = None) -> monitor.Board:
    rdir = run_dir(record)
    beats = monitor.read_heartbeats(rdir)
    if watch is not None:
        watch.see(beats, now or time.time())
    return monitor.judge(beats, now or time.time(), histories=histories_of(rdir),
                         progress_at=watch.progress_at if watch else None, polled=watch.polled if watch else None)


def stragglers_of(record: registry.Record, seen: Seen | None = None,
                  board: monitor.Board | None = None) -> list[dict[str, Any]]:
    """The job's stragglers: while it trains, the live board's (its last few heartbeats; ``board``: that board,
    when the caller judged it already); after, the whole newest attempt's from the ranks' heartbeat histories."""
    seen = seen or seen_of(record)
    beats, histories = seen.beats, seen.histories
    current = monitor.newest_attempt(beats)
    every_rank = len(histories) >= len(current)  # else a job too large to read every history: the rings
    if any(b.phase == "train" for b in current.values()) or not histories or not every_rank:
        live = board.stragglers if board is not None else monitor.stragglers(beats, time.time(), histories)
        return [monitor.straggler_json(v) for v in live]
    return monitor.run_stragglers(histories)


def waterfalls(record: registry.Record, slurm: list[dict[str, float | None]] | None = None,
               seen: Seen | None = None) -> list[timeline.Waterfall]:
    """Every rank's start-up waterfall; ``slurm``: sacct_attempts(record), when the caller has asked already."""
    rdir = run_dir(record)
    seen = seen or seen_of(record)
    marks: dict[tuple[int, int], dict[str, float]] = {}
    world: list[tuple[int, int, str]] = []
    for beat in [b for hist in seen.histories.values() for b in hist] + list(seen.beats.values()):
        marks.setdefault((beat.attempt, beat.rank), {}).update(beat.marks)
        world.append((beat.attempt, beat.rank, beat.node))
    shell = timeline.read_shell_stamps(rdir)
    if not world:
        # No heartbeat yet: each task's shell stamps stand for its ranks.
        world = [(a, logs.task_of(record, t) if record.world_size == record.ntasks else t, f"task {t}")
                 for a, entry in shell.items() for t in entry["tasks"]]
    task_of = {rank: logs.task_of(record, rank) for _, rank, _ in world if 0 <= rank < max(record.world_size, 1)}
    return timeline.assemble(world, task_of, shell, marks, sacct_attempts(record) if slurm is None else slurm,
                             grammar.timestamp(record.submitted))

