"""Describe one training job (JobSpec) and parse the values it is made of: job files, flags, Slurm's syntax.

Checking a whole spec against a cluster profile is hpc.speccheck's job; this module knows no profile.
"""

from __future__ import annotations

import re
import signal as signals
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

from hpc import nodelist, plan, shown, vocab

# Only when neither the user, the profile nor the partition's DefaultTime gives a time limit.
DEFAULT_TIME = "01:00:00"
# Upper bounds on sizes, checked before anything of that size is built (host lists, ranks.txt, local tasks).
MAX_NODES = nodelist.MAX_HOSTS      # 65,536: as many hosts as one Slurm range can name
MAX_TASKS_PER_NODE = 65533          # Slurm's ceiling for MaxTasksPerNode (slurm.conf(5)); GPUs per node too
MAX_CPUS_PER_TASK = 65535           # Slurm keeps CPUs per task in 16 bits
MAX_WORLD_SIZE = 1 << 20            # 1,048,576 ranks: ten times the largest training jobs run; more is a typo

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, in ASCII digits and nothing around them
# (sbatch refuses ' 30' and Unicode digits).
_TIME_FORMS = tuple((re.compile(re.sub("[dhms]", "([0-9]{1,10})", form)), re.findall("[dhms]", form))
                    for form in ("m", "m:s", "h:m:s", "d-h", "d-h:m", "d-h:m:s"))
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
_SIGNAL = re.compile(r"(?:(?P<to>R|B|RB|BR):)?(?:(?i:SIG)?(?P<name>[A-Za-z][A-Za-z0-9]*)|(?P<number>[0-9]+))"
                     r"(?:@(?P<delay>[0-9]+))?")
# Slurm's dependency types (sbatch --dependency) and the short forms --after JOB[:ok|any|notok] takes.
DEPENDENCY_TYPES = ("after", "afterany", "afterok", "afternotok", "aftercorr", "singleton")
_AFTER_SHORT = {"ok": "afterok", "any": "afterany", "notok": "afternotok", "corr": "aftercorr", "start": "after"}
# A job id, or one task of a job array (JOBID_TASKID).
_DEPENDENCY_JOB = re.compile(r"[1-9][0-9]*(?:_[0-9]+)?")
# Whole numbers beyond this fit none of Slurm's fields.
MAX_INT = 2**31 - 1


class SpecError(ValueError):
    """A job spec that cannot run as asked; the message is one line naming the fix."""


@dataclass(frozen=True)
class JobSpec:
    """One job as asked for; ``None`` means "take the cluster profile's value" (see hpc.speccheck.resolve)."""

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
    elastic: bool = False         # with no spare left, relaunch on the nodes left (the global batch kept)
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
        return 1 if self.launcher in vocab.NODE_LAUNCHERS else self.procs_per_node

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
            grouped.setdefault(kind, []).extend([job] if job else [])  # singleton names no job
        return ",".join(":".join([kind, *jobs]) for kind, jobs in grouped.items())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_args": list(self.train_args), "after": list(self.after)}


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
        elif key in ("offload", "elastic"):
            if not isinstance(value, bool):
                raise SpecError(f"{key} must be true or false, got {shown.value(value)}")
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
    """``USR1`` from ``B:SIGusr1@120`` or ``10@5``: the signal a valid --signal spec names, as Python's signal
    module spells it without SIG."""
    m = _SIGNAL.fullmatch(value)
    word = (m["name"] or m["number"]).upper() if m else "USR1"
    return signals.Signals(int(word)).name[3:] if word.isdigit() else word


def check_signal(value: str) -> None:
    """SpecError unless Slurm's --signal takes ``value`` ([R|B|RB:][SIG]NAME|NUMBER[@DELAY]) and it warns the
    ranks with a signal they checkpoint on."""
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
    instead = f"USR1@{m['delay'] or 120}"
    if "B" in (m["to"] or ""):
        raise SpecError(f"--signal {value} signals the batch shell ({m['to']}:), which does not checkpoint and which "
                        f"USR1 ends before requeue.sh runs; drop the B so that Slurm warns the ranks alone: {instead}")
    if signal_name(value) not in vocab.CHECKPOINT_SIGNALS:
        raise SpecError(f"--signal {value}: the ranks checkpoint on {' or '.join(vocab.CHECKPOINT_SIGNALS)} only, "
                        f"not on {signal_name(value)}; use {instead}")


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
