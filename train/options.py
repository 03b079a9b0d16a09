"""The trainer's command line (docs/CONTRACTS.md) parsed into one frozen Options value.

Torch-free on purpose: ``hpcdist render`` parses a job's trainer arguments with this very parser, so a
bad argument fails at render time rather than on every rank after the queue.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hpc import vocab

DEFAULT_BATCH = 256  # global, dp/ddp; DeepSpeed takes its config's train_batch_size unless told
# Destinations the launch sets (hpcdist's task.sh, the DeepSpeed launcher): given twice, the last would
# silently win, so each may appear once, and a job's own arguments may not set them at all.
RESERVED = ("backend", "run_dir", "deepspeed_config", "local_rank", "zero_stage", "precision")
# The largest values torch takes: its generators a 64-bit seed (the classic loader's sampler seeds with seed + epoch),
# set_num_threads a C int, and its collectives' timeout counts nanoseconds in 64 bits (~292 years), past which
# it overflows into a negative timeout.
MOST = {"seed": 2**63 - 1, "threads": 2**31 - 1, "timeout_s": 10**9}


class OptionsError(ValueError):
    """An argument the trainer refuses; one line."""


@dataclass(frozen=True)
class Options:
    backend: str
    run_dir: Path
    dataset: str = "synthetic"
    data_dir: Path | None = None
    download: bool = False
    synthetic_size: int = 4096
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    loader: str = "resident"
    augment: bool = False
    num_workers: int = 2
    zero_stage: int | None = None
    precision: str = "auto"
    deepspeed_config: Path | None = None
    checkpoint_every: int = 0
    checkpoint_every_min: float = 10.0
    snapshot_every_s: float | None = None  # None: hpc.checkpoints.SNAPSHOT_EVERY_S in a Slurm job, else off
    persist_every_s: float = 60.0
    resume: bool = False
    seed: int = 0
    log_every: int | None = None  # None: PRINT_EVERY printed, CURVE_POINTS recorded (train/__main__)
    warmup_steps: int = 1
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    timeout_s: float = 600.0
    preflight: bool = False
    preflight_only: bool = False
    heartbeat_s: float = 2.0
    hang_timeout_s: float = 60.0
    hang_factor: float = 10.0


class _Parser(argparse.ArgumentParser):
    checking = False  # True while hpcdist checks a job's arguments: nothing may print or exit then

    def error(self, message: str):
        # argparse hands every ArgumentError (a bad value, _Once's refusal) to error() as well.
        raise OptionsError(message)

    def print_help(self, file=None):
        if self.checking:
            raise OptionsError("--help would make the job print this help and end without training; drop it")
        super().print_help(file)


class _Once(argparse.Action):
    """Store a value, refusing a second occurrence of the same destination under any spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given", set())
        if self.dest in seen:
            raise argparse.ArgumentError(self, "given twice; it is set once, by the launch")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def parser() -> argparse.ArgumentParser:
    # No abbreviations: `--back` or `--run-d` must not reach an option by a prefix of its name.
    p = _Parser(prog="python -m train", description="Train the reference CIFAR-10 ConvNet.", allow_abbrev=False)
    p.add_argument("--backend", choices=vocab.BACKENDS, required=True, action=_Once)
    p.add_argument("--run-dir", type=Path, required=True, help="metrics.jsonl, summary.json, checkpoints/",
                   action=_Once)
    p.add_argument("--dataset", choices=vocab.DATASETS, default="synthetic")
    p.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data-dir if missing")
    p.add_argument("--synthetic-size", type=int, default=4096, help="training images; the test set is a quarter")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    p.add_argument("--batch-size", type=int, help=f"global batch over all ranks (dp/ddp default {DEFAULT_BATCH})")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3, DeepSpeed: the config's)")
    p.add_argument("--loader", choices=vocab.LOADERS, default="resident")
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) and horizontal flip")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (classic loader)")
    p.add_argument("--zero-stage", type=int, choices=vocab.ZERO_STAGES, action=_Once)
    p.add_argument("--precision", choices=vocab.PRECISIONS, default="auto", action=_Once)
    p.add_argument("--deepspeed-config", type=Path, action=_Once)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    p.add_argument("--checkpoint-every-min", type=float, default=10.0,
                   help="also checkpoint when this many minutes of wall time passed since the last one; bounds "
                        "what a crash loses (0: off)")
    p.add_argument("--snapshot-every-s", type=float,
                   help="seconds between snapshots of the state in node memory, which a relaunch in the allocation "
                        "resumes from (dp/ddp: written in the background; DeepSpeed: each node's part, handed to "
                        "the next node in the background; default 5 in a Slurm job, whose epilog frees a killed run's, "
                        "and none elsewhere; 0: off)")
    p.add_argument("--persist-every-s", type=float, default=60.0,
                   help="seconds between snapshots also written to RUN_DIR/checkpoints in the background (the first "
                        "at once), which a new job on other nodes resumes from when the allocation is lost (0: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint or snapshot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int,
                   help="steps between loss lines, printed and in metrics.jsonl (default: printed every 100, "
                        "recorded at least 50 times a run for the report's curve)")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="steps left out of summary.json's images_per_s (start-up, cuDNN autotuning, compiling)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, help="intra-op threads per rank (default: this rank's share of its CPUs)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout")
    p.add_argument("--preflight", action="store_true", help="check an all_reduce across all ranks first")
    p.add_argument("--preflight-only", action="store_true", help="the preflight check, then exit (hpcdist doctor)")
    p.add_argument("--heartbeat-s", type=float, default=2.0,
                   help="seconds between heartbeat writes to RUN_DIR/heartbeat/ (0: no heartbeats, no hang watchdog)")
    p.add_argument("--hang-timeout-s", type=float, default=60.0,
                   help="a rank whose step stalls this long (and --hang-factor x the median step time) is hung: "
                        "stacks are dumped and the ranks exit 76 (0: no hang watchdog)")
    p.add_argument("--hang-factor", type=float, default=10.0, help="the k in max(--hang-timeout-s, k x step time)")
    # The DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same and wins.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS, action=_Once)
    return p


def _validate(opts: Options) -> None:
    for name in ("synthetic_size", "epochs", "max_steps", "batch_size", "log_every", "warmup_steps", "threads"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise OptionsError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("checkpoint_every_min", "snapshot_every_s", "persist_every_s", "heartbeat_s", "hang_timeout_s",
                 "hang_factor"):
        if getattr(opts, name) is not None and not 0 <= getattr(opts, name) < float("inf"):
            raise OptionsError(f"--{name.replace('_', '-')} must be a number 0 or more, got {getattr(opts, name)}")
    for name in ("num_workers", "checkpoint_every", "seed"):
        if getattr(opts, name) < 0:
            raise OptionsError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(opts, name)}")
    if not 0 < opts.timeout_s < float("inf"):
        raise OptionsError(f"--timeout-s must be a positive number of seconds, got {opts.timeout_s}")
    for name, most in MOST.items():
        if getattr(opts, name) is not None and getattr(opts, name) > most:
            raise OptionsError(f"--{name.replace('_', '-')} must be at most {most}, got {getattr(opts, name)}")
    if opts.lr is not None and not 0 < opts.lr < float("inf"):
        raise OptionsError(f"--lr must be a positive number, got {opts.lr}")
    for name in ("zero_stage", "deepspeed_config"):
        if opts.backend != "deepspeed" and getattr(opts, name) is not None:
            # Ignored, they would leave a run believed to be ZeRO's training plain dp/ddp.
            raise OptionsError(f"--{name.replace('_', '-')} applies to --backend deepspeed, and {opts.backend} "
                               "has no ZeRO; drop it, or pass --backend deepspeed")
    if opts.dataset == "cifar10" and opts.data_dir is None:
        raise OptionsError("--dataset cifar10 needs --data-dir DIR (the folder holding cifar-10-batches-py/)")


def options(argv: Sequence[str]) -> Options:
    """The Options ``argv`` gives, or OptionsError (one line) for any argument the trainer refuses."""
    args = vars(parser().parse_args(list(argv)))
    args.pop("local_rank")
    args.pop("_given", None)
    opts = Options(**args)
    _validate(opts)
    return opts


def reserved_flags() -> tuple[str, ...]:
    """Every spelling of the RESERVED options (``--local_rank`` and ``--local-rank``, ...)."""
    return tuple(flag for action in parser()._actions if action.dest in RESERVED for flag in action.option_strings)


def check_job_args(args: Sequence[str]) -> None:
    """OptionsError unless ``args``, a job's own trainer arguments, leave every RESERVED destination alone.

    Decided by argparse's destination, so no spelling (``--local-rank``, ``--run-dir=X``) gets past it.
    """
    p = parser()
    unset = object()
    p.checking = True
    for action in p._actions:
        if action.dest in RESERVED:
            action.required, action.default = False, unset
    namespace, _ = p.parse_known_args(list(args))
    for action in p._actions:
        if action.dest in RESERVED and getattr(namespace, action.dest, unset) is not unset:
            raise OptionsError(f"{'/'.join(action.option_strings)} is set by hpcdist itself; use the matching "
                               "hpcdist option instead")


def parse(argv: Sequence[str] | None = None) -> Options:
    """The trainer's Options from its command line; exits 2 with one line on a bad argument."""
    try:
        return options(sys.argv[1:] if argv is None else argv)
    except OptionsError as exc:
        # One line, as the exit-status contract asks, rather than argparse's usage block.
        print(f"python -m train: error: {exc} (see --help)", file=sys.stderr)
        raise SystemExit(2) from None
