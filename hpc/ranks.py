"""Resolve a process's rank, world size and rendezvous address from its environment (pure).

    >>> resolve({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", ...}).rank
    1

Sources are tried in priority order, like Lightning's cluster environments: a launcher that already
exported torch's variables (torchrun, the DeepSpeed launcher) wins; else a Slurm task started by srun;
else a task of submitit's local executor; else one single process. An existing MASTER_ADDR/MASTER_PORT
always wins over anything derived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from hpc import nodelist

# Each source is a table from torch's names to the environment variables that carry them.
TORCHRUN = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
    "node_rank": "GROUP_RANK",
}
SLURM = {
    "rank": "SLURM_PROCID",
    "world_size": "SLURM_NTASKS",
    "local_rank": "SLURM_LOCALID",
    "node_rank": "SLURM_NODEID",
    "nodelist": "SLURM_JOB_NODELIST",
    "job_id": "SLURM_JOB_ID",
    "tasks_per_node": "SLURM_TASKS_PER_NODE",
}
SUBMITIT_LOCAL = {
    "rank": "SUBMITIT_LOCAL_GLOBALID",
    "world_size": "SUBMITIT_LOCAL_NTASKS",
    "local_rank": "SUBMITIT_LOCAL_LOCALID",
    "node_rank": "SUBMITIT_LOCAL_NODEID",
    "job_id": "SUBMITIT_LOCAL_JOB_ID",
}

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Derived ports stay below Linux's default ephemeral range (32768-60999), so a port the kernel handed
# to some outgoing connection cannot collide with the rendezvous port.
PORT_BASE = 12000
PORT_SPAN = 20000


class RankError(ValueError):
    """The environment describes no consistent process geometry."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and where each value came from."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str
    origin: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def port_for_job(job_id: str) -> int:
    """A port every rank of a job derives alike without talking; jobs sharing a node rarely collide."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise RankError(f"job id {job_id!r} has no digits to derive MASTER_PORT from; set MASTER_PORT")
    return PORT_BASE + int(digits) % PORT_SPAN


def tasks_on_node(tasks_per_node: str, node_rank: int) -> int:
    """Tasks on one node from SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> node 3 runs 1."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise RankError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} does not parse")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_rank < len(counts):
        raise RankError(f"node {node_rank} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_rank]


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise RankError(f"{name}={value!r} is not an integer") from None


def detect(environ: Mapping[str, str]) -> str:
    """Name the source that describes this process: torchrun, slurm, submitit-local or single."""
    if all(TORCHRUN[k] in environ for k in ("rank", "world_size", "local_rank")):
        return "torchrun"
    # The batch step also carries SLURM_PROCID=0, but it is not a task: only srun sets SLURM_STEP_ID
    # to a number there (the batch script is step "batch" and exports no SLURM_STEP_ID).
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and environ.get("SLURM_STEP_ID", "").isdigit():
        return "slurm"
    if SUBMITIT_LOCAL["rank"] in environ and SUBMITIT_LOCAL["world_size"] in environ:
        return "submitit-local"
    return "single"


def resolve(environ: Mapping[str, str]) -> DistEnv:
    """Resolve rank, world size, local rank, node rank and MASTER_ADDR/PORT from ``environ``."""
    source = detect(environ)
    origin: dict[str, str] = {}

    def take(table: Mapping[str, str], key: str, default: int | None = None) -> int:
        name = table.get(key)
        if name and name in environ:
            origin[key] = name
            return _int(environ, name)
        if default is None:
            raise RankError(f"{source} environment lacks {name}")
        origin[key] = "default"
        return default

    if source == "torchrun":
        rank, world_size, local_rank = (take(TORCHRUN, k) for k in ("rank", "world_size", "local_rank"))
        local_world_size = take(TORCHRUN, "local_world_size", world_size)
        node_rank = take(TORCHRUN, "node_rank", 0)
    elif source == "slurm":
        rank, world_size = take(SLURM, "rank"), take(SLURM, "world_size")
        local_rank, node_rank = take(SLURM, "local_rank", 0), take(SLURM, "node_rank", 0)
        if SLURM["tasks_per_node"] in environ:
            local_world_size = tasks_on_node(environ[SLURM["tasks_per_node"]], node_rank)
            origin["local_world_size"] = SLURM["tasks_per_node"]
        else:
            local_world_size, origin["local_world_size"] = world_size, "default"
    elif source == "submitit-local":
        rank, world_size = take(SUBMITIT_LOCAL, "rank"), take(SUBMITIT_LOCAL, "world_size")
        local_rank = take(SUBMITIT_LOCAL, "local_rank", rank)
        node_rank = take(SUBMITIT_LOCAL, "node_rank", 0)
        local_world_size, origin["local_world_size"] = world_size, SUBMITIT_LOCAL["world_size"]
    else:
        rank, world_size, local_rank, local_world_size, node_rank = 0, 1, 0, 1, 0
        origin.update(dict.fromkeys(("rank", "world_size", "local_rank", "local_world_size", "node_rank"), "default"))

    if not 0 <= rank < world_size:
        raise RankError(f"rank {rank} is outside world size {world_size} ({source})")
    if not 0 <= local_rank < max(local_world_size, 1):
        raise RankError(f"local rank {local_rank} is outside local world size {local_world_size} ({source})")

    if "MASTER_ADDR" in environ:
        master_addr, origin["master_addr"] = environ["MASTER_ADDR"], "MASTER_ADDR"
    elif source == "slurm" and SLURM["nodelist"] in environ:
        try:
            master_addr = nodelist.first(environ[SLURM["nodelist"]])
        except nodelist.NodelistError as exc:
            raise RankError(f"SLURM_JOB_NODELIST: {exc}") from None
        origin["master_addr"] = "first host of SLURM_JOB_NODELIST"
    else:
        master_addr, origin["master_addr"] = DEFAULT_MASTER_ADDR, "default"

    job_id_var = {"slurm": SLURM["job_id"], "submitit-local": SUBMITIT_LOCAL["job_id"]}.get(source)
    if "MASTER_PORT" in environ:
        master_port, origin["master_port"] = _int(environ, "MASTER_PORT"), "MASTER_PORT"
    elif job_id_var and job_id_var in environ:
        master_port = port_for_job(environ[job_id_var])
        origin["master_port"] = f"derived from {job_id_var}"
    else:
        master_port, origin["master_port"] = DEFAULT_MASTER_PORT, "default"

    return DistEnv(rank, world_size, local_rank, local_world_size, node_rank, master_addr, master_port,
                   source, origin)


def threads_per_rank(environ: Mapping[str, str], cpu_count: int, dist: DistEnv) -> int:
    """Intra-op threads for one rank: its share of the CPUs its task owns, so ranks never oversubscribe.

    An explicit OMP_NUM_THREADS wins. A Slurm task owns SLURM_CPUS_PER_TASK CPUs; under torchrun or the
    DeepSpeed launcher one such task holds every local rank of the node, which then split it.
    """
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(environ["OMP_NUM_THREADS"]), 1)
    owned = cpu_count
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        owned = min(int(environ["SLURM_CPUS_PER_TASK"]), cpu_count)
    sharing = 1 if dist.source == "slurm" and "SLURM_CPUS_PER_TASK" in environ else dist.local_world_size
    return max(owned // max(sharing, 1), 1)
