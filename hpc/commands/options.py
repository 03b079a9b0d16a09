"""The job options every job-making command shares (render, submit, doctor), and spec building from them.

``job_options`` adds the flags to a click command; ``prepare`` turns them into a written job directory
or exits 2 with one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

import hpc
from hpc import hostfile as hostfiles
from hpc import registry, shown, vocab
from hpc import spec as specs

if TYPE_CHECKING:
    from hpc.render import Rendered

class WholeNumber(click.ParamType):
    """A whole number in ASCII digits, as Slurm reads one; click's own int also takes ' 3 ' and Unicode digits."""

    name = "integer"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, str) or not re.fullmatch(r"-?[0-9]+", value):
            self.fail(f"{ascii(value)} is not a whole number in ASCII digits", param, ctx)
        return int(value)


WHOLE = WholeNumber()

# (flags, JobSpec field, click keyword arguments); every default is None so that a job file's value is
# kept unless the flag was actually given. Choices are checked by hpc.speccheck.check, not click, so a bad
# value in a job file and on the command line fail alike: one line, exit 2. hpc.spec's INT_FIELDS read as WHOLE.
OPTIONS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--cluster",), "cluster", {"help": "Cluster profile name or YAML path (see `hpcdist clusters`). "
                                  "[$HPCDIST_CLUSTER, else the config's default_cluster, else local]"}),
    (("--nodes", "-N"), "nodes", {"help": "Nodes. [1]"}),
    (("--gpus-per-node",), "gpus_per_node", {"help": "GPUs per node. [the profile's]"}),
    (("--ntasks-per-node",), "ntasks_per_node",
     {"help": "Ranks per node on a CPU-only job (with GPUs: one per GPU). [1]"}),
    (("--cpus-per-task",), "cpus_per_task", {"help": "CPUs per Slurm task. [the profile's]"}),
    (("--backend",), "backend", {"help": f"Training backend: {', '.join(vocab.JOB_BACKENDS)}. [ddp]"}),
    (("--launcher",), "launcher", {"help": "What starts each node's ranks: "
                                   f"{', '.join(vocab.LAUNCHERS)}. [srun]"}),
    (("--zero-stage",), "zero_stage", {"help": "DeepSpeed ZeRO stage 0-3. [2]"}),
    (("--precision",), "precision", {"help": f"{', '.join(vocab.PRECISIONS)}. [auto]"}),
    (("--partition", "-p"), "partition", {"help": "Slurm partition. [the profile's]"}),
    (("--account", "-A"), "account", {"help": "Slurm account. [the profile's]"}),
    (("--time", "-t"), "time", {"help": "Slurm time limit, e.g. 30, 02:00:00, 1-00:00:00. [the profile's, else "
                                "the partition's DefaultTime, else 01:00:00]"}),
    (("--job-name", "-J"), "job_name", {"help": f"Slurm job name. [{vocab.DEFAULT_JOB_NAME}]"}),
    (("--job-dir", "--output-dir", "-o"), "job_dir",
     {"help": "Job directory to create. [runs/JOB_NAME-YYYYmmdd-HHMMSS]"}),
    (("--nodelist", "-w"), "nodelist",
     {"help": "Slurm nodelist to request, e.g. n[1-2]; also fills ranks.txt and the hostfile offline."}),
    (("--signal",), "signal",
     {"help": "Slurm --signal warning the ranks to checkpoint: USR1 or TERM, sent to the steps (no B:). [USR1@120]"}),
    (("--max-requeues",), "max_requeues", {"help": "Requeues after a checkpointed stop. [3]"}),
    (("--max-retries",), "max_retries",
     {"help": "Retries from the newest checkpoint, on other nodes, after a lost node, a killed rank or a hang. [2]"}),
    (("--spare-nodes",), "spare_nodes",
     {"help": "Extra nodes the allocation holds: after a lost node, a killed rank or a hang the step is relaunched "
              "at once on them, without a trip through the queue. [0]"}),
    (("--elastic/--no-elastic",), "elastic",
     {"help": "When no spare is left, relaunch in the allocation on the nodes left, keeping the global batch "
              "(DeepSpeed's ZeRO state regrouped through a universal checkpoint), rather than wait in the queue "
              "for a node."}),
    (("--offload/--no-offload",), "offload",
     {"help": "DeepSpeed: offload optimizer state (and ZeRO-3 parameters) to CPU memory."}),
    (("--params",), "params",
     {"help": "Model parameters for --backend auto, e.g. 350M or 7B. [the built-in ConvNet's]"}),
    (("--after",), "after",
     {"multiple": True, "metavar": "JOB[:ok|any|notok]",
      "help": "Start only after job JOB ended so (ok: completed, the default); repeatable."}),
    (("--exclude", "-x"), "exclude", {"help": "Nodes to keep the job off, a Slurm nodelist, e.g. n2 or n[2-3]."}),
    (("--container",), "container",
     {"metavar": "IMAGE", "help": "Run each task in this image (a path, or a name the runtime pulls); none: on the "
                                  "host. [the profile's container.image, else the host]"}),
    (("--container-runtime",), "container_runtime",
     {"help": "charliecloud, apptainer, singularity, podman-hpc, pyxis or oci. [the profile's]"}),
)


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add every job option, ``-c/--config`` and the trainer's arguments (after ``--``) to a command."""
    for flags, name, kwargs in reversed(OPTIONS):
        whole = {"type": WHOLE} if name in specs.INT_FIELDS else {}
        func = click.option(*flags, name, default=None, **whole, **kwargs)(func)
    func = click.argument("train_args", nargs=-1, type=click.UNPROCESSED)(func)
    return click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
                        help="Job file (YAML): the same options, keys spelled with underscores.")(func)


def checkout_root() -> str | None:
    """The repository root when hpc runs from a checkout (tasks then need it on PYTHONPATH)."""
    package = Path(hpc.__file__).resolve().parent
    root = package.parent
    if (root / "templates").is_dir() and not (package / "templates").is_dir() and (root / "train").is_dir():
        return str(root)
    return None


def _default_job_dir(job_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", job_name).strip("._") or "job"
    first = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    # A second submit in the same second (another shell) takes the next free name, not the first one's directory.
    return next((name for name in (first, *(f"{first}-{n}" for n in range(2, 1000))) if not os.path.lexists(name)),
                first)


def values_from_options(config_file: str | None = None, base: dict[str, Any] | None = None,
                        **options: Any) -> dict[str, Any]:
    """Job values: ``base`` (a sweep file's), then the job file, then the flags that were given."""
    from hpc import yamlfile

    values: dict[str, Any] = dict(base or {})
    if config_file:
        try:
            loaded = yamlfile.load(Path(config_file), "job file")
        except yamlfile.YamlError as exc:
            raise specs.SpecError(str(exc)) from None
        if not isinstance(loaded, dict):
            raise specs.SpecError(f"job file {config_file} must be a YAML mapping of option names")
        values.update({k.replace("-", "_") if isinstance(k, str) else k: v for k, v in loaded.items()})
        if "output_dir" in values:
            if "job_dir" in values:
                raise specs.SpecError(f"job file {config_file} sets both job_dir and output_dir (the same "
                                      "thing); keep one")
            values["job_dir"] = values.pop("output_dir")
    train_args = options.pop("train_args", None)
    # A repeatable flag that was not given arrives as (), which must not hide the job file's value.
    values.update({k: v for k, v in options.items() if v is not None and v != ()})
    if train_args:
        values["train_args"] = list(train_args)
    values.setdefault("job_dir", _default_job_dir(str(values.get("job_name") or vocab.DEFAULT_JOB_NAME)))
    if isinstance(values["job_dir"], str):
        if not values["job_dir"] or "\x00" in values["job_dir"]:
            raise specs.SpecError(f"--job-dir {values['job_dir']!r} is not a directory name; give one")
        values["job_dir"] = os.path.abspath(os.path.expanduser(values["job_dir"]))
    internal = sorted(k for k in values if k in specs.INTERNAL_FIELDS)
    if internal:
        raise specs.SpecError(f"{', '.join(internal)} is decided by hpcdist itself, not by a job file; remove it")
    if not values.get("cluster"):
        from hpc import sites

        try:
            values["cluster"] = sites.default_cluster(os.environ)[0]
        except sites.SiteError as exc:
            raise specs.SpecError(str(exc)) from None
    # The interpreter and import path are this hpcdist's own, never a job file's.
    values["python"] = sys.executable
    values["pythonpath"] = checkout_root()
    return values


def fail(command: str, why: Exception | str) -> NoReturn:
    """One line on stderr and exit status 2: every input error ends this way."""
    lines = str(why).splitlines()
    click.echo(f"hpcdist {command}: {lines[0] if lines else type(why).__name__}", err=True)
    sys.exit(2)


def build(config_file: str | None = None, check_partition: bool = True, here: bool = False,
          **options: Any) -> Rendered:
    """Spec, profile, checks and rendering: everything short of writing; raises on bad input. ``here``: the
    job runs on this machine (the local executor), so its CPU, not the profile's nodes, decides precision."""
    from hpc import dsconfig, partition, profiles, render, speccheck

    spec = specs.from_mapping(values_from_options(config_file, **options))
    profile = profiles.load(spec.cluster)
    # Where Slurm answers (and is the cluster the profile describes), the partition's limits apply before
    # anything is written: a job over MaxTime would otherwise pend forever.
    cluster = partition.query(os.environ) if check_partition else None
    part = None
    if cluster is not None and partition.applies(profile, cluster):
        speccheck.check(spec, profile)  # the request's own mistakes are named before the partition's limits
        part = partition.pick(cluster, spec.partition or profile.partition)
        timed = partition.with_default_time(spec, profile, part)
        if timed.time != spec.time:
            click.echo(f"hpcdist: --time {timed.time}: partition {part.name!r}'s DefaultTime", err=True)
        spec = timed
    rendered = render.render(spec, profile, cpus=dsconfig.this_cpu() if here else None, local=here)
    if cluster is not None and part is not None:
        partition.check(rendered.spec, part, cluster.nodes_of(part))
    # Not in render's pure checks: they ask this machine's filesystem, which the job's nodes share.
    specs.check_dataset(rendered.spec, os.path.exists)
    check_container(rendered, local=False)
    return rendered


def check_container(rendered: Rendered, local: bool) -> None:
    """SpecError for a container that cannot run where the job goes (see ``hpc.container.check``)."""
    from hpc import container as containers
    from hpc import jobfiles

    if rendered.container is not None:
        try:
            containers.check(rendered.container, rendered.binds, gpus_per_node=rendered.spec.gpus_per_node or 0,
                             local=local, exists=os.path.exists, read_json=lambda p: jobfiles.json_object(Path(p)))
        except containers.ContainerError as exc:
            raise specs.SpecError(str(exc)) from None


def prepare(command: str, config_file: str | None, force: bool = False, check_partition: bool = True,
            check: Callable[[Rendered], None] | None = None, here: bool = False, **options: Any) -> Rendered:
    """Render and write the job directory, or exit 2 with one line; what ``submit`` calls too.

    ``check(rendered)`` may refuse the job (SpecError) before anything is written: the submit path's own limits.
    """
    from hpc import profiles, render

    try:
        rendered = build(config_file, check_partition, here, **options)
        if check is not None:
            check(rendered)
        render.write(rendered, force=force)
    except (specs.SpecError, profiles.ProfileError, render.RenderError, hostfiles.HostfileError) as exc:
        fail(command, exc)
    if rendered.spec.backend_reason:
        spec = rendered.spec
        stage = f" ZeRO-{spec.zero_stage}" if spec.backend == "deepspeed" else ""
        click.echo(f"hpcdist {command}: --backend auto chose {spec.backend}{stage}: {spec.backend_reason}",
                   err=True)
    if rendered.precision_reason:
        click.echo(f"hpcdist {command}: --precision auto → {rendered.spec.precision}: {rendered.precision_reason}",
                   err=True)
    return rendered


def submit_or_exit(command: str, rendered: Rendered, where: str, made: Path | None = None) -> Any:
    """``hpc.submit.submit``, or one line and exit 1 (2: a registry that cannot take the job) with the job directory
    it was to run from removed.

    Nothing runs from that directory: leaving it would only look like a job that exists. Only the directory
    render just wrote goes (it holds the marker); ``made``, a folder this command created to hold it, goes too
    once it is empty. Returns the hpc.job.Job.
    """
    from hpc import jobdir
    from hpc import submit as submitting

    try:
        return submitting.submit(rendered, where, os.environ)
    except Exception as exc:  # noqa: BLE001 - whatever stopped the submission, the job dir must go
        jobdir.discard(rendered.job_dir)
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()
        click.echo(f"hpcdist {command}: {shown.line(exc)}", err=True)
        sys.exit(2 if isinstance(exc, registry.JobError) else 1)


class Seconds(click.FloatRange):
    """A duration option: a finite number of seconds from low to a week (click's FloatRange lets nan through,
    since nan compares false with any bound)."""

    name = "seconds"

    def __init__(self, low: float) -> None:
        super().__init__(min=low, max=7 * 86400)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if seconds != seconds:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def lookup(command: str, key: str) -> registry.Record:
    """The job a command names (a job id, or a job directory); exit 2 naming what is wrong when none is."""
    try:
        return registry.lookup(key, os.environ)
    except registry.JobError as exc:
        fail(command, exc)
