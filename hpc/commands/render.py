"""``hpcdist render`` and ``hpcdist hostfile``: turn job options into a checked job directory.

    hpcdist render --nodes 2 --backend deepspeed --launcher deepspeed --job-dir runs/a -- --epochs 1
    hpcdist hostfile --from-slurm --world-info --slots 4

"""

from __future__ import annotations

import os
from typing import Any

import click

from hpc import hostfile as hostfiles
from hpc import jobdir, vocab
from hpc.commands.options import WHOLE, fail, job_options, prepare


@click.command()
@job_options
@click.option("--force", is_flag=True, help="Replace a job directory hpcdist rendered that never ran.")
@click.option("--test-only", "test_only_", is_flag=True, help="Also ask Slurm: sbatch --test-only.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the job directory, not job.sbatch.")
def render(config_file: str | None, force: bool, test_only_: bool, quiet: bool, **options: Any) -> None:
    """Write a checked job directory (job.sbatch, setup.sh, task.sh, ...) and print job.sbatch.

    The trainer's own arguments follow `--`.
    """
    rendered = prepare("render", config_file, force=force, **options)
    if not quiet:
        click.echo(rendered.files[vocab.JOB_SBATCH], nl=False)
    click.echo(f"# job directory: {rendered.job_dir}", err=not quiet)
    if test_only_:
        from hpc.slurm import commands

        if not commands.available(os.environ, "sbatch"):
            click.echo("sbatch is not on PATH: skipped --test-only", err=True)
            return
        status, answer = commands.sbatch_test_only(rendered.job_dir / vocab.JOB_SBATCH)
        if not status:
            click.echo(answer, err=True)
        else:
            # A job Slurm refuses will not run: its directory, just written, goes again.
            jobdir.discard(rendered.job_dir)
            reason = answer.splitlines()[-1] if answer else f"exit {status}"
            fail("render", RuntimeError(f"Slurm refused the job (sbatch --test-only): {reason}; "
                                        f"nothing was kept"))


@click.command()
@click.option("--from-slurm", is_flag=True, help="Hosts from $SLURM_JOB_NODELIST (inside a job).")
@click.option("--nodelist", "-w", help="Hosts from a Slurm nodelist, e.g. n[1-2].")
@click.option("--slots", type=WHOLE, help="Ranks per host. [$SLURM_GPUS_ON_NODE, else 1]")
@click.option("--world-info", is_flag=True, help="Print DeepSpeed's base64 --world_info instead.")
def hostfile(from_slurm: bool, nodelist: str | None, slots: int | None, world_info: bool) -> None:
    """Print a DeepSpeed hostfile (or --world_info) for a Slurm nodelist."""
    try:
        if from_slurm == bool(nodelist):
            raise hostfiles.HostfileError("pass exactly one of --from-slurm and --nodelist")
        expr = hostfiles.nodelist_from_slurm(os.environ) if from_slurm else nodelist
        names = hostfiles.hosts(expr)
        count = slots if slots is not None else hostfiles.slots_from_slurm(os.environ)
        text = hostfiles.world_info(names, count) + "\n" if world_info else hostfiles.hostfile(names, count)
    except hostfiles.HostfileError as exc:
        fail("hostfile", exc)
    click.echo(text, nl=False)
