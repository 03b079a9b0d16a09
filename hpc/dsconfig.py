"""Decide the precision and the DeepSpeed config once, torch-free: for `hpcdist render` and for a trainer run by hand.

    config = resolve(load(base_path()), world_size=4, gpu=False, zero_stage=3)   # auto on CPUs: fp32
    precision_of(config)                                                         # -> "fp32"
    choose("auto", gpu=False, config=config, cpus=Cpus(native_bf16(cpuinfo))).reason  # why

A job directory's deepspeed.json is this function's output; the trainer takes that file as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hpc import jobfiles, vocab
from hpc.paths import configs_dir

BASE = "zero2_fp16.json"
# A DeepSpeed config is a few KB.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """The DeepSpeed config cannot be used as asked; the message says what to change."""


def base_path() -> Path:
    """The shipped base config (configs/deepspeed/zero2_fp16.json): fp16 ZeRO-2 with Adam."""
    return configs_dir() / "deepspeed" / BASE


def load(path: Path) -> dict[str, Any]:
    try:
        # A person's file: a link to it is fine, a FIFO, a device or a 1 GB file is not.
        config = jobfiles.loads(jobfiles.read_text(Path(path), MAX_CONFIG_BYTES, follow=True))
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass an existing file, e.g. "
                          f"{base_path()}") from None
    except jobfiles.Damaged as exc:
        raise ConfigError(f"DeepSpeed config: {exc}; fix it or pass another") from None
    except ValueError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({exc}); fix it or pass another") from None
    except OSError as exc:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({exc.strerror}); fix it or pass another") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} is not a JSON object; fix it or pass another")
    return config


def precision_of(config: Mapping[str, Any]) -> str:
    return next((dtype for dtype in ("bf16", "fp16") if config.get(dtype, {}).get("enabled")), "fp32")


def lr_of(config: Mapping[str, Any]) -> float | None:
    return config.get("optimizer", {}).get("params", {}).get("lr")


def trained_with(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the config that wrote it: the ZeRO stage and precision, which decide the files
    DeepSpeed writes and the state it expects in them."""
    return {"zero_stage": config.get("zero_optimization", {}).get("stage", 0), "precision": precision_of(config)}


# /proc/cpuinfo flags of a CPU that computes bf16 itself: x86 AVX512-BF16 or AMX-BF16 ("flags"), aarch64
# FEAT_BF16 ("Features"). Without one, torch emulates bf16 on fp32 units, which costs more than it saves.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text describes a CPU with native bf16 (every listed core must have it)."""
    found = [set(value.split()) for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
             if key.strip() in ("flags", "Features")]
    return bool(found) and all(flags & NATIVE_BF16_FLAGS for flags in found)


@dataclass(frozen=True)
class Cpus:
    """What is known of the CPUs a job will run on: native bf16 or not (None: unknown), and how to name them."""

    bf16: bool | None
    named: str = "this CPU"


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpus:
    """This machine's CPU, for jobs that run here (the local executor, a trainer run by hand)."""
    try:
        return Cpus(native_bf16(cpuinfo.read_text()))
    except OSError:
        return Cpus(None)


@dataclass(frozen=True)
class Choice:
    """The precision a job trains in, and why, where ``auto`` weighed the hardware (else None)."""

    precision: str
    reason: str | None = None


def choose(requested: str, *, gpu: bool, config: Mapping[str, Any] | None = None, cpus: Cpus | None = None) -> Choice:
    """What ``--precision`` means: itself, or for ``auto`` fp32 under dp/ddp (no ``config``); under DeepSpeed
    the config's on GPUs, and on CPU-only jobs bf16 where ``cpus`` have native bf16, else fp32: fp16 runs
    ~35x slower there and emulated bf16 ~4x slower than fp32."""
    if requested != vocab.AUTO:
        if requested not in vocab.DTYPES:
            raise ConfigError(f"precision {requested!r} is not one of {', '.join(vocab.PRECISIONS)}")
        return Choice(requested)
    if config is None:
        return Choice("fp32")  # dp/ddp: nothing to weigh, autocast is opt-in
    if gpu:
        return Choice(precision_of(config), "the DeepSpeed config's precision, on GPUs")
    cpus = cpus or Cpus(None)
    if cpus.bf16:
        return Choice("bf16", f"native bf16 on {cpus.named}")
    if cpus.bf16 is None:
        return Choice("fp32", f"not known whether {cpus.named} have native bf16; set cpu_bf16 in the profile")
    return Choice("fp32", f"no native bf16 on {cpus.named} (AVX512-BF16, AMX): bf16 would be emulated, ~4x slower")


def resolve(base: Mapping[str, Any], *, world_size: int, gpu: bool, zero_stage: int | None = None,
            precision: str = vocab.AUTO, offload: bool = False, global_batch: int | None = None,
            lr: float | None = None, cpus: Cpus | None = None) -> dict[str, Any]:
    """``base`` with the job's ZeRO stage, offload, precision (``choose``), batch and lr: one micro batch per
    rank, no accumulation (the trainer counts one optimizer step per batch it draws). ``base`` is left alone."""
    config = copy.deepcopy(dict(base))
    zero = config.setdefault("zero_optimization", {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero.get("stage") == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    chosen = choose(precision, gpu=gpu, config=config, cpus=cpus).precision
    config.setdefault("fp16", {})["enabled"] = chosen == "fp16"
    config.setdefault("bf16", {})["enabled"] = chosen == "bf16"
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
    config["train_batch_size"] = batch
    config["train_micro_batch_size_per_gpu"] = batch // world_size
    config["gradient_accumulation_steps"] = 1
    return config


# Set by requeue.sh for a step relaunched on fewer nodes (--elastic): the job's deepspeed.json, resolved for all
# of them, is regrouped for the ranks left.
ELASTIC_ENV = "HPCDIST_ELASTIC_NODES"


def regroup(config: Mapping[str, Any], path: Path, world_size: int) -> dict[str, Any]:
    """``config``, resolved for another number of ranks, for ``world_size``: the global batch kept, each rank's
    share of it grown (an elastic relaunch on the nodes left); ConfigError when it does not split."""
    batch = config.get("train_batch_size")
    if not isinstance(batch, int) or batch < 1 or batch % world_size:
        raise ConfigError(f"the global batch {batch} of {path} does not split over the {world_size} rank(s) an "
                          "elastic relaunch has left; choose a --batch-size that every number of nodes left divides")
    return {**copy.deepcopy(dict(config)), "train_micro_batch_size_per_gpu": batch // world_size,
            "gradient_accumulation_steps": 1}


def check_resolved(config: Mapping[str, Any], path: Path, world_size: int, **given: Any) -> None:
    """Refuse a config file that ``resolve`` did not make for ``world_size`` ranks, or that a flag contradicts.

    ``given`` maps the trainer's flags (zero_stage, precision, global_batch, lr) to their values; None and
    ``auto`` say nothing. The file decides: a flag may repeat it, never change it.
    """
    batch, micro = config.get("train_batch_size"), config.get("train_micro_batch_size_per_gpu")
    if batch is None or micro is None or micro * world_size != batch or config.get("gradient_accumulation_steps") != 1:
        raise ConfigError(f"DeepSpeed config {path} is not resolved for {world_size} rank(s) (train_batch_size = "
                          "train_micro_batch_size_per_gpu x ranks, gradient_accumulation_steps 1); render it with "
                          "`hpcdist render --backend deepspeed`, or drop --deepspeed-config")
    found = {**trained_with(config), "global_batch": batch, "lr": lr_of(config)}
    flags = {"zero_stage": "--zero-stage", "precision": "--precision", "global_batch": "--batch-size", "lr": "--lr"}
    for name, value in given.items():
        if value not in (None, vocab.AUTO) and value != found[name]:
            raise ConfigError(f"{flags[name]} {value} contradicts {path}, which says {found[name]}; the file "
                              f"decides: drop {flags[name]} or edit the file")


def check_resume(saved: Mapping[str, Any] | None, config: Mapping[str, Any], where: object) -> None:
    """Refuse to resume with ``config`` from ``where``, written with ``saved`` (``trained_with``'s), where DeepSpeed
    would fail only once it loads, in a traceback. A checkpoint that records nothing (written before the record), or
    a record damaged since, is not checked."""
    stage, precision = (saved or {}).get("zero_stage"), (saved or {}).get("precision")
    if type(stage) is not int or stage not in vocab.ZERO_STAGES or precision not in vocab.DTYPES:
        return
    asked = trained_with(config)
    # ZeRO-1 and -2 keep the same optimizer partitions in the same files: DeepSpeed loads either as the other.
    if precision == asked["precision"] and (stage == asked["zero_stage"] or {stage, asked["zero_stage"]} == {1, 2}):
        return
    raise ConfigError(f"{where} holds DeepSpeed ZeRO-{stage} {precision} state, and this run asks for "
                      f"ZeRO-{asked['zero_stage']} {asked['precision']}, which cannot load it: resume with "
                      f"--zero-stage {stage} --precision {precision} (or a --deepspeed-config that says so), or "
                      "start afresh in another --run-dir")
