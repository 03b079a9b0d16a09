"""Resolve a DeepSpeed JSON config against the command line, and make the environment safe for its op builds."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import MutableMapping

from hpc import vocab
from hpc.paths import configs_dir

DEFAULT_CONFIG = "zero2_fp16.json"


class ConfigError(ValueError):
    """The DeepSpeed config cannot be used as asked; the message says what to change."""


def default_config_path() -> Path:
    return configs_dir() / "deepspeed" / DEFAULT_CONFIG


def sanitize_arch_list(value: str) -> str:
    """``9.0a;8.0`` -> ``9.0;8.0``: DeepSpeed's op builder parses the minor number with int(), which
    fails on the arch-specific suffixes (a, f) that CUDA 12+ images put in TORCH_CUDA_ARCH_LIST."""
    kept: list[str] = []
    for item in re.split(r"[;\s]+", value.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-zA-Z]*(\+PTX)?", item)
        arch = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}" if m else item
        if arch and arch not in kept:
            kept.append(arch)
    return ";".join(kept)


def prepare_environment(environ: MutableMapping[str, str], cuda: bool) -> None:
    """Before DeepSpeed is imported: a parseable TORCH_CUDA_ARCH_LIST for its op builds, and no GPU search
    on a machine without one (its accelerator detection is decided once, at import)."""
    if "TORCH_CUDA_ARCH_LIST" in environ:
        environ["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(environ["TORCH_CUDA_ARCH_LIST"])
    if not cuda:
        environ.setdefault("DS_ACCELERATOR", "cpu")


def load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass --deepspeed-config with an existing "
                          f"file, e.g. {default_config_path()}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({exc}); fix it or pass another") from None


def precision_of(config: dict) -> str:
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def resolve(base: dict, *, world_size: int, zero_stage: int | None = None, precision: str | None = None,
            global_batch: int | None = None, lr: float | None = None) -> dict:
    """``base`` with the command line's overrides applied, one micro batch per rank and no accumulation."""
    config = copy.deepcopy(base)
    if zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = zero_stage
    if precision is not None:
        if precision not in vocab.DTYPES:
            raise ConfigError(f"precision {precision!r} is not one of {', '.join(vocab.DTYPES)}")
        config.setdefault("fp16", {})["enabled"] = precision == "fp16"
        config.setdefault("bf16", {})["enabled"] = precision == "bf16"
    if lr is not None:
        config.setdefault("optimizer", {"type": "Adam"}).setdefault("params", {})["lr"] = lr
    batch = global_batch or config.get("train_batch_size")
    if batch is None:
        micro = config.get("train_micro_batch_size_per_gpu")
        if micro is None:
            raise ConfigError("the DeepSpeed config sets neither train_batch_size nor "
                              "train_micro_batch_size_per_gpu; add one or pass --batch-size")
        batch = micro * config.get("gradient_accumulation_steps", 1) * world_size
    if batch % world_size:
        raise ConfigError(f"global batch {batch} does not split evenly over {world_size} ranks; "
                          f"pass --batch-size with a multiple of {world_size}")
    # The trainer counts one optimizer step per batch it draws, so accumulation is folded into the batch.
    config["train_batch_size"] = batch
    config["train_micro_batch_size_per_gpu"] = batch // world_size
    config["gradient_accumulation_steps"] = 1
    return config
