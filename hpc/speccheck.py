"""Check a JobSpec against its cluster profile, filling the profile's defaults, before anything is written.

    spec = speccheck.check(JobSpec(job_dir="/scratch/j", nodes=2), profiles.load("local"))

``check`` runs a sequence of small named checks and stops at the first problem, so which message a user
sees for a spec with several problems depends on their order: keep it.
"""

from __future__ import annotations

import re
from dataclasses import replace

from hpc import container as containers
from hpc import dsconfig, jobfiles, nodelist, plan, shown
from hpc.profiles import Profile
from hpc.spec import (
    DEFAULT_TIME,
    MAX_CPUS_PER_TASK,
    MAX_NODES,
    MAX_TASKS_PER_NODE,
    MAX_WORLD_SIZE,
    JobSpec,
    SpecError,
    check_signal,
    check_writable_text,
    parse_after,
    time_seconds,
)
from hpc.vocab import DEFAULT_ZERO_STAGE, LAUNCHERS, NODE_LAUNCHERS, PRECISIONS, VALID_LAUNCHERS, ZERO_STAGES
from hpc.vocab import JOB_BACKENDS as BACKENDS

# slurmdbd keeps job names in a tinytext column (255 bytes).
MAX_JOB_NAME_BYTES = 255
# requeue.sh compares restart counts in shell arithmetic; far beyond Slurm's own MaxBatchRequeue.
MAX_REQUEUES = 10000
MAX_SPARE_NODES = 1024
# Linux's limit on a whole path (on one component: jobfiles.MAX_NAME_BYTES).
PATH_MAX = 4095
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What a spec leaves unset (None) and the cluster profile fills in.
PROFILE_DEFAULTS = ("gpus_per_node", "cpus_per_task", "partition", "account")


def resolve(spec: JobSpec, profile: Profile, cpus: dsconfig.Cpus | None = None) -> JobSpec:
    """Fill the profile's defaults and settle ``--backend auto`` and the ZeRO stage.

    ``--backend auto`` asks hpc.plan for the configuration with the least communication whose model
    states fit the profile's gpu_memory; the model is the built-in ConvNet unless --params says otherwise.
    ``cpus``: where a CPU-only job runs, as render is given them (else the profile's).
    """
    spec = replace(
        spec,
        **{key: getattr(profile, key) for key in PROFILE_DEFAULTS if getattr(spec, key) is None},
        time=spec.time if spec.time is not None else profile.time or DEFAULT_TIME,
        python=profile.python or spec.python or "python3",
    )
    if spec.backend == "auto":
        try:
            # DeepSpeed's plans in the precision DeepSpeed would train, decided as render will (DDP's memory is
            # the same in any): planned as fp32, a job that trains in fp16 got a ZeRO stage and numbers it never had.
            precision = dsconfig.choose(spec.precision, gpu=bool(spec.gpus_per_node), cpus=cpus or profile.cpus(),
                                        config=dsconfig.load(dsconfig.base_path())).precision
            rec = plan.recommend(spec.params or plan.model_params("convnet"), spec.nodes, spec.procs_per_node,
                                 profile.gpu_memory, precision)
        except (plan.PlanError, dsconfig.ConfigError) as exc:
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
    check_writable_text(option, value)
    if _CONTROL.search(value):
        raise SpecError(f"{option} {shown.value(value)} contains a newline or control character, which Slurm "
                        "rejects; remove it")
    if not spaces and any(ch.isspace() for ch in value):
        raise SpecError(f"{option} {shown.value(value)} contains whitespace, which Slurm rejects; remove it")


def check_sizes(spec: JobSpec) -> None:
    """Refuse sizes beyond hpc.spec's MAX_* bounds in one line, before the --backend auto model or a table sees them."""
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
    _check_text("--container", spec.container, spaces=False)
    _check_text("--container-runtime", spec.container_runtime, spaces=False)
    try:
        chosen = containers.resolve(spec.container, spec.container_runtime, profile.container)
    except containers.ContainerError as exc:
        raise SpecError(str(exc)) from None
    if chosen is None:  # an explicit none stays: render decides from this spec again, the profile's image aside
        return replace(spec, container="none" if spec.container == "none" else None, container_runtime=None)
    if not spec.container:  # the profile's image, which the option's check above never saw
        _check_text("the profile's container.image", chosen.image, spaces=False)
    return replace(spec, container=chosen.image, container_runtime=chosen.runtime)


def check(spec: JobSpec, profile: Profile, cpus: dsconfig.Cpus | None = None) -> JobSpec:
    """Check geometry and inputs; return the resolved spec or raise SpecError (one line, the fix)."""
    _check_choices(spec)
    # Sizes twice: before the --backend auto model sees them, and once the profile's defaults are in.
    check_sizes(spec)
    spec = resolve(spec, profile, cpus)
    check_sizes(spec)
    spec = _settle_container(spec, profile)
    _check_zero_stage_backend(spec)
    _check_nodes_and_gpus(spec, profile)
    _check_counts(spec)
    _check_launcher(spec)
    _check_restarts(spec)
    _check_offload(spec)
    _check_job_name(spec)
    _check_text("--partition", spec.partition, spaces=False)
    _check_text("--account", spec.account, spaces=False)
    check_job_dir(spec.job_dir)
    _check_text("python", spec.python, spaces=True)
    _check_text("pythonpath", spec.pythonpath, spaces=True)
    # A profile's name or path reaches only comments and spec.yaml, each quoted for its place.
    check_writable_text("--cluster", spec.cluster)
    _check_time_and_signal(spec)
    for item in spec.after:
        parse_after(item)
    _check_hosts(spec)
    # Last: the trainer's own view of its arguments, once the geometry they meet is known to be sound.
    check_train_args(spec)
    return spec


def _check_choices(spec: JobSpec) -> None:
    for option, value, choices in (("--backend", spec.backend, BACKENDS), ("--launcher", spec.launcher, LAUNCHERS),
                                   ("--precision", spec.precision, PRECISIONS)):
        if value not in choices:
            raise SpecError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def _check_zero_stage_backend(spec: JobSpec) -> None:
    if spec.zero_stage is not None and spec.backend != "deepspeed":
        raise SpecError(f"--zero-stage applies to DeepSpeed only; drop it or use --backend deepspeed "
                        f"(got --backend {spec.backend})")


def _check_nodes_and_gpus(spec: JobSpec, profile: Profile) -> None:
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


def _check_counts(spec: JobSpec) -> None:
    for option, value in (("--cpus-per-task", spec.cpus_per_task), ("--ntasks-per-node", spec.ntasks_per_node)):
        if value is not None and value < 1:
            raise SpecError(f"{option} must be at least 1")
    if spec.zero_stage is not None and spec.zero_stage not in ZERO_STAGES:
        raise SpecError(f"--zero-stage {spec.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")


def _check_launcher(spec: JobSpec) -> None:
    """The launcher runs this backend, with the tasks per node it starts."""
    gpus = spec.gpus_per_node or 0
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


def _check_restarts(spec: JobSpec) -> None:
    """Requeues, retries and the spare nodes a relaunch moves to."""
    for option, value, most in (("--max-requeues", spec.max_requeues, MAX_REQUEUES),
                                ("--max-retries", spec.max_retries, MAX_REQUEUES),
                                ("--spare-nodes", spec.spare_nodes, MAX_SPARE_NODES)):
        if not 0 <= value <= most:
            raise SpecError(f"{option} {value}: give 0 to {most}")
    if spec.nodelist and spec.spare_nodes:
        raise SpecError("--nodelist names the nodes of the step, and spares are whatever Slurm adds: drop "
                        "--nodelist or --spare-nodes")


def _check_offload(spec: JobSpec) -> None:
    if spec.offload and spec.backend != "deepspeed":
        raise SpecError(f"--offload moves DeepSpeed's optimizer state to CPU memory; drop it or use --backend "
                        f"deepspeed (got --backend {spec.backend})")


def _check_job_name(spec: JobSpec) -> None:
    _check_text("--job-name", spec.job_name, spaces=True)
    if len(spec.job_name.encode()) > MAX_JOB_NAME_BYTES:
        raise SpecError(f"--job-name is {len(spec.job_name.encode())} bytes; Slurm keeps at most "
                        f"{MAX_JOB_NAME_BYTES}: shorten it")


def check_job_dir(job_dir: str) -> None:
    """SpecError for a job directory Slurm would mangle or refuse in its log paths (a sweep's, before its tasks')."""
    _check_text("--job-dir", job_dir, spaces=True)
    if "%" in job_dir or "\\" in job_dir:
        raise SpecError(f"--job-dir {shown.value(job_dir)} contains '%' or a backslash, which Slurm interprets "
                        "in log paths; pick a directory without them")
    if not job_dir.startswith("/"):
        raise SpecError(f"--job-dir {shown.value(job_dir)} must be absolute by render time")
    # The longest path the job writes under it: run/checkpoints/... leave room.
    if jobfiles.name_too_long(job_dir) or len(job_dir.encode()) > PATH_MAX - 255:
        raise SpecError(f"--job-dir {shown.value(job_dir)} is too long for a path (at most "
                        f"{jobfiles.MAX_NAME_BYTES} bytes a name); pick a shorter one")


def _check_time_and_signal(spec: JobSpec) -> None:
    if spec.time != spec.time.strip() or not spec.time:
        raise SpecError(f"--time {shown.value(spec.time)}: no blanks around the value, which sbatch refuses")
    _check_text("--time", spec.time, spaces=False)
    time_seconds(spec.time)
    _check_text("--signal", spec.signal, spaces=False)
    check_signal(spec.signal)


def _check_hosts(spec: JobSpec) -> None:
    """--nodelist names --nodes hosts, and --exclude keeps none of them off."""
    hosts = [] if spec.nodelist is None else nodelist.expand_for("--nodelist", spec.nodelist, SpecError)
    if spec.nodelist is not None and len(hosts) != spec.nodes:
        raise SpecError(f"--nodelist {spec.nodelist!r} names {len(hosts)} node(s) but --nodes is "
                        f"{spec.nodes}; make them agree")
    if spec.exclude is None:
        return
    _check_text("--exclude", spec.exclude, spaces=False)
    clash = sorted(set(nodelist.expand_for("--exclude", spec.exclude, SpecError)) & set(hosts))
    if clash:
        raise SpecError(f"--exclude {spec.exclude!r} keeps off {', '.join(clash)}, which --nodelist asks for; "
                        "drop it from one of them")


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
