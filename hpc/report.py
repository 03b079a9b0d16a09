"""A finished (or running) job's run report as data and HTML: loss curve, images/s per rank, start-up
waterfall, attempts and goodput. Pure: hpc/commands/observe.py reads the files and draws the charts.

Goodput splits the allocated time of every attempt (nodes x its elapsed time; the time a requeued job
waits in the queue is not allocated) into: start-up (start of the allocation to the last rank's first
step), productive steps, recomputation (steps redone after a resume because the previous attempt had run
past its last checkpoint), checkpointing, evaluation and idle (the rest: teardown, the batch shell after
the step, a rank left waiting).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

CATEGORIES = ("productive", "startup", "recompute", "checkpoint", "eval", "idle")


@dataclass(frozen=True)
class AttemptSpan:
    """What one attempt did with its allocation, in seconds of wall time (multiply by nodes for node-s)."""

    attempt: int
    start: float
    end: float
    ending: str = "unknown"
    first_step_at: float | None = None
    resume_step: int = 0
    last_step: int = 0
    train_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0
    redone_steps: int = 0

    @property
    def elapsed_s(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def steps(self) -> int:
        return max(self.last_step - self.resume_step, 0)

    def seconds(self) -> dict[str, float]:
        """Wall seconds per category; they add up to ``elapsed_s``."""
        startup = min(max((self.first_step_at or self.end) - self.start, 0.0), self.elapsed_s)
        rest = self.elapsed_s - startup
        checkpoint = min(self.checkpoint_s, rest)
        evaluation = min(self.eval_s, rest - checkpoint)
        train = min(self.train_s, rest - checkpoint - evaluation)
        redo = train * min(self.redone_steps / self.steps, 1.0) if self.steps else 0.0
        return {"productive": train - redo, "startup": startup, "recompute": redo, "checkpoint": checkpoint,
                "eval": evaluation, "idle": rest - checkpoint - evaluation - train}


def phase_seconds(beats: Sequence[Any], since: float | None, until: float) -> dict[str, float]:
    """Seconds per phase from one rank's heartbeats of one attempt (oldest first): the gap after each
    heartbeat belongs to its phase (the trainer writes one at every phase change), clipped to [since, until]
    (``since`` None: from the first heartbeat)."""
    out: dict[str, float] = {}
    for before, after in zip(beats, beats[1:]):
        lo = before.time if since is None else max(before.time, since)
        hi = min(after.time, until)
        if hi > lo:
            out[before.phase] = out.get(before.phase, 0.0) + hi - lo
    return out


def spans(attempts: Sequence[int], starts: Mapping[int, float], ends: Mapping[int, float],
          endings: Mapping[int, str], first_steps: Mapping[int, float],
          lead_history: Mapping[int, Sequence[Any]], steps_seen: Mapping[int, int] | None = None) -> list[AttemptSpan]:
    """Each attempt's span from its start/end times and its lead rank's heartbeat history.

    ``lead_history``: attempt -> rank 0's heartbeats in that attempt. The step a resume started from is the
    ``start_step`` its heartbeats carry (else the step its first training heartbeat shows); steps up to
    the furthest any earlier attempt reached are recomputation. ``steps_seen`` (attempt -> the furthest step
    another source, metrics.jsonl, logged) catches steps run after the last heartbeat of a killed attempt.
    """
    steps_seen = steps_seen or {}
    out = []
    furthest = 0
    for attempt in sorted(attempts):
        beats = list(lead_history.get(attempt, ()))
        start = starts.get(attempt, beats[0].time if beats else 0.0)
        end = ends.get(attempt, beats[-1].time if beats else start)
        first = first_steps.get(attempt)
        resume = next((b.start_step for b in beats if b.start_step is not None),
                      next((b.step for b in beats if b.phase == "train"), 0))
        last = max([b.step for b in beats] + [steps_seen.get(attempt, resume)])
        phases = phase_seconds(beats, since=first, until=end)
        redone = max(min(last, furthest) - resume, 0)
        out.append(AttemptSpan(attempt, start, end, endings.get(attempt, "unknown"), first, resume, last,
                               phases.get("train", 0.0), phases.get("checkpoint", 0.0), phases.get("eval", 0.0),
                               redone))
        furthest = max(furthest, last)
    return out


def goodput(spans_: Sequence[AttemptSpan], nodes: int) -> dict[str, Any]:
    """Node-seconds per category over all attempts, and each one's share of the allocated total."""
    seconds = [span.seconds() for span in spans_]
    totals = {c: sum((s[c] * nodes for s in seconds), 0.0) for c in CATEGORIES}
    allocated = sum(totals.values())
    shares = {c: (v / allocated if allocated else 0.0) for c, v in totals.items()}
    return {"nodes": nodes, "allocated_node_s": allocated, "node_s": totals, "share": shares,
            "redone_steps": sum(s.redone_steps for s in spans_),
            "attempts": [{**asdict(span), "seconds": s} for span, s in zip(spans_, seconds)]}


def loss_series(metrics: Sequence[Mapping[str, Any]]) -> list[list[tuple[int, float]]]:
    """rank 0's (step, loss) points, one list per run segment: a step that goes back starts a new one
    (metrics.jsonl is appended to after a resume)."""
    segments: list[list[tuple[int, float]]] = []
    last = None
    for row in metrics:
        step, loss = row.get("step"), row.get("loss")
        if not isinstance(step, int) or not isinstance(loss, (int, float)):
            continue
        if last is None or step <= last:
            segments.append([])
        segments[-1].append((step, float(loss)))
        last = step
    return segments


def steps_by_attempt(segments: Sequence[Sequence[tuple[int, float]]], trained: Sequence[int]) -> dict[int, int]:
    """attempt -> the furthest step of its metrics segment, pairing segments with the attempts that trained,
    in order; nothing when the counts differ (an attempt that logged no step would shift every pair)."""
    if len(segments) != len(trained):
        return {}
    return {attempt: max(step for step, _ in seg) for attempt, seg in zip(sorted(trained), segments) if seg}


def rate_series(histories: Mapping[int, Sequence[Any]]) -> dict[int, list[tuple[float, float]]]:
    """rank -> (seconds since the first heartbeat, images/s) from its training heartbeats, every attempt; a NaN
    point between attempts, so a chart breaks its line over the time the job was down."""
    origin = min((b.time for beats in histories.values() for b in beats), default=0.0)
    out: dict[int, list[tuple[float, float]]] = {}
    for rank, beats in sorted(histories.items()):
        points: list[tuple[float, float]] = []
        attempt = None
        for b in beats:
            if b.phase != "train" or not b.images_per_s:
                continue
            if attempt is not None and b.attempt != attempt:
                points.append((b.time - origin, float("nan")))
            points.append((b.time - origin, b.images_per_s))
            attempt = b.attempt
        out[rank] = points
    return out


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(title: str, facts: Sequence[tuple[str, Any]], images: Mapping[str, str],
                attempts: Sequence[Mapping[str, Any]], good: Mapping[str, Any], waterfall_text: str,
                stragglers: Sequence[Mapping[str, Any]]) -> str:
    """One self-contained HTML page; ``images`` maps a chart's name to its PNG as base64."""
    def img(name: str, alt: str) -> str:
        return (f'<img alt="{_e(alt)}" src="data:image/png;base64,{images[name]}">' if name in images
                else f"<p><em>{_e(alt)}: no data</em></p>")

    attempt_rows = [(a.get("attempt"), a.get("job_id", ""), a.get("ending", ""), a.get("step", ""),
                     a.get("rank", ""), a.get("node", ""), a.get("detail", ""), a.get("action", ""))
                    for a in attempts]
    good_rows = [(c, f"{good['node_s'][c]:.1f}", f"{good['share'][c] * 100:.1f}%") for c in CATEGORIES]
    straggling = ("<p>none</p>" if not stragglers else
                  _table(("rank", "node", "compute vs others"),
                         [(s["rank"], s["node"], f"{s['compute_ratio']:.2f}x") for s in stragglers]))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _table(("", ""), facts),
        "<h2>Loss</h2>", img("loss", "loss curve"),
        "<h2>Images/s per rank</h2>", img("rate", "images/s over time per rank"),
        "<h2>Start-up waterfall</h2>", img("waterfall", "start-up waterfall"), f"<pre>{_e(waterfall_text)}</pre>",
        "<h2>Attempts</h2>",
        _table(("attempt", "job", "ending", "step", "rank", "node", "detail", "action"), attempt_rows)
        if attempt_rows else "<p>one attempt (no attempts.jsonl)</p>",
        "<h2>Goodput</h2>",
        f"<p>Allocated: {good['allocated_node_s']:.1f} node-seconds over {good['nodes']} node(s); "
        f"{good['redone_steps']} step(s) recomputed after resumes.</p>",
        img("goodput", "goodput"), _table(("category", "node-seconds", "share"), good_rows),
        "<h2>Stragglers</h2>", straggling,
        "<h2>Data</h2>", f"<pre>{_e(json.dumps(good, indent=1, default=str))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
