"""Read a sweep's matrix (axes, tasks, excludes) and expand it into the configurations to run; pure, no files.

    matrix = combine(PRESETS["compare"], Matrix(axes=(parse_axis("train.lr=1e-3,1e-2"),)))
    configurations(matrix, "ddp")   # [{"backend": "dp", "nodes": 1, "train.lr": "1e-3"}, ...]
    job_values(base, configuration) # the base job's values with one configuration applied

An axis key is a job key (``zero_stage``, ``nodes``, ...) or ``train.OPTION`` for a trainer argument; every
refusal is a SweepError whose one-line message names the axis and the fix.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from hpc import shown, vocab
from hpc import spec as specs
from train import options as train_options

# Slurm's MaxArraySize defaults to 1001 (indices 0-1000); a bigger matrix is a mistake more often than a plan.
MAX_TASKS = 1000
TRAIN_PREFIX = "train."
# JobSpec fields an axis may set; the rest are the sweep's own (its directory) or derived.
JOB_KEYS = tuple(f for f in specs.FIELDS if f not in ("job_dir", "train_args", "python", "pythonpath",
                                                       "backend_reason"))
# Keys that mean something only under DeepSpeed: for another backend the axis does not apply, and the
# configurations that differ only there collapse into one.
DEEPSPEED_ONLY = ("zero_stage", "offload")
FILE_KEYS = ("name", "base", "axes", "tasks", "exclude", "max_parallel")
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


# The seed's question: DP, DDP or DeepSpeed, which ZeRO stage? dp is one process on one node; the others
# spread over two nodes, so they form a second array.
PRESETS = {
    "compare": Matrix(tasks=(
        {"backend": "dp", "nodes": 1},
        {"backend": "ddp", "nodes": 2},
        *({"backend": "deepspeed", "zero_stage": stage, "nodes": 2} for stage in vocab.ZERO_STAGES),
    )),
}


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
        if flag in train_options.reserved_flags():
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


def parse_assignment(spec_text: str) -> dict[str, str]:
    """``KEY=V,KEY2=V2`` (a partial configuration) from --skip."""
    out: dict[str, str] = {}
    for part in spec_text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--skip {spec_text!r}: write KEY=VALUE[,KEY=VALUE...]")
        out[normalise_key(key.strip(), f"--skip {spec_text}")] = value.strip()
    return out


def parse_file(data: Any, source: str) -> tuple[dict[str, Any], Matrix, dict[str, Any]]:
    """(base job values, matrix, other settings: name, max_parallel) from a sweep file's YAML."""
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {source} must be a mapping with base:, axes:, tasks:, exclude:")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise SweepError(f"sweep file {source}: {shown.unknown_keys(unknown, FILE_KEYS)}")
    base = {} if data.get("base") is None else data["base"]  # an empty list is the wrong kind, not nothing
    if not isinstance(base, dict):
        raise SweepError(f"sweep file {source}: base: must be a mapping of job keys")
    axes_data = {} if data.get("axes") is None else data["axes"]
    if not isinstance(axes_data, dict):
        raise SweepError(f"sweep file {source}: axes: must map each key to a list of values")
    axes = tuple(make_axis(normalise_key(key, f"sweep file {source}"),
                           values if isinstance(values, list) else [values]) for key, values in axes_data.items())
    tasks = tuple(_assignments_list(data.get("tasks"), "tasks", source))
    exclude = tuple(_assignments_list(data.get("exclude"), "exclude", source))
    settings = {k: data[k] for k in ("name", "max_parallel") if data.get(k) is not None}
    return {str(k).replace("-", "_"): v for k, v in base.items()}, Matrix(axes, tasks, exclude), settings


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
    for i, task in enumerate(matrix.tasks):
        # The axis would overwrite the task's value in every configuration, so the task would never run as written.
        clash = next((a.key for a in matrix.axes if a.key in task), None)
        if clash:
            raise SweepError(f"task #{i + 1} sets {label({clash: task[clash]})}, which axis {clash} also sets; "
                             "drop the key from the task or drop the axis")
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
    unique: dict[str, dict[str, Any]] = {}
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
            unique.setdefault(key, values)
    if not unique:
        raise SweepError("the excludes leave no task to run; exclude less")
    return list(unique.values())


def job_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The base job's values with one configuration applied; trainer axes append ``--OPTION VALUE``."""
    out = dict(base)
    if text(values.get("backend", "deepspeed")) not in ("deepspeed", "auto"):
        # As an axis's would (configurations()), the base's DeepSpeed-only keys do not apply to a task an axis
        # gives another backend: `--zero-stage 2 --grid backend=ddp,deepspeed` compares DDP with ZeRO-2.
        out = {k: v for k, v in out.items() if k not in DEEPSPEED_ONLY}
    train_args = list(out.get("train_args") or ())
    for key, value in values.items():
        if key.startswith(TRAIN_PREFIX):
            flag = "--" + key[len(TRAIN_PREFIX):]
            # A boolean trainer axis is a flag that is there or not: false takes away the base's too.
            if text(value) == "true":
                train_args.append(flag)
            elif text(value) == "false":
                train_args = [arg for arg in train_args if arg != flag]
            else:
                train_args.extend([flag, text(value)])
        elif value is None:
            out.pop(key, None)
        elif key in ("offload", "elastic") and isinstance(value, str):
            if value not in ("true", "false"):
                raise specs.SpecError(f"{key} must be true or false, got {value!r}")
            out[key] = value == "true"
        else:
            out[key] = value
    out["train_args"] = train_args
    return out
