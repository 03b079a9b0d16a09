"""Measure a job's goodput: when each attempt began, trained and ended, split by hpc.report into node-time shares.

    good = goodput_of(record, telemetry.waterfalls(record))
    good["share"]["train"], good["redone_steps"]     # also written as JOB_DIR/report/goodput.json

Reads the job's files and sacct through hpc.telemetry; the arithmetic (spans, shares) is hpc.report's, pure.
"""

from __future__ import annotations

from typing import Any

from hpc import registry, report, timeline, vocab
from hpc.telemetry import Seen, attempts_of, read_jsonl, run_dir, sacct_attempts, seen_of


def _time(value: Any) -> float | None:
    """An attempt's ``ended`` as attempts.jsonl holds it, epoch seconds or ISO 8601, as epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return timeline.iso_time(value) if isinstance(value, str) else None


def goodput_of(record: registry.Record, falls: list[timeline.Waterfall],
               slurm: list[dict[str, float | None]] | None = None, seen: Seen | None = None) -> dict[str, Any]:
    """hpc.report.goodput of every attempt seen: it began when its waterfalls say it was allocated, and ended
    when attempts.jsonl says, else when sacct does, else at its last heartbeat (a killed attempt leaves no
    record of its own end). ``slurm``: sacct_attempts(record), when the caller has asked already."""
    rdir = run_dir(record)
    seen = seen or seen_of(record)
    histories, beats = seen.histories, seen.beats
    attempts = attempts_of(record)
    seen = {b.attempt for hist in histories.values() for b in hist} | {b.attempt for b in beats.values()}
    seen |= {w.attempt for w in falls} | {a["attempt"] for a in attempts if isinstance(a.get("attempt"), int)}
    starts: dict[int, float] = {}
    for w in falls:
        starts[w.attempt] = min(starts.get(w.attempt, at := w.allocated_at), at)
    ends = {a["attempt"]: t for a in attempts if (t := _time(a.get("ended"))) is not None}
    for attempt, row in enumerate(sacct_attempts(record) if slurm is None else slurm):
        if row.get("ended") is not None:
            ends.setdefault(attempt, row["ended"])  # type: ignore[arg-type]
    for attempt in seen:
        last = [b.time for hist in histories.values() for b in hist if b.attempt == attempt]
        last += [b.time for b in beats.values() if b.attempt == attempt]
        if attempt not in ends and last:
            ends[attempt] = max(last)
    endings = {a["attempt"]: str(a.get("ending", "unknown")) for a in attempts if isinstance(a.get("attempt"), int)}
    first_steps: dict[int, float] = {}
    for w in falls:
        done = w.at("first_step_done")
        if done is not None:
            first_steps[w.attempt] = max(first_steps.get(w.attempt, 0.0), done)
    lead = {a: [b for b in histories.get(0, []) if b.attempt == a] for a in seen}
    trained = [a for a in sorted(seen) if any(b.phase == "train" for b in lead[a])]
    steps_seen = report.steps_by_attempt(report.loss_series(read_jsonl(rdir / vocab.METRICS)), trained)
    spans = report.spans(sorted(seen), starts, ends, endings, first_steps, lead, steps_seen)
    return report.goodput(spans, record.nodes)

