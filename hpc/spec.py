"""Describe one training job (JobSpec) and check its geometry and inputs before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hpc import jobfiles, nodelist, plan, shown, vocab
from hpc.vocab import DEFAULT_ZERO_STAGE, LAUNCHERS, NODE_LAUNCHERS, PRECISIONS, VALID_LAUNCHERS, ZERO_STAGES
from hpc.vocab import JOB_BACKENDS as BACKENDS
from train import options as train_options

if TYPE_CHECKING:
    from hpc.profiles import Profile

# Only when neither the user, the profile nor the partition's DefaultTime gives a time limit.
DEFAULT_TIME = "01:00:00"
# Every spelling of the trainer options hpcdist passes itself (train.options.RESERVED, by destination);
# check_train_args refuses them however abbreviated or spelled.
RESERVED_TRAIN_ARGS = train_options.reserved_flags()
# slurmdbd keeps job names in a tinytext column (255 bytes).
MAX_JOB_NAME_BYTES = 255
# Upper bounds on sizes, checked before anything of that size is built (host lists, ranks.txt, local tasks).
MAX_NODES = nodelist.MAX_HOSTS      # 65,536: as many hosts as one Slurm range can name
MAX_TASKS_PER_NODE = 65533          # Slurm's ceiling for MaxTasksPerNode (slurm.conf(5)); GPUs per node too
MAX_CPUS_PER_TASK = 65535           # Slurm keeps CPUs per task in 16 bits
MAX_WORLD_SIZE = 1 << 20            # 1,048,576 ranks: ten times the largest training jobs run; more is a typo

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, in ASCII digits and nothing around them
# (sbatch refuses ' 30' and Unicode digits).
_D = "([0-9]{1,10})"
_TIME_FORMS = (
    (re.compile(_D), ("m",)),
    (re.compile(f"{_D}:{_D}"), ("m", "s")),
    (re.compile(f"{_D}:{_D}:{_D}"), ("h", "m", "s")),
    (re.compile(f"{_D}-{_D}"), ("d", "h")),
    (re.compile(f"{_D}-{_D}:{_D}"), ("d", "h", "m")),
    (re.compile(f"{_D}-{_D}:{_D}:{_D}"), ("d", "h", "m", "s")),
)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# Slurm's words for "no time limit" (as is a limit of 0), in any case.
UNLIMITED_TIMES = ("UNLIMITED", "INFINITE")
# Slurm keeps a time limit in minutes in 32 bits, its largest value meaning "infinite".
MAX_TIME_MINUTES = 2**32 - 2
# The signal names Slurm's --signal knows (sig_name2num), with or without SIG and in any case; a number
# must be a real signal's. The warning's delay is a 16-bit count of seconds.
SLURM_SIGNALS = ("HUP", "INT", "QUIT", "ABRT", "KILL", "ALRM", "TERM", "USR1", "USR2", "URG", "CONT", "STOP",
                 "TSTP", "TTIN", "TTOU", "XCPU")
MAX_SIGNAL_NUMBER = 64
MAX_SIGNAL_DELAY_S = 65535
# SIG goes only before a name: sbatch refuses SIG10 (found by tests/test_slurm_oracle.py).
_SIGNAL = re.compile(r"(?:(?:R|B|RB|BR):)?(?:(?i:SIG)?(?P<name>[A-Za-z][A-Za-z0-9]*)|(?P<number>[0-9]+))"
                     r"(?:@(?P<delay>[0-9]+))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Slurm's dependency types (sbatch --dependency) and the short forms --after JOB[:ok|any|notok] takes.
DEPENDENCY_TYPES = ("after", "afterany", "afterok", "afternotok", "aftercorr", "singleton")
_AFTER_SHORT = {"ok": "afterok", "any": "afterany", "notok": "afternotok", "corr": "aftercorr", "start": "after"}
# A job id, or one task of a job array (JOBID_TASKID).
_DEPENDENCY_JOB = re.compile(r"[1-9]\d*(?:_\d+)?")
# Whole numbers beyond this fit none of Slurm's fields.
MAX_INT = 2**31 - 1
# requeue.sh compares restart counts in shell arithmetic; far beyond Slurm's own MaxBatchRequeue.
MAX_REQUEUES = 10000
MAX_SPARE_NODES = 1024
# Linux's limits on one path component and a whole path.
NAME_MAX = jobfiles.MAX_NAME_BYTES
PATH_MAX = 4095


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
    max_retries: int = 2
    spare_nodes: int = 0          # nodes held beyond --nodes, for a step relaunched after a failure
    params: int | None = None
    offload: bool = False
    backend_reason: str | None = None
    train_args: tuple[str, ...] = ()
    python: str | None = None
    pythonpath: str | None = None
    after: tuple[str, ...] = ()   # dependencies, each "afterok:123" (see dependency())
    exclude: str | None = None    # nodes to keep off, a Slurm nodelist
    container: str | None = None  # the image each task runs in ("none": the host, whatever the profile says)
    container_runtime: str | None = None  # hpc.container.RUNTIMES; the profile's when not given

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
    def allocation_nodes(self) -> int:
        """Nodes the allocation holds: the step's, and the spares a relaunch moves to."""
        return self.nodes + self.spare_nodes

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
    def time_minutes(self) -> int | None:
        """The time limit in whole minutes, rounded up as Slurm does; None for no limit."""
        seconds = time_seconds(self.time or DEFAULT_TIME)
        return None if seconds is None else -(-seconds // 60)

    @property
    def signal_delay_s(self) -> int:
        m = _SIGNAL.fullmatch(self.signal)
        return int(m["delay"]) if m and m["delay"] else 60

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

    @property
    def signal_name(self) -> str:
        """``USR1`` from ``B:SIGusr1@120`` or ``10@5``: the signal's name as Python's signal module spells it."""
        return signal_name(self.signal)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["train_args"] = list(self.train_args)
        out["after"] = list(self.after)
        return out


FIELDS = tuple(f.name for f in fields(JobSpec))
# Decided by hpcdist, never by a job file or flag: how --backend auto chose, and the interpreter and
# import path of the hpcdist that renders.
INTERNAL_FIELDS = ("backend_reason", "python", "pythonpath")
USER_FIELDS = tuple(f for f in FIELDS if f not in INTERNAL_FIELDS)
INT_FIELDS = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "zero_stage", "max_requeues",
              "max_retries", "spare_nodes")


def from_mapping(values: Mapping[str, Any]) -> JobSpec:
    """A JobSpec from plain values (a job file merged with flags, then hpcdist's python and pythonpath);
    unknown keys and bad values are errors."""
    allowed = (*USER_FIELDS, "python", "pythonpath")
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise SpecError(f"job file: {shown.unknown_keys(unknown, USER_FIELDS)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(
                    r"-?[0-9]+", str(value)):
                raise SpecError(f"{key} must be a whole number (ASCII digits), got {shown.value(value)}")
            if abs(int(str(value))) > MAX_INT:
                raise SpecError(f"{key} {value} is out of range; give a number below {MAX_INT}")
            value = int(str(value))
        elif key == "params":
            try:
                value = plan.parse_count(str(value))
            except plan.PlanError as exc:
                raise SpecError(f"params: {exc}") from None
        elif key == "train_args":
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
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
                raise SpecError(f"offload must be true or false, got {shown.value(value)}")
        elif not isinstance(value, str):
            raise SpecError(f"{key} must be a string, got {shown.value(value)}")
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


def time_seconds(value: str) -> int | None:
    """Seconds in a Slurm --time value, None for no limit (0, UNLIMITED, INFINITE); SpecError otherwise."""
    if value.upper() in UNLIMITED_TIMES:
        return None
    for pattern, units in _TIME_FORMS:
        m = pattern.fullmatch(value)
        if m:
            seconds = sum(int(g) * _SECONDS[u] for g, u in zip(m.groups(), units))
            if seconds > MAX_TIME_MINUTES * 60:
                raise SpecError(f"--time {value} is beyond Slurm's largest time limit; use 0 or UNLIMITED for "
                                "none")
            return seconds or None
    raise SpecError(f"--time {shown.value(value)} is not a Slurm time: use MM, HH:MM:SS or D-HH:MM:SS (ASCII "
                    "digits), or UNLIMITED")


def signal_name(value: str) -> str:
    """The signal a valid --signal spec names, as Python's signal module spells it without SIG."""
    import signal as signals

    m = _SIGNAL.fullmatch(value)
    word = (m["name"] or m["number"]).upper() if m else "USR1"
    return signals.Signals(int(word)).name[3:] if word.isdigit() else word


def check_signal(value: str) -> None:
    """SpecError unless Slurm's --signal takes ``value`` ([R|B|RB:][SIG]NAME|NUMBER[@DELAY])."""
    import signal as signals

    m = _SIGNAL.fullmatch(value)
    if not m:
        raise SpecError(f"--signal {shown.value(value)} is not a Slurm signal spec; use e.g. USR1@120")
    word = (m["name"] or m["number"]).upper()
    if word.isdigit():
        if not 1 <= int(word) <= MAX_SIGNAL_NUMBER or int(word) not in {s.value for s in signals.Signals}:
            raise SpecError(f"--signal {value}: {word} is not a signal number; use a name such as USR1")
    elif word not in SLURM_SIGNALS:
        raise SpecError(f"--signal {value}: Slurm knows no signal {m['name']}; use one of "
                        f"{', '.join(SLURM_SIGNALS)}")
    if m["delay"] is not None and int(m["delay"]) > MAX_SIGNAL_DELAY_S:
        raise SpecError(f"--signal {value}: the delay is at most {MAX_SIGNAL_DELAY_S} seconds in Slurm; "
                        "give a smaller one")


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
        time=spec.time if spec.time is not None else profile.time or DEFAULT_TIME,
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


def unwritable(value: str) -> str | None:
    """Why no file or command line can carry ``value`` (a NUL byte, a lone surrogate), or None."""
    if "\x00" in value:
        return "contains a NUL byte, which no command line or script can carry; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ("contains a character that is not valid UTF-8 (a lone surrogate, or bytes that are not "
                "UTF-8); remove it")
    return None


def check_writable_text(option: str, value: str) -> None:
    """SpecError for text no file or command line can carry (see ``unwritable``)."""
    problem = unwritable(value)
    if problem:
        raise SpecError(f"{option} {shown.value(value)} {problem}")


def _check_text(option: str, value: str | None, *, spaces: bool) -> None:
    if value is None:
        return
    if not value:
        raise SpecError(f"{option} is empty; give a value or leave the option out")
    check_writable_text(option, value)
    if _CONTROL.search(value):
        raise SpecError(f"{option} {shown.value(value)} contains a newline or control character, which Slurm "
                        "rejects; remove it")
    if not spaces and any(ch.isspace() for ch in value):
        raise SpecError(f"{option} {shown.value(value)} contains whitespace, which Slurm rejects; remove it")


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


def _settle_container(spec: JobSpec, profile: Profile) -> JobSpec:
    """The spec with its container decided: the image and runtime the tasks will use, or none."""
    from hpc import container as containers

    _check_text("--container", spec.container, spaces=False)
    _check_text("--container-runtime", spec.container_runtime, spaces=False)
    try:
        chosen = containers.resolve(spec.container, spec.container_runtime, profile.container)
    except containers.ContainerError as exc:
        raise SpecError(str(exc)) from None
    if chosen is None:
        return replace(spec, container=None, container_runtime=None)
    return replace(spec, container=chosen.image, container_runtime=chosen.runtime)


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
    spec = _settle_container(spec, profile)
    if spec.zero_stage is not None and spec.backend != "deepspeed":
        raise SpecError(f"--zero-stage applies to DeepSpeed only; drop it or use --backend deepspeed "
                        f"(got --backend {spec.backend})")
    gpus = spec.gpus_per_node or 0

    if spec.nodes < 1:
        raise SpecError(f"--nodes {spec.nodes}: a job needs at least one node; use --nodes 1 or more")
    if profile.max_nodes is not None and spec.nodes > profile.max_nodes:
        raise SpecError(f"--nodes {spec.nodes} exceeds cluster {profile.name!r}'s max_nodes "
                        f"{profile.max_nodes}; ask for fewer nodes")
    if gpus < 0:
        raise SpecError(f"--gpus-per-node {gpus}: give 0 (CPU only) or more")
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
    if not 0 <= spec.max_requeues <= MAX_REQUEUES:
        raise SpecError(f"--max-requeues {spec.max_requeues}: give 0 to {MAX_REQUEUES}")
    if not 0 <= spec.max_retries <= MAX_REQUEUES:
        raise SpecError(f"--max-retries {spec.max_retries}: give 0 to {MAX_REQUEUES}")
    if not 0 <= spec.spare_nodes <= MAX_SPARE_NODES:
        raise SpecError(f"--spare-nodes {spec.spare_nodes}: give 0 to {MAX_SPARE_NODES}")
    if spec.nodelist and spec.spare_nodes:
        raise SpecError("--nodelist names the nodes of the step, and spares are whatever Slurm adds: drop "
                        "--nodelist or --spare-nodes")
    if spec.offload and spec.backend != "deepspeed":
        raise SpecError(f"--offload moves DeepSpeed's optimizer state to CPU memory; drop it or use --backend "
                        f"deepspeed (got --backend {spec.backend})")

    _check_text("--job-name", spec.job_name, spaces=True)
    if len(spec.job_name.encode()) > MAX_JOB_NAME_BYTES:
        raise SpecError(f"--job-name is {len(spec.job_name.encode())} bytes; Slurm keeps at most "
                        f"{MAX_JOB_NAME_BYTES}: shorten it")
    _check_text("--partition", spec.partition, spaces=False)
    _check_text("--account", spec.account, spaces=False)
    _check_text("--job-dir", spec.job_dir, spaces=True)
    if "%" in spec.job_dir or "\\" in spec.job_dir:
        raise SpecError(f"--job-dir {shown.value(spec.job_dir)} contains '%' or a backslash, which Slurm interprets "
                        "in log paths; pick a directory without them")
    if not spec.job_dir.startswith("/"):
        raise SpecError(f"--job-dir {shown.value(spec.job_dir)} must be absolute by render time")
    # The longest path the job writes under it: run/checkpoints/... leave room.
    if jobfiles.name_too_long(spec.job_dir) or len(
            spec.job_dir.encode()) > PATH_MAX - 255:
        raise SpecError(f"--job-dir {shown.value(spec.job_dir)} is too long for a path (at most {NAME_MAX} bytes a "
                        "name); pick a shorter one")
    _check_text("python", spec.python, spaces=True)
    _check_text("pythonpath", spec.pythonpath, spaces=True)
    # A profile's name or path reaches only comments and spec.yaml, each quoted for its place.
    check_writable_text("--cluster", spec.cluster)
    if spec.time != spec.time.strip() or not spec.time:
        raise SpecError(f"--time {shown.value(spec.time)}: no blanks around the value, which sbatch refuses")
    _check_text("--time", spec.time, spaces=False)
    time_seconds(spec.time)
    _check_text("--signal", spec.signal, spaces=False)
    check_signal(spec.signal)
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
            excluded = nodelist.expand(spec.exclude, limit=MAX_NODES)
        except nodelist.NodelistError as exc:
            raise SpecError(f"--exclude: {exc}") from None
        clash = sorted(set(excluded) & set(nodelist.expand(spec.nodelist) if spec.nodelist else ()))
        if clash:
            raise SpecError(f"--exclude {spec.exclude!r} keeps off {', '.join(clash)}, which --nodelist asks for; "
                            "drop it from one of them")
    # Last: the trainer's own view of its arguments, once the geometry they meet is known to be sound.
    check_train_args(spec)
    return spec


def check_train_args(spec: JobSpec) -> None:
    """The trainer's own parser reads the job's arguments now, as every rank would after the queue.

    Each must be one the trainer accepts, none may set what hpcdist passes itself (decided by argparse's
    destination, so no spelling or abbreviation gets past), and the global batch must split over the ranks.
    train.options is torch-free, so this costs no torch import.
    """
    from train import options

    for arg in spec.train_args:
        check_writable_text("a trainer argument", arg)
    try:
        options.check_job_args(spec.train_args)
        opts = options.options(launch_args(spec) + list(spec.train_args))
    except options.OptionsError as exc:
        raise SpecError(f"trainer argument after --: {exc}") from None
    if spec.backend != "deepspeed":
        batch = opts.batch_size or options.DEFAULT_BATCH
        if batch % spec.world_size:
            raise SpecError(f"global batch {batch} does not split evenly over {spec.world_size} ranks; pass "
                            f"-- --batch-size with a multiple of {spec.world_size}")


def launch_args(spec: JobSpec) -> list[str]:
    """The trainer arguments task.sh passes ahead of the job's own (see templates/launch-*.sh.j2)."""
    args = ["--backend", spec.backend, "--run-dir", f"{spec.job_dir}/run", "--precision", spec.precision]
    if spec.backend == "deepspeed":
        args += ["--zero-stage", str(spec.zero_stage), "--deepspeed-config", f"{spec.job_dir}/deepspeed.json"]
    return args


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
