"""``hpcdist doctor``: submit a tiny preflight job and judge its network before a real run.

    hpcdist doctor --nodes 2 --cluster example-ib          # all-reduce over every rank; NCCL over IB?
    hpcdist doctor --nodes 2 --executor local              # the same on this machine, emulated

Each rank of the job runs the trainer's ``--preflight-only``: it checks that it can reach
MASTER_ADDR:MASTER_PORT, joins the process group, all-reduces a one and writes what it saw. With NCCL
the job logs NCCL_DEBUG=INFO, from which doctor reads the transport and fails when a profile that
expects InfiniBand fell back to sockets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from hpc import doctor as judging
from hpc import jobfiles, jobs, logs, profiles, vocab
from hpc.commands.options import fail, job_options, prepare, submit_or_exit
from hpc.spec import SpecError


def read_reports(run_dir: Path) -> list[judging.RankReport]:
    """Each rank's preflight report; a damaged one is left out, and judging then names that rank as missing."""
    reports = []
    for path in sorted(jobfiles.folder(run_dir / vocab.PREFLIGHT, "rank-*.json")):
        try:
            reports.append(jobfiles.typed(judging.RankReport, jobfiles.json_object(path, 1 << 20) or {}))
        except (TypeError, ValueError):
            continue
    return reports


def _two_ranks(rendered: Any) -> None:
    # One process joins no collective (the trainer's preflight says so and writes no report): nothing to judge.
    if rendered.spec.world_size < 2:
        raise SpecError("the job has one rank, so there is no network between ranks to check; ask for --nodes 2 "
                        "(or --ntasks-per-node 2)")


@click.command()
@job_options
@click.option("--executor", type=click.Choice(("auto", "slurm", "local")), default="auto", show_default=True,
              help="local: emulate the allocation on this machine (the default where sbatch is missing).")
def doctor(config_file: str | None, executor: str, **options: Any) -> None:
    """Run an all-reduce across the job's ranks and check the network it used."""
    from hpc import submit as submitting

    options["train_args"] = tuple(options.get("train_args") or ()) + ("--preflight-only",)
    options["job_name"] = options.get("job_name") or "hpcdist-doctor"
    try:
        where = submitting.choose("submitit", executor, jobs.slurm_available(os.environ))
    except ValueError as exc:
        fail("doctor", exc)
    rendered = prepare("doctor", config_file, check=_two_ranks, **options)
    spec = rendered.spec
    submitted = submit_or_exit("doctor", rendered, where)
    click.echo(f"preflight job {submitted.record.job_id} ({where}) on {spec.nodes} node(s), "
               f"{spec.world_size} rank(s): {rendered.job_dir}")
    final = submitted.wait()
    run_dir = Path(rendered.job_dir) / vocab.RUN_DIR
    found = sorted(jobfiles.folder(run_dir / vocab.PREFLIGHT, "nccl-*.log"))
    nccl_logs = [jobfiles.tail_text(p, 1 << 20) for p in found]
    expect_ib = spec.gpus_per_node > 0 and profiles.load(spec.cluster).network.ib
    verdicts = judging.judge(read_reports(run_dir), spec.world_size, nccl_logs, expect_ib)
    if not final.ok:
        verdicts.append(judging.Verdict(False, f"the preflight job ended {final.state}: "
                                               f"see `hpcdist logs {submitted.record.job_id}`"))
    for verdict in verdicts:
        click.echo(f"{'ok  ' if verdict.ok else 'FAIL'}  {verdict.message}")
    if not all(v.ok for v in verdicts):
        report = logs.failure_report(submitted.record)
        if report:
            click.echo(report, err=True)
        sys.exit(1)
