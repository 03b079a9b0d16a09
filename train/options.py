"""The trainer's command line (docs/CONTRACTS.md) parsed into one frozen Options value."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hpc import vocab

DEFAULT_BATCH = 256  # global, dp/ddp; DeepSpeed takes its config's train_batch_size unless told


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
    resume: bool = False
    seed: int = 0
    log_every: int = 100
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
    def error(self, message: str):
        # One line, as the exit-status contract asks, rather than argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m train", description="Train the reference CIFAR-10 ConvNet.")
    p.add_argument("--backend", choices=vocab.BACKENDS, required=True)
    p.add_argument("--run-dir", type=Path, required=True, help="metrics.jsonl, summary.json, checkpoints/")
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
    p.add_argument("--zero-stage", type=int, choices=vocab.ZERO_STAGES)
    p.add_argument("--precision", choices=vocab.PRECISIONS, default="auto")
    p.add_argument("--deepspeed-config", type=Path)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    p.add_argument("--checkpoint-every-min", type=float, default=10.0,
                   help="also checkpoint when this many minutes of wall time passed since the last one; bounds "
                        "what a crash loses (0: off)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
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
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


def parse(argv: Sequence[str] | None = None) -> Options:
    args = vars(parser().parse_args(argv))
    args.pop("local_rank")
    opts = Options(**args)
    for name in ("synthetic_size", "epochs", "max_steps", "batch_size", "log_every", "warmup_steps", "threads"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("checkpoint_every_min", "heartbeat_s", "hang_timeout_s", "hang_factor"):
        if getattr(opts, name) < 0:
            parser().error(f"--{name.replace('_', '-')} must not be negative, got {getattr(opts, name)}")
    if opts.dataset == "cifar10" and opts.data_dir is None:
        parser().error("--dataset cifar10 needs --data-dir DIR (the folder holding cifar-10-batches-py/)")
    return opts
