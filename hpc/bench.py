"""The benchmark's pure core: the configuration grid, its spec syntax, images/s from metrics, and the report.

    >>> parse_config("deepspeed:zero2:bf16:2")
    Config(backend='deepspeed', ranks=2, zero_stage=2, precision='bf16', loader='resident', batch=256, threads=None)

A config spec is ``BACKEND[:TOKEN...]``, tokens in any order, each at most once:
``N`` ranks (default 1), ``zeroN`` ZeRO stage (deepspeed; default 0), ``fp32|bf16|fp16`` precision
(default fp32), ``resident|classic`` loader (default resident), ``bN`` global batch (default the run's
--batch), ``tN`` intra-op threads per rank (default: the rank's share of the CPUs this task owns).
Side effects (running configs, writing files, drawing) live in hpc/commands/bench.py; no torch here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping, Sequence

from hpc import ranks

BACKENDS = ("floor", "dp", "ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16")
LOADERS = ("resident", "classic")
DEFAULT_BATCH = 256
# Training images held in memory, by the trainer (its --synthetic-size default) and the floor alike.
SYNTHETIC_SIZE = 4096
SPEC_HELP = ("BACKEND[:N][:zeroN][:fp32|bf16|fp16][:resident|classic][:bN][:tN] with BACKEND one of "
             + ", ".join(BACKENDS))

# The comparison users ask for, sized for a 2-core CPU box: every backend at one rank against the floor,
# then two ranks, once with each rank given its share of the cores and once oversubscribed.
DEFAULT_GRID = (
    "floor:1",
    "ddp:resident:1",
    "ddp:classic:1",
    "dp:resident:1",
    "deepspeed:zero0:fp32:1",
    "deepspeed:zero2:fp32:1",
    "deepspeed:zero2:bf16:1",
    "floor:2",
    "ddp:resident:2",
    "ddp:resident:2:t2",
    "deepspeed:zero2:fp32:2",
)

# The targets: hpcdist's ddp path on one rank within 5% of the floor, and two ranks on two cores
# at least 0.9x one rank.
FLOOR_TARGET = 0.95
SCALING_TARGET = 0.9


class BenchError(ValueError):
    """A grid spec or a run's records cannot give a number; the message says which and why."""


@dataclass(frozen=True)
class Config:
    """One benchmarked training setup; ``threads`` None means each rank takes its share of the CPUs."""

    backend: str
    ranks: int = 1
    zero_stage: int | None = None
    precision: str = "fp32"
    loader: str = "resident"
    batch: int = DEFAULT_BATCH
    threads: int | None = None

    def __post_init__(self) -> None:
        # DeepSpeed always runs some ZeRO stage; naming it keeps the name a faithful spec.
        if self.backend == "deepspeed" and self.zero_stage is None:
            object.__setattr__(self, "zero_stage", 0)

    @property
    def name(self) -> str:
        """The canonical spec: ``parse_config(c.name) == c`` for every valid config."""
        parts = [self.backend]
        if self.backend == "deepspeed":
            parts += [f"zero{self.zero_stage}", self.precision]
        elif self.precision != "fp32":
            parts.append(self.precision)
        if self.backend in ("dp", "ddp") or self.loader != "resident":
            parts.append(self.loader)
        if self.batch != DEFAULT_BATCH:
            parts.append(f"b{self.batch}")
        parts.append(str(self.ranks))
        if self.threads is not None:
            parts.append(f"t{self.threads}")
        return ":".join(parts)

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return self.name.replace(":", "-")

    def one_rank(self) -> Config:
        """The same training on one rank with its default threads: what ``scaling`` divides by."""
        return replace(self, ranks=1, threads=None)


_TOKENS = (
    ("ranks", re.compile(r"(\d+)"), int),
    ("zero_stage", re.compile(r"zero(\d+)"), int),
    ("precision", re.compile("(" + "|".join(PRECISIONS) + ")"), str),
    ("loader", re.compile("(" + "|".join(LOADERS) + ")"), str),
    ("batch", re.compile(r"b(\d+)"), int),
    ("threads", re.compile(r"t(\d+)"), int),
)


def parse_config(spec: str, batch: int = DEFAULT_BATCH) -> Config:
    """One config from ``spec`` (see the module docstring); ``batch`` is the global batch unless ``bN``."""
    backend, *tokens = spec.strip().lower().split(":")
    if backend not in BACKENDS:
        raise BenchError(f"config {spec!r}: unknown backend {backend!r}; write {SPEC_HELP}")
    values: dict[str, object] = {}
    for token in tokens:
        for key, pattern, kind in _TOKENS:
            m = pattern.fullmatch(token)
            if m:
                break
        else:
            raise BenchError(f"config {spec!r}: unknown token {token!r}; write {SPEC_HELP}")
        if key in values:
            raise BenchError(f"config {spec!r}: {key.replace('_', ' ')} given twice")
        values[key] = kind(m.group(1))
    values.setdefault("batch", batch)
    config = Config(backend, **values)  # type: ignore[arg-type]
    check(config, spec)
    return config


def check(config: Config, spec: str) -> None:
    """Refuse configs the trainer or the floor cannot run, naming the fix."""
    where = f"config {spec!r}"
    if config.ranks < 1:
        raise BenchError(f"{where}: ranks must be at least 1")
    if config.backend == "dp" and config.ranks != 1:
        raise BenchError(f"{where}: dp (nn.DataParallel) is one process; use ddp for {config.ranks} ranks")
    if config.zero_stage is not None and config.backend != "deepspeed":
        raise BenchError(f"{where}: zeroN applies to deepspeed only")
    if config.zero_stage is not None and not 0 <= config.zero_stage <= 3:
        raise BenchError(f"{where}: ZeRO stage must be 0-3")
    if config.backend == "floor" and (config.precision != "fp32" or config.loader != "resident"):
        raise BenchError(f"{where}: the floor trains in fp32 from resident tensors only")
    if config.batch < 1 or config.batch % config.ranks:
        raise BenchError(f"{where}: global batch {config.batch} must be a positive multiple of {config.ranks} ranks")
    if config.threads is not None and config.threads < 1:
        raise BenchError(f"{where}: threads per rank must be at least 1")


def parse_grid(specs: Iterable[str], batch: int = DEFAULT_BATCH) -> tuple[Config, ...]:
    """Configs from specs, each of which may hold several separated by commas or spaces; no duplicates."""
    configs: list[Config] = []
    for text in specs:
        for spec in re.split(r"[,\s]+", text.strip()):
            if not spec:
                continue
            config = parse_config(spec, batch)
            if config in configs:
                raise BenchError(f"config {spec!r} is in the grid twice (as {config.name})")
            configs.append(config)
    if not configs:
        raise BenchError(f"the grid is empty; give at least one --config {SPEC_HELP}")
    return tuple(configs)


def default_grid(batch: int = DEFAULT_BATCH) -> tuple[Config, ...]:
    return parse_grid(DEFAULT_GRID, batch)


def threads_for(config: Config, environ: Mapping[str, str], cpus: int) -> int:
    """Threads each rank of ``config`` runs with: explicit ``tN``, else hpc.ranks' share for N local ranks."""
    if config.threads is not None:
        return config.threads
    local = ranks.DistEnv(rank=0, world_size=config.ranks, local_rank=0, local_world_size=config.ranks,
                          node_rank=0, master_addr=ranks.DEFAULT_MASTER_ADDR,
                          master_port=ranks.DEFAULT_MASTER_PORT, source="torchrun")
    return ranks.threads_per_rank(environ, cpus, local)


def argv(config: Config, threads: int, steps: int, warmup: int, run_dir: str, python: str) -> list[str]:
    """The command that runs ``config``: the floor or the trainer, under torchrun for more than one rank."""
    launch = [python] if config.ranks == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(config.ranks)]
    total = str(warmup + steps)
    if config.backend == "floor":
        return launch + ["-m", "train.floor", "--batch-size", str(config.batch), "--max-steps", total,
                         "--warmup", str(warmup), "--threads", str(threads), "--samples", str(SYNTHETIC_SIZE)]
    # An epoch holds at least one step, so --epochs equal to the steps never stops the run before --max-steps.
    trainer = ["-m", "train", "--backend", config.backend, "--run-dir", run_dir, "--dataset", "synthetic",
               "--synthetic-size", str(SYNTHETIC_SIZE), "--epochs", total, "--max-steps", total,
               "--batch-size", str(config.batch), "--loader", config.loader,
               "--precision", config.precision, "--threads", str(threads), "--log-every", "1"]
    if config.backend == "deepspeed":
        trainer += ["--zero-stage", str(config.zero_stage)]
    return launch + trainer


def images_per_s(records: Sequence[Mapping[str, object]], warmup: int, batch: int) -> float:
    """Global images/s over the steps after warm-up: (steps after warm-up x batch) / (t_last - t_warmup).

    ``records`` are metrics.jsonl lines logged every step; the one for the ``warmup``-th step ends the
    warm-up, so its time is where the clock starts and that step and those before it are not counted.
    """
    try:
        timed = sorted((int(r["step"]), float(r["time_s"])) for r in records)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise BenchError("metrics records need numeric 'step' and 'time_s'") from None
    if warmup < 1:
        raise BenchError("warm-up must be at least 1 step: the first step's time is not a rate")
    if len(timed) <= warmup:
        raise BenchError(f"{len(timed)} logged steps, none after {warmup} warm-up steps; log every step "
                         "(--log-every 1) and run more steps")
    steps = [s for s, _ in timed]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise BenchError("metrics skip steps; the trainer must log every step (--log-every 1)")
    (step0, t0), (step1, t1) = timed[warmup - 1], timed[-1]
    if t1 <= t0:
        raise BenchError(f"time_s does not advance after warm-up ({t0} -> {t1})")
    return (step1 - step0) * batch / (t1 - t0)


def parse_jsonl(text: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a torn last line (a killed writer) is dropped."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


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

    @property
    def ok(self) -> bool:
        return self.error is None and self.images_per_s is not None


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


def _peaks(report: Mapping[str, object], missing: list[str]) -> tuple[int | None, ...]:
    peaks = peaks_of(report)
    if not peaks or None in peaks:
        missing.append("ranks[].peak_memory_bytes")
    return peaks


def result_from_summary(config: Config, threads: int, summary: Mapping[str, object],
                        records: Sequence[Mapping[str, object]], warmup: int, steps: int, wall_s: float) -> Result:
    """A trainer run's result: images/s from its per-step metrics, the rest from its summary.json."""
    missing: list[str] = []
    ttfs = _number(summary, "time_to_first_step_s", missing)
    peaks = _peaks(summary, missing)
    rate: float | None = None
    try:
        rate = images_per_s(records, warmup, config.batch)
        last = max(int(r["step"]) for r in records)  # type: ignore[call-overload]
        # A run cut short (an epoch cap, a crash after some steps) would give a rate over other steps.
        error = None if last >= warmup + steps else f"the trainer stopped at step {last} of {warmup + steps}"
    except BenchError as exc:
        error = str(exc)
    return Result(config, threads, rate if error is None else None, ttfs, peaks, wall_s, error, tuple(missing))


def result_from_floor(config: Config, threads: int, report: Mapping[str, object], wall_s: float) -> Result:
    """The floor's result from the one JSON line its rank 0 printed."""
    missing: list[str] = []
    rate = _number(report, "images_per_s", missing)
    ttfs = _number(report, "time_to_first_step_s", missing)
    peaks = _peaks(report, missing)
    error = None if rate is not None else "the floor printed no images_per_s"
    return Result(config, threads, rate, ttfs, peaks, wall_s, error, tuple(missing))


def peaks_of(summary: Mapping[str, object]) -> tuple[int | None, ...]:
    """``ranks[].peak_memory_bytes`` in rank order; None where a rank did not report it."""
    entries = summary.get("ranks")
    if not isinstance(entries, list):
        return ()
    ordered = sorted((e for e in entries if isinstance(e, dict)), key=lambda e: e.get("rank", 0))
    return tuple(e["peak_memory_bytes"] if isinstance(e.get("peak_memory_bytes"), int) else None for e in ordered)


def vs_floor(result: Result, results: Sequence[Result]) -> float | None:
    """images/s over the floor's with the same ranks, batch and threads per rank; None if there is none."""
    if result.config.backend == "floor" or not result.ok:
        return None
    for other in results:
        c = other.config
        if (c.backend == "floor" and other.ok and c.ranks == result.config.ranks
                and c.batch == result.config.batch and other.threads == result.threads):
            return result.images_per_s / other.images_per_s  # type: ignore[operator]
    return None


def scaling(result: Result, results: Sequence[Result]) -> float | None:
    """images/s over the same training's on one rank with default threads; None at one rank or if absent."""
    if result.config.ranks == 1 or not result.ok:
        return None
    base = result.config.one_rank()
    for other in results:
        if other.config == base and other.ok:
            return result.images_per_s / other.images_per_s  # type: ignore[operator]
    return None


def _num(value: float | None, fmt: str, absent: str = "missing") -> str:
    return absent if value is None else format(value, fmt)


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
        rate = f"failed: {r.error}" if r.error else _num(r.images_per_s, ".0f")
        # A failed run reported nothing, so its empty cells are not the trainer's missing fields.
        absent = "" if r.error else "missing"
        rows.append((c.name, c.backend, "" if c.zero_stage is None else str(c.zero_stage), c.precision,
                     "" if c.backend == "floor" else c.loader, str(c.batch), str(c.ranks), str(r.threads), rate,
                     _ratio(vs_floor(r, results)), _ratio(scaling(r, results)),
                     _num(r.time_to_first_step_s, ".1f", absent), _mib(r.peak_memory_bytes, absent)))
    return rows


def markdown_table(results: Sequence[Result]) -> str:
    """A GitHub-flavoured Markdown table, one row per config, in grid order."""
    numeric = {"batch", "ranks", "threads/rank", "images/s", "vs floor", "vs 1 rank", "first step s"}
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def verdicts(results: Sequence[Result]) -> list[str]:
    """The issue's two targets, checked where the grid holds the rows they need."""
    lines = []
    for r in results:
        c = r.config
        ratio = vs_floor(r, results)
        # The target is for the trainer's default path; the classic loader is there to show its cost.
        if c.backend == "ddp" and c.ranks == 1 and c.loader == "resident" and ratio is not None:
            mark = "meets" if ratio >= FLOOR_TARGET else "misses"
            lines.append(f"{c.name} vs floor: {ratio:.2f}x ({mark} the >= {FLOOR_TARGET}x target)")
    for r in results:
        c = r.config
        ratio = scaling(r, results)
        # The targets are hpcdist's; the floor's own scaling stays in the table as the ceiling to read them by.
        if c.backend != "floor" and ratio is not None:
            mark = "meets" if ratio >= SCALING_TARGET else "misses"
            lines.append(f"{c.name} vs 1 rank: {ratio:.2f}x ({mark} the >= {SCALING_TARGET}x target"
                         + (", oversubscribed" if c.threads is not None else "") + ")")
    return lines


def markdown_report(results: Sequence[Result], meta: Mapping[str, object]) -> str:
    """bench.md: what was run, the table, the targets, and any fields a run did not report."""
    head = ", ".join(f"{k} {v}" for k, v in meta.items())
    parts = ["# hpcdist bench", head, markdown_table(results)]
    checks = verdicts(results)
    if checks:
        parts.append("\n".join(f"- {line}" for line in checks))
    gaps = [f"- {r.config.name}: {', '.join(r.missing)} not reported" for r in results if r.missing]
    if gaps:
        parts.append("Missing fields (reported as missing, not estimated):\n" + "\n".join(gaps))
    return "\n\n".join(parts) + "\n"


def to_json(results: Sequence[Result], meta: Mapping[str, object]) -> dict:
    """bench.json: the run's settings and one object per config, ratios included."""
    rows = []
    for r in results:
        row = asdict(r)
        row["config"] = {"name": r.config.name, **asdict(r.config)}
        row["peak_memory_bytes"] = list(r.peak_memory_bytes)
        row["missing"] = list(r.missing)
        row["vs_floor"] = vs_floor(r, results)
        row["vs_1_rank"] = scaling(r, results)
        rows.append(row)
    return {**meta, "targets": {"ddp_1_rank_vs_floor": FLOOR_TARGET, "n_ranks_vs_1_rank": SCALING_TARGET},
            "results": rows}


def chart_bars(results: Sequence[Result]) -> list[tuple[str, float, str]]:
    """(label, images/s, kind) per successful config, kind being "floor" or the backend, for the PNG."""
    return [(r.config.name, r.images_per_s, r.config.backend) for r in results if r.ok]  # type: ignore[misc]
