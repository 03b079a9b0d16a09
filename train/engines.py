"""One training step, evaluation and checkpoint I/O behind the same face for torch (dp, ddp) and DeepSpeed."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import ContextManager, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hpc import dsconfig
from train import checkpoint, snapshot
from train.model import bare_state_dict
from train.options import DEFAULT_BATCH, Options
from train.runtime import barrier, broadcast_from_0, gathered

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    """What the trainer asks of a backend: a step, predictions, the full parameters, checkpoint I/O."""

    input_dtype: torch.dtype  # what the loader normalises images into
    zero_stage: int | None  # DeepSpeed's ZeRO stage; None for dp/ddp
    trained_with: dict | None  # what its checkpoints record for a resume to match (hpc.dsconfig); None for dp/ddp
    lr: float | None  # what it was built with, which its optimizer's saved state would overrule at a resume

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def full_parameters(self) -> ContextManager[list[tuple[str, torch.Tensor]]]: ...

    def write(self, save_dir: Path, tag: str, rank: int, trainer_state: dict) -> None: ...

    def read(self, folder: Path, rank: int) -> dict: ...


class TorchEngine:
    """Adam on a plain, DataParallel or DDP-wrapped module; bf16/fp16 by autocast, fp16 with a GradScaler."""

    input_dtype = torch.float32  # autocast casts per op
    zero_stage = trained_with = None

    def __init__(self, model: nn.Module, *, backend: str, device: torch.device, precision: str, lr: float,
                 world_size: int = 1, compile: bool = False, channels_last: bool = False) -> None:
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module, self.device, self.precision, self.lr = model, device, precision, lr
        net: nn.Module = model
        # DDP over one process only copies every gradient into its buckets and all-reduces it with itself.
        if backend == "ddp" and world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        elif backend == "dp" and device.type == "cuda":
            net = nn.DataParallel(model)
        self.net = torch.compile(net) if compile else net
        # The fused kernel is one launch for all parameters on GPU; the CPU path has no fused Adam gain.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32")

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The images in the module's memory format (channels-last with --channels-last), so its first
        convolution converts nothing."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.net.train()
        with self._autocast():
            loss = F.cross_entropy(self.net(self._inputs(x)), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach().float()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        with self._autocast():
            return self.net(self._inputs(x)).argmax(1)

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        yield list(self.module.named_parameters())

    def state(self, trainer_state: dict) -> dict:
        """The whole training state, by reference to the live tensors."""
        return {**trainer_state, "model": bare_state_dict(self.module.state_dict()),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def capture(self, trainer_state: dict) -> dict:
        """The state copied to the host with this process's RNGs, for a snapshot: every rank seeds alike and
        draws from the global RNGs alike (data order and augmentation have generators of their own), so one
        rank's RNGs stand for all of them."""
        return snapshot.cpu_copy({**self.state(trainer_state), "rng": checkpoint.rng_state()})

    def restore(self, saved: dict, where: Path | str = "the checkpoint") -> dict:
        """Load a state from ``state``/``capture`` (read from ``where``) into the module and optimizer; the trainer's
        own part back."""
        saved = dict(saved)
        try:
            self.module.load_state_dict(bare_state_dict(saved.pop("model")))
        except RuntimeError as exc:  # load_state_dict's keys or shapes: another model's, which a retry loads no better
            mismatch = (str(exc).splitlines()[1:2] or [str(exc)])[0].strip().rstrip(".")
            raise checkpoint.CheckpointError(f"{where} holds another model than this trainer's ({mismatch}): resume in "
                                             "the --run-dir of this model's run, or move it away") from None
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        scaler = saved.pop("scaler")
        if scaler:  # empty where no fp16 trained: a resume in fp16 starts its loss scale as a fresh run does
            self.scaler.load_state_dict(scaler)
        if "rng" in saved:
            checkpoint.set_rng_state(saved.pop("rng"))
        return saved

    def write(self, save_dir: Path, tag: str, rank: int, trainer_state: dict) -> None:
        folder = Path(save_dir) / tag
        if rank == 0:
            checkpoint.put(self.state(trainer_state), folder / checkpoint.TRAINER_FILE)
        checkpoint.put(checkpoint.rng_state(), checkpoint.rng_file(folder, rank))

    def read(self, folder: Path, rank: int) -> dict:
        state = self.restore(checkpoint.load(Path(folder) / checkpoint.TRAINER_FILE), folder)
        # A snapshot persisted in the background has no per-rank files: its state holds the RNGs for every rank.
        if checkpoint.rng_file(folder, rank).exists():
            checkpoint.set_rng_state(checkpoint.load(checkpoint.rng_file(folder, rank)))
        return state


class DeepSpeedEngine:
    """deepspeed.initialize on the module with the resolved config: ZeRO stage, precision and Adam come from it."""

    def __init__(self, model: nn.Module, *, config: dict) -> None:
        import deepspeed
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        saver = self.engine.checkpoint_engine
        if type(saver) is TorchCheckpointEngine:
            # DeepSpeed's own files written as ours are: its torch.save to a path says a write stopped by a file-size
            # limit or a quota only as "iostream error", which would end the run as a crash, not as storage (74).
            saver.save = lambda state_dict, path: checkpoint.put(state_dict, path, saver.zipfile_serialization)
        self.trained_with, self.lr = dsconfig.trained_with(config), dsconfig.lr_of(config)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.input_dtype = (torch.bfloat16 if self.engine.bfloat16_enabled()
                      else torch.float16 if self.engine.fp16_enabled() else torch.float32)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.engine.train()
        loss = F.cross_entropy(self.engine(x.to(self.input_dtype)).float(), y)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach().float()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        return self.engine(x.to(self.input_dtype)).argmax(1)

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        import deepspeed

        named = list(self.engine.module.named_parameters())
        # ZeRO-3 keeps only this rank's slice of each parameter; gathering is a collective on every rank.
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            yield named

    def write(self, save_dir: Path, tag: str, rank: int, trainer_state: dict) -> None:
        try:
            self.engine.save_checkpoint(str(save_dir), tag=tag, client_state={"trainer": trainer_state},
                                        save_latest=False)
        except (OSError, RuntimeError):
            # Its files are written between its collectives: after them come ZeRO-3's gather of the parameters it
            # keeps whole (the optimizer's checkpoint epilogue) and the barrier it ends with. A rank whose write
            # failed meets the others at each, so that they all reach checkpoint.save's vote together (torch's
            # writer says a failed write as a RuntimeError).
            epilogue = getattr(self.engine.optimizer, "checkpoint_event_epilogue", None)
            if epilogue is not None:
                epilogue()
            barrier()
            raise
        checkpoint.put(checkpoint.rng_state(), checkpoint.rng_file(Path(save_dir) / tag, rank))

    def read(self, folder: Path, rank: int) -> dict:
        folder = Path(folder)
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved = sum(1 for _ in folder.glob(checkpoint.rng_file(folder, "*").name))
        regroup = self.zero_stage and saved != world
        # Every rank learns of any rank's refusal: one rank leaving alone would hang the others in the load.
        reads = None if regroup and rank == 0 else rank
        refused = [why for why in gathered(checkpoint.deepspeed_foreign(folder, reads), world) if why]
        if refused:
            raise checkpoint.CheckpointError(refused[0])
        if regroup:
            client = self._read_universal(folder, rank, world)
        else:
            # ZeRO-0's optimizer state is whole in every checkpoint: it loads on any number of ranks.
            path, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no loadable checkpoint in {folder}")
        if checkpoint.rng_file(folder, rank).exists():  # a rank an elastic relaunch added has none of its own
            checkpoint.set_rng_state(checkpoint.load(checkpoint.rng_file(folder, rank)))
        return client["trainer"]

    def _read_universal(self, folder: Path, rank: int, world: int) -> dict:
        """A ZeRO checkpoint written by another number of ranks (an elastic relaunch): rank 0 converts it to
        DeepSpeed's universal checkpoint beside it, every rank loads its new partition from that, rank 0
        removes it."""
        from deepspeed.checkpoint import ds_to_universal

        # A folder of its own, made fresh: one a killed conversion left is never taken or removed by name.
        made = Path(tempfile.mkdtemp(prefix=f".universal-{folder.name}-", dir=folder.parent)) if rank == 0 else None

        def convert() -> None:
            if rank == 0:
                # inject_missing_state: the checkpoints were saved without DeepSpeed's universal_checkpoint_info.
                with _saving_through_put():
                    ds_to_universal.main(argparse.Namespace(
                        input_folder=str(folder), output_folder=str(made / folder.name), num_extract_workers=1,
                        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))

        # A vote, as a checkpoint's save is: the ranks waiting for the copy learn of its failure and end alike.
        checkpoint.together(convert, checkpoint.Agreement.of_every_rank(), rank, folder.parent, made,
                            f"{folder.name}'s universal copy")
        universal = Path(broadcast_from_0(made, world))
        # DeepSpeed asks its config at load time only, and has no other way in for a config already built.
        self.engine._config.load_universal_checkpoint = True
        try:
            path, client = self.engine.load_checkpoint(str(universal), tag=folder.name)
        finally:
            self.engine._config.load_universal_checkpoint = False
        barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no loadable checkpoint in the universal copy of {folder}")
        return client


@contextlib.contextmanager
def _saving_through_put() -> Iterator[None]:
    """torch.save to a path goes through checkpoint.put meanwhile, as DeepSpeed's saves do (its universal conversion
    has no saver to hand ours to): torch's own writer says a write stopped by a file-size limit or a quota only as
    "unexpected pos", which would end the run as a crash, not as storage (74)."""
    save = torch.save

    def through_put(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if args or kwargs or not isinstance(f, (str, os.PathLike)):
            return save(obj, f, *args, **kwargs)  # put's own call, with its file
        checkpoint.put(obj, f)

    torch.save = through_put
    try:
        yield
    finally:
        torch.save = save


def precision_and_config(opts: Options, device: torch.device, world: int,
                         environ: Mapping[str, str] = os.environ) -> tuple[str, dict | None, int]:
    """The precision in force, DeepSpeed's config as deepspeed.initialize gets it, and the global batch.

    A job's rendered deepspeed.json is taken as it is (its flags may repeat it, never change it); run by
    hand, the config is resolved here by the same function `hpcdist render` uses, for this machine's CPU.
    """
    gpu = device.type == "cuda"
    if opts.backend != "deepspeed":
        return dsconfig.choose(opts.precision, gpu=gpu).precision, None, opts.batch_size or DEFAULT_BATCH
    given = {"zero_stage": opts.zero_stage, "precision": opts.precision, "global_batch": opts.batch_size,
             "lr": opts.lr}
    if opts.deepspeed_config is not None:
        config = dsconfig.load(opts.deepspeed_config)
        if environ.get(dsconfig.ELASTIC_ENV):
            config = dsconfig.regroup(config, opts.deepspeed_config, world)
        dsconfig.check_resolved(config, opts.deepspeed_config, world, **given)
    else:
        config = dsconfig.resolve(dsconfig.load(dsconfig.base_path()), world_size=world, gpu=gpu,
                                  cpus=dsconfig.this_cpu(), **given)
    return dsconfig.precision_of(config), config, config["train_batch_size"]


def cpu_has_fp16() -> bool:
    """What DeepSpeed's CPU accelerator asks before it accepts an fp16 config."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
