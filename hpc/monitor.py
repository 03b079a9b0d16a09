"""Read the ranks' heartbeats and judge them: the per-rank board behind ``hpcdist top``, STALE ranks, STRAGGLERS.

    board = monitor.judge(monitor.read_heartbeats(run_dir), now=time.time())
    print(monitor.table(board))

Heartbeats are contract 1 of docs/CONTRACTS.md: one file per node, ``RUN_DIR/heartbeat/node-N.json``, holding
its ranks' newest beats, and its history ``node-N.jsonl`` (hpc/beatfile.py, the schema both sides share).
Pure except for the two readers at the top, which take a folder and return values.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

from hpc import beatfile, jobfiles, nodelist, shown, vocab
from hpc.beatfile import Heartbeat

# A rank is STALE when its step has not moved for STALE_K median step times, and never sooner than
# STALE_MIN_S: heartbeats come every 2 s, so anything shorter would flag healthy ranks between writes.
STALE_K = 5.0
STALE_MIN_S = 10.0
# A rank is a STRAGGLER when its compute time per step is at least STRAGGLER_RATIO x the other ranks'
# median, in each of its last SUSTAIN samples (heartbeats, or steps when the trainer keeps a ring).
STRAGGLER_RATIO = 1.3
SUSTAIN = beatfile.RING
# Readers that show every rank's history read every node's only up to this many nodes; past it, the first
# node's alone (rank 0's, for goodput and the rate chart), and the stragglers come from each beat's own ring.
HISTORY_NODES = 8
ENDING_RANKS = 8  # an ending line names at most this many unfinished ranks
# Past TABLE_RANKS ranks top's table shows the flagged ranks and the slowest steps (a screen, not 32,768 rows:
# --all or --json for every rank); each kind of flag line names FLAG_LINES ranks and counts the rest.
TABLE_RANKS = 32
FLAG_LINES = 8
POLLED_KEEP = 32  # a refreshing top remembers this many compute times per rank


def beats_in(document: Mapping[str, Any]) -> Iterable[Heartbeat]:
    """A node document's beats; a damaged one is skipped."""
    for data in beatfile.beats_of(document):
        try:
            yield Heartbeat.from_mapping(data)
        except (ValueError, TypeError, OverflowError):
            continue


# node file -> ((mtime ns, size), its beats): a command reads the same files several times (status, report,
# and top every 2 s); at 4,096 nodes parsing them is what costs, a stat is cheap.
_SEEN: dict[Path, tuple[tuple[int, int], tuple[Heartbeat, ...]]] = {}


def read_heartbeats(run_dir: Path) -> dict[int, Heartbeat]:
    """The newest heartbeat of each rank that wrote one, by rank (from its node's file)."""
    keys = {}
    for path in jobfiles.folder(beatfile.folder(run_dir), "node-*.json"):
        try:
            st = path.stat()
        except OSError:
            continue
        keys[path] = (st.st_mtime_ns, st.st_size)
    changed = [path for path, key in keys.items() if _SEEN.get(path, ((), ()))[0] != key]
    if changed:
        with jobfiles.kept(many=len(changed) >= 64):  # 32,768 beats live as long as the command
            for path in changed:
                document = beatfile.read_node(path)
                _SEEN[path] = (keys[path], tuple(beats_in(document)) if document is not None else ())
    return dict(sorted({b.rank: b for path in keys for b in _SEEN[path][1]}.items()))


def read_histories(run_dir: Path, nodes: Collection[int] | None = None) -> dict[int, list[Heartbeat]]:
    """Each rank's heartbeat history, oldest first, from its node's (``nodes``: only those nodes'). A node
    republishes a beat its rank has not replaced yet: each beat is kept once; one whose time is unknown is left out
    (the spans measured from it would be decades)."""
    out: dict[int, list[Heartbeat]] = {}
    for paths in beatfile.history_files(run_dir, nodes).values():
        for document in beatfile.read_history(paths):
            for beat in beats_in(document):
                if not beat.time:
                    continue
                mine = out.setdefault(beat.rank, [])
                if not mine or (mine[-1].time, mine[-1].phase) != (beat.time, beat.phase):
                    mine.append(beat)
    return out


# ---- judging -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankView:
    """One rank as ``top`` shows it: its heartbeat, how old it is, and the verdicts."""

    beat: Heartbeat
    age_s: float | None             # None: the beat's time is unknown or yet to come, so is its age
    progress_age_s: float | None
    stale: bool = False
    stale_reason: str = ""
    straggler: bool = False
    compute_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        b = self.beat
        return {"rank": b.rank, "node": b.node, "node_rank": b.node_rank, "local_rank": b.local_rank,
                "pid": b.pid, "attempt": b.attempt, "phase": b.phase, "step": b.step, "total_steps": b.total_steps,
                "step_time_s": b.step_time_s, "compute_s": b.compute_s, "comm_s": b.comm_s,
                "images_per_s": b.images_per_s, "loss": b.loss, "rss_bytes": b.rss_bytes,
                "peak_memory_bytes": b.peak_memory_bytes, "heartbeat_age_s": _rounded(self.age_s),
                "progress_age_s": _rounded(self.progress_age_s), "stale": self.stale,
                "stale_reason": self.stale_reason, "straggler": self.straggler,
                "compute_ratio": _rounded(self.compute_ratio)}


@dataclass(frozen=True)
class Board:
    """Every rank's view at one moment, in rank order, with the job-wide numbers the verdicts used."""

    now: float
    ranks: tuple[RankView, ...]
    median_step_s: float | None
    stale_after_s: float

    @property
    def stale(self) -> tuple[RankView, ...]:
        return tuple(v for v in self.ranks if v.stale)

    @property
    def stragglers(self) -> tuple[RankView, ...]:
        return tuple(v for v in self.ranks if v.straggler)

    def to_json(self) -> dict[str, Any]:
        return {"time": self.now, "median_step_time_s": self.median_step_s, "stale_after_s": self.stale_after_s,
                "ranks": [v.to_json() for v in self.ranks],
                "stale": [{"rank": v.beat.rank, "node": v.beat.node, "reason": v.stale_reason} for v in self.stale],
                "stragglers": [straggler_json(v) for v in self.stragglers]}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def straggler_json(view: RankView) -> dict[str, Any]:
    return {"rank": view.beat.rank, "node": view.beat.node, "compute_ratio": _rounded(view.compute_ratio)}


def _median_without(ordered: Sequence[float], value: float) -> float:
    """The median of sorted ``ordered`` less one ``value`` it holds, without copying (32,768 ranks each leave
    one out: a copy per rank would be quadratic)."""
    gone = bisect.bisect_left(ordered, value)
    n = len(ordered) - 1

    def at(k: int) -> float:
        return ordered[k] if k < gone else ordered[k + 1]
    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


def compute_samples(beat: Heartbeat, history: Sequence[Heartbeat] = ()) -> list[float]:
    """The rank's recent compute times per step, oldest first, for the straggler test.

    Its heartbeat history in this attempt's training phase (each heartbeat's compute_s is already a
    median over recent steps); else the heartbeat's own ring of step times; else its one compute_s.
    """
    past = [b.compute_s for b in history if b.attempt == beat.attempt and b.phase == "train" and b.compute_s]
    if len(past) >= SUSTAIN:
        return [float(v) for v in past]  # type: ignore[arg-type]
    if beat.recent_compute_s:
        return list(beat.recent_compute_s)
    return [beat.compute_s] if beat.compute_s else []


def straggler_ratios(samples: Mapping[int, Sequence[float]],
                     window: int = SUSTAIN) -> dict[int, tuple[bool, float | None]]:
    """rank -> (straggler?, the median of its last ``window`` samples over the other ranks' median).

    Each rank is compared with the others only (leave-one-out): with two ranks, a median that included
    the slow one would hide it. A straggler's median is at least STRAGGLER_RATIO x the others', and so are
    at least SUSTAIN of its last ``window`` samples (default: the last SUSTAIN, i.e. each of them).
    """
    level = {r: statistics.median(s[-window:]) for r, s in samples.items() if s}
    ordered = sorted(level.values())
    # Leaving out any value below the middle gives one median, any above another: 32,768 ranks need three.
    half = (len(ordered) - 1) // 2
    medians: dict[int, float] = {}
    out: dict[int, tuple[bool, float | None]] = dict.fromkeys(samples, (False, None))
    for rank, own in samples.items():
        if not own or len(ordered) < 2:
            continue
        at = min(max(bisect.bisect_left(ordered, level[rank]), half - 1), half + 1)
        reference = medians.get(at)
        if reference is None:
            reference = medians[at] = _median_without(ordered, ordered[at])
        if reference <= 0:
            continue
        bar = STRAGGLER_RATIO * reference
        flagged = level[rank] >= bar and sum(v >= bar for v in own[-window:]) >= SUSTAIN
        out[rank] = (flagged, level[rank] / reference)
    return out


def judge(beats: Mapping[int, Heartbeat], now: float, histories: Mapping[int, Sequence[Heartbeat]] | None = None,
          progress_at: Mapping[int, float] | None = None, polled: Mapping[int, Sequence[float]] | None = None) -> Board:
    """Every rank's view at ``now``.

    ``progress_at`` (rank -> when a watcher last saw its step move) and ``polled`` (rank -> compute_s
    values a watcher collected, one per new heartbeat) come from a refreshing ``top``; a one-shot reader
    relies on the heartbeat's own ``step_at`` and ring, or its history.
    """
    current, median_step, stale_after, verdicts = _verdicts(beats, histories or {}, polled or {})
    progress_at = progress_at or {}
    views = tuple(_view(rank, beat, now, stale_after, progress_at, verdicts) for rank, beat in current.items())
    return Board(now, views, median_step, stale_after)


def stragglers(beats: Mapping[int, Heartbeat], now: float,
               histories: Mapping[int, Sequence[Heartbeat]] | None = None) -> tuple[RankView, ...]:
    """``judge(beats, now, histories).stragglers``, looking at the stale test of the flagged ranks alone (at
    4,096 nodes the view of every rank is most of judge's time)."""
    current, _, stale_after, verdicts = _verdicts(beats, histories or {}, {})
    views = (_view(r, current[r], now, stale_after, {}, verdicts) for r, (flagged, _) in verdicts.items() if flagged)
    return tuple(v for v in views if v.straggler)


def newest_attempt(beats: Mapping[int, Heartbeat]) -> dict[int, Heartbeat]:
    """The beats of the newest attempt, in rank order: an earlier attempt's files describe processes long gone."""
    attempt = max((b.attempt for b in beats.values()), default=0)
    return {r: b for r, b in sorted(beats.items()) if b.attempt == attempt}


def _verdicts(beats: Mapping[int, Heartbeat], histories: Mapping[int, Sequence[Heartbeat]],
              polled: Mapping[int, Sequence[float]]
              ) -> tuple[dict[int, Heartbeat], float | None, float, dict[int, tuple[bool, float | None]]]:
    """The newest attempt's beats, their median step time, the age past which a rank is stale, the straggler test."""
    current = newest_attempt(beats)
    step_times = [b.step_time_s for b in current.values() if b.phase == "train" and b.step_time_s is not None]
    median_step = statistics.median(step_times) if step_times else None
    stale_after = max(STALE_K * median_step, STALE_MIN_S) if median_step else STALE_MIN_S
    samples = {}
    for r, b in current.items():
        if b.phase == "train":
            own = compute_samples(b, histories.get(r, ()))
            mine = polled.get(r, ())
            samples[r] = list(mine) if len(mine) > len(own) else own
    return current, median_step, stale_after, straggler_ratios(samples)


def _view(rank: int, beat: Heartbeat, now: float, stale_after: float, progress_at: Mapping[int, float],
          verdicts: Mapping[int, tuple[bool, float | None]]) -> RankView:
    age = beatfile.age(now, beat.time)
    seen = [t for t in (beat.step_at, progress_at.get(rank)) if t is not None]
    progress_age = beatfile.age(now, max(seen)) if seen else age
    stale, why = False, ""
    if beat.phase not in vocab.FINAL_PHASES:
        if age is not None and age > stale_after:
            stale, why = True, f"no heartbeat for {age:.0f}s"
        elif beat.phase == "train" and progress_age is not None and progress_age > stale_after:
            stale, why = True, f"step {beat.step} unchanged for {progress_age:.0f}s"
    flagged, compute_ratio = verdicts.get(rank, (False, None))
    return RankView(beat, age, progress_age, stale, why, flagged and not stale, compute_ratio)


class Watch:
    """What a refreshing ``top`` remembers between polls: when each rank's step last moved, and the
    compute time of each new heartbeat (a history of its own when the trainer keeps none)."""

    def __init__(self) -> None:
        self.last: dict[int, Heartbeat] = {}
        self.progress_at: dict[int, float] = {}
        self.polled: dict[int, list[float]] = {}

    def see(self, beats: Mapping[int, Heartbeat], now: float) -> None:
        for rank, beat in beats.items():
            before = self.last.get(rank)
            if before is None or before.step != beat.step or before.attempt != beat.attempt:
                self.progress_at[rank] = now if before is not None else beat.time
            if before is None or before.attempt != beat.attempt:
                self.polled[rank] = []
            if beat.phase == "train" and beat.compute_s and (before is None or before.time != beat.time):
                self.polled[rank] = (self.polled[rank] + [beat.compute_s])[-POLLED_KEEP:]
            self.last[rank] = beat


# ---- showing -----------------------------------------------------------------------------------------

TABLE_COLUMNS = ("NODE", "RANK", "PID", "PHASE", "STEP", "STEP_S", "COMPUTE_S", "COMM_S", "IMG/S", "AGE_S", "RSS",
                 "FLAGS")


def chosen(board: Board, most: int | None = None) -> list[RankView]:
    """Every rank up to ``most`` (None: no limit); past it the flagged ranks first, then the slowest steps."""
    if most is None or len(board.ranks) <= most:
        return list(board.ranks)
    return sorted(board.ranks, key=lambda v: (not (v.stale or v.straggler), -(v.beat.step_time_s or 0.0),
                                              v.beat.rank))[:most]


def table_rows(board: Board, most: int | None = None) -> list[tuple[str, ...]]:
    """One row per rank (the ``chosen`` ones), grouped by node (nodes in node-rank order), flags last."""
    views = sorted(chosen(board, most), key=lambda v: (v.beat.node_rank if v.beat.node_rank is not None
                                                        else 1 << 30, v.beat.node, v.beat.rank))
    # Name nodes by hostname unless two node ranks share one (the local executor's emulated nodes).
    shared = len({v.beat.node for v in views}) < len({v.beat.node_rank for v in views})
    rows = []
    for v in views:
        b = v.beat
        flags = []
        if v.stale:
            flags.append(f"STALE ({v.stale_reason})")
        if v.straggler:
            flags.append(f"STRAGGLER ({v.compute_ratio:.2f}x compute)")
        if v.age_s is None:
            flags.append("UNKNOWN (its heartbeat's time is no clock's)")
        step = f"{b.step}/{b.total_steps}" if b.total_steps else str(b.step)
        rows.append((b.node_label if shared else b.node, str(b.rank), shown.number(b.pid, "d"), b.phase, step,
                     shown.number(b.step_time_s, ".3f"), shown.number(b.compute_s, ".3f"),
                     shown.number(b.comm_s, ".3f"), shown.number(b.images_per_s, ".0f"),
                     shown.number(v.age_s, ".1f", "?"),
                     "-" if b.rss_bytes is None else f"{b.rss_bytes / 2**20:.0f}M", "  ".join(flags)))
    return rows


def table(board: Board, most: int | None = TABLE_RANKS) -> str:
    """The board as aligned text, ``most`` ranks of it and a line counting the rest; a node's name is printed on
    its first rank's row only."""
    rows = table_rows(board, most)
    if not rows:
        return "no heartbeats yet (the trainer writes run/heartbeat/node-N.json once it starts)"
    named = [row if i == 0 or row[0] != rows[i - 1][0] else ("", *row[1:]) for i, row in enumerate(rows)]
    lines = shown.aligned((TABLE_COLUMNS, *named))
    if len(rows) < len(board.ranks):
        # chosen() shows the flagged ranks first, so those left out are the flagged past the rows shown.
        left = max(len(board.stale) + len(board.stragglers) - len(rows), 0)
        lines.append(f"... {len(board.ranks) - len(rows):,} more ranks not shown ({left:,} of them flagged): "
                     "--all or --json shows every rank")
    return "\n".join(lines)


def run_stragglers(histories: Mapping[int, Sequence[Heartbeat]]) -> list[dict[str, Any]]:
    """Stragglers over a whole attempt (the newest in the histories), for summaries and reports after the end:
    a rank whose median compute over its training heartbeats is STRAGGLER_RATIO x the others', in SUSTAIN or more
    of them. Each as ``{"rank", "node", "compute_ratio"}``."""
    attempt = max((b.attempt for beats in histories.values() for b in beats), default=0)
    trained = {rank: mine for rank, beats in histories.items()
               if (mine := [b for b in beats if b.attempt == attempt and b.phase == "train" and b.compute_s])}
    samples = {rank: [b.compute_s for b in mine] for rank, mine in trained.items()}
    longest = max((len(s) for s in samples.values()), default=0)
    verdicts = straggler_ratios(samples, window=max(longest, SUSTAIN))  # type: ignore[arg-type]
    return [{"rank": r, "node": trained[r][-1].node, "compute_ratio": round(v[1], 3)}  # type: ignore[arg-type]
            for r, v in sorted(verdicts.items()) if v[0]]


def ending_line(beats: Mapping[int, Heartbeat]) -> str | None:
    """How an ended job's ranks last reported, newest attempt only: ``ranks at the end: 2 done``, or with a
    rank that wrote no final heartbeat (killed, or its node lost) ``...; rank 1 on n2 last at step 78 (train)``."""
    current = list(newest_attempt(beats).values())
    if not current:
        return None
    finals = [phase for phase in vocab.FINAL_PHASES if any(b.phase == phase for b in current)]
    parts = [f"{sum(b.phase == phase for b in current)} {phase}" for phase in finals]
    unfinished = [b for b in current if b.phase not in vocab.FINAL_PHASES]
    parts += [f"rank {b.rank} on {b.node} last at step {b.step} ({b.phase})" for b in unfinished[:ENDING_RANKS]]
    parts += [f"{len(unfinished) - ENDING_RANKS} more ranks"] if len(unfinished) > ENDING_RANKS else []
    return "ranks at the end: " + "; ".join(parts)


def straggler_lines(board: Board, most: int = FLAG_LINES) -> list[str]:
    """``straggler: rank 1 on n2, compute 2.10x the other ranks' median`` per straggler, then ``stale: ...`` per
    stale rank: ``most`` of each kind, and one line counting the rest with their nodes."""
    return (flag_lines("straggler", [(v.beat.rank, v.beat.node, f"compute {v.compute_ratio:.2f}x the other ranks' "
                                      "median") for v in board.stragglers], most)
            + flag_lines("stale", [(v.beat.rank, v.beat.node, v.stale_reason) for v in board.stale], most))


def flag_lines(kind: str, flagged: Sequence[tuple[Any, str, str]], most: int = FLAG_LINES) -> list[str]:
    """``KIND: rank R on NODE, WHY`` for the first ``most`` of (rank, node, why), then
    ``KIND: 4,088 more ranks on 511 nodes gpu[0008-0511]``."""
    lines = [f"{kind}: rank {rank} on {node}" + (f", {why}" if why else "") for rank, node, why in flagged[:most]]
    if rest := flagged[most:]:
        nodes = list(dict.fromkeys(str(node) for _, node, _ in rest))
        lines.append(f"{kind}: {len(rest):,} more ranks on {len(nodes):,} nodes "
                     + shown.line(nodelist.compress(nodes), limit=80))
    return lines
