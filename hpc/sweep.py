"""Plan a sweep (render every configuration, one Slurm job array per allocation shape) and write its directory.

    sweep = hpc.sweep.plan(base_values, matrix, sweep_dir, max_parallel=2, load_profile=profiles.load)
    hpc.sweep.write(sweep)               # SWEEP/sweep.yaml, SWEEP/array-K/job.sbatch, SWEEP/array-K/task-I/...

The matrix and its configurations come from hpc.sweep_matrix; reading a submitted sweep back (states, metrics,
the table and the chart) is hpc.sweep_results.

A sweep directory holds ``sweep.yaml`` (the matrix and every resolved task) and one directory per array.
Each array task's directory is an ordinary job directory (setup.sh, task.sh, requeue.sh, spec.yaml,
deepspeed.json, logs/, run/) rendered by hpc.render; the array's job.sbatch picks it by
``$SLURM_ARRAY_TASK_ID`` from a case statement written at submit time, so its run directory, its
preemption marker and its ``--resume`` (``SLURM_RESTART_COUNT`` is per array task) are its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from hpc import jobdir, jobfiles, profiles, render, shown, speccheck, templating, vocab
from hpc import spec as specs
from hpc.profiles import Profile
from hpc.sweep_matrix import Matrix, SweepError, configurations, job_values, label, text

SWEEP_FILE = "sweep.yaml"
SUBMITTED_FILE = "submitted.json"


@dataclass(frozen=True)
class Task:
    """One configuration: its values, its array and index there, and its rendered job directory."""

    index: int
    values: Mapping[str, Any]
    array: int
    array_index: int
    rendered: render.Rendered

    @property
    def label(self) -> str:
        return label(self.values)


@dataclass(frozen=True)
class Array:
    """The tasks that share one allocation shape: one sbatch --array job."""

    index: int
    job_dir: Path
    tasks: tuple[Task, ...]
    max_parallel: int
    job_sbatch: str

    @property
    def name(self) -> str:
        return f"array-{self.index}"

    @property
    def range(self) -> str:
        return f"0-{len(self.tasks) - 1}%{self.max_parallel}"


@dataclass(frozen=True)
class Sweep:
    sweep_dir: Path
    name: str
    base: Mapping[str, Any]
    matrix: Matrix
    max_parallel: int | None
    arrays: tuple[Array, ...]

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(sorted((t for a in self.arrays for t in a.tasks), key=lambda t: t.index))


# ---- planning it ---------------------------------------------------------------------------------

def geometry(spec: specs.JobSpec) -> dict[str, Any]:
    """What the array's job.sbatch fixes for all its tasks (templates/sbatch-allocation.j2 and the srun line);
    ``nodes`` is the allocation's, spares included: each task's step.sh runs its own on them."""
    return {"cluster": spec.cluster, "job_name": spec.job_name, "nodes": spec.allocation_nodes,
            "ntasks_per_node": spec.slurm_tasks_per_node, "cpus_per_task": spec.cpus_per_task,
            "gpus_per_node": spec.gpus_per_node, "time": spec.time, "partition": spec.partition,
            "account": spec.account, "nodelist": spec.nodelist, "exclude": spec.exclude, "after": spec.after,
            "signal": spec.signal, "container": spec.container, "container_runtime": spec.container_runtime}

Checker = Callable[[specs.JobSpec], None]


def _spec(base: Mapping[str, Any], values: Mapping[str, Any], job_dir: str,
          load_profile: Callable[[str], Profile]) -> tuple[specs.JobSpec, Profile]:
    spec = specs.from_mapping({**job_values(base, values), "job_dir": job_dir})
    profile = load_profile(spec.cluster)
    # Rendering checks what check() cannot alone (a DeepSpeed batch that the world size does not divide).
    return render.render(spec, profile, search=(str(render.paths.templates_dir()),)).spec, profile


def _blame(base: Mapping[str, Any], values: Mapping[str, Any], job_dir: str,
           load_profile: Callable[[str], Profile], check_more: Checker) -> str:
    """The axis value a failing configuration would pass without, if exactly one; else the whole configuration."""
    culprits = []
    for key, value in values.items():
        if value is None:
            continue
        try:
            spec, _ = _spec(base, {k: v for k, v in values.items() if k != key}, job_dir, load_profile)
            check_more(spec)
        except ValueError:  # SpecError, ProfileError and RenderError all are
            continue
        culprits.append(f"axis {label({key: value})}")
    return culprits[0] if len(culprits) == 1 else f"task {label(values)}"


def plan(base: Mapping[str, Any], matrix: Matrix, sweep_dir: str | Path, *, max_parallel: int | None = None,
         name: str = "sweep", load_profile: Callable[[str], Profile],
         check_more: Checker = lambda spec: None, check_rendered: Callable[[render.Rendered], None] = lambda r: None,
         environ: Mapping[str, str] = os.environ) -> Sweep:
    """Check and render every task of the sweep; writes nothing. Raises SweepError (one line, the axis).
    ``check_rendered``: what submit checks of a rendered job too (its container where it will run)."""
    sweep_dir = Path(os.path.abspath(sweep_dir))
    if max_parallel is not None and (not jobfiles.is_a(max_parallel, int) or max_parallel < 1):
        raise SweepError("--max-parallel (max_parallel: in a sweep file) must be a whole number of at least 1, "
                         f"got {max_parallel!r}")
    try:
        # Read as a job file is, whatever the tasks set over it: a value no task reads is still a mistake, and a
        # train_args that is no list would be taken apart into its characters or keys.
        specs.from_mapping({**base, "job_dir": str(sweep_dir)})
        speccheck.check_job_dir(str(sweep_dir))  # the sweep's own folder, before a task is blamed for it
    except specs.SpecError as exc:
        raise SweepError(str(exc)) from None
    configs = configurations(matrix, text(base.get("backend") or "ddp"))
    placeholder = str(sweep_dir / "task")
    groups: dict[tuple[Any, ...], list[tuple[int, dict[str, Any], Profile]]] = {}
    seen: dict[specs.JobSpec, dict[str, Any]] = {}
    for i, values in enumerate(configs):
        try:
            spec, profile = _spec(base, values, placeholder, load_profile)
            check_more(spec)
        except (specs.SpecError, profiles.ProfileError, render.RenderError) as exc:
            raise SweepError(f"{_blame(base, values, placeholder, load_profile, check_more)}: "
                             f"{str(exc).splitlines()[0]}") from None
        # Spellings the matrix tells apart (01 and 1) may resolve alike: one job run twice for one result.
        if (twin := seen.setdefault(spec, values)) is not values:
            raise SweepError(f"tasks {label(twin)} and {label(values)} are the same job; give each value once")
        groups.setdefault(tuple(geometry(spec).values()), []).append((i, values, profile))
    arrays = []
    for a, members in enumerate(groups.values()):
        array_dir = sweep_dir / f"array-{a}"
        tasks = []
        for j, (i, values, profile) in enumerate(members):
            spec = specs.from_mapping({**job_values(base, values), "job_dir": str(array_dir / f"task-{j}")})
            try:
                rendered = render.render(spec, profile, search=render.search_path(profile, environ))
                check_rendered(rendered)
            except (specs.SpecError, render.RenderError) as exc:
                raise SweepError(f"task {label(values)}: {str(exc).splitlines()[0]}") from None
            # The array's job.sbatch runs this directory; a second, single-job script there would only mislead.
            files = {k: v for k, v in rendered.files.items() if k != vocab.JOB_SBATCH}
            tasks.append(Task(i, values, a, j, replace(rendered, files=files)))
        array = Array(a, array_dir, tuple(tasks), min(max_parallel or len(tasks), len(tasks)), job_sbatch="")
        arrays.append(replace(array, job_sbatch=render_array(array, environ)))
    return Sweep(sweep_dir, name, dict(base), matrix, max_parallel, tuple(arrays))


def render_array(array: Array, environ: Mapping[str, str]) -> str:
    """The array's job.sbatch (templates/array.sbatch.j2) from its first task's resolved spec."""
    spec = array.tasks[0].rendered.spec
    profile = profiles.load(spec.cluster)
    env = templating.environment(render.search_path(profile, environ))
    context = {
        **render.container_context(spec, profile),
        "spec": spec,
        "vocab": templating.TEMPLATE_VOCAB,
        # Each array task's batch log sits in its own job directory, named as `hpcdist logs JOBID_TASK` looks.
        "batch_log": f"{array.job_dir}/task-%a/{vocab.batch_log('%A_%a')}",
        "array_range": array.range,
        "max_parallel": array.max_parallel,
        "tasks_per_node": spec.slurm_tasks_per_node,
        "tasks": [{"array_index": t.array_index, "job_dir": str(t.rendered.job_dir), "label": t.label}
                  for t in array.tasks],
    }
    try:
        return templating.render_template(env, "array.sbatch.j2", context)
    except render.RenderError as exc:
        raise SweepError(str(exc)) from None


# ---- writing it ----------------------------------------------------------------------------------

def resolved(task: Task) -> dict[str, Any]:
    spec = task.rendered.spec
    return {"index": task.index, "array": f"array-{task.array}", "array_index": task.array_index,
            "job_dir": str(task.rendered.job_dir), "values": dict(task.values),
            "backend": spec.backend, "zero_stage": spec.zero_stage, "precision": spec.precision,
            "launcher": spec.launcher, "nodes": spec.nodes, "world_size": spec.world_size,
            "train_args": list(spec.train_args)}


def sweep_yaml(sweep: Sweep) -> str:
    data = {
        "name": sweep.name,
        "sweep_dir": str(sweep.sweep_dir),
        "max_parallel": sweep.max_parallel,
        "base": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sweep.base.items() if k != "job_dir"},
        "axes": {a.key: list(a.values) for a in sweep.matrix.axes},
        "tasks": [dict(t) for t in sweep.matrix.tasks],
        "exclude": [dict(e) for e in sweep.matrix.exclude],
        "arrays": [{"name": a.name, "job_dir": str(a.job_dir), "array": a.range, "tasks": len(a.tasks),
                    "geometry": {k: (list(g) if isinstance(g, tuple) else g)
                                 for k, g in geometry(a.tasks[0].rendered.spec).items()}}
                   for a in sweep.arrays],
        "resolved": [resolved(t) for t in sweep.tasks],
    }
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def tasks_table(array: Array) -> str:
    """``tasks.txt``: which array index runs which configuration, in which directory."""
    rows = [("index", "task", "values", "job_dir")]
    rows += [(str(t.array_index), str(t.index), t.label, str(t.rendered.job_dir)) for t in array.tasks]
    return "\n".join(shown.aligned(rows)) + "\n"


def write(sweep: Sweep, *, force: bool = False) -> Path:
    """Write the whole sweep directory at once, each array task's job directory inside it.

    A failure leaves nothing behind; ``force`` replaces only a sweep directory hpcdist wrote.
    """
    target = sweep.sweep_dir
    files = {SWEEP_FILE: sweep_yaml(sweep)}
    dirs = []
    for array in sweep.arrays:
        adir = array.job_dir.relative_to(target)
        files[str(adir / vocab.JOB_SBATCH)] = array.job_sbatch
        files[str(adir / "tasks.txt")] = tasks_table(array)
        for task in array.tasks:
            tdir = task.rendered.job_dir.relative_to(target)
            own_dirs = (vocab.LOGS_DIR, vocab.RUN_DIR)
            files[str(tdir / jobdir.MARKER)] = jobdir.marker_text(
                "job", jobdir.written_paths(task.rendered.files, own_dirs))
            files.update({str(tdir / name): body for name, body in task.rendered.files.items()})
            dirs += [str(tdir / d) for d in own_dirs]
    return jobdir.write_tree(target, files, dirs=dirs, what="sweep directory", force=force)
