"""The benchmark's pure core: the configuration grid, its spec syntax, images/s from metrics, and the report.

    >>> parse_config("deepspeed:zero2:bf16:2")
    Config(backend='deepspeed', ranks=2, zero_stage=2, precision='bf16', loader='resident', batch=256, threads=None)

A config spec is ``BACKEND[:TOKEN...]``, tokens in any order, each at most once:
``N`` ranks (default 1), ``zeroN`` ZeRO stage (deepspeed; default 0), ``auto|fp32|bf16|fp16`` precision
(default fp32; ``auto``: what the trainer picks for this machine, the row says which), ``resident|classic``
loader (default resident), ``bN`` global batch (default the run's
--batch), ``tN`` intra-op threads per rank (default: the rank's share of the CPUs this task owns),
``cl`` channels_last and ``compile`` torch.compile (dp/ddp), ``nohb`` the trainer without its heartbeat
(``--heartbeat-s 0``, to measure the heartbeat's cost). ``floor`` is a bare PyTorch loop and
``floor-deepspeed`` a bare DeepSpeed engine loop (tools/floor.py): what the trainer's rows are divided by.
Side effects (running configs, writing files, drawing) live in hpc/commands/bench.py; no torch here.
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping, Sequence

from hpc import ranks, vocab

FLOORS = ("floor", "floor-deepspeed")
BACKENDS = (*FLOORS, *vocab.BACKENDS)
PRECISIONS = vocab.PRECISIONS
LOADERS = vocab.LOADERS
DEFAULT_BATCH = 256
# Training images held in memory, by the trainer (its --synthetic-size default) and the floor alike.
SYNTHETIC_SIZE = 4096
SPEC_HELP = ("BACKEND[:N][:zeroN][:auto|fp32|bf16|fp16][:resident|classic][:bN][:tN][:cl][:compile][:nohb] "
             "with BACKEND one of " + ", ".join(BACKENDS))

# The comparison users ask for, sized for a 2-core CPU box: every backend at one rank against its floor,
# then two ranks, once with each rank given its share of the cores and once oversubscribed.
DEFAULT_GRID = (
    "floor:1",
    "ddp:resident:1",
    "ddp:classic:1",
    "dp:resident:1",
    "deepspeed:zero0:fp32:1",
    "floor-deepspeed:zero2:fp32:1",
    "deepspeed:zero2:fp32:1",
    "deepspeed:zero2:bf16:1",
    "deepspeed:zero2:auto:1",
    "floor:2",
    "ddp:resident:2",
    "ddp:resident:2:t2",
    "deepspeed:zero2:fp32:2",
)

# The targets: hpcdist's ddp path on one rank, and its DeepSpeed path against a bare DeepSpeed
# loop, within 5% of their floors; two ranks on two cores at least 0.9x one rank.
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
    channels_last: bool = False
    compile: bool = False
    # False: the trainer runs with --heartbeat-s 0, to measure what its heartbeat costs.
    heartbeat: bool = True

    def __post_init__(self) -> None:
        # DeepSpeed always runs some ZeRO stage; naming it keeps the name a faithful spec.
        if self.uses_deepspeed and self.zero_stage is None:
            object.__setattr__(self, "zero_stage", 0)

    @property
    def uses_deepspeed(self) -> bool:
        return self.backend in ("deepspeed", "floor-deepspeed")

    @property
    def name(self) -> str:
        """The canonical spec: ``parse_config(c.name) == c`` for every valid config."""
        parts = [self.backend]
        if self.uses_deepspeed:
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
        parts += [flag for flag, on in (("cl", self.channels_last), ("compile", self.compile),
                                        ("nohb", not self.heartbeat)) if on]
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
    ("channels_last", re.compile("(cl)"), bool),
    ("compile", re.compile("(compile)"), bool),
    ("heartbeat", re.compile("(nohb)"), lambda _: False),
)


def parse_config(spec: str, batch: int = DEFAULT_BATCH) -> Config:
    """One config from ``spec`` (see the module docstring); ``batch`` is the global batch unless ``bN``."""
    backend, *tokens = spec.strip().lower().split(":")
    if backend not in BACKENDS:
        raise BenchError(f"config {spec!r}: unknown backend {backend!r}; write {SPEC_HELP}")
    values: dict[str, object] = {}
    for token in tokens:
        for key, pattern, kind in _TOKENS:  # noqa: B007 - the entry that matched is used after break
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
    if config.zero_stage is not None and not config.uses_deepspeed:
        raise BenchError(f"{where}: zeroN applies to deepspeed and floor-deepspeed only")
    if config.zero_stage is not None and not 0 <= config.zero_stage <= 3:
        raise BenchError(f"{where}: ZeRO stage must be 0-3")
    if config.backend == "floor" and config.precision != "fp32":
        raise BenchError(f"{where}: the floor trains in fp32; floor-deepspeed takes a precision")
    if config.backend == "floor-deepspeed" and config.precision == vocab.AUTO:
        raise BenchError(f"{where}: floor-deepspeed takes a named precision ({', '.join(vocab.DTYPES)}), not auto")
    if config.backend in FLOORS and config.loader != "resident":
        raise BenchError(f"{where}: a floor trains from tensors already on the device, never a loader")
    if not config.heartbeat and config.backend in FLOORS:
        raise BenchError(f"{where}: nohb applies to the trainer; a floor writes no heartbeat")
    if (config.channels_last or config.compile) and config.backend not in ("dp", "ddp"):
        raise BenchError(f"{where}: cl and compile apply to dp and ddp only")
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


def argv(config: Config, threads: int, steps: int, warmup: int, run_dir: str, python: str,
         samples: int = SYNTHETIC_SIZE) -> list[str]:
    """The command that runs ``config``: a floor or the trainer, under torchrun for more than one rank."""
    launch = [python] if config.ranks == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(config.ranks)]
    total = str(warmup + steps)
    if config.backend in FLOORS:
        floor = ["-m", "tools.floor", "--batch-size", str(config.batch), "--max-steps", total,
                 "--warmup", str(warmup), "--threads", str(threads), "--samples", str(samples)]
        if config.backend == "floor-deepspeed":
            floor += ["--engine", "deepspeed", "--zero-stage", str(config.zero_stage),
                      "--precision", config.precision]
        return launch + floor
    # An epoch holds at least one step, so --epochs equal to the steps never stops the run before --max-steps.
    # Logging only the first and last step keeps the loss read-back (a device sync) out of the timed steps.
    trainer = ["-m", "train", "--backend", config.backend, "--run-dir", run_dir, "--dataset", "synthetic",
               "--synthetic-size", str(samples), "--epochs", total, "--max-steps", total,
               "--batch-size", str(config.batch), "--loader", config.loader,
               "--precision", config.precision, "--threads", str(threads), "--log-every", total,
               "--warmup-steps", str(warmup)]
    if config.backend == "deepspeed":
        trainer += ["--zero-stage", str(config.zero_stage)]
    trainer += [flag for flag, on in (("--channels-last", config.channels_last), ("--compile", config.compile))
                if on]
    if not config.heartbeat:
        trainer += ["--heartbeat-s", "0"]
    return launch + trainer


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


def _text(report: Mapping[str, object], key: str) -> str | None:
    value = report.get(key)
    return value if isinstance(value, str) else None


def _peaks(report: Mapping[str, object], missing: list[str]) -> tuple[int | None, ...]:
    peaks = peaks_of(report)
    if not peaks or None in peaks:
        missing.append("ranks[].peak_memory_bytes")
    return peaks


def result_from_summary(config: Config, threads: int, summary: Mapping[str, object], warmup: int, steps: int,
                        wall_s: float) -> Result:
    """A trainer run's result from its summary.json, whose images_per_s leaves out ``warmup`` steps."""
    missing: list[str] = []
    ttfs = _number(summary, "time_to_first_step_s", missing)
    peaks = _peaks(summary, missing)
    device = _text(summary, "device")
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
    return Result(config, threads, float(rate) if error is None else None, ttfs, peaks,  # type: ignore[arg-type]
                  wall_s, error, tuple(missing), device=device, trained=_text(summary, "precision"))


def result_from_floor(config: Config, threads: int, report: Mapping[str, object], wall_s: float) -> Result:
    """The floor's result from the one JSON line its rank 0 printed."""
    missing: list[str] = []
    rate = _number(report, "images_per_s", missing)
    ttfs = _number(report, "time_to_first_step_s", missing)
    peaks = _peaks(report, missing)
    error = None if rate is not None else "the floor printed no images_per_s"
    device = _text(report, "device")
    return Result(config, threads, rate, ttfs, peaks, wall_s, error, tuple(missing), device=device)


def peaks_of(summary: Mapping[str, object]) -> tuple[int | None, ...]:
    """``ranks[].peak_memory_bytes`` in rank order; None where a rank did not report it."""
    entries = summary.get("ranks")
    if not isinstance(entries, list):
        return ()
    ordered = sorted((e for e in entries if isinstance(e, dict)), key=lambda e: e.get("rank", 0))
    return tuple(e["peak_memory_bytes"] if isinstance(e.get("peak_memory_bytes"), int) else None for e in ordered)


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

    for backend in (("floor-deepspeed", "floor") if c.backend == "deepspeed" else ("floor",)):
        for other in results:
            if same(other, backend):
                return other
    return None


def vs_floor(result: Result, results: Sequence[Result]) -> float | None:
    """images/s over its floor's (see ``floor_of``); None if the grid ran none."""
    floor = floor_of(result, results)
    if floor is None:
        return None
    return result.images_per_s / floor.images_per_s  # type: ignore[operator]


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
        precision = f"auto → {r.trained or '?'}" if c.precision == vocab.AUTO else c.precision
        rows.append((c.name, c.backend, "" if c.zero_stage is None else str(c.zero_stage), precision,
                     "" if c.backend in FLOORS else c.loader, str(c.batch), str(c.ranks), str(r.threads), rate,
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
        floor = floor_of(r, results)
        bare_ds = floor is not None and floor.config.backend == "floor-deepspeed"
        plain_ddp = (c.backend == "ddp" and c.ranks == 1 and c.loader == "resident" and c.precision == "fp32"
                     and not (c.channels_last or c.compile))
        if ratio is not None and (plain_ddp or bare_ds):
            mark = "meets" if ratio >= FLOOR_TARGET else "misses"
            lines.append(f"{c.name} vs {floor.config.name}: {ratio:.2f}x "  # type: ignore[union-attr]
                         f"({mark} the >= {FLOOR_TARGET}x target)")
    for r in results:
        c = r.config
        ratio = scaling(r, results)
        # The targets are hpcdist's; the floor's own scaling stays in the table as the ceiling to read them by.
        if c.backend not in FLOORS and ratio is not None:
            mark = "meets" if ratio >= SCALING_TARGET else "misses"
            lines.append(f"{c.name} vs 1 rank: {ratio:.2f}x ({mark} the >= {SCALING_TARGET}x target"
                         + (", oversubscribed" if c.threads is not None else "") + ")")
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
    rows = []
    for r in results:
        row = asdict(r)
        row["config"] = {"name": r.config.name, **asdict(r.config)}
        row["peak_memory_bytes"] = list(r.peak_memory_bytes)
        row["missing"] = list(r.missing)
        row["vs_floor"] = vs_floor(r, results)
        row["vs_1_rank"] = scaling(r, results)
        row["spread"] = spread(r.samples)
        rows.append(row)
    return {**meta, "targets": {"ddp_1_rank_vs_floor": FLOOR_TARGET, "deepspeed_vs_floor_deepspeed": FLOOR_TARGET,
                                "n_ranks_vs_1_rank": SCALING_TARGET},
            "results": rows}


ORDERS = ("shuffle", "alternate", "fixed")


def round_order(n: int, round_: int, how: str = "shuffle", seed: int = 0) -> list[int]:
    """The order (indices into the grid) in which round ``round_`` (1-based) runs its ``n`` configs.

    On a shared machine the first config of a round runs measurably faster than the rest, so a fixed
    order favours one config every round. ``shuffle``: an order drawn from ``seed`` (recorded with the
    results, so a run can be repeated), rotated one place each round, so that over ``n`` rounds every
    config runs once in every position (independent shuffles leave that to chance: with two configs, one
    ran first in 3 of 4 rounds). ``alternate`` runs odd rounds forward and even rounds backward; ``fixed``
    keeps the grid's order.
    """
    if how not in ORDERS:
        raise BenchError(f"unknown order {how!r}; choose one of {', '.join(ORDERS)}")
    order = list(range(n))
    if how == "alternate" and round_ % 2 == 0:
        order.reverse()
    elif how == "shuffle" and n:
        random.Random(seed).shuffle(order)
        turn = (round_ - 1) % n
        order = order[turn:] + order[:turn]
    return order


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
