"""``hpcdist drill``: certify that a partition's failures are classified, retried and resumed exactly.

    hpcdist drill --nodes 2                                              # ddp under srun, all five scenarios
    hpcdist drill --nodes 2 --backend deepspeed --launcher deepspeed --scenarios rank_kill,node_loss --json

Takes the same job options as ``hpcdist submit``; the trainer's arguments after ``--`` are added to the
drill's own small job (see hpc/drill.py; hpc/drill_run.py runs it). Exit status 0 when every scenario
passed, 1 otherwise.
A node-loss scenario sets a node DOWN for a few seconds (it needs the rights of a Slurm operator) and
resumes it whatever happens.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from hpc.commands.options import Seconds, fail, job_options


@click.command()
@job_options
@click.option("--scenarios", default=",".join(("preempt", "time_limit", "rank_kill", "node_loss", "hang")),
              show_default=True, help="Which faults to inject, comma-separated, in this order.")
@click.option("--steps", type=int, default=40, show_default=True, help="Training steps of each scenario's job.")
@click.option("--time-limit-steps", type=int, default=None,
              help="Steps of the time-limit scenario's job (and the reference), which must still be training when "
                   "Slurm acts on the cut limit. [as many as the reference trains in 75 s]")
@click.option("--via", type=click.Choice(("submitit", "sbatch")), default="sbatch", show_default=True,
              help="How each job is submitted.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--timeout", "timeout_s", type=Seconds(1), default=600, show_default=True,
              help="Seconds each scenario's job may take from the fault to its end.")
@click.option("--node-control", metavar="CMD", default=None,
              help="How node_loss kills a node for real and brings it back: `CMD kill-node NODE`, `CMD revive "
                   "NODE` (scripts/slurm-local.sh does both). [none: the node's job processes are SIGKILLed and "
                   "the node set DOWN, as an admin would]")
def drill(config_file: str | None, scenarios: str, steps: int, time_limit_steps: int | None, via: str,
          as_json: bool, timeout_s: float, node_control: str | None, **options: Any) -> None:
    """Run a small job per scenario, inject the fault, and check ending, retry, resume and recovery time."""
    from hpc import drill as drilling
    from hpc import drill_run, jobs
    from hpc import submit as submitting
    from hpc.commands.options import prepare, submit_or_exit

    chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in drilling.SCENARIOS]
    if unknown or not chosen:
        fail("drill", ValueError(f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from "
                                 f"{', '.join(drilling.SCENARIOS)}"))
    if steps <= drilling.FAULT_STEP + drilling.CHECKPOINT_EVERY:
        least = drilling.FAULT_STEP + 2 * drilling.CHECKPOINT_EVERY
        fail("drill", ValueError(f"--steps {steps} leaves nothing to check after the fault at step "
                                 f"{drilling.FAULT_STEP}; use at least {least}"))
    try:
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

    def submit(label: str, job_steps: int) -> Any:
        train_args = (*drilling.TRAIN_ARGS, "--max-steps", str(job_steps), *user_args)
        # The uninterrupted reference needs no spare node.
        chosen_options = {**options, "spare_nodes": None} if label == "reference" else options
        rendered = prepare("drill", config_file, job_dir=str(root / label), job_name=f"{name}-{label}",
                           train_args=train_args, **chosen_options)
        return submit_or_exit("drill", rendered, where, made).record

    results = drill_run.run_drill(chosen, submit, steps, say=say, timeout_s=timeout_s, node_control=node_control,
                                  time_limit_steps=time_limit_steps, spare_nodes=options.get("spare_nodes") or 0)
    click.echo(drilling.as_json(results) if as_json else drilling.table(results))
    sys.exit(0 if all(r.ok for r in results) else 1)
