"""``hpcdist sweep``: run a matrix of configurations as Slurm job arrays, and compare how the tasks did.

    hpcdist sweep --grid backend=ddp,deepspeed zero_stage=1,2,3 precision=fp32,bf16 --max-parallel 2 \\
        --nodes 2 -o runs/grid -- --max-steps 20
    hpcdist sweep -f sweep.yaml --dry-run        # base:, axes:, tasks:, exclude: (a partial configuration each)
    hpcdist sweep                                # the preset `compare`: dp, ddp, DeepSpeed ZeRO 0-3
    hpcdist sweep status runs/grid [--json] ; hpcdist sweep report runs/grid --png docs/x.png --markdown docs/x.md
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import click

from hpc import fileio, job
from hpc.commands.options import check_container, fail, job_options, values_from_options
from hpc.slurm import states

WAIT_POLL_S = 3.0


class SweepGroup(click.Group):
    """``hpcdist sweep [OPTIONS]`` runs a sweep; ``hpcdist sweep status|report SWEEP`` reads one back."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        if args[0] == "run":
            args = ["run", *spread_grid(args[1:])]
        return super().parse_args(ctx, args)


def spread_grid(args: Sequence[str]) -> list[str]:
    """``--grid a=1,2 b=3`` -> ``--grid a=1,2 --grid b=3``: the axes after --grid up to the next option or ``--``."""
    out: list[str] = []
    in_grid = False
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        in_grid = arg == "--grid" or (in_grid and not arg.startswith("-"))
        if arg != "--grid":
            out += ["--grid", arg] if in_grid else [arg]
    return out


@click.group(cls=SweepGroup)
def sweep() -> None:
    """Run a matrix of configurations as Slurm job arrays (one per allocation shape), or read one back.

    \b
    hpcdist sweep [JOB OPTIONS] [--grid KEY=V1,V2 ...] [-f SWEEP.yaml] [--preset compare] -- [TRAINER ARGS]
    hpcdist sweep status SWEEP ; hpcdist sweep report SWEEP
    """


@sweep.command("run")
@job_options
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="An axis: a job key (backend, zero_stage, precision, nodes, ...) or train.OPTION; several may "
                   "follow one --grid.")
@click.option("--file", "-f", "sweep_file", type=click.Path(dir_okay=False),
              help="Sweep file (YAML): base: (job keys), axes: (key: [values]), tasks: and exclude: "
                   "(lists of partial configurations), max_parallel:.")
@click.option("--skip", multiple=True, metavar="KEY=V[,KEY=V]", help="Leave out the configurations that match.")
@click.option("--preset", type=click.Choice(("compare",)),
              help="compare: dp (1 node), ddp and DeepSpeed ZeRO 0-3 (2 nodes). The default without axes.")
@click.option("--max-parallel", type=int, help="Array tasks running at once per array (--array=0-N%K). [all]")
@click.option("--via", type=click.Choice(("sbatch", "submitit")), default="sbatch", show_default=True,
              help="Arrays are submitted with sbatch only.")
@click.option("--dry-run", is_flag=True, help="Write the sweep directory and print every task; submit nothing.")
@click.option("--force", is_flag=True, help="Replace a sweep directory hpcdist rendered that never ran.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for every task; exit 1 unless all completed.")
def run(config_file: str | None, grid: tuple[str, ...], sweep_file: str | None, skip: tuple[str, ...],
        preset: str | None, max_parallel: int | None, via: str, dry_run: bool, force: bool, wait_: bool,
        **options: Any) -> None:
    """Run a sweep: every configuration of the matrix, grouped into one job array per allocation shape."""
    from hpc import jobs, profiles, registry, render, sweep_matrix, sweep_results, yamlfile
    from hpc import spec as specs
    from hpc import sweep as sweeps

    if via == "submitit":
        fail("sweep", ValueError("job arrays are submitted with sbatch only; drop --via submitit"))
    if not dry_run and not jobs.slurm_available(os.environ):
        fail("sweep", ValueError("job arrays need Slurm (sbatch on PATH); use --dry-run to see the tasks"))
    try:
        # Without --file the sweep file is an empty one: no base, no axes, no settings.
        data = yamlfile.load(Path(sweep_file), "sweep file") if sweep_file else {}
        base, file_matrix, settings = sweep_matrix.parse_file(data, sweep_file or "")
        cli = sweep_matrix.Matrix(axes=tuple(sweep_matrix.parse_axis(g) for g in grid),
                                  exclude=tuple(sweep_matrix.parse_assignment(s) for s in skip))
        chosen = preset or ("compare" if not (grid or file_matrix.axes or file_matrix.tasks) else None)
        preset_matrix = sweep_matrix.PRESETS[chosen] if chosen else sweep_matrix.Matrix()
        matrix = sweep_matrix.combine(preset_matrix, file_matrix, cli)
        base.setdefault("job_name", settings.get("name") or "sweep")
        values = values_from_options(config_file, base=base, **options)
        check_more = slurm_checks(values)
        sweep_dir = values.pop("job_dir")
        throttle = settings.get("max_parallel") if max_parallel is None else max_parallel  # 0 is refused, not "all"
        plan = sweeps.plan(values, matrix, sweep_dir, max_parallel=throttle,
                           name=str(values.get("job_name")), load_profile=profiles.load, check_more=check_more,
                           check_rendered=lambda rendered: check_container(rendered, local=False))
        if not dry_run:  # before anything is written: one Slurm runs must not go unregistered
            registry.writable(registry.registry_path(os.environ))
        sweeps.write(plan, force=force)
    except (sweep_matrix.SweepError, yamlfile.YamlError, specs.SpecError, profiles.ProfileError,
            render.RenderError, registry.JobError) as exc:
        fail("sweep", exc)
    if dry_run:
        click.echo(describe(plan), nl=False)
        click.echo(f"# sweep directory: {plan.sweep_dir} (dry run: nothing submitted)", err=True)
        return
    try:
        ids = submit(plan)
    except RuntimeError as exc:
        click.echo(f"hpcdist sweep: {exc}", err=True)
        sys.exit(1)
    for array in plan.arrays:
        click.echo(f"Submitted job array {ids[array.name]} ({array.range}, {len(array.tasks)} task(s)): "
                   f"{array.job_dir}")
    click.echo(f"# sweep directory: {plan.sweep_dir}; follow it with: hpcdist sweep status {plan.sweep_dir}")
    if wait_:
        # hpc.job's one follow loop: one sacct per poll for all the arrays.
        final = job.follow(lambda: current_rows(plan.sweep_dir),
                           lambda rows: all(r.state in states.TERMINAL for r in rows), WAIT_POLL_S)
        click.echo(sweep_results.table(final), nl=False)
        if not all(r.state == "COMPLETED" for r in final):
            sys.exit(1)


def slurm_checks(values: dict[str, Any]) -> Any:
    """What `hpcdist submit` checks beyond the job itself, for every task: the live partition's limits (where
    Slurm answers) and the dataset on this machine. Fills the partition's DefaultTime into ``values`` when
    neither the flags nor the profile give --time, as submit does."""
    from hpc import partition, profiles
    from hpc import spec as specs

    cluster = partition.query(os.environ)
    if cluster is not None and values.get("time") is None:
        profile = profiles.load(values["cluster"])
        if partition.applies(profile, cluster):
            part = partition.pick(cluster, values.get("partition") or profile.partition)
            values["time"] = partition.with_default_time(specs.from_mapping(values), profile, part).time
            if values["time"] is not None:
                click.echo(f"hpcdist: --time {values['time']}: partition {part.name!r}'s DefaultTime", err=True)

    def check_more(spec: specs.JobSpec) -> None:
        profile = profiles.load(spec.cluster)
        if cluster is not None and partition.applies(profile, cluster):
            part = partition.pick(cluster, spec.partition or profile.partition)
            partition.check(spec, part, cluster.nodes_of(part))
        specs.check_dataset(spec, os.path.exists)

    return check_more


def describe(plan: Any) -> str:
    """The dry run: every array's job.sbatch, then every task's values, resolved job and command."""
    parts = []
    for array in plan.arrays:
        parts.append(f"==> {array.job_dir}/job.sbatch <==\n{array.job_sbatch}")
        for task in array.tasks:
            spec = task.rendered.spec
            stage = f" zero_stage={spec.zero_stage}" if spec.backend == "deepspeed" else ""
            lines = [f"==> task {task.index} ({array.name} index {task.array_index}): {task.label} <==",
                     f"# {spec.backend}{stage} precision={spec.precision} launcher={spec.launcher} "
                     f"nodes={spec.nodes} ranks={spec.world_size} job_dir={task.rendered.job_dir}"]
            ds = task.rendered.files.get("deepspeed.json")
            if ds:
                config = json.loads(ds)
                fp16, bf16 = (config.get(k, {}).get("enabled") for k in ("fp16", "bf16"))
                lines.append(f"# deepspeed.json: stage={config['zero_optimization']['stage']} fp16={fp16} "
                             f"bf16={bf16} micro_batch={config.get('train_micro_batch_size_per_gpu')}")
            lines.append(task.rendered.files["task.sh"].rstrip("\n"))
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def submit(plan: Any) -> dict[str, str]:
    """sbatch every array (all or none), then register each array task as a job of its own."""
    from hpc import jobdir, registry
    from hpc import submit as submitting
    from hpc import sweep as sweeps

    try:
        ids = dict(zip([a.name for a in plan.arrays],
                       submitting.submit_arrays([a.job_dir / "job.sbatch" for a in plan.arrays])))
    except (submitting.SubmitError, OSError) as exc:
        # Nothing runs from this directory: leaving it would only look like a sweep that exists.
        jobdir.discard(plan.sweep_dir, "sweep")
        raise RuntimeError(str(exc)) from None
    now = datetime.datetime.now(datetime.timezone.utc)
    fileio.atomic_write(plan.sweep_dir / sweeps.SUBMITTED_FILE, json.dumps(
        {"arrays": ids, "via": "sbatch", "submitted": now.isoformat(timespec="seconds")}, indent=1) + "\n")
    # `hpcdist status|logs|cancel JOBID_TASK` then find each array task and its directory.
    for array in plan.arrays:
        for task in array.tasks:
            record = submitting.record_for(task.rendered, f"{ids[array.name]}_{task.array_index}", "sbatch", now)
            registry.write_marker(record)
            registry.append(registry.registry_path(os.environ), record)
    return ids


def current_rows(sweep_dir: Path) -> list[Any]:
    """Every task's row, its state as `hpcdist status` tells it (the controller's while it holds the task)."""
    from hpc import jobs, sweep_results

    data, submitted = sweep_results.load(sweep_dir)
    seen = jobs.slurm_states(sweep_results.job_ids(data, submitted))
    return sweep_results.rows(data, submitted, {job_id: now.state for job_id, now in seen.items()})


def _read(command: str, sweep_dir: str) -> list[Any]:
    from hpc import sweep_matrix

    try:
        return current_rows(Path(sweep_dir).resolve())
    except sweep_matrix.SweepError as exc:
        fail(f"sweep {command}", exc)


@sweep.command("status")
@click.argument("sweep_dir", metavar="SWEEP")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task, in a list.")
def status(sweep_dir: str, as_json: bool) -> None:
    """Each task's state and metrics (from its run/summary.json)."""
    from hpc import sweep_results

    rows = _read("status", sweep_dir)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=1))
        return
    click.echo(sweep_results.table(rows), nl=False)


@sweep.command("report")
@click.argument("sweep_dir", metavar="SWEEP")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task, in a list; no chart.")
@click.option("--png", type=click.Path(dir_okay=False), help="Bar chart to write. [SWEEP/report.png]")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write the markdown table here.")
@click.option("--title", default=None, help="The chart's title. [the sweep directory's name]")
def report(sweep_dir: str, as_json: bool, png: str | None, markdown: str | None, title: str | None) -> None:
    """A markdown table comparing the tasks, and a PNG bar chart of images/s, peak memory and first step."""
    from hpc import sweep_results

    rows = _read("report", sweep_dir)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=1))
        return
    text = sweep_results.table(rows, markdown=True)
    click.echo(text, nl=False)
    path = Path(png) if png else Path(sweep_dir) / "report.png"
    writes = [(Path(markdown), lambda: fileio.atomic_write(Path(markdown), text))] if markdown else []
    writes.append((path, lambda: sweep_results.chart(rows, path, title or Path(sweep_dir).resolve().name)))
    for target, write in writes:
        try:
            write()
        except OSError as exc:
            fail("sweep report", OSError(f"cannot write {target}: {exc.strerror or exc}; give a path in a folder "
                                         "that exists and that you may write"))
    click.echo(f"# chart: {path}", err=True)
