"""``hpcdist env``: show how this process's rank and rendezvous resolve from its environment.

    hpcdist env --explain          # each value and where it came from
    eval "$(hpcdist env --shell)"  # what task scripts do before starting torchrun or DeepSpeed
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Mapping

import click

from hpc import ranks, shown


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


@click.command()
@click.option("--explain", "mode", flag_value="explain", default=True, help="Each value and its origin.")
@click.option("--shell", "mode", flag_value="shell", help="export lines for MASTER_ADDR/MASTER_PORT.")
def env(mode: str) -> None:
    """Resolve rank, world size and MASTER_ADDR/PORT from this environment."""
    try:
        dist = ranks.resolve(os.environ)
    except ranks.RankError as exc:
        click.echo(f"hpcdist env: {exc}", err=True)
        sys.exit(2)
    click.echo(shell_exports(dist, os.environ) if mode == "shell" else explain(dist))
