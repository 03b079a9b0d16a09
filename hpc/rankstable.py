"""Tabulate what each rank of a job will see (the job directory's ranks.txt), before the job runs.

    print(ranks_table(spec, profile.environment()))

The table comes from synthetic launcher environments fed through hpc.ranks.resolve, the very function each
rank runs, so it shows what the ranks will compute rather than a second opinion of it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from hpc import nodelist, ranks, shown
from hpc.spec import JobSpec
from hpc.task import local_nodelist

# What the port column says of a port unknown before the job runs, and the header line saying where it comes from.
DERIVED_PORT = f"{ranks.PORT_BASE}+JOBID%{ranks.PORT_SPAN}"
SUBMIT_PORT = "free-at-submit"
TORCHRUN_PICKS = "torchrun-picks"
PORT_NOTES = {
    DERIVED_PORT: f"# master_port: {DERIVED_PORT}, the same for every rank; where another program holds it on the "
                  "batch host as the allocation starts, a free port no job id derives (above "
                  f"{ranks.PORT_BASE + ranks.PORT_SPAN - 1}, outside the kernel's ephemeral range; hpc/ports.py).",
    SUBMIT_PORT: f"# master_port: a port of {ranks.PORT_BASE}-{ranks.PORT_BASE + ranks.PORT_SPAN - 1} found free when "
                 "the job is submitted, the same for every rank.",
    # torch.distributed.elastic's c10d rendezvous (RendezvousStoreInfo): task.sh's MASTER_ADDR:MASTER_PORT is only
    # where the agents meet.
    TORCHRUN_PICKS: "# master_addr, master_port: torchrun's rendezvous hands its ranks the host name (FQDN) of the "
                    "node whose agent it ranked first and a port that agent picks, the same for every rank.",
}


def ranks_table(spec: JobSpec, profile_env: Mapping[str, str], full_up_to: int = 1024, local: bool = False) -> str:
    """What each rank will see, from synthetic launcher environments fed through hpc.ranks.resolve: each over
    ``profile_env``, what setup.sh exports to every task (Profile.environment), since a MASTER_ADDR/PORT there wins.
    ``local``: run by the local executor, whose runner emulates the nodes on loopback addresses (whatever the
    nodelist) and hands every rank the port it asked the OS for at submit.

    Every rank is listed up to ``full_up_to`` ranks; beyond, the first and last rank of each node (the
    rest follow rank = node_rank * procs_per_node + local_rank, which the header states). Linear in the
    rows listed: each environment carries the compressed nodelist, of which resolve reads the first host.
    """
    per_node = spec.procs_per_node
    full = spec.world_size <= full_up_to
    rows = _rows(spec, profile_env, range(per_node) if full else sorted({0, per_node - 1}), local)
    header = ("rank", "local_rank", "node_rank", "node", "master_addr", "master_port", "source")
    lines = [
        "# What each rank will see: hpc.ranks.resolve on the environment its launcher gives it.",
        f"# {spec.world_size} rank(s) = {spec.nodes} node(s) x {per_node}; "
        f"rank = node_rank * {per_node} + local_rank.",
        *(["# node: the local runner's emulated nodes, loopback addresses of this machine."] if local else []),
        *(note for port, note in PORT_NOTES.items() if port in (row[5] for row in rows)),
        "# Every rank is listed." if full else
        f"# Over {full_up_to} ranks: only the first and last rank of each node are listed; the ranks between "
        "see the same node, master_addr and master_port.",
        *shown.aligned((header, *rows)),
    ]
    return "\n".join(lines) + "\n"


def _rows(spec: JobSpec, profile_env: Mapping[str, str], local_ranks: Sequence[int],
          local: bool) -> list[tuple[str, ...]]:
    """ranks_table's rows: (rank, local_rank, node_rank, node, master_addr, master_port, source)."""
    expr = local_nodelist(spec.nodes) if local else nodelist.compress(spec.hosts)
    per_node, tasks = spec.procs_per_node, spec.slurm_tasks_per_node
    step_tasks = spec.world_size if spec.launcher == "srun" else spec.nodes
    # ranks.txt is written before the job has an id or port: the port column states the rule that gives it,
    # unless the profile gives the port itself.
    unknown = SUBMIT_PORT if local else DERIVED_PORT

    def slurm_task(procid: int, local_id: int, node_rank: int) -> dict[str, str]:
        return {**profile_env,
                "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(step_tasks), "SLURM_STEP_ID": "0",
                "SLURM_LOCALID": str(local_id), "SLURM_NODEID": str(node_rank), "SLURM_JOB_NODELIST": expr,
                "SLURM_STEP_NODELIST": expr, "SLURM_STEP_NUM_TASKS": str(step_tasks),
                "SLURM_STEP_TASKS_PER_NODE": f"{tasks}(x{spec.nodes})", "SLURM_JOB_ID": "0"}

    rows = []
    for node_rank, host in enumerate(nodelist.expand(expr) if local else spec.hosts):
        if spec.launcher != "srun":
            # task.sh resolves MASTER_ADDR/PORT as the Slurm task of node_rank (one per node), then the
            # launcher exports torch's variables to each rank it spawns.
            task = ranks.resolve(slurm_task(node_rank, 0, node_rank))
        for local_rank in local_ranks:
            rank = node_rank * per_node + local_rank
            if spec.launcher == "srun":
                environ = slurm_task(rank, local_rank, node_rank)
            else:
                # The launcher passes on task's MASTER_ADDR, which may be a placeholder (<node0>) no rank could
                # resolve: the row shows task's.
                environ = {
                    **profile_env,
                    "RANK": str(rank), "WORLD_SIZE": str(spec.world_size), "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node_rank),
                    "MASTER_PORT": str(task.master_port),
                }
            dist = ranks.resolve(environ)
            rendezvous = dist if spec.launcher == "srun" else task
            given = rendezvous.origin["master_port"] == "MASTER_PORT"
            master = (rendezvous.master_addr, str(rendezvous.master_port) if given else unknown)
            rows.append((str(dist.rank), str(dist.local_rank), str(dist.node_rank), host,
                         *((TORCHRUN_PICKS,) * 2 if spec.launcher == "torchrun" else master), dist.source))
    return rows
