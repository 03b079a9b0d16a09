"""Write up a benchmark's results: each row against its floor and one rank, the targets, bench.md and bench.json.

    text = markdown_report([median_of(runs) for runs in rounds], {"cpus": 2, "steps": 200})

Pure: hpc/commands/bench.py writes the files and draws the chart from ``chart_bars``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from typing import Mapping, Sequence

from hpc import shown, vocab
from hpc.bench import FLOORS
from hpc.benchresults import Result

# The targets: hpcdist's ddp path on one rank, and its DeepSpeed path against a bare DeepSpeed
# loop, within 5% of their floors; two ranks on two cores at least 0.9x one rank.
FLOOR_TARGET = 0.95
SCALING_TARGET = 0.9
SNAPSHOT_STALL_TARGET = 0.02  # snapshots in node memory: the copy is the only stall (issue 19)


def floor_of(result: Result, results: Sequence[Result]) -> Result | None:
    """The floor run a trainer row is divided by: for DeepSpeed the bare DeepSpeed loop with the same ZeRO
    stage and precision if the grid ran one, else the bare PyTorch loop; same ranks, batch and threads."""
    c = result.config
    if c.backend in FLOORS or not result.ok:
        return None

    def same(other: Result, backend: str) -> bool:
        o = other.config
        return (o.backend == backend and other.ok and o.ranks == c.ranks and o.batch == c.batch
                and other.threads == result.threads
                and (backend == "floor" or (o.zero_stage, o.precision) == (c.zero_stage, c.precision)))

    backends = ("floor-deepspeed", "floor") if c.backend == "deepspeed" else ("floor",)
    return next((other for backend in backends for other in results if same(other, backend)), None)


def vs_floor(result: Result, results: Sequence[Result]) -> float | None:
    """images/s over its floor's (see ``floor_of``); None if the grid ran none."""
    floor = floor_of(result, results)
    return None if floor is None else result.images_per_s / floor.images_per_s  # type: ignore[operator]


def scaling(result: Result, results: Sequence[Result]) -> float | None:
    """images/s over the same training's on one rank with default threads; None at one rank or if absent."""
    if result.config.ranks == 1 or not result.ok:
        return None
    one_rank = replace(result.config, ranks=1, threads=None)
    base = next((other for other in results if other.config == one_rank and other.ok), None)
    return None if base is None else result.images_per_s / base.images_per_s  # type: ignore[operator]


def _mib(peaks: tuple[int | None, ...], absent: str = "missing") -> str:
    if not peaks:
        return absent
    return " / ".join("missing" if p is None else f"{p / 2**20:.0f}" for p in peaks)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


COLUMNS = ("config", "backend", "ZeRO", "precision", "loader", "batch", "ranks", "threads/rank", "images/s",
           "vs floor", "vs 1 rank", "first step s", "peak MiB per rank")


def table_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        c = r.config
        rate = f"failed: {r.error}" if r.error else shown.number(r.images_per_s, ".0f", "missing")
        # A failed run reported nothing, so its empty cells are not the trainer's missing fields.
        absent = "" if r.error else "missing"
        precision = f"auto → {r.trained or '?'}" if c.precision == vocab.AUTO else c.precision
        rows.append((c.name, c.backend, "" if c.zero_stage is None else str(c.zero_stage), precision,
                     "" if c.backend in FLOORS else c.loader, str(c.batch), str(c.ranks), str(r.threads), rate,
                     _ratio(vs_floor(r, results)), _ratio(scaling(r, results)),
                     shown.number(r.time_to_first_step_s, ".1f", absent), _mib(r.peak_memory_bytes, absent)))
    return rows


def markdown_table(results: Sequence[Result]) -> str:
    """A GitHub-flavoured Markdown table, one row per config, in grid order."""
    numeric = {"batch", "ranks", "threads/rank", "images/s", "vs floor", "vs 1 rank", "first step s"}
    return "\n".join(shown.markdown((COLUMNS, *table_rows(results)),
                                    right={i for i, c in enumerate(COLUMNS) if c in numeric}))


def verdicts(results: Sequence[Result]) -> list[str]:
    """The issue's two targets, checked where the grid holds the rows they need."""
    lines = []
    for r in results:
        c = r.config
        floor = floor_of(r, results)
        # The target is for the trainer's default path; the classic loader is there to show its cost.
        plain_ddp = (c.backend == "ddp" and c.ranks == 1 and c.loader == "resident" and c.precision == "fp32"
                     and not (c.channels_last or c.compile))
        if floor is not None and (plain_ddp or floor.config.backend == "floor-deepspeed"):
            ratio = vs_floor(r, results)
            mark = "meets" if ratio >= FLOOR_TARGET else "misses"  # type: ignore[operator]
            lines.append(f"{c.name} vs {floor.config.name}: {ratio:.2f}x ({mark} the >= {FLOOR_TARGET}x target)")
    for r in results:
        c = r.config
        ratio = scaling(r, results)
        # The targets are hpcdist's; the floor's own scaling stays in the table as the ceiling to read them by.
        if c.backend not in FLOORS and ratio is not None:
            mark = "meets" if ratio >= SCALING_TARGET else "misses"
            lines.append(f"{c.name} vs 1 rank: {ratio:.2f}x ({mark} the >= {SCALING_TARGET}x target"
                         + (", oversubscribed" if c.threads is not None else "") + ")")
    for r in results:
        share = r.snapshot_stall_share
        if share is not None:
            mark = "meets" if share <= SNAPSHOT_STALL_TARGET else "misses"
            lines.append(f"{r.config.name}: snapshot copies stalled training {share:.3%} of its time ({r.snapshots} "
                         f"snapshots, {1000 * r.snapshot_stall_s / r.snapshots:.2f} ms each; {mark} the <= "  # type: ignore[operator]
                         f"{SNAPSHOT_STALL_TARGET:.0%} target)")
    return lines


def markdown_report(results: Sequence[Result], meta: Mapping[str, object]) -> str:
    """bench.md: what was run, the table, the targets, and any fields a run did not report."""
    head = ", ".join(f"{k} {v}" for k, v in meta.items() if k != "orders")
    parts = ["# hpcdist bench", head, markdown_table(results)]
    checks = verdicts(results)
    if checks:
        parts.append("\n".join(f"- {line}" for line in checks))
    runs = spread_lines(results, meta.get("orders", ()))  # type: ignore[arg-type]
    if runs:
        parts.append(f"Samples per config (#position in its round; order {meta.get('order')}, seed "
                     f"{meta.get('seed')}), spread = (max - min) / median:\n" + "\n".join(f"- {x}" for x in runs))
    gaps = [f"- {r.config.name}: {', '.join(r.missing)} not reported" for r in results if r.missing]
    if gaps:
        parts.append("Missing fields (reported as missing, not estimated):\n" + "\n".join(gaps))
    return "\n\n".join(parts) + "\n"


def to_json(results: Sequence[Result], meta: Mapping[str, object]) -> dict:
    """bench.json: the run's settings and one object per config, ratios included."""
    rows = [{**asdict(r), "config": {"name": r.config.name, **asdict(r.config)}, "vs_floor": vs_floor(r, results),
             "vs_1_rank": scaling(r, results), "spread": spread(r.samples),
             "snapshot_stall_share": r.snapshot_stall_share} for r in results]
    return {**meta, "targets": {"ddp_1_rank_vs_floor": FLOOR_TARGET, "deepspeed_vs_floor_deepspeed": FLOOR_TARGET,
                                "n_ranks_vs_1_rank": SCALING_TARGET, "snapshot_stall_share": SNAPSHOT_STALL_TARGET},
            "results": rows}


def spread(samples: Sequence[float]) -> float | None:
    """(max - min) / median of a config's samples: how far runs of the same config moved."""
    if len(samples) < 2:
        return None
    middle = statistics.median(samples)
    return (max(samples) - min(samples)) / middle if middle else None


def spread_lines(results: Sequence[Result], orders: Sequence[Sequence[str]] = ()) -> list[str]:
    """Per config: its samples with the position each ran at in its round, and their spread."""
    lines = []
    for r in results:
        if len(r.samples) < 2:
            continue
        places = [(order.index(r.config.name) + 1 if r.config.name in order else None) for order in orders]
        runs = ", ".join(f"{v:.0f}" + (f" (#{p})" if p else "") for v, p in
                         zip(r.samples, places or [None] * len(r.samples)))
        lines.append(f"{r.config.name}: {runs}; spread {spread(r.samples) * 100:.0f}%")  # type: ignore[operator]
    return lines


def chart_bars(results: Sequence[Result]) -> list[tuple[str, float, str]]:
    """(label, images/s, kind) per successful config, kind being "floor" or the backend, for the PNG."""
    return [(r.config.name, r.images_per_s, "floor" if r.config.backend in FLOORS else r.config.backend)
            for r in results if r.ok]  # type: ignore[misc]
