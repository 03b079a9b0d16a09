"""What a Slurm cluster's partitions allow, read from scontrol, and whether a job or a profile fits them.

    facts = query(os.environ)            # the one side effect: scontrol, with a short timeout; None if no Slurm
    check(spec, pick(facts, "debug"))     # pure: SpecError naming the limit, e.g. MaxTime
    problems(profile, facts)              # pure: what `hpcdist profile check` lists

Parsers take the text of ``scontrol show partition -o``, ``scontrol show node -o`` and ``scontrol show config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, Sequence

from hpc import jobfiles, nodelist
from hpc.slurm import commands, grammar, parse
from hpc.slurm.runner import Runner
from hpc.slurm.runner import run as slurm_run
from hpc.spec import JobSpec, SpecError, time_seconds

if TYPE_CHECKING:
    from hpc.profiles import Profile

CHECK_ENV = "HPCDIST_PARTITION_CHECK"
# Words scontrol prints where a limit is unset.
_UNSET = ("UNLIMITED", "INFINITE", "NONE", "N/A", "(NULL)", "")
# One Gres entry: gpu[:type]:count with an optional (S:0-1) or (IDX:...) suffix.
_GRES = re.compile(r"gpu(?::[^:(,]+)?:(\d+)[KMG]?(?:\([^)]*\))?")


@dataclass(frozen=True)
class Node:
    """One node as Slurm configured it."""

    name: str
    cpus: int
    memory_mb: int | None
    gpus: int


@dataclass(frozen=True)
class Partition:
    """One partition's limits; ``None`` means Slurm sets none."""

    name: str
    nodes: tuple[str, ...]
    nodes_expr: str
    max_time_s: int | None = None
    default_time_s: int | None = None
    max_nodes: int | None = None
    default: bool = False
    state: str = "UP"


@dataclass(frozen=True)
class Cluster:
    """What scontrol said about the cluster this machine submits to."""

    name: str | None
    partitions: tuple[Partition, ...]
    nodes: tuple[Node, ...]
    accounting: bool | None = None
    slurm_conf: str | None = None   # where slurm.conf is: plugstack.conf and oci.conf sit beside it by default
    plugstack: str | None = None    # PlugStackConfig when set (the SPANK plugins, e.g. pyxis)

    def nodes_of(self, partition: Partition) -> tuple[Node, ...]:
        wanted = set(partition.nodes)
        return tuple(n for n in self.nodes if n.name in wanted)


# ---- parsing (pure) ------------------------------------------------------------------------------

def gres_gpus(gres: str) -> int:
    """GPUs in a node's Gres (``gpu:a100:8(S:0-1)``, ``gpu:4,gpu:v100:2``, ``(null)``)."""
    return sum(int(m.group(1)) for m in _GRES.finditer(gres))


def tres_gpus(tres: str) -> int:
    """GPUs in CfgTRES (``cpu=64,mem=500G,gres/gpu=8,gres/gpu:a100=8``): the untyped total."""
    m = re.search(r"(?:^|,)gres/gpu=(\d+)", tres)
    return int(m.group(1)) if m else 0


def parse_partitions(text: str) -> tuple[Partition, ...]:
    out = []
    for f in parse.records(text):
        if "PartitionName" not in f:
            continue
        expr = f.get("Nodes", "")
        try:
            names = tuple(nodelist.expand(expr)) if expr.upper() not in _UNSET else ()
        except nodelist.NodelistError:
            names = ()
        out.append(Partition(
            name=f["PartitionName"], nodes=names, nodes_expr=expr,
            max_time_s=grammar.duration_s(f.get("MaxTime", "")),
            default_time_s=grammar.duration_s(f.get("DefaultTime", "")),
            max_nodes=jobfiles.count(f.get("MaxNodes", "")), default=f.get("Default", "NO").upper() == "YES",
            state=f.get("State", "UP")))
    return tuple(out)


def parse_nodes(text: str) -> tuple[Node, ...]:
    out = []
    for f in parse.records(text):
        if "NodeName" not in f:
            continue
        cpus = jobfiles.count(f.get("CPUEfctv", "")) or jobfiles.count(f.get("CPUTot", "")) or 0
        gpus = gres_gpus(f.get("Gres", "")) or tres_gpus(f.get("CfgTRES", ""))
        out.append(Node(f["NodeName"], cpus, jobfiles.count(f.get("RealMemory", "")), gpus))
    return tuple(out)


def cluster_from(partitions: str, nodes: str, config: str) -> Cluster:
    conf = parse.config(config)
    storage = conf.get("AccountingStorageType")
    plugstack = conf.get("PlugStackConfig")
    return Cluster(name=conf.get("ClusterName"), partitions=parse_partitions(partitions), nodes=parse_nodes(nodes),
                   accounting=None if storage is None else storage != "accounting_storage/none",
                   slurm_conf=conf.get("SLURM_CONF"), plugstack=None if plugstack in (None, "(null)") else plugstack)


# ---- judging (pure) ------------------------------------------------------------------------------

def pick(cluster: Cluster, name: str | None) -> Partition:
    """The named partition, or Slurm's default one; SpecError naming the partitions there are."""
    for part in cluster.partitions:
        if (name is None and part.default) or part.name == name:
            return part
    names = ", ".join(p.name for p in cluster.partitions) or "none"
    if name is None:
        label = f" {cluster.name!r}" if cluster.name else ""
        raise SpecError(f"Slurm cluster{label} has no default partition; pass --partition (one of {names})")
    raise SpecError(f"partition {name!r} does not exist on Slurm cluster {cluster.name or 'here'!r}; pass "
                    f"--partition with one of {names}")


def _over(time: str, max_time_s: int | None) -> bool:
    """Whether a --time value asks for more than MaxTime; no limit (0, UNLIMITED) asks for more than any."""
    if max_time_s is None:
        return False
    seconds = time_seconds(time)
    return seconds is None or seconds > max_time_s


def check(spec: JobSpec, part: Partition, nodes: Sequence[Node]) -> None:
    """Refuse a resolved job that this partition would never run: SpecError naming the limit and the fix."""
    where = f"partition {part.name!r}"
    if spec.time is not None and _over(spec.time, part.max_time_s):
        raise SpecError(f"--time {spec.time} exceeds {where}'s MaxTime {grammar.format_duration(part.max_time_s)}; "
                        "ask for at most that, or another --partition")
    if part.max_nodes is not None and spec.nodes > part.max_nodes:
        raise SpecError(f"--nodes {spec.nodes} exceeds {where}'s MaxNodes {part.max_nodes}; ask for at most "
                        f"{part.max_nodes}, or another --partition")
    if spec.nodes > len(part.nodes):
        raise SpecError(f"--nodes {spec.nodes}: {where} has only {len(part.nodes)} node(s) ({part.nodes_expr}); "
                        f"ask for at most {len(part.nodes)}")
    for option, expr in (("--nodelist", spec.nodelist), ("--exclude", spec.exclude)):
        missing = [h for h in nodelist.expand(expr) if h not in part.nodes] if expr else []
        if missing:
            shown_missing = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise SpecError(f"{option} names {shown_missing}, not in {where} (its nodes: {part.nodes_expr}); "
                            f"pick nodes from it or drop {option}")
    if spec.exclude:
        left = sorted(set(part.nodes) - set(nodelist.expand(spec.exclude)))
        if len(left) < spec.nodes:
            raise SpecError(f"--exclude {spec.exclude} leaves {len(left)} of {where}'s nodes for a job that needs "
                            f"{spec.nodes}; exclude fewer nodes or ask for fewer --nodes")
    gpus = spec.gpus_per_node or 0
    usable = [n for n in nodes if n.gpus >= gpus]  # every node when the job asks for no GPU
    if gpus and len(usable) < spec.nodes:
        most = max((n.gpus for n in nodes), default=0)
        raise SpecError(f"--gpus-per-node {gpus}: {len(usable)} of {where}'s nodes have that many GPUs (Gres; "
                        f"at most {most} per node) but the job needs {spec.nodes}; ask for at most {most}")
    cpus = spec.slurm_tasks_per_node * (spec.cpus_per_task or 1)
    if usable and all(n.cpus < cpus for n in usable):
        most = max(n.cpus for n in usable)
        raise SpecError(f"{spec.slurm_tasks_per_node} task(s) x {spec.cpus_per_task or 1} CPU(s) per node exceed "
                        f"the {most} CPUs of {where}'s nodes; lower --cpus-per-task or --ntasks-per-node")


def applies(profile: Profile, cluster: Cluster) -> bool:
    """Whether the Slurm answering here is the one the profile describes (a profile may name another site)."""
    return not (profile.slurm_cluster and cluster.name and profile.slurm_cluster != cluster.name)


def with_default_time(spec: JobSpec, profile: Profile, part: Partition | None) -> JobSpec:
    """The partition's DefaultTime when neither the user nor the profile gives --time."""
    if spec.time is None and profile.time is None and part is not None and part.default_time_s is not None:
        return replace(spec, time=grammar.format_duration(part.default_time_s))
    return spec


def problems(profile: Profile, cluster: Cluster) -> list[str]:
    """Everything in a profile that the live cluster contradicts, one sentence each (empty: it fits)."""
    out = []
    if not applies(profile, cluster):
        out.append(f"slurm_cluster is {profile.slurm_cluster!r} but this Slurm cluster is {cluster.name!r}")
    try:
        part = pick(cluster, profile.partition)
    except SpecError:
        names = ", ".join(p.name for p in cluster.partitions) or "none"
        what = f"partition {profile.partition!r} does not exist" if profile.partition else "no partition is set " \
            "and Slurm has no default one"
        return out + [f"{what}; set partition: to one of {names}"]
    where = f"partition {part.name!r}"
    nodes = cluster.nodes_of(part)
    if profile.gpus_per_node:
        most = max((n.gpus for n in nodes), default=0)
        if profile.gpus_per_node > most:
            out.append(f"gpus_per_node {profile.gpus_per_node} but {where}'s nodes have at most {most} GPU(s) in Gres")
    if profile.time is not None and _over(profile.time, part.max_time_s):
        out.append(f"time {profile.time} exceeds {where}'s MaxTime {grammar.format_duration(part.max_time_s)}")
    if not part.nodes:
        out.append(f"{where} has no nodes, so no job of this profile can start there; set partition: to one that has")
    elif profile.max_nodes is not None:
        if profile.max_nodes > len(part.nodes):
            out.append(f"max_nodes {profile.max_nodes} but {where} has {len(part.nodes)} node(s)")
        if part.max_nodes is not None and profile.max_nodes > part.max_nodes:
            out.append(f"max_nodes {profile.max_nodes} exceeds {where}'s MaxNodes {part.max_nodes}")
    need = profile.cpus_per_task * max(profile.gpus_per_node, 1)
    if nodes and need > max(n.cpus for n in nodes):
        out.append(f"cpus_per_task {profile.cpus_per_task} x {max(profile.gpus_per_node, 1)} rank(s) per node "
                   f"exceed the {max(n.cpus for n in nodes)} CPUs of {where}'s nodes")
    if part.state.upper() != "UP":
        out.append(f"{where} is {part.state}")
    return out


# ---- asking Slurm (the side effect) --------------------------------------------------------------

def query(environ: Mapping[str, str], runner: Runner = slurm_run) -> Cluster | None:
    """The cluster's partitions, nodes and config, or None where scontrol is missing, fails or is slow."""
    if environ.get(CHECK_ENV, "1").strip().lower() in ("0", "no", "off", "false") or not commands.available(environ):
        return None
    texts = []
    for what in ("partition", "node", "config"):
        text = commands.show(what, runner=runner)
        if text is None:
            return None
        texts.append(text)
    return cluster_from(*texts)
