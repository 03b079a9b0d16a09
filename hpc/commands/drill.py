"""``hpcdist drill``: certify that a partition's failures are classified, retried and resumed exactly.

    hpcdist drill --nodes 2                                              # ddp under srun, the five basic ones
    hpcdist drill --nodes 2 --backend deepspeed --launcher deepspeed --scenarios rank_kill,node_loss --json
    hpcdist drill --nodes 2 --spare-nodes 1 --node-control "bash scripts/slurm-local.sh" \
        --small-disk /tmp/slurm-local/small-disk                        # all seven, nodes killed for real
    hpcdist drill --nodes 2 --spare-nodes 1 --job-defaults              # the time lost with the trainer's defaults

Takes the same job options as ``hpcdist submit``; the trainer's arguments after ``--`` are added to the
drill's own small job (see hpc/drill.py; hpc/drill_run.py runs it). Exit status 0 when every scenario
passed, 1 otherwise.
Without --node-control a node-loss scenario sets a node DOWN for a few seconds (it needs the rights of a Slurm
operator) and resumes it whatever happens; batch_host_loss needs --node-control and disk_full --small-disk
(each is in the default list when its option is given). disk_full's job runs in a new folder on the small
file system, moved into the drill's job directory when it has ended.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from hpc.commands.options import Seconds, fail, job_options, prepare, submit_or_exit


@click.command()
@job_options
@click.option("--scenarios", default=None,
              help="Which faults to inject, comma-separated, in this order. [preempt,time_limit,rank_kill,"
                   "node_loss,hang, then batch_host_loss with --node-control and disk_full with --small-disk]")
@click.option("--steps", type=int, default=40, show_default=True, help="Training steps of each scenario's job.")
@click.option("--time-limit-steps", type=int, default=None,
              help="Steps of the time-limit scenario's job (and the reference), which must still be training when "
                   "Slurm acts on the cut limit. [as many as the reference trains in 75 s]")
@click.option("--via", type=click.Choice(("submitit", "sbatch")), default="sbatch", show_default=True,
              help="How each job is submitted.")
@click.option("--job-defaults", is_flag=True,
              help="Run the jobs with the trainer's own checkpoint and snapshot defaults, each fault half a snapshot "
                   "interval after a snapshot: the time a user with the defaults loses. [a checkpoint every 5 steps, "
                   "each fault at step 10]")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--timeout", "timeout_s", type=Seconds(1), default=600, show_default=True,
              help="Seconds each scenario's job may take from the fault to its end.")
@click.option("--node-control", metavar="CMD", default=None,
              help="How node_loss kills a node for real and brings it back: `CMD kill-node NODE`, `CMD revive "
                   "NODE` (scripts/slurm-local.sh does both). [none: the node's job processes are SIGKILLed and "
                   "the node set DOWN, as an admin would]")
@click.option("--small-disk", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder on a small file system every node sees, for disk_full to fill (scripts/slurm-local.sh "
                   "mounts one at /tmp/slurm-local/small-disk).")
def drill(config_file: str | None, scenarios: str | None, steps: int, time_limit_steps: int | None, via: str,
          job_defaults: bool, as_json: bool, timeout_s: float, node_control: str | None, small_disk: Path | None,
          **options: Any) -> None:
    """Run a small job per scenario, inject the fault, and check ending, retry, resume and recovery time."""
    from hpc import drill as drilling
    from hpc import drill_run, jobs
    from hpc import submit as submitting

    given = {"--node-control": node_control, "--small-disk": small_disk}
    try:
        chosen = drilling.choose(scenarios, given)
        if steps <= drilling.FAULT_STEP + drilling.CHECKPOINT_EVERY:
            least = drilling.FAULT_STEP + 2 * drilling.CHECKPOINT_EVERY
            raise ValueError(f"--steps {steps} leaves nothing to check after the fault at step {drilling.FAULT_STEP}; "
                             f"use at least {least}")
        where = submitting.choose(via, "slurm", jobs.slurm_available(os.environ))
    except ValueError as exc:
        fail("drill", exc)
    root = Path(options.pop("job_dir") or f"runs/drill-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    made = None if root.exists() else root
    user_args = tuple(options.pop("train_args") or ())
    name = options.pop("job_name") or "drill"
    if options.get("precision") is None:
        options["precision"] = "fp32"  # exact resume is checked to 1e-6: no reduced precision
    say = (lambda text: click.echo(text, err=True)) if as_json else click.echo

    on_small_disk = Path(tempfile.mkdtemp(prefix="hpcdist-drill-", dir=small_disk)) if "disk_full" in chosen else None

    def submit(label: str, job_steps: int) -> Any:
        train_args = (*drilling.train_args(label, job_defaults), "--max-steps", str(job_steps), *user_args)
        # The uninterrupted reference needs no spare node.
        chosen_options = {**options, "spare_nodes": None} if label == "reference" else options
        folder = on_small_disk if label == "disk_full" else root
        rendered = prepare("drill", config_file, job_dir=str(folder / label), job_name=f"{name}-{label}",
                           train_args=train_args, **chosen_options)
        return submit_or_exit("drill", rendered, where, made).record

    try:
        results = drill_run.run_drill(chosen, submit, steps, say=say, timeout_s=timeout_s, node_control=node_control,
                                      time_limit_steps=time_limit_steps, spare_nodes=options.get("spare_nodes") or 0,
                                      job_defaults=job_defaults)
    finally:
        if on_small_disk is not None:
            # The small file system is shared by every drill: its job directory joins the others.
            if (on_small_disk / "disk_full").is_dir():
                root.mkdir(parents=True, exist_ok=True)
                shutil.move(on_small_disk / "disk_full", root / "disk_full")
                say(f"disk_full: job directory moved from {on_small_disk} to {root / 'disk_full'}")
            on_small_disk.rmdir()
    click.echo(drilling.as_json(results) if as_json else drilling.table(results))
    sys.exit(0 if all(r.ok for r in results) else 1)
