"""Which container runtime runs each task, what it binds and passes in, and what can be refused at render.

    container = Container("charliecloud", "/scratch/img/hpcdist")
    check(container, gpus_per_node=0, executor_local=False)    # ContainerError naming the fix
    binds((job_dir, pythonpath, data_dir), python, container, os.path.realpath)  # bound at the same paths

Only the task runs in the container: job.sbatch and requeue.sh stay in the host's batch shell, since they
call scontrol. The shell text of each runtime's command line is in templates/container.sh.j2.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

# name -> how it is started: "task" runtimes wrap the task's launcher (task.sh runs on the host, the launcher
# and the trainer inside); "step" runtimes are srun options (task.sh itself runs inside). ``gpu_flag``: the
# option that shows the job's GPUs inside, where the runtime needs one; ``image``: "path" where the image is
# a file or folder every node must see, "ref" where the runtime may also pull a name, "uri" where it pulls only
# what names a scheme (docker://, oras://, docker-archive:...) and reads anything else as a file.
RUNTIMES: Mapping[str, Mapping[str, Any]] = {   # in the order a site's are preferred: most integrated first
    "pyxis": {"command": "srun", "starts": "step", "gpu_flag": None, "image": "ref"},
    "apptainer": {"command": "apptainer", "starts": "task", "gpu_flag": "--nv", "image": "uri"},
    "singularity": {"command": "singularity", "starts": "task", "gpu_flag": "--nv", "image": "uri"},
    "charliecloud": {"command": "ch-run", "starts": "task", "gpu_flag": None, "image": "path"},
    "podman-hpc": {"command": "podman-hpc", "starts": "task", "gpu_flag": "--gpu", "image": "ref"},
    "oci": {"command": "srun", "starts": "step", "gpu_flag": None, "image": "path", "requeue_after_s": 15},
}
# Seconds from hpcdist's requeue of a job to its next start. Slurm 22.05 names an oci step's container and spool
# folder by job and step id alone, so a requeued job's first step would meet the old run's while that
# slurmstepd still tears it down (its RunTimeKill then ended the new one): 15 s covers KillWait 5 s here.
REQUEUE_AFTER_S = 2
# Variables that must reach the trainer unchanged, for the runtimes that pass none by default (podman-hpc):
# the rank environment, the rendezvous, threads, NCCL's settings and hpcdist's own.
PASSED = ("SLURM_*", "SLURMD_*", "MASTER_*", "NCCL_*", "HPCDIST_*", "OMP_*", "PYTHON*", "CUDA_*", "TORCH*",
          "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")
# What the runtimes' bind options split on: pyxis and apptainer a list at ',', every runtime SRC:DST at ':'.
_BIND_SEPARATORS = re.compile(r"[:,]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # docker://, library://, docker-archive:, oci-archive:...
# The folders an image's root file system owns (the FHS's, and the lib variants distributions add): binding the
# host's over one runs the host's files instead of the image's (its conda in /opt, its Python in /usr) or breaks it.
IMAGE_OWNED = frozenset(f"/{name}" for name in ("bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32",
                                                "opt", "proc", "root", "run", "sbin", "srv", "sys", "usr", "var"))


class ContainerError(ValueError):
    """A container setting that cannot work; one line naming the fix."""


@dataclass(frozen=True)
class Container:
    """The image a job's tasks run in and how."""

    runtime: str
    image: str
    mounts: tuple[str, ...] = ()   # more host folders, each bound at the same path
    gpus: bool = True              # pass the runtime's GPU flag on a GPU job
    env: tuple[str, ...] = ()      # more variables (NAME or PREFIX*) for runtimes that pass none by default

    @property
    def command(self) -> str:
        return RUNTIMES[self.runtime]["command"]

    @property
    def starts(self) -> str:
        return RUNTIMES[self.runtime]["starts"]

    @property
    def requeue_after_s(self) -> int:
        return RUNTIMES[self.runtime].get("requeue_after_s", REQUEUE_AFTER_S)

    @property
    def image_is_path(self) -> bool:
        kind = RUNTIMES[self.runtime]["image"]
        return (kind == "path" or self.image.startswith(("/", "./", "../"))
                or (kind == "uri" and not _SCHEME.match(self.image)))


def from_mapping(data: Mapping[str, Any], where: str = "container", image_required: bool = True) -> Container:
    """A Container from a profile's ``container:`` section, where the image may be left to each job."""
    unknown = [k for k in data if k not in ("runtime", "image", "mounts", "gpus", "env")]
    if unknown:
        raise ContainerError(f"{where}: unknown key {str(unknown[0])[:40]!r}; valid keys: runtime, image, mounts, "
                             "gpus, env")
    runtime = data.get("runtime")
    if runtime is None:
        raise ContainerError(f"{where}.runtime is missing; name the one the site runs: {', '.join(RUNTIMES)}")
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ContainerError(f"{where}.runtime {str(runtime)[:40]!r} is not one hpcdist runs; use one of "
                             f"{', '.join(RUNTIMES)}")
    image = data.get("image", None if image_required else "")
    if not isinstance(image, str) or (image_required and not image.strip()):
        raise ContainerError(f"{where}.image must name the image (a path, or a name the runtime pulls)")
    if image.strip().startswith("-"):
        # The image is the runtime's first word after its options: '--privileged' would be one of them.
        raise ContainerError(f"{where}.image {image.strip()[:60]!r} starts with '-', which {runtime} would read as "
                             "an option; name the image itself")
    mounts = _strings(data.get("mounts") or [], f"{where}.mounts")
    bad = next((m for m in mounts if not m.startswith("/") or _BIND_SEPARATORS.search(m)), None)
    if bad is not None:
        raise ContainerError(f"{where}.mounts: {bad[:60]!r} must be an absolute host path without ':' or ',' (bound "
                             "at the same path)")
    bad = next((m for m in mounts if bind_folder(m) is None), None)
    if bad is not None:
        raise ContainerError(f"{where}.mounts: {bad[:60]!r} is / or a folder the image's own root holds, which the "
                             "host's would hide or replace; name the folder under it that the job needs")
    env = _strings(data.get("env") or [], f"{where}.env")
    bad = next((e for e in env if not _ENV_NAME.fullmatch(e)), None)
    if bad is not None:
        raise ContainerError(f"{where}.env: {bad[:60]!r} is not a variable name (or PREFIX*)")
    gpus = data.get("gpus", True)
    if not isinstance(gpus, bool):
        raise ContainerError(f"{where}.gpus must be true or false")
    return Container(runtime, image.strip(), tuple(mounts), gpus, tuple(env))


def resolve(image: str | None, runtime: str | None, site: Container | None) -> Container | None:
    """The job's container: its --container IMAGE (``none``: run on the host) over the profile's image, its
    --container-runtime over the profile's runtime; the profile's mounts, GPU flag and variables kept."""
    if image == "none":
        return None
    image = image or (site.image if site else None)
    if not image:
        if runtime:
            raise ContainerError(f"--container-runtime {runtime[:40]!r} needs an image: pass --container IMAGE or "
                                 "set container.image in the profile")
        return None
    runtime = runtime or (site.runtime if site else None)
    if runtime is None:
        raise ContainerError("--container needs a runtime: pass --container-runtime (one of "
                             f"{', '.join(RUNTIMES)}) or set container.runtime in the profile")
    base = {"mounts": list(site.mounts), "gpus": site.gpus, "env": list(site.env)} if site else {}
    return from_mapping({"runtime": runtime, "image": image, **base})


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ContainerError(f"{where} must be a list of strings")
    return value


def check(container: Container, binds: Iterable[str], *, gpus_per_node: int, local: bool,
          exists: Callable[[str], bool], read_json: Callable[[str], Any] = lambda path: None) -> None:
    """Refuse what render can already know will not run: ContainerError in one line.

    ``exists(path)`` says whether a path exists where the job runs (a shared filesystem: this machine);
    ``read_json(path)`` the JSON object in a file there (None when absent or damaged).
    """
    split = next((b for b in binds if _BIND_SEPARATORS.search(b)), None)
    if split is not None:
        raise ContainerError(f"folder {split[:60]!r}, bound into the container, holds a ':' or ',', the separator "
                             f"{container.runtime} splits binds at (it would bind other folders); use paths without")
    if local and container.starts == "step":
        raise ContainerError(f"runtime {container.runtime} is an srun plugin, which the local executor does not "
                             "have; submit to Slurm or use charliecloud, apptainer or podman-hpc")
    if gpus_per_node and not container.gpus:
        raise ContainerError(f"the job has {gpus_per_node} GPU(s) per node but the profile's container.gpus is "
                             f"false: {container.runtime} would hide them; set gpus: true or run on CPUs")
    if container.image_is_path:
        if not container.image.startswith("/"):
            raise ContainerError(f"image {container.image[:60]!r} is a relative path, which each node would read "
                                 "from its own working directory; give an absolute path")
        if not exists(container.image):
            raise ContainerError(f"image {container.image[:60]!r} does not exist here, so no node sharing this "
                                 "filesystem can see it; build it (scripts/build-image.sh) or fix the path")
        # ch-run binds only onto folders the image already has (its image is read-only).
        missing = [b for b in binds if container.runtime == "charliecloud" and exists(container.image + "/etc")
                   and not exists(container.image + b)]
        if missing:
            raise ContainerError(f"image {container.image[:60]!r} has no mount point {missing[0]} (of "
                                 f"{', '.join(missing)}); create it there (mkdir -p IMAGE{missing[0]}) or rebuild "
                                 f"with scripts/build-image.sh --mount {missing[0]}")
        missing = _unbound(read_json(container.image + "/config.json"), binds) if container.runtime == "oci" else []
        if missing:
            raise ContainerError(f"bundle {container.image[:60]!r} binds no {missing[0]} (of {', '.join(missing)}): "
                                 "srun --container binds only its config.json's mounts; add it there or rebuild with "
                                 f"scripts/build-image.sh BUNDLE --oci --mount {missing[0]}")


def _unbound(config: Any, binds: Iterable[str]) -> list[str]:
    """The folders an OCI bundle's config.json mounts none of (none when it is unreadable: runc will say)."""
    if not isinstance(config, dict) or not isinstance(config.get("mounts"), list):
        return []
    bound = [m["destination"].rstrip("/") + "/" for m in config["mounts"] if _is_bind(m)]
    return [b for b in binds if not any((b + "/").startswith(d) for d in bound)]


def _is_bind(mount: Any) -> bool:
    if not isinstance(mount, dict) or not isinstance(mount.get("destination"), str):
        return False
    options = mount.get("options")
    return mount.get("type") == "bind" or (isinstance(options, list) and ("bind" in options or "rbind" in options))


def detect(on_path: Callable[[str], bool], plugstack: str, oci_conf: bool) -> list[str]:
    """The runtimes this site offers, most integrated first: pyxis when plugstack.conf loads it, then the
    commands found on PATH, then Slurm's own OCI support when oci.conf exists."""
    found = ["pyxis"] if re.search(r"^\s*(required|optional)\s+\S*spank_pyxis\.so", plugstack, re.M) else []
    found += [name for name, runtime in RUNTIMES.items() if runtime["starts"] == "task" and on_path(runtime["command"])]
    return found + (["oci"] if oci_conf else [])


def bind_folder(path: str) -> str | None:
    """The host folder bound for a folder the task needs: its top folder, but under one an image's root owns
    (IMAGE_OWNED) the folder itself; None for such a folder itself or ``/``, which the image's own serves."""
    folder = posixpath.normpath(path)  # '/work/../usr' is in /usr, and its top folder must say so
    top = "/" + folder.lstrip("/").split("/")[0]  # /work/main/job -> /work: an image need only hold that mount point
    if top not in IMAGE_OWNED:
        return None if top == "/" else top
    return None if folder == top else folder


def binds(folders: Iterable[str | None], python: str | None, container: Container,
          real: Callable[[str], str] = str) -> tuple[str, ...]:
    """Host folders bound into the container at the same paths: for each folder the task needs (the job
    directory, the import path, the data) and the interpreter's environment (``ENV/bin/python``), as given and
    where ``real`` (os.path.realpath) says its links lead, the folder ``bind_folder`` names; then the profile's own
    mounts; none inside another already bound."""
    homes = [_environment(python), _environment(real(python))] if python else []
    needed = [f for f in (*folders, *homes) if f and f.startswith("/")]
    found = [bind_folder(f) for f in (*needed, *map(real, needed))]
    every = dict.fromkeys((*filter(None, found), *container.mounts))
    return tuple(f for f in every if not any(f.startswith(c.rstrip("/") + "/") for c in every))


def _environment(python: str) -> str:
    home = posixpath.dirname(python)
    # The interpreter's lib/ and site-packages are beside its bin/.
    return posixpath.dirname(home) if posixpath.basename(home) == "bin" else home


def srun_options(container: Container, binds: Iterable[str]) -> tuple[str, ...]:
    """The srun options of the runtimes that are srun plugins (pyxis, Slurm's own OCI), for job.sbatch's step
    and submitit's alike; none for the others, which wrap the task's launcher instead."""
    if container.starts != "step":
        return ()
    if container.runtime == "pyxis":
        return (f"--container-image={container.image}", "--container-mounts=" + ",".join(f"{b}:{b}" for b in binds))
    return (f"--container={container.image}",)


def passed_env(container: Container) -> tuple[str, ...]:
    """Variable names (PREFIX* for a family) a runtime that passes no environment must be told to pass."""
    return tuple(dict.fromkeys([*PASSED, *container.env]))
