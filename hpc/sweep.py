"""Expand a sweep (a base job, axes, excludes) into one Slurm job array per geometry, and read back its tasks.

    sweep = hpc.sweep.plan(base_values, matrix, sweep_dir, max_parallel=2, load_profile=profiles.load)
    hpc.sweep.write(sweep)               # SWEEP/sweep.yaml, SWEEP/array-K/job.sbatch, SWEEP/array-K/task-I/...
    rows = hpc.sweep.rows(sweep_record, sacct_text)   # state and metrics of every task

A sweep directory holds ``sweep.yaml`` (the matrix and every resolved task) and one directory per array.
Each array task's directory is an ordinary job directory (setup.sh, task.sh, requeue.sh, spec.yaml,
deepspeed.json, logs/, run/) rendered by hpc.render; the array's job.sbatch picks it by
``$SLURM_ARRAY_TASK_ID`` from a case statement written at submit time, so its run directory, its
preemption marker and its ``--resume`` (``SLURM_RESTART_COUNT`` is per array task) are its own.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from hpc import fileio, jobfiles, render, shown, vocab, yamlfile
from hpc import spec as specs
from hpc.profiles import Profile

SWEEP_FILE = "sweep.yaml"
SUBMITTED_FILE = "submitted.json"
# Slurm's MaxArraySize defaults to 1001 (indices 0-1000); a bigger matrix is a mistake more often than a plan.
MAX_TASKS = 1000
# What sweep status and report read of sweep.yaml's `resolved` entries and of each task's summary.json.
RESOLVED_FIELDS = {"index": int, "array": str, "array_index": int, "job_dir": str, "values": dict | None}
SUMMARY_FIELDS = {"precision": str | None, "images_per_s": float | None, "final_loss": float | None,
                  "test_accuracy": float | None, "time_to_first_step_s": float | None, "ranks": list | None}
RANK_FIELDS = {"rank": int, "peak_memory_bytes": float | None, "hostname": str}
TRAIN_PREFIX = "train."
# JobSpec fields an axis may set; the rest are the sweep's own (its directory) or derived.
JOB_KEYS = tuple(f for f in specs.FIELDS if f not in ("job_dir", "train_args", "python", "pythonpath",
                                                       "backend_reason"))
# Keys that mean something only under DeepSpeed: for another backend the axis does not apply, and the
# configurations that differ only there collapse into one.
DEEPSPEED_ONLY = ("zero_stage", "offload")
FILE_KEYS = ("name", "base", "axes", "tasks", "exclude", "max_parallel")
# The seed's question: DP, DDP or DeepSpeed, which ZeRO stage? dp is one process on one node; the others
# spread over two nodes, so they form a second array.
PRESETS: dict[str, dict[str, Any]] = {
    "compare": {"tasks": [
        {"backend": "dp", "nodes": 1},
        {"backend": "ddp", "nodes": 2},
        *({"backend": "deepspeed", "zero_stage": stage, "nodes": 2} for stage in specs.ZERO_STAGES),
    ]},
}
_TRAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message is one line naming the axis and the fix."""


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Matrix:
    """The configurations: every explicit task (or one empty one) times the product of the axes, less excludes."""

    axes: tuple[Axis, ...] = ()
    tasks: tuple[Mapping[str, Any], ...] = ()
    exclude: tuple[Mapping[str, Any], ...] = ()

    @property
    def size(self) -> int:
        return max(len(self.tasks), 1) * math.prod(len(a.values) for a in self.axes)


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


# ---- reading the matrix --------------------------------------------------------------------------

def text(value: Any) -> str:
    """A value as the command line spells it: how axis values, excludes and labels compare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def label(values: Mapping[str, Any]) -> str:
    """``backend=deepspeed zero_stage=2``; JSON-escaped, so it is one line whatever the values hold."""
    parts = [f"{k}={text(v)}" for k, v in values.items() if v is not None]
    return json.dumps(" ".join(parts))[1:-1] or "(base)"


def normalise_key(key: Any, where: str) -> str:
    """A job key (``zero_stage``, ``zero-stage``) or ``train.OPTION``; SweepError for anything else."""
    if not isinstance(key, str) or not key:
        raise SweepError(f"{where}: axis key {key!r} is not a name; use a job key or train.OPTION")
    if key.startswith(TRAIN_PREFIX):
        name = key[len(TRAIN_PREFIX):]
        if not _TRAIN_NAME.fullmatch(name):
            raise SweepError(f"{where}: axis {key!r} is not a trainer option; write train.OPTION, e.g. train.lr")
        flag = "--" + name.replace("_", "-")
        if flag in specs.RESERVED_TRAIN_ARGS:
            job_key = flag[2:].replace("-", "_")
            fix = f"sweep the job key {job_key} instead" if job_key in JOB_KEYS else "hpcdist sets it for each task"
            raise SweepError(f"{where}: axis {key!r} is set by hpcdist; {fix}")
        return TRAIN_PREFIX + name.replace("_", "-")
    name = key.replace("-", "_")
    if name not in JOB_KEYS:
        raise SweepError(f"{where}: unknown axis {key!r}; use a job key ({', '.join(JOB_KEYS)}) or train.OPTION "
                         "for a trainer argument")
    return name


def parse_axis(spec_text: str) -> Axis:
    """``KEY=V1,V2,...`` from --grid."""
    key, sep, values = spec_text.partition("=")
    if not sep:
        raise SweepError(f"--grid {spec_text!r}: write KEY=V1,V2 (e.g. backend=ddp,deepspeed)")
    key = normalise_key(key.strip(), f"--grid {spec_text}")
    items = tuple(v.strip() for v in values.split(",")) if values.strip() else ()
    return make_axis(key, items)


def make_axis(key: str, values: Sequence[Any]) -> Axis:
    if not values:
        raise SweepError(f"axis {key} is empty; give it at least one value")
    seen: set[str] = set()
    for value in values:
        if value is None or text(value) == "":
            raise SweepError(f"axis {key} has an empty value; remove it or give one")
        if isinstance(value, (dict, list)):
            raise SweepError(f"axis {key} value {value!r} is not a single value")
        if text(value) in seen:
            raise SweepError(f"axis {key} lists {text(value)} twice; give each value once")
        seen.add(text(value))
    return Axis(key, tuple(values))


def parse_assignment(spec_text: str, option: str = "--skip") -> dict[str, str]:
    """``KEY=V,KEY2=V2`` (a partial configuration) from --skip."""
    out: dict[str, str] = {}
    for part in spec_text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"{option} {spec_text!r}: write KEY=VALUE[,KEY=VALUE...]")
        out[normalise_key(key.strip(), f"{option} {spec_text}")] = value.strip()
    return out


def parse_file(data: Any, source: str) -> tuple[dict[str, Any], Matrix, dict[str, Any]]:
    """(base job values, matrix, other settings: name, max_parallel) from a sweep file's YAML."""
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {source} must be a mapping with base:, axes:, tasks:, exclude:")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise SweepError(f"sweep file {source}: {shown.unknown_keys(unknown, FILE_KEYS)}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"sweep file {source}: base: must be a mapping of job keys")
    axes_data = data.get("axes") or {}
    if not isinstance(axes_data, dict):
        raise SweepError(f"sweep file {source}: axes: must map each key to a list of values")
    axes = []
    for key, values in axes_data.items():
        name = normalise_key(key, f"sweep file {source}")
        if not isinstance(values, list):
            values = [values]
        axes.append(make_axis(name, values))
    tasks = tuple(_assignments_list(data.get("tasks"), "tasks", source))
    exclude = tuple(_assignments_list(data.get("exclude"), "exclude", source))
    settings = {k: data[k] for k in ("name", "max_parallel") if data.get(k) is not None}
    return {str(k).replace("-", "_"): v for k, v in base.items()}, Matrix(tuple(axes), tasks, exclude), settings


def _assignments_list(items: Any, what: str, source: str) -> Iterable[dict[str, Any]]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) and i for i in items):
        raise SweepError(f"sweep file {source}: {what}: must be a list of mappings such as {{backend: ddp}}")
    return [{normalise_key(k, f"sweep file {source} {what}"): v for k, v in i.items()} for i in items]


def combine(*matrices: Matrix) -> Matrix:
    """Axes, tasks and excludes of several sources (file, preset, command line); a key swept twice is refused."""
    axes: list[Axis] = []
    tasks: tuple[Mapping[str, Any], ...] = ()
    exclude: list[Mapping[str, Any]] = []
    for m in matrices:
        for axis in m.axes:
            if any(a.key == axis.key for a in axes):
                raise SweepError(f"axis {axis.key} is given twice; merge its values into one axis")
            axes.append(axis)
        if m.tasks:
            if tasks:
                raise SweepError("two task lists (a preset and a sweep file's tasks:); keep one")
            tasks = m.tasks
        exclude.extend(m.exclude)
    return Matrix(tuple(axes), tasks, tuple(exclude))


# ---- expanding it --------------------------------------------------------------------------------

def configurations(matrix: Matrix, base_backend: str | None) -> list[dict[str, Any]]:
    """Every configuration in order (tasks, then axes, first axis slowest), less excludes, collapsed.

    A DeepSpeed-only key (zero_stage, offload) does not apply to another backend: it becomes None there,
    and configurations that are then equal are kept once.
    """
    if matrix.size > MAX_TASKS:
        sizes = " x ".join([str(len(matrix.tasks))] * bool(matrix.tasks) + [f"{len(a.values)} ({a.key})"
                                                                             for a in matrix.axes])
        raise SweepError(f"the matrix has {matrix.size} tasks ({sizes}), over the limit of {MAX_TASKS}; "
                         "sweep fewer values or split it into several sweeps")
    keys = {a.key for a in matrix.axes} | {k for t in matrix.tasks for k in t}
    for i, rule in enumerate(matrix.exclude):
        for key, value in rule.items():
            if key not in keys:
                raise SweepError(f"exclude #{i + 1}: {key} is not an axis of this sweep; exclude by "
                                 f"{', '.join(sorted(keys)) or 'an axis'}")
            known = {text(a_value) for a in matrix.axes if a.key == key for a_value in a.values} | {
                text(t[key]) for t in matrix.tasks if key in t}
            if text(value) not in known:
                raise SweepError(f"exclude #{i + 1}: {text(value)} is not a value of axis {key} "
                                 f"({', '.join(sorted(known))})")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for task in matrix.tasks or ({},):
        for combo in itertools.product(*(a.values for a in matrix.axes)):
            values = {**task, **{a.key: v for a, v in zip(matrix.axes, combo)}}
            if any(all(k in values and text(values[k]) == text(v) for k, v in rule.items())
                   for rule in matrix.exclude):
                continue
            backend = text(values.get("backend", base_backend or "ddp"))
            if backend not in ("deepspeed", "auto"):
                values = {k: (None if k in DEEPSPEED_ONLY else v) for k, v in values.items()}
            key = json.dumps({k: text(v) if v is not None else None for k, v in values.items()}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(values)
    if not out:
        raise SweepError("the excludes leave no task to run; exclude less")
    return out


def job_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The base job's values with one configuration applied; trainer axes append ``--OPTION VALUE``."""
    out = dict(base)
    train_args = list(out.get("train_args") or ())
    for key, value in values.items():
        if key.startswith(TRAIN_PREFIX):
            flag = "--" + key[len(TRAIN_PREFIX):]
            # A boolean trainer axis is a flag that is there or not.
            if value is True or text(value) == "true":
                train_args.append(flag)
            elif not (value is False or text(value) == "false"):
                train_args.extend([flag, text(value)])
        elif value is None:
            out.pop(key, None)
        elif key == "offload" and isinstance(value, str):
            if value not in ("true", "false"):
                raise specs.SpecError(f"offload must be true or false, got {value!r}")
            out[key] = value == "true"
        else:
            out[key] = value
    out["train_args"] = train_args
    return out


def geometry(spec: specs.JobSpec) -> tuple[Any, ...]:
    """What the array's job.sbatch fixes for all its tasks (templates/sbatch-allocation.j2 and the srun line)."""
    return (spec.cluster, spec.job_name, spec.nodes, spec.slurm_tasks_per_node, spec.cpus_per_task,
            spec.gpus_per_node, spec.time, spec.partition, spec.account, spec.nodelist, spec.exclude,
            spec.after, spec.signal, spec.container, spec.container_runtime)


GEOMETRY_NAMES = ("cluster", "job_name", "nodes", "ntasks_per_node", "cpus_per_task", "gpus_per_node", "time",
                  "partition", "account", "nodelist", "exclude", "after", "signal", "container", "container_runtime")

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
        culprits.append(f"axis {key}={text(value)}")
    return culprits[0] if len(culprits) == 1 else f"task {label(values)}"


def plan(base: Mapping[str, Any], matrix: Matrix, sweep_dir: str | Path, *, max_parallel: int | None = None,
         name: str = "sweep", load_profile: Callable[[str], Profile],
         check_more: Checker = lambda spec: None, environ: Mapping[str, str] | None = None) -> Sweep:
    """Check and render every task of the sweep; writes nothing. Raises SweepError (one line, the axis)."""
    from hpc import profiles

    sweep_dir = Path(os.path.abspath(sweep_dir))
    if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                     or max_parallel < 1):
        raise SweepError(f"--max-parallel must be a whole number of at least 1, got {max_parallel!r}")
    configs = configurations(matrix, text(base.get("backend") or "ddp"))
    placeholder = str(sweep_dir / "task")
    # First pass: check every configuration and learn its allocation shape.
    checked: list[tuple[dict[str, Any], specs.JobSpec, Profile]] = []
    for values in configs:
        try:
            spec, profile = _spec(base, values, placeholder, load_profile)
            check_more(spec)
        except (specs.SpecError, profiles.ProfileError, render.RenderError) as exc:
            raise SweepError(f"{_blame(base, values, placeholder, load_profile, check_more)}: "
                             f"{str(exc).splitlines()[0]}") from None
        checked.append((values, spec, profile))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (_, spec, _) in enumerate(checked):
        groups.setdefault(geometry(spec), []).append(i)
    search_env = environ if environ is not None else os.environ
    arrays = []
    for a, members in enumerate(groups.values()):
        array_dir = sweep_dir / f"array-{a}"
        tasks = []
        for j, i in enumerate(members):
            values, _, profile = checked[i]
            spec = specs.from_mapping({**job_values(base, values), "job_dir": str(array_dir / f"task-{j}")})
            try:
                rendered = render.render(spec, profile, search=render.search_path(profile, search_env))
            except (specs.SpecError, render.RenderError) as exc:
                raise SweepError(f"task {label(values)}: {str(exc).splitlines()[0]}") from None
            # The array's job.sbatch runs this directory; a second, single-job script there would only mislead.
            files = {k: v for k, v in rendered.files.items() if k != vocab.JOB_SBATCH}
            tasks.append(Task(i, values, a, j, replace(rendered, files=files)))
        parallel = min(max_parallel or len(tasks), len(tasks))
        first = tasks[0].rendered
        sbatch = render_array(first, array_dir, tasks, parallel, search_env)
        arrays.append(Array(a, array_dir, tuple(tasks), parallel, sbatch))
    return Sweep(sweep_dir, name, dict(base), matrix, max_parallel, tuple(arrays))


def render_array(first: render.Rendered, array_dir: Path, tasks: Sequence[Task], max_parallel: int,
                 environ: Mapping[str, str]) -> str:
    """The array's job.sbatch (templates/array.sbatch.j2) from its first task's resolved spec."""
    from hpc import profiles

    spec = first.spec
    profile = profiles.load(spec.cluster)
    env = render.environment(render.search_path(profile, environ))
    context = {
        **render.container_context(spec, profile),
        "spec": spec,
        "vocab": render.TEMPLATE_VOCAB,
        # Each array task's batch log sits in its own job directory, named as `hpcdist logs JOBID_TASK` looks.
        "batch_log": f"{array_dir}/task-%a/{vocab.batch_log('%A_%a')}",
        "array_dir": str(array_dir),
        "array_range": f"0-{len(tasks) - 1}%{max_parallel}",
        "max_parallel": max_parallel,
        "tasks_per_node": spec.slurm_tasks_per_node,
        "tasks": [{"array_index": t.array_index, "job_dir": str(t.rendered.job_dir), "label": t.label}
                  for t in tasks],
    }
    try:
        return render.render_template(env, "array.sbatch.j2", context)
    except render.RenderError as exc:
        raise SweepError(str(exc)) from None


# ---- writing it ----------------------------------------------------------------------------------

def resolved(task: Task) -> dict[str, Any]:
    spec = task.rendered.spec
    out = {"index": task.index, "array": f"array-{task.array}", "array_index": task.array_index,
           "job_dir": str(task.rendered.job_dir), "values": {k: v for k, v in task.values.items()},
           "backend": spec.backend, "zero_stage": spec.zero_stage, "precision": spec.precision,
           "launcher": spec.launcher, "nodes": spec.nodes, "world_size": spec.world_size,
           "train_args": list(spec.train_args)}
    return out


def sweep_yaml(sweep: Sweep) -> str:
    data = {
        "name": sweep.name,
        "sweep_dir": str(sweep.sweep_dir),
        "max_parallel": sweep.max_parallel,
        "base": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sweep.base.items()
                 if k not in ("job_dir",)},
        "axes": {a.key: list(a.values) for a in sweep.matrix.axes},
        "tasks": [dict(t) for t in sweep.matrix.tasks],
        "exclude": [dict(e) for e in sweep.matrix.exclude],
        "arrays": [{"name": a.name, "job_dir": str(a.job_dir), "array": a.range, "tasks": len(a.tasks),
                    "geometry": dict(zip(GEOMETRY_NAMES, (list(g) if isinstance(g, tuple) else g
                                                          for g in geometry(a.tasks[0].rendered.spec))))}
                   for a in sweep.arrays],
        "resolved": [resolved(t) for t in sweep.tasks],
    }
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def tasks_table(array: Array) -> str:
    """``tasks.txt``: which array index runs which configuration, in which directory."""
    rows = [("index", "task", "values", "job_dir")]
    rows += [(str(t.array_index), str(t.index), t.label, str(t.rendered.job_dir)) for t in array.tasks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(v.ljust(w) for v, w in zip(r, widths)), r[3]]) for r in rows) + "\n"


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
            files[str(tdir / render.MARKER)] = render.marker_text(
                "job", render.written_paths(task.rendered.files, own_dirs))
            files.update({str(tdir / name): body for name, body in task.rendered.files.items()})
            dirs += [str(tdir / d) for d in own_dirs]
    try:
        return render.write_tree(target, files, dirs=dirs, what="sweep directory", force=force)
    except render.RenderError as exc:
        raise SweepError(str(exc)) from None


# ---- reading it back -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One task as the report shows it."""

    index: int
    label: str
    array: str
    job_id: str           # JOBID_TASKID once submitted, else ""
    state: str
    precision: str | None   # what the trainer trained in (summary.json), which "auto" leaves to it
    images_per_s: float | None
    final_loss: float | None
    test_accuracy: float | None
    peak_memory_mib: tuple[float, ...]   # per rank, in rank order
    time_to_first_step_s: float | None
    hostnames: tuple[str, ...]
    job_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(sweep_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(sweep.yaml, {array name: Slurm job id}) of a written sweep; SweepError if it is none or is damaged."""
    try:
        data = yamlfile.load(sweep_dir / SWEEP_FILE, SWEEP_FILE, follow=False)
    except yamlfile.YamlError as exc:
        raise SweepError(f"{sweep_dir} is not a sweep directory ({exc}); pass the directory hpcdist sweep made") \
            from None
    resolved = data.get("resolved") if isinstance(data, dict) else None
    damaged = next((i for i, task in enumerate(resolved or []) if not isinstance(task, dict) or any(
        not jobfiles.is_a(task.get(k), kind) for k, kind in RESOLVED_FIELDS.items())), None) \
        if isinstance(resolved, list) else -1
    if damaged is not None:
        where = "has no list of tasks" if damaged < 0 else f"task entry {damaged} is damaged"
        raise SweepError(f"{sweep_dir / SWEEP_FILE} {where}; it is not as hpcdist sweep wrote it, so run the "
                         "sweep again into a new directory")
    arrays = (jobfiles.json_object(sweep_dir / SUBMITTED_FILE, 1 << 20) or {}).get("arrays")
    # A job id that is not Slurm's (digits) is damage: that array counts as not submitted.
    submitted = {k: v for k, v in arrays.items() if isinstance(v, str) and v.isdigit() and v.isascii()} \
        if isinstance(arrays, dict) else {}
    return data, submitted


def _array_indices(expr: str) -> list[int]:
    """``3`` or ``[2-5%2]`` / ``[1,4-6]``: the task ids sacct folds into one pending row."""
    body = expr.strip("[]").split("%")[0]
    out: list[int] = []
    for part in filter(None, body.split(",")):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def parse_array_sacct(text_out: str, job_ids: Iterable[str]) -> dict[str, str]:
    """``JOBID_TASK -> state`` from ``sacct -X -n -P -o JobID,State ...`` rows of array jobs."""
    wanted = set(job_ids)
    out: dict[str, str] = {}
    for line in text_out.splitlines():
        cols = line.split("|")
        if len(cols) < 2:
            continue
        job, _, task = cols[0].partition("_")
        if job not in wanted or not task:
            continue
        state = cols[1].split()[0] if cols[1].strip() else "UNKNOWN"
        for index in _array_indices(task):
            out[f"{job}_{index}"] = state
    return out


def read_summary(job_dir: Path) -> dict[str, Any] | None:
    """A task's run/summary.json with only its fields of the right type, and only its ranks that are whole."""
    data = jobfiles.json_object(job_dir / vocab.RUN_DIR / vocab.SUMMARY)
    if data is None:
        return None
    data = jobfiles.well_typed(data, SUMMARY_FIELDS)
    ranks = data.get("ranks") or []
    data["ranks"] = [r for r in ranks if isinstance(r, dict) and jobfiles.well_typed(r, RANK_FIELDS) == r]
    return data


def rows(data: Mapping[str, Any], submitted: Mapping[str, str], states: Mapping[str, str]) -> list[Row]:
    """Every task's row: its Slurm state (``NOT_SUBMITTED`` for a dry run) and its run/summary.json."""
    out = []
    for task in data.get("resolved") or []:
        array_job = submitted.get(task["array"])
        job_id = f"{array_job}_{task['array_index']}" if array_job else ""
        job_dir = Path(task["job_dir"])
        summary = read_summary(job_dir) or {}
        ranks = sorted(summary.get("ranks") or [], key=lambda r: r.get("rank", 0))
        state = states.get(job_id, "UNKNOWN") if job_id else "NOT_SUBMITTED"
        out.append(Row(
            index=task["index"], label=label(task.get("values") or {}), array=task["array"], job_id=job_id,
            state=state, precision=summary.get("precision"), images_per_s=summary.get("images_per_s"),
            final_loss=summary.get("final_loss"),
            test_accuracy=summary.get("test_accuracy"),
            peak_memory_mib=tuple(round((r.get("peak_memory_bytes") or 0) / 2**20, 1) for r in ranks),
            time_to_first_step_s=summary.get("time_to_first_step_s"),
            hostnames=tuple(r.get("hostname", "") for r in ranks), job_dir=str(job_dir)))
    return out


def _fmt(value: Any, spec_fmt: str) -> str:
    return "-" if value is None else format(value, spec_fmt)


def table(report_rows: Sequence[Row], markdown: bool = False) -> str:
    """The comparison as aligned text, or as a markdown table."""
    header = ("task", "job", "configuration", "state", "precision", "images/s", "final loss", "test acc",
              "peak MiB per rank", "first step s")
    body = [(str(r.index), r.job_id or "-", r.label, r.state, r.precision or "-", _fmt(r.images_per_s, ".0f"),
             _fmt(r.final_loss, ".4f"), _fmt(r.test_accuracy, ".3f"),
             "/".join(f"{m:.0f}" for m in r.peak_memory_mib) or "-", _fmt(r.time_to_first_step_s, ".1f"))
            for r in report_rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * 5]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in (header, *body)) + "\n"


def chart(report_rows: Sequence[Row], path: Path, title: str) -> Path:
    """A PNG of bar charts (images/s, peak memory, time to first step) per task; matplotlib loads only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.index}: {r.label}" for r in report_rows]
    panels = (("images/s", [r.images_per_s or 0 for r in report_rows]),
              ("peak MiB (largest rank)", [max(r.peak_memory_mib, default=0) for r in report_rows]),
              ("time to first step, s", [r.time_to_first_step_s or 0 for r in report_rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(labels) + 1.8), sharey=True)
    for ax, (name, values) in zip(axes, panels):
        ax.barh(range(len(values)), values, color="#4c72b0")
        ax.set_title(name)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}" if v >= 10 else f" {v:.1f}", va="center", fontsize=8)
        ax.margins(x=0.2)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fileio.save_png(fig, path, dpi=100)
    plt.close(fig)
    return path
