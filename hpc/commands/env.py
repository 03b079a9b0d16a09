"""``hpcdist env``: show how this process's rank and rendezvous resolve from its environment.

    hpcdist env --explain          # each value and where it came from
    eval "$(hpcdist env --shell)"  # what task scripts do before starting torchrun or DeepSpeed
    hpcdist env --rendezvous-port  # a Slurm job's batch shell as an allocation starts (templates/setup.sh.j2)
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Mapping

import click

from hpc import ports, ranks, shown


def explain(dist: ranks.DistEnv) -> str:
    """A table of each resolved value and the variable (or rule) it came from."""
    rows = [("source", dist.source, "<- detect() in priority order: torchrun, slurm, submitit-local, single")]
    for name in ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "master_addr",
                 "master_port"):
        rows.append((name, str(getattr(dist, name)), f"<- {dist.origin.get(name, '')}"))
    return "\n".join(shown.aligned(rows))


def shell_exports(dist: ranks.DistEnv, environ: Mapping[str, str]) -> str:
    """``export NAME=value`` lines (quoted) for MASTER_ADDR and MASTER_PORT, and ``rdzv_conf=`` torchrun's
    ``--rdzv_conf`` (``is_host=1`` on the node that hosts the c10d store, empty where torch must guess)."""
    host = ranks.hosts_rendezvous(dist, environ)
    return "\n".join([*(f"export {k}={shlex.quote(v)}" for k, v in dist.torch_env().items()
                       if k in ("MASTER_ADDR", "MASTER_PORT")),
                      f"rdzv_conf={'' if host is None else f'is_host={int(host)}'}"])


def rendezvous_port(environ: Mapping[str, str], can_listen=ports.listenable) -> str:
    """What the batch shell exports as HPCDIST_MASTER_PORT: a port no job id derives where another program holds
    the one the job id derives on this host, where every step's rank 0 runs; nothing where that one is free."""
    job_id = environ.get("SLURM_JOB_ID", "")
    try:
        port = ports.rendezvous_port(job_id, ports.ephemeral_range(), can_listen)
    except ports.PortError as exc:
        raise ranks.RankError(f"no port for job {shown.value(job_id)}'s rendezvous here: {exc}; set MASTER_PORT "
                              "in the profile's environment") from None
    return "" if port == ranks.port_for_job(job_id) else str(port)


@click.command()
@click.option("--explain", "mode", flag_value="explain", default=True, help="Each value and its origin.")
@click.option("--shell", "mode", flag_value="shell", help="export lines for MASTER_ADDR/MASTER_PORT.")
@click.option("--rendezvous-port", "mode", flag_value="rendezvous-port",
              help=f"{ranks.PICKED_MASTER_PORT} for the batch shell: a port no job id derives where another "
                   "program holds the one SLURM_JOB_ID derives here, else nothing.")
def env(mode: str) -> None:
    """Resolve rank, world size and MASTER_ADDR/PORT from this environment."""
    try:
        if mode == "rendezvous-port":
            click.echo(rendezvous_port(os.environ))
            return
        dist = ranks.resolve(os.environ)
    except ranks.RankError as exc:
        click.echo(f"hpcdist env: {exc}", err=True)
        sys.exit(2)
    click.echo(shell_exports(dist, os.environ) if mode == "shell" else explain(dist))
