"""Format a running job's progress and its end-of-run summary as text; pure functions, no I/O.

    p = progress.of(heartbeats, last_metric)      # what to show, from rank heartbeats / metrics.jsonl
    progress.bar(p, width=80)                     # one line for a terminal, redrawn in place
    progress.line(p)                              # one plain line for a pipe or a log
    progress.summary(summary, attempts, stragglers)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hpc import monitor, vocab

# A pipe gets a progress line at most this often (a terminal's bar is redrawn on every poll).
PLAIN_EVERY_S = 5.0
# summary.json's numbers in the summary line, in order, each as shown.
SUMMARY_NUMBERS = (("images_per_s", "{:,.0f} images/s"), ("final_loss", "final loss {:.4f}"),
                   ("test_accuracy", "test accuracy {:.3f}"), ("time_to_first_step_s", "first step after {:.1f}s"))


@dataclass(frozen=True)
class Progress:
    """A job's progress at one moment: rank 0's step and loss, the ranks' summed images/s, the phase."""

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    images_per_s: float | None = None
    step_time_s: float | None = None
    phase: str = ""
    attempt: int = 0

    @property
    def eta_s(self) -> float | None:
        if self.total_steps is None:
            return None
        if self.step >= self.total_steps:
            return 0.0
        if self.step_time_s is None:
            return None
        return (self.total_steps - self.step) * self.step_time_s

    @property
    def fraction(self) -> float | None:
        if not self.total_steps:
            return None
        return min(max(self.step / self.total_steps, 0.0), 1.0)


def of(beats: Mapping[int, Any], metric: Mapping[str, Any] | None = None) -> Progress | None:
    """Progress from heartbeats (hpc.monitor.Heartbeat by rank) of the newest attempt, else from rank 0's
    newest metrics.jsonl line; None when neither has anything yet."""
    if beats:
        current = monitor.newest_attempt(beats)
        lead = next(iter(current.values()))  # in rank order: rank 0 while it reports
        # While training, the ranks training now; after it, the last rate each rank reported.
        rates = [b.images_per_s for b in current.values() if b.phase == "train" and b.images_per_s]
        rates = rates or [b.images_per_s for b in current.values() if b.images_per_s]
        return Progress(step=lead.step, total_steps=lead.total_steps, loss=lead.loss,
                        images_per_s=sum(rates) if rates else None, step_time_s=lead.step_time_s,
                        phase=lead.phase, attempt=lead.attempt)
    if metric:
        step = metric.get("step")
        return Progress(step=step if isinstance(step, int) else 0, loss=_num(metric.get("loss")),
                        images_per_s=_num(metric.get("images_per_s")), phase="train")
    return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown (or past any float: a step time of 1e300 s)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fields(p: Progress) -> list[str]:
    out = []
    if p.loss is not None:
        out.append(f"loss {p.loss:.4f}")
    if p.images_per_s is not None:
        out.append(f"{p.images_per_s:,.0f} images/s")
    if p.total_steps is not None and p.phase not in vocab.FINAL_PHASES:  # an ended run has no time left to guess
        out.append(f"ETA {duration(p.eta_s)}")
    if p.phase and p.phase != "train":
        out.append(p.phase)
    if p.attempt:
        out.append(f"attempt {p.attempt}")
    return out


def step_text(p: Progress) -> str:
    return f"step {p.step}/{p.total_steps}" if p.total_steps else f"step {p.step}"


def line(p: Progress) -> str:
    """``step 120/200 | loss 1.2340 | 1,830 images/s | ETA 42s`` for pipes and logs."""
    return " | ".join([step_text(p), *_fields(p)])


def bar(p: Progress, width: int = 80) -> str:
    """``[#######.......] 120/200 60% | loss ... | ETA 42s``, cut to ``width`` columns."""
    tail = " | ".join(_fields(p))
    counts = f"{p.step}/{p.total_steps} {p.fraction * 100:3.0f}%" if p.fraction is not None else f"step {p.step}"
    text = f"{counts} | {tail}" if tail else counts
    room = width - len(text) - 3
    if p.fraction is not None and room >= 10:
        cells = min(room, 40)
        done = int(p.fraction * cells)
        text = f"[{'#' * done}{'.' * (cells - done)}] {text}"
    return text[:width]


def changed(previous: Progress | None, current: Progress, since_s: float) -> bool:
    """Whether a pipe should get a new line: a phase or attempt change at once, a new step every PLAIN_EVERY_S."""
    if previous is None:
        return True
    if (current.phase, current.attempt) != (previous.phase, previous.attempt):
        return True
    return current.step != previous.step and since_s >= PLAIN_EVERY_S


def summary(result: Mapping[str, Any] | None, attempts: Sequence[Mapping[str, Any]] = (),
            stragglers: Sequence[Mapping[str, Any]] = (), waited_s: float | None = None) -> list[str]:
    """The lines ``submit --wait`` ends with: rate, loss, accuracy, time to first step, attempts, stragglers."""
    lines = []
    if result:
        parts = [fmt.format(n) for key, fmt in SUMMARY_NUMBERS if (n := _num(result.get(key))) is not None]
        if isinstance(result.get("steps"), int):
            parts.append(f"{result['steps']} steps")
        if parts:
            lines.append("summary: " + ", ".join(parts))
    if attempts:
        described = [f"{a.get('attempt', i)}: {a.get('ending', '?')}"
                     + (f" at step {a['step']}" if isinstance(a.get("step"), int) else "")
                     for i, a in enumerate(attempts)]
        lines.append(f"attempts: {len(attempts)} ({'; '.join(described)})")
    elif result:
        lines.append("attempts: 1")
    lines += monitor.flag_lines("straggler", [
        (s.get("rank"), s.get("node"), "" if (ratio := _num(s.get("compute_ratio"))) is None
         else f"compute {ratio:.2f}x the other ranks' median") for s in stragglers])
    if waited_s is not None:
        lines.append(f"waited {duration(waited_s)}")
    return lines
