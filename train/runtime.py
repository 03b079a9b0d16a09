"""Process plumbing: DeepSpeed's build environment, process groups with a timeout, preflight, device facts."""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import socket
import sys
import time
from pathlib import Path
from typing import MutableMapping

import torch
import torch.distributed as dist

from hpc import fileio, vocab
from hpc.ranks import PICKED_MASTER_PORT, DistEnv


class UsageError(ValueError):
    """Bad input: printed as one line on stderr, exit status 2."""


class PreflightError(RuntimeError):
    """A rank cannot reach the others (rank 0 cannot listen for them), or their all_reduce is wrong; printed as one
    line, exit status 1."""


def say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def warn(rank: int, message: str) -> None:
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def make_run_dir(run_dir: Path) -> None:
    """``run_dir`` made where missing; UsageError where it or its checkpoints/ is no folder, which would otherwise
    show only when the first checkpoint is written, after the training it was to keep."""
    for folder in (Path(run_dir), Path(run_dir) / vocab.CHECKPOINTS):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} exists and is not a folder; move it away or pass another --run-dir")
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--run-dir {run_dir} cannot be made ({exc.strerror}); pass a folder you can write") from None


def pick_device(backend: str, env: DistEnv) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if backend == "dp":
        return torch.device("cuda", 0)
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def sanitize_arch_list(value: str) -> str:
    """``9.0a;8.0`` -> ``9.0;8.0``: DeepSpeed's op builder parses the minor number with int(), which
    fails on the arch-specific suffixes (a, f) that CUDA 12+ images put in TORCH_CUDA_ARCH_LIST."""
    items = re.split(r"[;\s]+", value.strip())
    arches = [re.sub(r"\A(\d+\.\d+)[a-zA-Z]*(\+PTX)?\Z", r"\1\2", item) for item in items]
    return ";".join(dict.fromkeys(filter(None, arches)))


def prepare_deepspeed_environment(environ: MutableMapping[str, str], cuda: bool) -> None:
    """Before DeepSpeed is imported: a parseable TORCH_CUDA_ARCH_LIST for its op builds, and no GPU search
    on a machine without one (its accelerator detection is decided once, at import)."""
    if "TORCH_CUDA_ARCH_LIST" in environ:
        environ["TORCH_CUDA_ARCH_LIST"] = sanitize_arch_list(environ["TORCH_CUDA_ARCH_LIST"])
    if not cuda:
        environ.setdefault("DS_ACCELERATOR", "cpu")


def without_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op when it joins a CPU process group: ~30 s
    of compiler on a fresh machine before the first step, for ``inference_all_reduce`` alone, which training
    never calls (ZeRO's collectives go through torch.distributed either way)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(backend: str, env: DistEnv, device: torch.device, timeout_s: float) -> str:
    """Join the job's process group; every collective after this fails after ``timeout_s`` instead of hanging."""
    timeout = datetime.timedelta(seconds=timeout_s)
    # torch's env:// rendezvous and DeepSpeed read these; without them DeepSpeed goes looking for mpi4py.
    os.environ.update(env.torch_env())
    comm = "nccl" if device.type == "cuda" else "gloo"
    if env.world_size == 1:
        # A lone process needs no port: an in-memory store cannot collide with another run on the machine, as
        # torch's default 29500 would. DeepSpeed adopts a group that exists as it is.
        dist.init_process_group(comm, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        if backend == "deepspeed":
            import deepspeed

            if device.type == "cpu":
                without_shm_comm()
            deepspeed.init_distributed(dist_backend=comm, timeout=timeout, auto_mpi_discovery=False)
        elif env.world_size > 1:
            dist.init_process_group(comm, init_method="env://", timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
    except dist.DistNetworkError as exc:
        if "EADDRINUSE" not in str(exc):
            raise
        raise PreflightError(port_taken(env)) from None
    return dist.get_backend()


def port_taken(env: DistEnv) -> str:
    """Rank 0's line when another program holds MASTER_PORT: a port chosen free is nobody's until rank 0 listens."""
    origin = env.origin.get("master_port", "")
    remedy = ("resubmit: a new job picks another free port" if origin == PICKED_MASTER_PORT
              else f"set MASTER_PORT to a port free on {socket.gethostname()} (the profile's environment)"
              + (", or resubmit: a new job id derives another port" if origin.startswith("derived") else ""))
    return (f"rank 0 cannot listen on MASTER_PORT {env.master_port} ({origin or 'default'}): it is in use by another "
            f"program on {socket.gethostname()}; {remedy}")


def log_nccl_for_preflight(environ: dict, run_dir: Path) -> None:
    """Have NCCL name its transports in files ``hpcdist doctor`` reads (set before NCCL initialises).

    Over what the profile exports for training runs: at its NCCL_DEBUG=WARN, or with NCCL_DEBUG_SUBSYS leaving
    out INIT, NCCL names no channel's transport, and a log elsewhere is one doctor never reads."""
    (run_dir / vocab.PREFLIGHT).mkdir(parents=True, exist_ok=True)
    if environ.get("NCCL_DEBUG", "").upper() != "TRACE":
        environ["NCCL_DEBUG"] = "INFO"
    environ.pop("NCCL_DEBUG_SUBSYS", None)
    environ["NCCL_DEBUG_FILE"] = str(run_dir / vocab.PREFLIGHT / "nccl-%h-%p.log")


def reach_master(env: DistEnv, deadline_s: float) -> None:
    """Fail fast, naming this rank, when MASTER_ADDR:MASTER_PORT cannot be reached from here.

    Without it a blocked port or a wrong MASTER_ADDR shows up only as the rendezvous timing out. Rank 0
    may still be starting, so refused connections are retried until the deadline.
    """
    if env.rank == 0 or env.world_size == 1:
        return
    deadline, last = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((env.master_addr, env.master_port), timeout=5).close()
            return
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise PreflightError(f"preflight: rank {env.rank} on {socket.gethostname()} cannot reach MASTER_ADDR:MASTER_PORT "
                       f"{env.master_addr}:{env.master_port} within {deadline_s:.0f} s ({last}); check that the "
                       "address resolves on every node and that no firewall blocks the port")


def preflight(env: DistEnv, device: torch.device, run_dir: Path) -> None:
    """A one-element all_reduce whose sum must equal the world size; each rank reports what it saw to
    ``run_dir/preflight/rank-R.json`` and raises, naming itself, when the sum is wrong."""
    probe = torch.ones(1, device=device)
    started = time.perf_counter()
    try:
        dist.all_reduce(probe)
        total = float(probe.item())
    except Exception as exc:  # noqa: BLE001 - whatever the backend raised, the message names this rank
        raise PreflightError(f"preflight all_reduce failed on rank {env.rank} of {env.world_size} "
                           f"({dist.get_backend()}): {exc}") from None
    report = {"rank": env.rank, "host": socket.gethostname(), "backend": dist.get_backend(), "total": total,
              "world_size": env.world_size, "seconds": time.perf_counter() - started}
    out = run_dir / vocab.PREFLIGHT
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write(out / f"rank-{env.rank}.json", json.dumps(report) + "\n")
    if int(total) != env.world_size:
        raise PreflightError(f"preflight all_reduce on rank {env.rank} summed to {int(total)}, "
                           f"expected world size {env.world_size}: some rank is misconfigured")


def all_mean(value: torch.Tensor, world_size: int) -> float:
    if world_size == 1:
        return float(value)
    total = value.detach().reshape(1).clone()
    dist.all_reduce(total)  # gloo has no AVG, so sum and divide
    return float(total) / world_size


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu": what summaries and bench reports record as the device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def leave(status: int) -> int:
    """``status``, once this rank left the process group with the others."""
    if dist.is_initialized():
        # Tear down together: a rank closing its connections while another still uses them can abort it.
        barrier()
        dist.destroy_process_group()
    return status


def broadcast_from_0(value, world: int):
    if world == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value, world: int, group=None) -> list:
    """Every rank's ``value``, by rank in ``group`` (every rank calls it; one rank alone needs no collective)."""
    values = [value]
    if world > 1:
        values = [None] * world
        dist.all_gather_object(values, value, group=group)
    return values
