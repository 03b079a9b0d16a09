"""The benchmark's grid: its configs and their spec syntax, the command that runs each, and each round's order.

    >>> parse_config("deepspeed:zero2:bf16:2")
    Config(backend='deepspeed', ranks=2, zero_stage=2, precision='bf16', loader='resident', batch=256, threads=None)

A config spec is ``BACKEND[:TOKEN...]``, tokens in any order, each at most once:
``N`` ranks (default 1), ``zeroN`` ZeRO stage (deepspeed; default 0), ``auto|fp32|bf16|fp16`` precision
(default fp32; ``auto``: what the trainer picks for this machine, the row says which), ``resident|classic``
loader (default resident), ``bN`` global batch (default the run's
--batch), ``tN`` intra-op threads per rank (default: the rank's share of the CPUs this task owns),
``cl`` channels_last and ``compile`` torch.compile (dp/ddp), ``nohb`` the trainer without its heartbeat
(``--heartbeat-s 0``, to measure the heartbeat's cost), ``snapS`` a snapshot in node memory every S seconds
(``--snapshot-every-s S``, to measure what snapshots cost; without it none, in a Slurm job too).
``floor`` is a bare PyTorch loop and ``floor-deepspeed`` a bare DeepSpeed engine loop (tools/floor.py): what
the trainer's rows are divided by. A run's numbers are read by hpc.benchresults and written up by
hpc.benchreport; side effects (running configs, writing files, drawing) live in hpc/commands/bench.py. No torch
in any of them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable, Mapping

from hpc import ranks, task, vocab

FLOORS = ("floor", "floor-deepspeed")
BACKENDS = (*FLOORS, *vocab.BACKENDS)
DEFAULT_BATCH = 256
# Training images held in memory, by the trainer (its --synthetic-size default) and the floor alike.
SYNTHETIC_SIZE = 4096
SPEC_HELP = ("BACKEND[:N][:zeroN][:auto|fp32|bf16|fp16][:resident|classic][:bN][:tN][:cl][:compile][:nohb][:snapS] "
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

class BenchError(ValueError):
    """A grid spec or a run's records cannot give a number; the message says which and why."""



def decimal(seconds: float) -> str:
    """``seconds`` exactly as the spec's grammar writes it, no exponent: ``:g`` made snap1234567 and snap1234568
    one name (``1.23457e+06``, trained as 1234570) and snap0.00001 a name (``1e-05``) that does not read back."""
    text = format(Decimal(repr(float(seconds))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text

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
    # Seconds between snapshots in node memory (--snapshot-every-s); None: none, as outside a Slurm job.
    snapshot_every_s: float | None = None

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
        if self.snapshot_every_s is not None:
            parts.append(f"snap{decimal(self.snapshot_every_s)}")
        return ":".join(parts)

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return self.name.replace(":", "-")


_TOKENS = (
    ("ranks", re.compile(r"(\d+)"), int),
    ("zero_stage", re.compile(r"zero(\d+)"), int),
    ("precision", re.compile("(" + "|".join(vocab.PRECISIONS) + ")"), str),
    ("loader", re.compile("(" + "|".join(vocab.LOADERS) + ")"), str),
    ("batch", re.compile(r"b(\d+)"), int),
    ("threads", re.compile(r"t(\d+)"), int),
    ("channels_last", re.compile("(cl)"), bool),
    ("compile", re.compile("(compile)"), bool),
    ("heartbeat", re.compile("(nohb)"), lambda _: False),
    ("snapshot_every_s", re.compile(r"snap(\d+(?:\.\d+)?)"), float),
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
    c, floor = config, config.backend in FLOORS
    if c.ranks < 1:  # before the rules below, which divide by it
        raise BenchError(f"config {spec!r}: ranks must be at least 1")
    rules = (
        (c.ranks > task.MAX_LOCAL_TASKS, f"{c.ranks} ranks would start {c.ranks} processes on this machine, over its "
                                         f"limit of {task.MAX_LOCAL_TASKS}; give fewer ranks"),
        (c.backend == "dp" and c.ranks != 1, f"dp (nn.DataParallel) is one process; use ddp for {c.ranks} ranks"),
        (c.zero_stage is not None and not c.uses_deepspeed, "zeroN applies to deepspeed and floor-deepspeed only"),
        (c.zero_stage is not None and not 0 <= c.zero_stage <= 3, "ZeRO stage must be 0-3"),
        (c.backend == "floor" and c.precision != "fp32", "the floor trains in fp32; floor-deepspeed takes a precision"),
        (c.backend == "floor-deepspeed" and c.precision == vocab.AUTO,
         f"floor-deepspeed takes a named precision ({', '.join(vocab.DTYPES)}), not auto"),
        (floor and c.loader != "resident", "a floor trains from tensors already on the device, never a loader"),
        (floor and not c.heartbeat, "nohb applies to the trainer; a floor writes no heartbeat"),
        ((c.channels_last or c.compile) and c.backend not in ("dp", "ddp"), "cl and compile apply to dp and ddp only"),
        (floor and c.snapshot_every_s is not None, "snapS applies to the trainer; a floor keeps no snapshots"),
        (c.snapshot_every_s is not None and c.snapshot_every_s <= 0,
         "snapS takes a positive number of seconds; leave it out for no snapshots"),
        (c.batch < 1 or c.batch % c.ranks, f"global batch {c.batch} must be a positive multiple of {c.ranks} ranks"),
        (c.threads is not None and c.threads < 1, "threads per rank must be at least 1"),
    )
    why = next((why for broken, why in rules if broken), None)
    if why:
        raise BenchError(f"config {spec!r}: {why}")


def parse_grid(specs: Iterable[str], batch: int = DEFAULT_BATCH) -> tuple[Config, ...]:
    """Configs from specs, each of which may hold several separated by commas or spaces; no duplicates."""
    configs: list[Config] = []
    for text in specs:
        for spec in filter(None, re.split(r"[,\s]+", text)):
            config = parse_config(spec, batch)
            if config in configs:
                raise BenchError(f"config {spec!r} is in the grid twice (as {config.name})")
            configs.append(config)
    if not configs:
        raise BenchError(f"the grid is empty; give at least one --config {SPEC_HELP}")
    return tuple(configs)


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
    # Given always: a bench run inside a Slurm job would otherwise take the trainer's default there.
    trainer += ["--snapshot-every-s", decimal(config.snapshot_every_s or 0)]
    return launch + trainer

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
    order = list(range(n))
    if how == "alternate" and round_ % 2 == 0:
        order.reverse()
    elif how == "shuffle" and n:
        random.Random(seed).shuffle(order)
        turn = (round_ - 1) % n
        order = order[turn:] + order[:turn]
    return order
