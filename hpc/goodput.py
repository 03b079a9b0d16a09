"""Measure a job's goodput: when each attempt began, trained and ended, split by hpc.report into node-time shares.

    losses = report.loss_series(jobfiles.lines_of(telemetry.run_dir(record) / vocab.METRICS))
    good = goodput_of(record, falls, telemetry.sacct_attempts(record), telemetry.seen_of(record), losses)
    good["share"]["productive"], good["redone_steps"]     # also written as JOB_DIR/report/goodput.json

Reads attempts.jsonl through hpc.telemetry and takes the rest from what the report read already; the arithmetic
(spans, shares) is hpc.report's, pure.
"""

from __future__ import annotations

import itertools
from typing import Any

from hpc import registry, report, timeline
from hpc.slurm import grammar
from hpc.telemetry import Seen, attempts_of, run_dir


def goodput_of(record: registry.Record, falls: list[timeline.Waterfall], slurm: list[dict[str, float | None]],
               seen: Seen, losses: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """hpc.report.goodput of every attempt seen: it began when its waterfalls say it was allocated, and ended
    when attempts.jsonl says, else when sacct does (``slurm``), else at its last heartbeat (a killed attempt
    leaves no record of its own end). ``losses``: report.loss_series of metrics.jsonl, which the report has read
    for its chart (a long run's file is megabytes: read once)."""
    # records.load keeps only lines whose attempt is an int and whose ending (and ended, when there) is text.
    attempts = attempts_of(record)
    endings = {a["attempt"]: a["ending"] for a in attempts}
    last_beat: dict[int, float] = {}
    for b in itertools.chain(*seen.histories.values(), seen.beats.values()):
        last_beat[b.attempt] = max(last_beat.get(b.attempt, b.time), b.time)
    numbers = set(last_beat) | {w.attempt for w in falls} | set(endings)
    starts: dict[int, float] = {}
    first_steps: dict[int, float] = {}
    for w in falls:
        starts[w.attempt] = min(starts.get(w.attempt, at := w.allocated_at), at)
        if (done := w.at("first_step_done")) is not None:
            first_steps[w.attempt] = max(first_steps.get(w.attempt, 0.0), done)
    runs = timeline.runs_by_attempt(slurm, timeline.read_shell_stamps(run_dir(record), tasks=False))
    ends = {**last_beat, **{a: row["ended"] for a, row in runs.items() if row.get("ended") is not None},
            **{a["attempt"]: t for a in attempts if (t := grammar.timestamp(a.get("ended", ""))) is not None}}
    lead = {a: [b for b in seen.histories.get(0, []) if b.attempt == a] for a in numbers}
    trained = [a for a in sorted(numbers) if any(b.phase == "train" for b in lead[a])]
    steps_seen = report.steps_by_attempt(losses, trained)
    spans = report.spans(sorted(numbers), starts, ends, endings, first_steps, lead, steps_seen)
    return report.goodput(spans, record.nodes)

