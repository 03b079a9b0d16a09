"""Describe one training job (JobSpec) and check its geometry and inputs before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hpc import nodelist, plan, vocab

if TYPE_CHECKING:
    from hpc.profiles import Profile

# The vocabulary lives in hpc.vocab; these names stay for the code that imports them from here.
BACKENDS = vocab.JOB_BACKENDS
LAUNCHERS = vocab.LAUNCHERS
PRECISIONS = vocab.PRECISIONS
ZERO_STAGES = vocab.ZERO_STAGES
VALID_LAUNCHERS = vocab.VALID_LAUNCHERS
NODE_LAUNCHERS = vocab.NODE_LAUNCHERS
DEFAULT_ZERO_STAGE = vocab.DEFAULT_ZERO_STAGE
# Only when neither the user, the profile nor the partition's DefaultTime gives a time limit.
DEFAULT_TIME = "01:00:00"
# slurmdbd keeps job names in a tinytext column (255 bytes).
MAX_JOB_NAME_BYTES = 255
# Options the render side passes to the trainer itself; a second copy after -- would contradict it.
RESERVED_TRAIN_ARGS = ("--backend", "--run-dir", "--deepspeed-config", "--local_rank", "--zero-stage",
                       "--precision")

# Upper bounds on sizes, checked before anything of that size is built (host lists, ranks.txt, local tasks).
MAX_NODES = nodelist.MAX_HOSTS      # 65,536: as many hosts as one Slurm range can name
MAX_TASKS_PER_NODE = 65533          # Slurm's ceiling for MaxTasksPerNode (slurm.conf(5)); GPUs per node too
MAX_CPUS_PER_TASK = 65535           # Slurm keeps CPUs per task in 16 bits
MAX_WORLD_SIZE = 1 << 20            # 1,048,576 ranks: ten times the largest training jobs run; more is a typo

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_FORMS = (
    (re.compile(r"(\d+)"), ("m",)),
    (re.compile(r"(\d+):(\d+)"), ("m", "s")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("h", "m", "s")),
    (re.compile(r"(\d+)-(\d+)"), ("d", "h")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("d", "h", "m")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("d", "h", "m", "s")),
)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SIGNAL = re.compile(r"(?:[RB]{1,2}:)?(?:SIG)?([A-Z][A-Z0-9]*|\d+)(?:@(\d+))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Slurm's dependency types (sbatch --dependency) and the short forms --after JOB[:ok|any|notok] takes.
DEPENDENCY_TYPES = ("after", "afterany", "afterok", "afternotok", "aftercorr", "singleton")
_AFTER_SHORT = {"ok": "afterok", "any": "afterany", "notok": "afternotok", "corr": "aftercorr", "start": "after"}
# A job id, or one task of a job array (JOBID_TASKID).
_DEPENDENCY_JOB = re.compile(r"[1-9]\d*(?:_\d+)?")


class SpecError(ValueError):
    """A job spec that cannot run as asked; the message is one line naming the fix."""


@dataclass(frozen=True)
class JobSpec:
    """One job as asked for; ``None`` means "take the cluster profile's value" (see ``resolve``)."""

    job_dir: str
    job_name: str = vocab.DEFAULT_JOB_NAME
    cluster: str = "local"
    nodes: int = 1
    gpus_per_node: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    backend: str = "ddp"
    launcher: str = "srun"
    zero_stage: int | None = None
    precision: str = "auto"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    nodelist: str | None = None
    signal: str = "USR1@120"
    max_requeues: int = 3
    params: int | None = None
    offload: bool = False
    backend_reason: str | None = None
    train_args: tuple[str, ...] = ()
    python: str | None = None
    pythonpath: str | None = None
    after: tuple[str, ...] = ()   # dependencies, each "afterok:123" (see dependency())
    exclude: str | None = None    # nodes to keep off, a Slurm nodelist

    @property
    def procs_per_node(self) -> int:
        """Ranks on each node: one per GPU, or --ntasks-per-node of them on a CPU-only job."""
        if self.backend == "dp":
            return 1
        return self.gpus_per_node or self.ntasks_per_node or 1

    @property
    def slurm_tasks_per_node(self) -> int:
        """Slurm tasks per node: one per rank under srun, one launcher per node otherwise."""
        return 1 if self.launcher in NODE_LAUNCHERS else self.procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def hosts(self) -> list[str]:
        """The nodes' names from --nodelist, else placeholders ``<node0>``, ``<node1>``, ..."""
        if self.nodelist:
            return nodelist.expand(self.nodelist)
        return [f"<node{i}>" for i in range(self.nodes)]

    @property
    def time_minutes(self) -> int:
        return -(-time_seconds(self.time or DEFAULT_TIME) // 60)

    @property
    def signal_delay_s(self) -> int:
        m = _SIGNAL.fullmatch(self.signal)
        return int(m.group(2)) if m and m.group(2) else 60

    @property
    def dependency(self) -> str | None:
        """sbatch's --dependency value: types in first-seen order, each with its jobs (``afterok:1:2,afterany:3``)."""
        if not self.after:
            return None
        grouped: dict[str, list[str]] = {}
        for item in self.after:
            kind, _, job = item.partition(":")
            grouped.setdefault(kind, [])
            if job:
                grouped[kind].append(job)
        return ",".join(":".join([kind, *jobs]) for kind, jobs in grouped.items())

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["train_args"] = list(self.train_args)
        out["after"] = list(self.after)
        return out


FIELDS = tuple(f.name for f in fields(JobSpec))
INT_FIELDS = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "zero_stage", "max_requeues")


def from_mapping(values: Mapping[str, Any]) -> JobSpec:
    """A JobSpec from plain values (a job file merged with flags); unknown keys and bad ints are errors."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise SpecError(f"unknown job key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(
                    r"\s*-?\d+\s*", str(value)):
                raise SpecError(f"{key} must be a whole number, got {value!r}")
            value = int(value)
        elif key == "params":
            try:
                value = plan.parse_count(str(value))
            except plan.PlanError as exc:
                raise SpecError(f"params: {exc}") from None
        elif key == "train_args":
            if isinstance(value, str) or not all(isinstance(v, (str, int, float)) for v in value):
                raise SpecError("train_args must be a list of strings (the trainer's arguments)")
            value = tuple(str(v) for v in value)
        elif key == "after":
            items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
                raise SpecError("after must be a job id or a list of them, e.g. [1234, 1235:any]")
            value = tuple(parse_after(str(v)) for v in items)
        elif key == "offload":
            if not isinstance(value, bool):
                raise SpecError(f"offload must be true or false, got {value!r}")
        elif not isinstance(value, str):
            raise SpecError(f"{key} must be a string, got {value!r}")
        clean[key] = value
    if "job_dir" not in clean:
        raise SpecError("no job directory: pass --job-dir DIR")
    return JobSpec(**clean)


def parse_after(text: str) -> str:
    """One dependency as Slurm spells it (``afterok:123``) from ``123``, ``123:any``, ``123_4:notok``,
    ``afterany:123`` or ``singleton``; SpecError naming the accepted forms otherwise."""
    text = text.strip()
    if text == "singleton":
        return text
    first, sep, second = text.partition(":")
    if _DEPENDENCY_JOB.fullmatch(first):
        kind = _AFTER_SHORT.get(second, second if second in DEPENDENCY_TYPES else None) if sep else "afterok"
        job = first
    else:
        kind, job = (first if first in DEPENDENCY_TYPES else None), second
    if kind is None or kind == "singleton" or not _DEPENDENCY_JOB.fullmatch(job):
        raise SpecError(f"--after {text!r} is not a dependency: use JOBID[:ok|any|notok|corr|start] (a job id, or "
                        "JOBID_TASK for one array task), TYPE:JOBID with TYPE one of "
                        f"{', '.join(DEPENDENCY_TYPES[:-1])}, or singleton")
    return f"{kind}:{job}"


def time_seconds(value: str) -> int:
    """Seconds in a Slurm --time value, or SpecError naming the accepted forms."""
    for pattern, units in _TIME_FORMS:
        m = pattern.fullmatch(value.strip())
        if m:
            return sum(int(g) * _SECONDS[u] for g, u in zip(m.groups(), units))
    raise SpecError(f"--time {value!r} is not a Slurm time: use MM, HH:MM:SS or D-HH:MM:SS")


def resolve(spec: JobSpec, profile: Profile) -> JobSpec:
    """Fill the profile's defaults and settle ``--backend auto`` and the ZeRO stage.

    ``--backend auto`` asks hpc.plan for the configuration with the least communication whose model
    states fit the profile's gpu_memory; the model is the built-in ConvNet unless --params says otherwise.
    """
    gpus = profile.gpus_per_node if spec.gpus_per_node is None else spec.gpus_per_node
    spec = replace(
        spec,
        gpus_per_node=gpus,
        cpus_per_task=spec.cpus_per_task if spec.cpus_per_task is not None else profile.cpus_per_task,
        partition=spec.partition if spec.partition is not None else profile.partition,
        account=spec.account if spec.account is not None else profile.account,
        time=spec.time or profile.time or DEFAULT_TIME,
        python=profile.python or spec.python or "python3",
    )
    if spec.backend == "auto":
        try:
            rec = plan.recommend(spec.params or plan.model_params("convnet"), spec.nodes, spec.procs_per_node,
                                 profile.gpu_memory, spec.precision)
        except plan.PlanError as exc:
            raise SpecError(f"--backend auto: {exc}") from None
        spec = replace(spec, backend=rec.backend, backend_reason=rec.reason, offload=spec.offload or rec.offload,
                       zero_stage=spec.zero_stage if spec.zero_stage is not None else rec.zero_stage)
    if spec.backend == "deepspeed" and spec.zero_stage is None:
        spec = replace(spec, zero_stage=DEFAULT_ZERO_STAGE)
    return spec


def _check_text(option: str, value: str | None, *, spaces: bool) -> None:
    if value is None:
        return
    if not value:
        raise SpecError(f"{option} is empty; give a value or leave the option out")
    if _CONTROL.search(value):
        raise SpecError(f"{option} {value!r} contains a newline or control character, which Slurm rejects; "
                        "remove it")
    if not spaces and any(ch.isspace() for ch in value):
        raise SpecError(f"{option} {value!r} contains whitespace, which Slurm rejects; remove it")


def check_sizes(spec: JobSpec) -> None:
    """Refuse sizes beyond the bounds above in one line, before the --backend auto model or a table sees them."""
    for option, value, limit in (("--nodes", spec.nodes, MAX_NODES),
                                 ("--gpus-per-node", spec.gpus_per_node, MAX_TASKS_PER_NODE),
                                 ("--ntasks-per-node", spec.ntasks_per_node, MAX_TASKS_PER_NODE),
                                 ("--cpus-per-task", spec.cpus_per_task, MAX_CPUS_PER_TASK)):
        if value is not None and value > limit:
            raise SpecError(f"{option} {value} is over the limit of {limit:,}; ask for at most {limit:,}")
    if spec.world_size > MAX_WORLD_SIZE:
        raise SpecError(f"{spec.nodes} node(s) x {spec.procs_per_node} rank(s) = {spec.world_size:,} ranks, over the "
                        f"limit of {MAX_WORLD_SIZE:,}; ask for fewer nodes or ranks per node")


def check(spec: JobSpec, profile: Profile) -> JobSpec:
    """Check geometry and inputs; return the resolved spec or raise SpecError (one line, the fix)."""
    if spec.backend not in BACKENDS:
        raise SpecError(f"unknown --backend {spec.backend!r}; choose one of {', '.join(BACKENDS)}")
    if spec.launcher not in LAUNCHERS:
        raise SpecError(f"unknown --launcher {spec.launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if spec.precision not in PRECISIONS:
        raise SpecError(f"unknown --precision {spec.precision!r}; choose one of {', '.join(PRECISIONS)}")
    check_sizes(spec)
    spec = resolve(spec, profile)
    check_sizes(spec)
    if spec.zero_stage is not None and spec.backend != "deepspeed":
        raise SpecError(f"--zero-stage applies to DeepSpeed only; drop it or use --backend deepspeed "
                        f"(got --backend {spec.backend})")
    gpus = spec.gpus_per_node or 0

    if spec.nodes < 1:
        raise SpecError(f"--nodes {spec.nodes}: a job needs at least one node; use --nodes 1 or more")
    if profile.max_nodes is not None and spec.nodes > profile.max_nodes:
        raise SpecError(f"--nodes {spec.nodes} exceeds cluster {profile.name!r}'s max_nodes "
                        f"{profile.max_nodes}; ask for fewer nodes")
    if gpus > profile.gpus_per_node:
        raise SpecError(f"--gpus-per-node {gpus} exceeds the {profile.gpus_per_node} GPU(s) per node of "
                        f"cluster {profile.name!r}; ask for at most {profile.gpus_per_node}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise SpecError("--cpus-per-task must be at least 1")
    if spec.ntasks_per_node is not None and spec.ntasks_per_node < 1:
        raise SpecError("--ntasks-per-node must be at least 1")
    if spec.zero_stage is not None and spec.zero_stage not in ZERO_STAGES:
        raise SpecError(f"--zero-stage {spec.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    if spec.launcher not in VALID_LAUNCHERS[spec.backend]:
        raise SpecError(f"--backend {spec.backend} cannot run under --launcher {spec.launcher}; use "
                        f"--launcher {' or '.join(VALID_LAUNCHERS[spec.backend])}")
    if spec.backend == "dp":
        if spec.nodes > 1:
            raise SpecError(f"--backend dp runs one process on one node (got --nodes {spec.nodes}); use "
                            "--nodes 1 or --backend ddp")
        if spec.ntasks_per_node not in (None, 1):
            raise SpecError("--backend dp runs one task; drop --ntasks-per-node or use --backend ddp")
    elif spec.ntasks_per_node is not None and gpus:
        if spec.launcher in NODE_LAUNCHERS and spec.ntasks_per_node != 1:
            raise SpecError(f"--launcher {spec.launcher} runs one task per node that starts one rank per GPU; "
                            "drop --ntasks-per-node or use --launcher srun")
        if spec.launcher == "srun" and spec.ntasks_per_node != gpus:
            raise SpecError(f"--launcher {spec.launcher} runs one task per GPU ({gpus}); drop "
                            f"--ntasks-per-node or set it to {gpus}")
    if spec.max_requeues < 0:
        raise SpecError("--max-requeues must be 0 or more")

    _check_text("--job-name", spec.job_name, spaces=True)
    if len(spec.job_name.encode()) > MAX_JOB_NAME_BYTES:
        raise SpecError(f"--job-name is {len(spec.job_name.encode())} bytes; Slurm keeps at most "
                        f"{MAX_JOB_NAME_BYTES}: shorten it")
    _check_text("--partition", spec.partition, spaces=False)
    _check_text("--account", spec.account, spaces=False)
    _check_text("--job-dir", spec.job_dir, spaces=True)
    if "%" in spec.job_dir or "\\" in spec.job_dir:
        raise SpecError(f"--job-dir {spec.job_dir!r} contains '%' or a backslash, which Slurm interprets in "
                        "log paths; pick a directory without them")
    if not spec.job_dir.startswith("/"):
        raise SpecError(f"--job-dir {spec.job_dir!r} must be absolute by render time")
    _check_text("python", spec.python, spaces=True)
    _check_text("pythonpath", spec.pythonpath, spaces=True)
    for arg in spec.train_args:
        if "\x00" in arg:
            raise SpecError("a trainer argument contains a NUL byte, which no command line can carry")
        if arg.split("=", 1)[0] in RESERVED_TRAIN_ARGS:
            raise SpecError(f"trainer argument {arg.split('=', 1)[0]} is set by hpcdist; use the matching "
                            "hpcdist option instead")
    time_seconds(spec.time)
    if not _SIGNAL.fullmatch(spec.signal):
        raise SpecError(f"--signal {spec.signal!r} is not a Slurm signal spec; use e.g. USR1@120")
    for item in spec.after:
        parse_after(item)
    if spec.nodelist is not None:
        try:
            hosts = nodelist.expand(spec.nodelist, limit=MAX_NODES)
        except nodelist.NodelistError as exc:
            raise SpecError(f"--nodelist: {exc}") from None
        if len(hosts) != spec.nodes:
            raise SpecError(f"--nodelist {spec.nodelist!r} names {len(hosts)} node(s) but --nodes is "
                            f"{spec.nodes}; make them agree")
    if spec.exclude is not None:
        _check_text("--exclude", spec.exclude, spaces=False)
        try:
            excluded = nodelist.expand(spec.exclude)
        except nodelist.NodelistError as exc:
            raise SpecError(f"--exclude: {exc}") from None
        clash = sorted(set(excluded) & set(nodelist.expand(spec.nodelist) if spec.nodelist else ()))
        if clash:
            raise SpecError(f"--exclude {spec.exclude!r} keeps off {', '.join(clash)}, which --nodelist asks for; "
                            "drop it from one of them")
    return spec


# What the trainer reads for --dataset cifar10 (train/data.py): DIR/cifar-10-batches-py/, or the batches in DIR.
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TEST_FILE = "test_batch"


def train_value(args: tuple[str, ...], name: str) -> str | None:
    """The last value of ``--name V`` or ``--name=V`` among the trainer's arguments, as argparse reads it."""
    found = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def check_dataset(spec: JobSpec, exists: Callable[[str], bool]) -> None:
    """Refuse a job whose trainer would stop at once for want of CIFAR-10, before anything is submitted.

    ``exists(path)`` says whether a path exists where the job runs (a shared filesystem: this machine).
    Only an absolute --data-dir is checked: a relative one is resolved in the job's working directory,
    which differs between the submit paths.
    """
    if train_value(spec.train_args, "--dataset") != "cifar10" or "--download" in spec.train_args:
        return
    data_dir = train_value(spec.train_args, "--data-dir")
    if data_dir is None:
        raise SpecError("--dataset cifar10 needs --data-dir DIR (the folder holding cifar-10-batches-py/) after --; "
                        "add it, or --download to fetch the data there")
    if not data_dir.startswith("/"):
        return
    nested = f"{data_dir.rstrip('/')}/{CIFAR_FOLDER}"
    if not exists(nested) and not exists(f"{data_dir.rstrip('/')}/{CIFAR_TEST_FILE}"):
        raise SpecError(f"--dataset cifar10: no CIFAR-10 under --data-dir {data_dir} (expected {nested}/); "
                        "put the data there, point --data-dir at it, or add --download")
