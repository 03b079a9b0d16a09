"""Resolve a process's rank, world size and rendezvous address from its environment (pure).

    >>> resolve({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", ...}).rank
    1

Sources are tried in priority order, like Lightning's cluster environments: a launcher that already
exported torch's variables (torchrun, the DeepSpeed launcher) wins; else a Slurm task started by srun;
else a task of submitit's local executor; else one single process. An existing MASTER_ADDR/MASTER_PORT
always wins over anything derived, and so does the port the local runner chose (HPCDIST_MASTER_PORT).

Inside a Slurm step the step's own values win over the allocation's: a step on part of the allocation
(``srun -N2 -r1`` in a 3-node job) runs on SLURM_STEP_NODELIST, not SLURM_JOB_NODELIST, and under
``srun -E`` SLURM_NTASKS and SLURM_TASKS_PER_NODE keep the allocation's values while SLURM_STEP_NUM_TASKS
and SLURM_STEP_TASKS_PER_NODE describe the step (tests/data/slurm_steps.json: captured on a real cluster).
SLURM_NODEID and SLURM_PROCID are already relative to the step.

A geometry whose variables contradict each other (SLURM_TASKS_PER_NODE not summing to SLURM_NTASKS, a node
rank beyond SLURM_NNODES or the step's nodelist, LOCAL_WORLD_SIZE=0, ...) is refused in one line naming each
variable as it was set: ranks that disagree on the world would hang at the rendezvous or share out the CPUs
wrongly. An allocation's nodelist only bounds a step's nodes, since a step may run on part of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, TypeVar

from hpc import jobfiles, nodelist, shown

# Each source is a table from torch's names to the environment variables that carry them.
TORCHRUN = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
    "node_rank": "GROUP_RANK",
    "nodes": "GROUP_WORLD_SIZE",
}
# What a launcher gives the ranks it starts. A job's tasks are started by srun or the local runner, never by a
# launcher: there these came from the submitting shell (setup.sh drops them; templates/setup.sh.j2).
LAUNCHER_VARIABLES = (*TORCHRUN.values(), "MASTER_ADDR", "MASTER_PORT")
# A port hpcdist chose for the job's rendezvous: the local runner's at submit, one per job (hpc/submit.py: its job ids
# are pids, of which two live ones may derive one port), a Slurm job's batch shell's where another program holds the
# derived one (hpc/ports.py). Not MASTER_PORT, which setup.sh drops as the submitting shell's.
PICKED_MASTER_PORT = "HPCDIST_MASTER_PORT"
# Slurm's entries list the variables that may carry a value, the step's before the allocation's.
SLURM = {
    "rank": ("SLURM_PROCID",),
    "world_size": ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
    "local_rank": ("SLURM_LOCALID",),
    "node_rank": ("SLURM_NODEID",),
    "nodelist": ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "job_id": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "tasks_per_node": ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    "nodes": ("SLURM_STEP_NUM_NODES", "SLURM_NNODES"),
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
MAX_PORT = 65535
# Derived ports stay below Linux's default ephemeral range (32768-60999), so a port the kernel handed
# to some outgoing connection cannot collide with the rendezvous port.
PORT_BASE = 12000
PORT_SPAN = 20000


_INTEGER = re.compile(r"-?[0-9]+")
# No rank, size or port has more than 18 digits; int() of over 4,300 raises an error of its own.
_WHOLE = re.compile(r"(-?)0*([0-9]{1,18})")
# A host name, an IPv4 address or an IPv6 one (a %zone after it): what torch's TCPStore can connect to.
_ADDRESS = re.compile(r"[A-Za-z0-9_.:%-]+")
_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


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
    digits = re.sub(r"[^0-9]", "", job_id)
    if not digits:
        raise RankError(f"job id {shown.value(job_id)} has no digits to derive MASTER_PORT from; set MASTER_PORT")
    # The last nine digits decide the remainder (PORT_SPAN divides 10**9), and int() refuses 4,301 or more.
    return PORT_BASE + int(digits[-9:]) % PORT_SPAN


def _tasks_items(tasks_per_node: str) -> Iterator[tuple[int, int]]:
    """(tasks, nodes) for each item of SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> (2, 3), (1, 1)."""
    for item in tasks_per_node.split(","):
        m = _TASKS_ITEM.fullmatch(item.strip())
        tasks, repeat = (_whole(m.group(1)), _whole(m.group(2) or "1")) if m else (None, None)
        if tasks is None or repeat is None:
            raise RankError(f"SLURM_TASKS_PER_NODE={shown.value(tasks_per_node)} does not parse")
        yield tasks, repeat


def tasks_on_node(tasks_per_node: str, node_rank: int) -> int:
    """Tasks on one node from SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> node 3 runs 1 (repeats not built)."""
    if node_rank >= 0:
        for tasks, repeat in _tasks_items(tasks_per_node):
            if node_rank < repeat:
                return tasks
            node_rank -= repeat
    raise RankError(f"node {node_rank} is outside SLURM_TASKS_PER_NODE={shown.value(tasks_per_node)}")


def _whole(text: str) -> int | None:
    """``text`` as a whole number of at most 18 digits (leading zeros aside), else None."""
    m = _WHOLE.fullmatch(text)
    return int(m.group(1) + m.group(2)) if m else None


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    # ASCII digits only: int() would also read "٣" or " 3 ", which no launcher writes.
    if not _INTEGER.fullmatch(value):
        raise RankError(f"{name}={shown.value(value)} is not an integer")
    number = _whole(value)
    if number is None:
        raise RankError(f"{name}={shown.value(value)} has {len(value.lstrip('-0'))} digits, more than any rank, "
                        "size or port; fix or unset it")
    return number


def _names(table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    names = table.get(key, ())
    return (names,) if isinstance(names, str) else names


def _present(environ: Mapping[str, str], table: Mapping[str, Any], key: str) -> str | None:
    """The first of ``key``'s variables that ``environ`` sets, or None."""
    return next((name for name in _names(table, key) if name in environ), None)


def detect(environ: Mapping[str, str]) -> str:
    """Name the source that describes this process: torchrun, slurm, submitit-local or single."""
    if all(TORCHRUN[k] in environ for k in ("rank", "world_size", "local_rank")):
        return "torchrun"
    # The batch step also carries SLURM_PROCID=0, but it is not a task: only srun sets SLURM_STEP_ID
    # to a number there (the batch script is step "batch" and exports no SLURM_STEP_ID).
    if ("SLURM_PROCID" in environ and _present(environ, SLURM, "world_size")
            and environ.get("SLURM_STEP_ID", "").isdigit()):
        return "slurm"
    if SUBMITIT_LOCAL["rank"] in environ and SUBMITIT_LOCAL["world_size"] in environ:
        return "submitit-local"
    return "single"


def resolve(environ: Mapping[str, str]) -> DistEnv:
    """Resolve rank, world size, local rank, node rank and MASTER_ADDR/PORT from ``environ``."""
    source = detect(environ)
    origin: dict[str, str] = {}
    rank, world_size, local_rank, local_world_size, node_rank = _geometry(environ, source, origin)
    disagreement = _disagreement(environ, source, origin, (rank, world_size, local_rank, local_world_size, node_rank))
    if disagreement:
        raise RankError(f"{disagreement} ({source}); its launcher's variables disagree: fix or unset the stale one")
    master_addr = _master_addr(environ, source, origin)
    master_port = _master_port(environ, source, origin)
    return DistEnv(rank, world_size, local_rank, local_world_size, node_rank, master_addr, master_port,
                   source, origin)


def _geometry(environ: Mapping[str, str], source: str, origin: dict[str, str]) -> tuple[int, int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size, node_rank) as ``source`` describes them."""

    def take(table: Mapping[str, Any], key: str, default: int | None = None) -> int:
        """``key``'s value from the first of its variables set, noting which in ``origin``; ``default`` if none
        is (RankError where the source must set one)."""
        name = _present(environ, table, key)
        if name:
            origin[key] = name
            return _int(environ, name)
        if default is None:
            raise RankError(f"{source} environment lacks {' or '.join(_names(table, key))}")
        origin[key] = "default"
        return default

    if source == "torchrun":
        rank, world_size, local_rank = (take(TORCHRUN, k) for k in ("rank", "world_size", "local_rank"))
        local_world_size = take(TORCHRUN, "local_world_size", world_size)
        node_rank = take(TORCHRUN, "node_rank", 0)
    elif source == "slurm":
        rank, world_size = take(SLURM, "rank"), take(SLURM, "world_size")
        local_rank, node_rank = take(SLURM, "local_rank", 0), take(SLURM, "node_rank", 0)
        tasks_var = _present(environ, SLURM, "tasks_per_node")
        local_world_size = tasks_on_node(environ[tasks_var], node_rank) if tasks_var else world_size
        origin["local_world_size"] = tasks_var or "default"
    elif source == "submitit-local":
        rank, world_size = take(SUBMITIT_LOCAL, "rank"), take(SUBMITIT_LOCAL, "world_size")
        local_rank = take(SUBMITIT_LOCAL, "local_rank", rank)
        node_rank = take(SUBMITIT_LOCAL, "node_rank", 0)
        local_world_size, origin["local_world_size"] = world_size, SUBMITIT_LOCAL["world_size"]
    else:
        rank, world_size, local_rank, local_world_size, node_rank = 0, 1, 0, 1, 0
        origin.update(dict.fromkeys(("rank", "world_size", "local_rank", "local_world_size", "node_rank"), "default"))
    return rank, world_size, local_rank, local_world_size, node_rank


def _disagreement(environ: Mapping[str, str], source: str, origin: Mapping[str, str],
                  geometry: tuple[int, int, int, int, int]) -> str | None:
    """What in ``geometry`` contradicts another of its values, each named with the variable it came from."""
    rank, world_size, local_rank, local_world_size, node_rank = geometry

    # Formatted only for the message: ranks.txt resolves every rank, each with the job's whole nodelist.
    def said(value: int, name: str, unit: str = "") -> str:
        return f"{value}{unit} ({name}={shown.value(environ[name])})" if name in environ else f"{value} ({name})"

    if not 0 <= rank < world_size:
        return f"rank {said(rank, origin['rank'])} is outside world size {said(world_size, origin['world_size'])}"
    if not 0 <= local_rank < local_world_size:
        return (f"local rank {said(local_rank, origin['local_rank'])} is outside local world size "
                f"{said(local_world_size, origin['local_world_size'])}")
    if local_world_size > world_size:
        return (f"local world size {said(local_world_size, origin['local_world_size'])} is over world size "
                f"{said(world_size, origin['world_size'])}")
    if node_rank < 0:
        return f"node rank {said(node_rank, origin['node_rank'])} is negative"
    tasks_var = _present(environ, SLURM, "tasks_per_node") if source == "slurm" else None
    tasks, nodes = _tasks_total(environ[tasks_var]) if tasks_var else (world_size, 0)
    if tasks != world_size:
        return f"{said(tasks, tasks_var, ' task(s)')} is not world size {said(world_size, origin['world_size'])}"
    counts = ([(nodes, tasks_var, True)] if tasks_var else []) + _node_counts(environ, source)
    for n, name, exact in counts[1:]:
        if n != counts[0][0] and (exact or n < counts[0][0]):
            relation = "not" if exact else "over the allocation's"
            return f"{said(*counts[0][:2], ' node(s)')} is {relation} {said(n, name, ' node(s)')}"
    if counts and node_rank >= counts[0][0]:
        return f"node rank {said(node_rank, origin['node_rank'])} is outside {said(*counts[0][:2], ' node(s)')}"
    return None


def _tasks_total(tasks_per_node: str) -> tuple[int, int]:
    """(tasks, nodes) that SLURM_TASKS_PER_NODE describes, e.g. ``2(x3),1`` -> (7, 4)."""
    items = tuple(_tasks_items(tasks_per_node))
    return sum(tasks * nodes for tasks, nodes in items), sum(nodes for _, nodes in items)


def _node_counts(environ: Mapping[str, str], source: str) -> list[tuple[int, str, bool]]:
    """(nodes, variable, exact) for each variable besides SLURM_TASKS_PER_NODE that counts the step's nodes;
    not exact for an allocation's nodelist, of which a step may use part."""
    table = {"torchrun": TORCHRUN, "slurm": SLURM}.get(source, {})
    nodes_var, list_var = _present(environ, table, "nodes"), _present(environ, table, "nodelist")
    counts = [(_int(environ, nodes_var), nodes_var, True)] if nodes_var else []
    if list_var:
        counts.append((_hosts(environ, list_var, nodelist.count), list_var, list_var == "SLURM_STEP_NODELIST"))
    return counts


T = TypeVar("T")


def _hosts(environ: Mapping[str, str], name: str, read: Callable[[str], T]) -> T:
    """``read`` (nodelist.first, nodelist.count) of the nodelist in variable ``name``."""
    try:
        return read(environ[name])
    except nodelist.NodelistError as exc:
        raise RankError(f"{name}: {exc}; fix or unset it") from None


def _master_addr(environ: Mapping[str, str], source: str, origin: dict[str, str]) -> str:
    """MASTER_ADDR as given, else a Slurm step's first host, else the loopback address."""
    nodelist_var = _present(environ, SLURM, "nodelist") if source == "slurm" else None
    if "MASTER_ADDR" in environ:
        origin["master_addr"] = "MASTER_ADDR"
        if not _ADDRESS.fullmatch(environ["MASTER_ADDR"]):
            raise RankError(f"MASTER_ADDR={shown.value(environ['MASTER_ADDR'])} is not a host name or IP address; "
                            "set it to one (e.g. node1 or 10.0.0.1) or unset it")
        return environ["MASTER_ADDR"]
    if nodelist_var:
        origin["master_addr"] = f"first host of {nodelist_var}"
        return _hosts(environ, nodelist_var, nodelist.first)
    origin["master_addr"] = "default"
    return DEFAULT_MASTER_ADDR


def hosts_rendezvous(dist: DistEnv, environ: Mapping[str, str]) -> bool | None:
    """Whether this node's torchrun agent hosts the c10d rendezvous store: known where MASTER_ADDR is the step's
    first node (a Slurm node name, as SLURMD_NODENAME is); None where it was given, and torch must guess. Left to
    guess, the host that finds MASTER_PORT taken joins whatever holds it as a client and waits out the rendezvous."""
    node = environ.get("SLURMD_NODENAME")
    if not node or not dist.origin.get("master_addr", "").startswith("first host of "):
        return None
    return node == dist.master_addr


def _master_port(environ: Mapping[str, str], source: str, origin: dict[str, str]) -> int:
    """MASTER_PORT as given, else the one hpcdist chose, else one derived from the job id (alike on every rank), else
    torch's default."""
    job_id_var = (_present(environ, SLURM, "job_id") if source == "slurm"
                  else _present(environ, SUBMITIT_LOCAL, "job_id") if source == "submitit-local" else None)
    given = next((name for name in ("MASTER_PORT", PICKED_MASTER_PORT) if name in environ), None)
    if given:
        master_port, origin["master_port"] = _int(environ, given), given
        if not 1 <= master_port <= MAX_PORT:
            raise RankError(f"{given}={master_port} is not a TCP port; set it to 1-{MAX_PORT} or unset it")
        return master_port
    if job_id_var:
        origin["master_port"] = f"derived from {job_id_var}"
        return port_for_job(environ[job_id_var])
    origin["master_port"] = "default"
    return DEFAULT_MASTER_PORT


def threads_per_rank(environ: Mapping[str, str], cpu_count: int, dist: DistEnv) -> int:
    """Intra-op threads for one rank: its share of the CPUs its task owns, so ranks never oversubscribe.

    An explicit OMP_NUM_THREADS wins. A Slurm task owns SLURM_CPUS_PER_TASK CPUs; under torchrun or the
    DeepSpeed launcher one such task holds every local rank of the node, which then split it.
    """
    threads, cpus = count_of(environ, "OMP_NUM_THREADS"), count_of(environ, "SLURM_CPUS_PER_TASK")
    if threads is not None:
        return max(threads, 1)
    owned = cpu_count if cpus is None else min(cpus, cpu_count)
    sharing = 1 if dist.source == "slurm" and "SLURM_CPUS_PER_TASK" in environ else dist.local_world_size
    return max(owned // max(sharing, 1), 1)


def attempt_of(environ: Mapping[str, str]) -> int:
    """This attempt's number: the batch shell's HPCDIST_ATTEMPT (it counts relaunches inside an allocation
    too), else Slurm's restart count; 0 where neither is a count."""
    counts = (count_of(environ, name) for name in ("HPCDIST_ATTEMPT", "SLURM_RESTART_COUNT"))
    return next((count for count in counts if count is not None), 0)


def count_of(environ: Mapping[str, str], name: str) -> int | None:
    """The count a variable holds (jobfiles.count), else None."""
    return jobfiles.count(environ.get(name) or "")
