"""Render a job directory's files from a JobSpec and a cluster profile, and write them all at once.

    rendered = render(spec, profiles.load("local"), "/scratch/job")   # pure: checks, writes nothing
    write(rendered)                                                   # the side effect, all or nothing

Templates render through hpc.templating's sandbox; hpc.jobdir decides where a directory may be written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from hpc import container as containers
from hpc import dsconfig, jobdir, paths, ranks, sites, vocab
from hpc.hostfile import hostfile
from hpc.profiles import Profile
from hpc.rankstable import ranks_table
from hpc.spec import JobSpec, SpecError, train_value
from hpc.speccheck import check
from hpc.templating import TEMPLATE_VOCAB, RenderError, environment, render_template

TEMPLATES_ENV = "HPCDIST_TEMPLATES"


@dataclass(frozen=True)
class Rendered:
    """A job directory's files, and the template-made shell lines submitit runs around each task."""

    spec: JobSpec  # resolved: profile defaults, backend, ZeRO stage and precision decided
    job_dir: Path
    files: Mapping[str, str]  # name relative to job_dir -> text
    setup: tuple[str, ...]  # submitit's setup lines in its batch script: source setup.sh
    teardown: tuple[str, ...]  # after its srun step: requeue.sh
    local_task: str  # one task's shell line under the local runner (run with bash -c)
    container: Any = None  # hpc.container.Container each task runs in, or None (the host)
    binds: tuple[str, ...] = ()  # host folders bound into it at the same paths
    step_options: tuple[str, ...] = ()  # its srun options (pyxis, oci), as job.sbatch's step carries them
    precision_reason: str | None = None  # why --precision auto became spec.precision


def search_path(profile: Profile, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Template directories in order: the profile's, $HPCDIST_TEMPLATES, each search-path level's templates/
    (hpc.sites), the built-in ones last."""
    site = {"the profile's templates:": profile.templates, f"${TEMPLATES_ENV}": environ.get(TEMPLATES_ENV)}
    for where, directory in site.items():
        if directory and not os.path.isdir(directory):
            # Rendering on without them would silently drop the site's overrides.
            raise RenderError(f"{where} {directory} is not a directory; create it, fix the path or unset it")
    return tuple(dict.fromkeys((*filter(None, site.values()), *sites.template_dirs(environ),
                                str(paths.templates_dir()))))


def settle(spec: JobSpec, cpus: dsconfig.Cpus) -> tuple[JobSpec, dict[str, Any] | None, str | None]:
    """The spec with its precision decided, the DeepSpeed config the trainer will get as it is (None for
    dp/ddp), and why ``auto`` became that precision.

    The precision's ``auto`` needs the device kind, which the spec knows (GPUs when gpus_per_node > 0), and
    on CPUs whether ``cpus`` compute bf16 natively.
    """
    gpu = bool(spec.gpus_per_node)
    try:
        if spec.backend != "deepspeed":
            choice = dsconfig.choose(spec.precision, gpu=gpu)
            return replace(spec, precision=choice.precision), None, choice.reason
        base = dsconfig.load(dsconfig.base_path())
        config = dsconfig.resolve(base, world_size=spec.world_size, gpu=gpu, zero_stage=spec.zero_stage,
                                  precision=spec.precision, offload=spec.offload, cpus=cpus,
                                  global_batch=_train_number(spec, "--batch-size", int),
                                  lr=_train_number(spec, "--lr", float))
        reason = dsconfig.choose(spec.precision, gpu=gpu, config=base, cpus=cpus).reason
    except dsconfig.ConfigError as exc:
        raise SpecError(str(exc)) from None
    return replace(spec, precision=dsconfig.precision_of(config)), config, reason


def _train_number(spec: JobSpec, flag: str, kind: type) -> Any:
    text = train_value(spec.train_args, flag)  # check() had the trainer's own parser read it: a number
    return None if text is None else kind(text)


def render(spec: JobSpec, profile: Profile, job_dir: str | Path | None = None, *,
           search: tuple[str, ...] | None = None, cpus: dsconfig.Cpus | None = None, local: bool = False) -> Rendered:
    """Every file of the job directory as text; checks the spec first and writes nothing. ``cpus``: the
    CPUs the job runs on, when not the profile's nodes; ``local``: the local executor runs it, on this machine."""
    if job_dir is not None:
        spec = replace(spec, job_dir=os.path.abspath(job_dir))
    cpus = cpus or profile.cpus()
    spec, ds_config, precision_reason = settle(check(spec, profile, cpus), cpus)
    jdir = Path(spec.job_dir)
    boxed = container_context(spec, profile)
    exported = profile.environment()
    context = {
        **boxed,
        "spec": spec,
        "profile": profile,
        "job_dir": spec.job_dir,
        "run_dir": str(jdir / vocab.RUN_DIR),
        "vocab": TEMPLATE_VOCAB,
        "python": spec.python,
        "environment": sorted(exported.items()),
        "launcher_variables": ranks.LAUNCHER_VARIABLES,
        "world_size": spec.world_size,
        "procs_per_node": spec.procs_per_node,
        "tasks_per_node": spec.slurm_tasks_per_node,
        "time_minutes": spec.time_minutes,
    }
    env = environment(search if search is not None else search_path(profile, os.environ))
    files = {name: render_template(env, f"{name}.j2", context)
             for name in (vocab.JOB_SBATCH, vocab.SETUP_SH, vocab.TASK_SH, vocab.STEP_SH, vocab.REQUEUE_SH)}
    lines = {name: render_template(env, f"{name}.j2", context).strip()
             for name in ("submitit-setup.sh", "submitit-teardown.sh", "local-task.sh")}
    files[vocab.SPEC_YAML] = yaml.safe_dump({"cluster_profile": profile.name, "world_size": spec.world_size,
                                             "procs_per_node": spec.procs_per_node, **spec.to_dict()},
                                            sort_keys=False, default_flow_style=False)
    try:
        files[vocab.RANKS_TXT] = ranks_table(spec, exported, local=local)
    except ranks.RankError as exc:  # every rank would fail the same way at its start
        raise SpecError(f"the env of cluster profile {profile.name}: {exc}") from None
    if ds_config is not None:
        files[vocab.DEEPSPEED_JSON] = json.dumps(ds_config, indent=2) + "\n"
    if spec.launcher == "deepspeed" and spec.nodelist:
        files[vocab.HOSTFILE] = hostfile(spec.hosts, spec.procs_per_node)
    return Rendered(spec=spec, job_dir=jdir, files=files, setup=(lines["submitit-setup.sh"],),
                    teardown=(lines["submitit-teardown.sh"],), local_task=lines["local-task.sh"],
                    precision_reason=precision_reason, container=boxed["container"], binds=boxed["binds"],
                    step_options=boxed["step_options"])


def container_context(spec: JobSpec, profile: Profile) -> dict[str, Any]:
    """What templates/container.sh.j2 needs: the container (None: the host), the folders bound into it at the
    same paths, its GPU flag, and the variables passed where the runtime passes none."""
    box = containers.resolve(spec.container, spec.container_runtime, profile.container)
    if box is None:
        return {"container": None, "binds": (), "gpu_flag": False, "passed_env": (), "step_options": (),
                "requeue_after_s": containers.REQUEUE_AFTER_S}
    binds = containers.binds((spec.job_dir, spec.pythonpath, train_value(spec.train_args, "--data-dir")),
                             spec.python, box, os.path.realpath)
    return {"container": box, "binds": binds, "gpu_flag": bool(spec.gpus_per_node) and box.gpus,
            "passed_env": containers.passed_env(box), "step_options": containers.srun_options(box, binds),
            "requeue_after_s": box.requeue_after_s}


# --- Writing: this module's only side effects. ---

def write(rendered: Rendered, *, force: bool = False) -> Path:
    """Write the job directory: its files, ``logs/`` and ``run/``, all at once (see ``jobdir.write_tree``)."""
    return jobdir.write_tree(rendered.job_dir, rendered.files, dirs=(vocab.LOGS_DIR, vocab.RUN_DIR), force=force)
