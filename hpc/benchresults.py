"""Read a benchmark run's numbers: one Result per config, from the trainer's summary.json or the floor's report.

    result = result_from_summary(config, threads, json.load(open("summary.json")), warmup, steps, wall_s)

A number a run did not report stays None and is named in ``Result.missing``: never estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from hpc.bench import Config


@dataclass(frozen=True)
class Result:
    """One config's measurements; a field the run did not report is None and named in ``missing``."""

    config: Config
    threads: int
    images_per_s: float | None = None
    time_to_first_step_s: float | None = None
    peak_memory_bytes: tuple[int | None, ...] = ()
    wall_s: float | None = None
    error: str | None = None
    missing: tuple[str, ...] = ()
    samples: tuple[float, ...] = ()
    device: str | None = None
    trained: str | None = None  # the precision the trainer trained in (summary.json): what auto became
    snapshots: int | None = None  # snapshots rank 0's node took (a snapS config), and what copying them stalled
    snapshot_stall_s: float | None = None
    steps: int | None = None      # every step the trainer ran, warm-up included

    @property
    def ok(self) -> bool:
        return self.error is None and self.images_per_s is not None

    @property
    def snapshot_stall_share(self) -> float | None:
        """Snapshot copies' stall as a share of the training time (steps x batch / images/s)."""
        if not self.ok or not self.snapshots or self.snapshot_stall_s is None or not self.steps:
            return None
        return self.snapshot_stall_s / (self.steps * self.config.batch / self.images_per_s)  # type: ignore[operator]


def median_of(runs: Sequence[Result]) -> Result:
    """One row from repeated runs of a config: the run with the median images/s, carrying every sample.

    The median (lower middle for an even count) is a real run, so its first-step time and peak memory
    stay that run's own. Any failed run makes the row that failure: a config that fails sometimes is
    not one to report a rate for.
    """
    failed = [r for r in runs if not r.ok]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r.images_per_s)
    middle = ordered[(len(ordered) - 1) // 2]
    return replace(middle, samples=tuple(r.images_per_s for r in runs))


def _number(report: Mapping[str, object], key: str, missing: list[str]) -> float | None:
    value = report.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    missing.append(key)
    return None


def _text(report: Mapping[str, object], key: str) -> str | None:
    value = report.get(key)
    return value if isinstance(value, str) else None


def _peaks(report: Mapping[str, object], missing: list[str]) -> tuple[int | None, ...]:
    """``ranks[].peak_memory_bytes`` in rank order, None where a rank did not report it (and then named missing)."""
    entries = report.get("ranks")
    ranks = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    ordered = sorted(ranks, key=lambda e: e.get("rank", 0))
    peaks = tuple(e["peak_memory_bytes"] if isinstance(e.get("peak_memory_bytes"), int) else None for e in ordered)
    if not peaks or None in peaks:
        missing.append("ranks[].peak_memory_bytes")
    return peaks


def result_from_summary(config: Config, threads: int, summary: Mapping[str, object], warmup: int, steps: int,
                        wall_s: float) -> Result:
    """A trainer run's result from its summary.json, whose images_per_s leaves out ``warmup`` steps."""
    missing: list[str] = []
    ttfs = _number(summary, "time_to_first_step_s", missing)
    peaks = _peaks(summary, missing)
    rate = summary.get("images_per_s")
    ran = summary.get("steps")
    error = None
    if summary.get("warmup_steps") != warmup:
        error = (f"summary.json's rate leaves out {summary.get('warmup_steps')} warm-up steps, not {warmup}; "
                 "the trainer must take --warmup-steps")
    elif not isinstance(ran, int) or ran < warmup + steps:
        error = f"the trainer stopped at step {ran} of {warmup + steps}"
    elif not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
        error = f"summary.json has no images_per_s (got {rate!r})"
    snapshots, stall = summary.get("snapshots"), summary.get("snapshot_stall_s")
    if config.snapshot_every_s is not None and not (isinstance(snapshots, int) and isinstance(stall, (int, float))):
        missing.append("snapshots")
    return Result(config, threads, float(rate) if error is None else None, ttfs, peaks,  # type: ignore[arg-type]
                  wall_s, error, tuple(missing), device=_text(summary, "device"), trained=_text(summary, "precision"),
                  snapshots=snapshots if isinstance(snapshots, int) else None,
                  snapshot_stall_s=float(stall) if isinstance(stall, (int, float)) else None,
                  steps=ran if isinstance(ran, int) else None)


def result_from_floor(config: Config, threads: int, report: Mapping[str, object], wall_s: float) -> Result:
    """The floor's result from the one JSON line its rank 0 printed."""
    missing: list[str] = []
    rate = _number(report, "images_per_s", missing)
    ttfs = _number(report, "time_to_first_step_s", missing)
    peaks = _peaks(report, missing)
    error = None if rate is not None else "the floor printed no images_per_s"
    return Result(config, threads, rate, ttfs, peaks, wall_s, error, tuple(missing), device=_text(report, "device"))
