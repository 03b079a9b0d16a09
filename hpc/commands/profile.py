"""``hpcdist profile init|check``: draft a cluster profile from the live Slurm, and check one against it.

    hpcdist profile init --partition gpu -o /etc/hpcdist/clusters/gpu.yaml
    hpcdist profile check gpu
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import click

from hpc import container as containers
from hpc import dsconfig, fileio, jobfiles
from hpc import partition as partitions
from hpc.commands.options import fail
from hpc.partition import Cluster, Node, Partition
from hpc.slurm import grammar
from hpc.slurm import runner as slurm_runner

# Every draft's first words: what --force looks for before it replaces a file.
DRAFTED = "# Drafted by `hpcdist profile init`"


def _word(value: str) -> str:
    """A YAML scalar that reads back as this very string (JSON strings are YAML)."""
    return json.dumps(value)


def _span(values: Sequence[int], unit: str) -> str:
    low, high = min(values), max(values)
    return f"{low}{unit}" if low == high else f"{low}-{high}{unit}"


def _nodes_line(part: Partition, nodes: Sequence[Node]) -> str:
    if not nodes:
        return f"# partition {part.name}: no nodes"
    memory = [n.memory_mb for n in nodes if n.memory_mb]
    gpus = [n.gpus for n in nodes]
    return (f"# partition {part.name}: {len(nodes)} node(s) {part.nodes_expr}; {_span([n.cpus for n in nodes], '')} "
            f"CPUs and {_span(memory, ' MB') if memory else 'unknown'} memory per node; "
            + (f"{_span(gpus, '')} GPU(s) per node (Gres)" if any(gpus) else "no GPUs in Gres"))


def _cpu_bf16_line(here: bool | None) -> str:
    why = "--precision auto trains CPU-only DeepSpeed jobs in bf16 only where true, else in fp32"
    if here is None:
        return f"# cpu_bf16: false   # could not know: whether the nodes' CPUs have native bf16; {why}"
    has = "has" if here else "has no"
    return (f"cpu_bf16: {str(here).lower()}   # this machine's CPU {has} native bf16 (AVX512-BF16, AMX); Slurm does "
            f"not tell the nodes': check one (grep -c bf16 /proc/cpuinfo); {why}")


def _container_lines(runtimes: Sequence[str]) -> list[str]:
    if not runtimes:
        return ["# container: {runtime: charliecloud}   # no container runtime found here (pyxis in plugstack.conf, "
                "apptainer, singularity, ch-run or podman-hpc on PATH, oci.conf); jobs run on the host"]
    return [f"container:   # found here: {', '.join(runtimes)}; a job runs in an image only with --container IMAGE "
            "(or image: below)",
            f"  runtime: {runtimes[0]}",
            "  # image: /path/or/name   # could not know: a default image for every job; unset: each job names one",
            "  # mounts: [/scratch]      # could not know: more host folders to bind at the same paths"]


def draft(cluster: Cluster, name: str | None, when: str, cpu_bf16_here: bool | None = None,
          runtimes: Sequence[str] = ()) -> str:
    """A profile for one partition as commented YAML: what Slurm told, and what it could not know.
    ``cpu_bf16_here``: whether the machine drafting it has native bf16, the guess for CPU-only nodes;
    ``runtimes``: the container runtimes found here (hpc.container.detect), most integrated first."""
    part = partitions.pick(cluster, name)
    nodes = cluster.nodes_of(part)
    gpus = min((n.gpus for n in nodes), default=0)
    lines = [
        f"{DRAFTED} from Slurm cluster {cluster.name or '(unnamed)'} on {when}.",
        "# Check every value; put the file in /etc/hpcdist/clusters/NAME.yaml (everyone) or",
        "# ~/.config/hpcdist/clusters/NAME.yaml (you), then: hpcdist profile check NAME",
        _nodes_line(part, nodes),
        *_placement_lines(cluster, part),
        *_node_lines(part, nodes, gpus, cpu_bf16_here),
        *_environment_lines(gpus),
        *_container_lines(runtimes),
    ]
    others = [p for p in cluster.partitions if p.name != part.name]
    if others:
        lines.append("# Other partitions: " + ", ".join(f"{p.name} ({len(p.nodes)} nodes)" for p in others)
                     + ". One profile each: `extends: THIS-NAME` and `partition: OTHER`, e.g. with --partition.")
    return "\n".join(lines) + "\n"


def _placement_lines(cluster: Cluster, part: Partition) -> list[str]:
    """Where jobs go: the cluster, the partition, the account and the time limit."""
    fmt = grammar.format_duration
    lines = []
    if cluster.name:
        lines.append(f"slurm_cluster: {_word(cluster.name)}   # partition limits are checked only on this cluster")
    lines.append(f"partition: {_word(part.name)}")
    if cluster.accounting:
        lines.append("# account: my-project   # accounting is on (slurmdbd): the account jobs are charged to; "
                     "unset: each user's default")
    elif cluster.accounting is False:
        lines.append("# accounting is off here: no account needed")
    limits = f"MaxTime {fmt(part.max_time_s) if part.max_time_s is not None else 'UNLIMITED'}"
    if part.default_time_s is not None:
        lines.append(f"# time: {_word(fmt(part.default_time_s))}   # unset: jobs get the partition's DefaultTime "
                     f"{fmt(part.default_time_s)}; {limits}")
    else:
        lines.append(f"# time: \"01:00:00\"   # unset: 01:00:00 (the partition has no DefaultTime); {limits}")
    return lines


def _node_lines(part: Partition, nodes: Sequence[Node], gpus: int, cpu_bf16_here: bool | None) -> list[str]:
    """What each node gives a job: ``gpus`` (the fewest), CPUs per task, and how many nodes one job may hold."""
    cpus = min((n.cpus for n in nodes), default=1)
    max_nodes = len(nodes) if part.max_nodes is None else min(len(nodes), part.max_nodes)
    mixed = gpus != max((n.gpus for n in nodes), default=0)
    fewest = f"   # the fewest among the partition's nodes ({_span([n.gpus for n in nodes], '')})" if mixed else ""
    lines = [f"gpus_per_node: {gpus}{fewest}"]
    if gpus:
        lines.append("# gpu_memory: 80GB   # could not know: memory per GPU (--backend auto plans against it)")
        lines.append(f"cpus_per_task: {max(cpus // gpus, 1)}   # {cpus} CPUs / {gpus} GPUs per node")
    else:
        lines.append(f"cpus_per_task: 1   # nodes have {cpus} CPU(s); raise it for threaded data loading")
        lines.append(_cpu_bf16_line(cpu_bf16_here))
    limit = f"   # MaxNodes {part.max_nodes}" if part.max_nodes is not None else ""
    # A profile's max_nodes is at least 1: 0 would make the draft one that no command loads.
    lines.append(f"max_nodes: {max_nodes}{limit}" if max_nodes else
                 "# max_nodes: 1   # could not know: Slurm reports no nodes in this partition")
    return lines


def _environment_lines(gpus: int) -> list[str]:
    """The job's shell and network: all beyond what Slurm knows, so commented placeholders."""
    lines = [
        "modules: []   # could not know: the module loads jobs need, e.g. [cuda/12.1, nccl/2.18]",
        "setup: []     # could not know: shell lines run before the job starts, e.g. [\"ulimit -n 65536\"]",
        "env:",
        "  PYTHONUNBUFFERED: \"1\"",
        "network:      # could not know: how ranks reach each other; ask your network admin",
    ]
    if gpus:
        lines += [
            "  ib: true",
            "  # NCCL_IB_HCA: mlx5_0,mlx5_1       # the InfiniBand HCAs (ibv_devinfo, ibstat)",
            "  # NCCL_SOCKET_IFNAME: ib0          # the interface for NCCL's bootstrap",
            "  # NCCL_IB_GID_INDEX: 3             # RoCE only",
            "  # GLOO_SOCKET_IFNAME: ib0",
        ]
    else:
        lines += ["  ib: false   # no GPUs: ranks talk over TCP sockets (Gloo)",
                  "  # GLOO_SOCKET_IFNAME: eth0   # if the default route's interface is not the nodes' network"]
    return lines


def runtimes_here(cluster: Cluster) -> list[str]:
    """The container runtimes this login node shows: SPANK's plugstack.conf, PATH, oci.conf beside slurm.conf."""
    conf_dir = os.path.dirname(cluster.slurm_conf or "/etc/slurm/slurm.conf")
    try:
        with open(cluster.plugstack or os.path.join(conf_dir, "plugstack.conf"), errors="replace") as f:
            plugstack = f.read(1 << 20)
    except OSError:
        plugstack = ""
    return containers.detect(lambda command: shutil.which(command) is not None, plugstack,
                             os.path.exists(os.path.join(conf_dir, "oci.conf")))


def _runtime_problems(box: containers.Container | None, cluster: Cluster) -> list[str]:
    """An srun plugin runtime (pyxis, oci) that Slurm's own configuration here does not load: every job's step
    would fail. A runtime run as a command is not judged: a login node's PATH need not be a compute node's."""
    if box is None or box.starts != "step":
        return []
    offered = runtimes_here(cluster)
    if box.runtime in offered:
        return []
    return [f"container.runtime {box.runtime}: Slurm here does not load it (found: {', '.join(offered) or 'none'}); "
            "set the runtime the site has"]


def _cluster_or_exit(command: str) -> Cluster:
    cluster = partitions.query({k: v for k, v in os.environ.items() if k != partitions.CHECK_ENV})
    if cluster is None:
        fail(f"profile {command}", f"Slurm does not answer here (scontrol missing, failing or slower than "
                                   f"{slurm_runner.QUERY_TIMEOUT_S} s); run it on a login node of the cluster")
    return cluster


@click.group()
def profile() -> None:
    """Draft a cluster profile from the live Slurm (init) or check one against it (check)."""


@profile.command()
@click.option("--partition", "-p", "partition_name", help="Partition to describe. [Slurm's default partition]")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write the draft here, not stdout.")
@click.option("--force", is_flag=True, help="Replace an earlier draft at --output (never another file, nor a link).")
def init(partition_name: str | None, output: str | None, force: bool) -> None:
    """Print a draft profile (YAML, with comments for what Slurm cannot tell) for one partition."""
    cluster = _cluster_or_exit("init")
    try:
        text = draft(cluster, partition_name, time.strftime("%Y-%m-%d"), dsconfig.this_cpu().bf16,
                     runtimes_here(cluster))
    except partitions.SpecError as exc:
        fail("profile init", exc)
    if output is None:
        click.echo(text, nl=False)
        return
    if force and not _replaceable(Path(output)):
        fail("profile init", f"{output} is not a draft of profile init (a link, or a file it did not write), so "
                             "--force leaves it; move it away or give another -o")
    try:
        if force:
            fileio.atomic_write(Path(output), text)
        else:
            with open(output, "x") as f:
                f.write(text)
    except FileExistsError:
        fail("profile init", f"{output} exists; pass --force to replace it or another -o")
    except OSError as exc:
        fail("profile init", f"cannot write {output}: {exc.strerror}")
    click.echo(f"wrote {output}; check it with: hpcdist profile check {output}", err=True)


def _replaceable(path: Path) -> bool:
    """Whether --force may replace ``path``: nothing is there, or a draft (a link, managed elsewhere, is not)."""
    if not os.path.lexists(path):
        return True
    try:
        with jobfiles.open_regular(path) as f:
            return f.read(len(DRAFTED)) == DRAFTED.encode()
    except (jobfiles.Damaged, OSError):
        return False


@profile.command()
@click.argument("name", required=False)
def check(name: str | None) -> None:
    """Check a profile (NAME, a YAML path, or the default cluster) against the live Slurm; exit 1 on problems."""
    from hpc import profiles, render, sites

    try:
        name = name or sites.default_cluster(os.environ)[0]
        prof = profiles.load(name)
        render.search_path(prof, os.environ)  # a templates directory that is not there fails every render
    except (profiles.ProfileError, sites.SiteError, render.RenderError) as exc:
        fail("profile check", exc)
    cluster = _cluster_or_exit("check")
    found = partitions.problems(prof, cluster) + _runtime_problems(prof.container, cluster)
    if found:
        click.echo(f"profile {prof.name!r} ({prof.source}) does not fit Slurm cluster {cluster.name or '(unnamed)'}:")
        for problem in found:
            click.echo(f"  - {problem}")
        sys.exit(1)
    part = partitions.pick(cluster, prof.partition)
    limit = grammar.format_duration(part.max_time_s) if part.max_time_s is not None else "UNLIMITED"
    click.echo(f"profile {prof.name!r} fits Slurm cluster {cluster.name or '(unnamed)'}: partition {part.name!r}, "
               f"{len(part.nodes)} node(s), MaxTime {limit}")
