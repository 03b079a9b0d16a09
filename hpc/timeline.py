"""The start-up waterfall of each rank in each attempt: from submission to its first training step.

    hpcdist timeline JOB          # per attempt, one row per rank: how long each start-up phase took

Timestamps come from three places: the registry and Slurm's accounting (submitted, started), the job's own
shell (``RUN_DIR/timeline/attempt-A/batch`` and ``task-T``, written by templates/timeline.sh.j2), and the
trainer's heartbeat marks (contract 1). Phases are the gaps between consecutive stamps, so they add up to
the rank's wall time from its first stamp to its first step. Pure except ``read_shell_stamps``.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from hpc import beatfile, jobfiles, shown, vocab
from hpc.slurm import grammar, parse

SACCT_TIMES = ("JobID", "Submit", "Start", "End")
# A stamp file holds a few short lines.
STAMPS_BYTES = 65536
CLOCK_SLACK_S = 2.0
# Every stamp after "submitted", in the order a rank passes them -> the phase it ends, named after what happens
# between the stamp before it and its own stamp.
PHASES = {
    "started": "queued",
    "batch_start": "batch shell start",
    "setup_done": "setup.sh",
    "task_start": "srun task launch",
    "process_start": "interpreter up",
    "torch_imported": "import torch",
    "process_group_ready": "process group",
    "model_built": "build model",
    "first_step_done": "first step",
}
STAMPS = ("submitted", *PHASES)


@dataclass(frozen=True)
class Phase:
    name: str       # what happened in it, e.g. "import torch"
    ends: str       # the stamp that ends it, e.g. "torch_imported"
    start: float
    seconds: float
    # The stamp was earlier than the one before it (clocks of different sources): drawn as zero.
    out_of_order: bool = False


@dataclass(frozen=True)
class Waterfall:
    """One rank's start-up in one attempt: the stamps it passed, its phases the gaps between them.

    The phases are derived when first asked: a report reads every rank's start and end (32,768 at 4,096 nodes)
    but the phases of a few.
    """

    attempt: int
    rank: int
    node: str
    stamps: tuple[tuple[str, float], ...]  # (stamp, when) in STAMPS order, at least two

    @property
    def first(self) -> str:
        """The earliest stamp known for it."""
        return self.stamps[0][0]

    @property
    def start(self) -> float:
        return self.stamps[0][1]

    @property
    def end(self) -> float:
        # A stamp earlier than the one before counts as equal to it: the end is the latest stamp.
        return max(when for _, when in self.stamps)

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    def _passed(self) -> Iterator[tuple[str, float]]:
        """Each stamp with when this rank passed it as the phases count it: never before the stamp before."""
        latest = self.start
        for name, when in self.stamps:
            latest = max(latest, when)
            yield name, latest

    def at(self, stamp: str) -> float | None:
        """When this rank passed ``stamp`` (as the phases count it), if it was recorded."""
        return next((when for name, when in self._passed() if name == stamp), None)

    @property
    def allocated_at(self) -> float:
        """The first stamp after the queue: when the allocation (this attempt's node time) began."""
        # Of two or more stamps, only the first can be "submitted".
        return next(when for name, when in self._passed() if name != "submitted")

    @functools.cached_property
    def phases(self) -> tuple[Phase, ...]:
        passed = list(self._passed())
        return tuple(Phase(PHASES[name], name, start, end - start, out_of_order=when < start)
                     for (_, start), (name, end), (_, when) in zip(passed, passed[1:], self.stamps[1:]))

    @property
    def slowest(self) -> Phase:
        return max(self.phases, key=lambda p: p.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "rank": self.rank, "node": self.node, "first": self.first,
                "start": self.start, "wall_s": round(self.wall_s, 3),
                "phases": [{"name": p.name, "ends": p.ends, "start": p.start, "seconds": round(p.seconds, 3),
                            "out_of_order": p.out_of_order} for p in self.phases]}


def waterfall(stamps: Mapping[str, float], attempt: int = 0, rank: int = 0, node: str = "") -> Waterfall | None:
    """The phases between the stamps present, in STAMPS order; None with fewer than two stamps.

    A stamp earlier than the one before it (the registry and sacct keep whole seconds; nodes' clocks
    differ) is taken as equal to it, so phases never go negative and still add up to the wall time.
    """
    present = tuple((name, float(when)) for name in STAMPS if (when := stamps.get(name)) is not None)
    return Waterfall(attempt, rank, node, present) if len(present) >= 2 else None


def parse_stamps(text: str) -> dict[str, float]:
    """``NAME UNIX_TIME`` lines (templates/timeline.sh.j2); the first of each name wins, junk (and a time no clock
    gives: jobfiles.unix_time) is skipped."""
    out: dict[str, float] = {}
    for parts in map(str.split, text.splitlines()):
        try:
            when = jobfiles.unix_time(float(parts[1])) if len(parts) == 2 else None
        except ValueError:
            continue
        if when is not None:
            out.setdefault(parts[0], when)
    return out


def read_shell_stamps(run_dir: Path, tasks: bool = True) -> dict[int, dict[str, Any]]:
    """attempt -> {"batch": {stamp: t}, "tasks": {task: {stamp: t}}} from RUN_DIR/timeline/; without ``tasks``, the
    batch shells' alone (a file an attempt, where the tasks' are one a task: 32,768 at 4,096 nodes x 8)."""
    out: dict[int, dict[str, Any]] = {}
    root = Path(run_dir) / vocab.TIMELINE
    for folder in sorted(jobfiles.folder(root, "attempt-*")):
        attempt = jobfiles.count(folder.name.split("-", 1)[1])
        if attempt is None:
            continue
        entry: dict[str, Any] = {"batch": {}, "tasks": {}}
        for path in jobfiles.folder(folder, "*" if tasks else "batch"):
            try:
                stamps = parse_stamps(jobfiles.read_text(path, STAMPS_BYTES))
            except (OSError, jobfiles.Damaged):
                continue
            if path.name == "batch":
                entry["batch"] = stamps
            elif path.name.startswith("task-") and (task := jobfiles.count(path.name[5:])) is not None:
                entry["tasks"][task] = stamps
        out[attempt] = entry
    return out


def parse_sacct_attempts(text: str, job_id: str) -> list[dict[str, float | None]]:
    """Each attempt's Submit, Start and End (unix times) from ``sacct -D -X -n -P -o JobID,Submit,Start,End``,
    oldest first: Slurm keeps one row per run of a requeued job. End is None while it runs."""
    rows = [{"submitted": grammar.timestamp(r["Submit"]), "started": grammar.timestamp(r["Start"]),
             "ended": grammar.timestamp(r["End"])} for r in parse.rows(text, SACCT_TIMES, job=job_id)]
    return sorted(rows, key=lambda r: (r["submitted"] or 0.0, r["started"] or 0.0))


def runs_by_attempt(slurm: Sequence[Mapping[str, float | None]],
                    shell: Mapping[int, Mapping[str, Any]]) -> dict[int, Mapping[str, float | None]]:
    """attempt -> the sacct row (parse_sacct_attempts) of the run it began: the first attempt whose batch shell
    started (batch_start) in that run. A step relaunched inside its allocation begins no run and takes the next
    number, so once one was, a row's index is no attempt's number; a job without batch stamps goes by index."""
    begun = {a: s["batch"]["batch_start"] for a, s in shell.items() if "batch_start" in s.get("batch", {})}
    if not begun:
        return dict(enumerate(slurm))
    rows = sorted((r for r in slurm if r.get("started") is not None), key=lambda r: r["started"] or 0.0)
    out: dict[int, Mapping[str, float | None]] = {}
    for i, row in enumerate(rows):
        # Start is whole seconds, the stamp the batch host's clock: allow for both.
        until = (rows[i + 1]["started"] or 0.0) - CLOCK_SLACK_S if i + 1 < len(rows) else math.inf
        inside = [a for a, at in begun.items() if (row["started"] or 0.0) - CLOCK_SLACK_S <= at < until]
        if inside:
            out[min(inside, key=begun.__getitem__)] = row
    return out


def assemble(world: Iterable[tuple[int, int, str]], task_of: Mapping[int, int], shell: Mapping[int, Mapping[str, Any]],
             marks: Mapping[tuple[int, int], Mapping[str, float]], slurm: Sequence[Mapping[str, float | None]],
             submitted: float | None) -> list[Waterfall]:
    """Every rank's waterfall in every attempt that left a trace.

    ``world``: (attempt, rank, node) triples seen; ``task_of``: rank -> its Slurm task; ``shell``: from
    read_shell_stamps; ``marks``: (attempt, rank) -> heartbeat marks; ``slurm``: per attempt Submit/Start;
    ``submitted``: the registry's submission time (attempt 0's, when accounting has none).
    """
    # waterfall() passes over names that are no stamp (sacct's "ended", junk in a shell file): only the heartbeat
    # marks are filtered here, since they may set no stamp before the process's own.
    bases: dict[int, dict[str, float]] = {}
    runs = runs_by_attempt(slurm, shell)
    out = []
    for attempt, rank, node in sorted(set(world)):
        if attempt not in bases:  # what every rank of the attempt shares
            stamps = {k: v for k, v in runs.get(attempt, {}).items() if v is not None}
            if attempt == 0 and submitted is not None:
                stamps.setdefault("submitted", submitted)
            bases[attempt] = {**stamps, **shell.get(attempt, {}).get("batch", {})}
        task = shell.get(attempt, {}).get("tasks", {}).get(task_of.get(rank, rank), {})
        own = {k: v for k, v in marks.get((attempt, rank), {}).items() if k in beatfile.MARKS}
        found = waterfall({**bases[attempt], **task, **own}, attempt, rank, node)
        if found is not None:
            out.append(found)
    return out


def slowest(falls: Sequence[Waterfall]) -> Waterfall | None:
    """The rank that reached its first step last (the one the whole job waited for)."""
    return max(falls, key=lambda w: (w.end, w.wall_s), default=None)


def worst(falls: Sequence[Waterfall], most: int = 16) -> list[Waterfall]:
    """At most ``most`` waterfalls for a chart or a page: each attempt's rank 0 and the ranks that reached their
    first step last, in attempt and rank order (4,096 nodes' worth of bars says nothing and takes minutes)."""
    if len(falls) <= most:
        return list(falls)
    firsts = [w for w in falls if w.rank == 0][: most // 2]
    # The few latest of tens of thousands: a partial selection, not a sort of them all.
    late = heapq.nlargest(most - len(firsts), (w for w in falls if w.rank != 0), key=lambda w: (w.end, w.wall_s))
    return sorted(firsts + late, key=lambda w: (w.attempt, w.rank))


def table(falls: Sequence[Waterfall]) -> str:
    """Per attempt: one row per rank, one column per phase (seconds), then the wall time; and the verdict."""
    if not falls:
        return ("no start-up timestamps yet: the job writes run/timeline/ as it starts and the trainer its "
                "heartbeat marks")
    blocks = []
    for attempt in sorted({w.attempt for w in falls}):
        mine = [w for w in falls if w.attempt == attempt]
        names = [PHASES[s] for s in STAMPS[1:] if any(p.ends == s for w in mine for p in w.phases)]
        header = ("RANK", "NODE", "FROM", *names, "TOTAL")
        rows = []
        for w in sorted(mine, key=lambda w: w.rank):
            by = {p.name: p for p in w.phases}
            rows.append((str(w.rank), w.node, w.first,
                         *[f"{by[n].seconds:.2f}" + ("*" if by[n].out_of_order else "") if n in by else "-"
                           for n in names], f"{w.wall_s:.2f}"))
        lines = [f"attempt {attempt} (seconds per phase)", *shown.aligned((header, *rows), right=range(3, len(header)))]
        worst = slowest(mine)
        lines.append(f"slowest: rank {worst.rank} on {worst.node or '?'}, first step {worst.wall_s:.1f}s after "
                     f"{worst.first}; its longest phase: {worst.slowest.name} ({worst.slowest.seconds:.1f}s)")
        if any(p.out_of_order for w in mine for p in w.phases):
            lines.append("* a stamp earlier than the one before it (whole-second clocks): counted as 0")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
