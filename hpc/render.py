"""Render a job directory's files from a JobSpec and a cluster profile through the Jinja templates."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import stat
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
import markupsafe
import yaml

from hpc import container as containers
from hpc import dsconfig, paths, ranks, sites, vocab
from hpc.hostfile import hostfile
from hpc.profiles import Profile
from hpc.spec import JobSpec, SpecError, check, train_value, unwritable

TEMPLATES_ENV = "HPCDIST_TEMPLATES"
# Written into every job (and sweep) directory hpcdist renders, naming its kind and every path it wrote:
# --force replaces only a directory whose marker says so and that holds nothing more (it never ran).
MARKER = ".hpcdist-job"
MARKER_NOTE = ("This directory was written by hpcdist; `--force` replaces it only while it holds exactly the paths "
               "below (a job that never ran).")
_MARKER_MAX_BYTES = 64 << 20
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+=,\[\]-]+")


class RenderError(ValueError):
    """A template that does not render, or a job directory that cannot be written; one line."""


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


class Shell(markupsafe.Markup):
    """Text a filter made fit for the place it goes: one shell word, one sbatch argument, a comment.

    The templates' finalize step lets only this (and a macro's output, made of it), whole numbers and
    plain tokens through, so a value that reaches a template without a filter fails the render instead of
    becoming code. It is Jinja's autoescaping machinery with refusal in place of HTML escaping: Markup is
    what Jinja already treats as "escaped", and a macro call returns Markup under autoescape.
    """


# Text that means the same unquoted in a shell command, an sbatch directive and a comment.
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_.,:@%+=/-]*")


def _text(value: Any) -> str:
    """``value`` as text a file can hold, or RenderError (see ``hpc.spec.unwritable``)."""
    text = str(value)
    problem = unwritable(text)
    if problem:
        raise RenderError(f"value {ascii(text)} {problem}")
    return text


def quote(value: Any) -> Shell:
    """The ``q`` filter: one shell word that is the value, literally."""
    return Shell(shlex.quote(_text(value)))


def sbatch_quote(value: Any) -> Shell:
    """The ``sbatch`` filter: a batch-directive argument as sbatch's own parser reads it (no shell).

    sbatch splits directive lines on blanks, honours double quotes and backslash escapes, and ends at the
    line's end; newlines cannot be carried at all, which check() already refused.
    """
    text = _text(value)
    if "\n" in text or "\r" in text:
        raise RenderError(f"sbatch directive value {text!r} contains a newline; Slurm cannot carry it")
    if _SBATCH_PLAIN.fullmatch(text):
        return Shell(text)
    return Shell('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def submitit_directive(value: Any) -> str | None:
    """A value for one of submitit's ``#SBATCH`` lines, arriving in Slurm as job.sbatch's does.

    submitit shell-quotes each value (shlex.quote), and sbatch's directive parser honours those quotes
    but also reads a backslash as an escape even inside them (``'a\\b'`` would arrive as ``ab``); so each
    backslash is doubled, to arrive as one.
    """
    return None if value is None else _text(value).replace("\\", "\\\\")


def comment(value: Any) -> Shell:
    """The ``comment`` filter: text for a ``#`` comment, every unprintable character (a newline) escaped."""
    return Shell("".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(value)))


def verbatim(value: Any) -> Shell:
    """The ``verbatim`` filter: shell text by design, as it is: the site admin's profile setup lines (a line
    may hold several, an if/fi block), or a template's own literal shell words passed to a macro."""
    return Shell(_text(value))


class UnquotedValue(RenderError):
    """A template put a value into shell text without a quoting filter."""


def finalize(value: Any) -> str:
    """Every ``{{ ... }}`` result passes here: filtered text, whole numbers and plain tokens only."""
    if isinstance(value, markupsafe.Markup):
        return value
    if isinstance(value, jinja2.Undefined):
        return str(value)  # StrictUndefined: fails naming the missing variable
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and _PLAIN_TOKEN.fullmatch(value):
        return value
    raise UnquotedValue(f"a template puts {value!r} into a script unquoted; pass it through | q, | sbatch "
                        "or | comment")


def search_path(profile: Profile, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Template directories in order: the profile's, $HPCDIST_TEMPLATES, each search-path level's templates/
    (hpc.sites), the built-in ones last."""
    site = [d for d in (profile.templates, environ.get(TEMPLATES_ENV)) if d]
    for where, directory in zip(("the profile's templates:", f"${TEMPLATES_ENV}"),
                                (profile.templates, environ.get(TEMPLATES_ENV))):
        if directory and not os.path.isdir(directory):
            # Rendering on without them would silently drop the site's overrides.
            raise RenderError(f"{where} {directory} is not a directory; create it, fix the path or unset it")
    return tuple(dict.fromkeys((*site, *sites.template_dirs(environ), str(paths.templates_dir()))))


class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja that reads values and calls macros, and nothing else.

    A site's templates come from a profile someone may have handed you, and rendering is a dry run: it must
    never run Python in your process. Jinja's sandbox already refuses private attributes (the
    ``cycler.__init__.__globals__`` road to ``os``) and mutation; on top, no module is reachable and the only
    callables are macros, Jinja's own globals (range, dict, cycler, ...) and their helpers' methods: no
    method of a value (``profile.environment``) runs.
    """

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(value, types.ModuleType) or isinstance(obj, types.ModuleType):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def is_safe_callable(self, obj: Any) -> bool:
        if isinstance(obj, jinja2.runtime.Macro) or any(obj is helper for helper in self.globals.values()):
            return True
        owner = getattr(obj, "__self__", None)
        return isinstance(owner, _JINJA_HELPERS) and super().is_safe_callable(obj)


_JINJA_HELPERS = (jinja2.runtime.LoopContext, jinja2.utils.Cycler, jinja2.utils.Joiner)

# What templates may read of hpcdist's vocabulary: its names and values, never the module itself.
TEMPLATE_VOCAB = types.MappingProxyType(
    {name: value for name, value in vars(vocab).items() if name.isupper()})


@functools.lru_cache(maxsize=8)
def environment(search: tuple[str, ...]) -> jinja2.Environment:
    env = Sandbox(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(d) for d in search]),
        undefined=jinja2.StrictUndefined,
        # On, so that macro output counts as checked text; finalize refuses every other unfiltered value
        # before any HTML escaping could touch it, and plain tokens hold nothing HTML would escape.
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=finalize,
    )
    env.filters["q"] = quote
    env.filters["sbatch"] = sbatch_quote
    env.filters["comment"] = comment
    env.filters["verbatim"] = verbatim
    return env


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


def ranks_table(spec: JobSpec, job_id: str | None = None, full_up_to: int = 1024) -> str:
    """What each rank will see, from synthetic launcher environments fed through hpc.ranks.resolve.

    Every rank is listed up to ``full_up_to`` ranks; beyond, the first and last rank of each node (the
    rest follow rank = node_rank * procs_per_node + local_rank, which the header states). Linear in the
    rows listed: each environment carries the compressed nodelist, of which resolve reads the first host.
    """
    from hpc import nodelist

    hosts = spec.hosts
    per_node, tasks = spec.procs_per_node, spec.slurm_tasks_per_node
    expr = nodelist.compress(hosts)
    job = job_id or "0"
    full = spec.world_size <= full_up_to
    local_ranks = range(per_node) if full else sorted({0, per_node - 1})
    rows = []
    for node_rank, host in enumerate(hosts):
        if spec.launcher != "srun":
            # task.sh resolves MASTER_ADDR/PORT as the Slurm task of node_rank (one per node), then the
            # launcher exports torch's variables to each rank it spawns.
            task = ranks.resolve({
                "SLURM_PROCID": str(node_rank), "SLURM_NTASKS": str(spec.nodes), "SLURM_STEP_ID": "0",
                "SLURM_NODEID": str(node_rank), "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": expr,
                "SLURM_STEP_NODELIST": expr, "SLURM_STEP_NUM_TASKS": str(spec.nodes),
                "SLURM_STEP_TASKS_PER_NODE": f"{tasks}(x{spec.nodes})", "SLURM_JOB_ID": job,
            })
        for local_rank in local_ranks:
            rank = node_rank * per_node + local_rank
            if spec.launcher == "srun":
                environ = {
                    "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(spec.world_size), "SLURM_STEP_ID": "0",
                    "SLURM_LOCALID": str(local_rank), "SLURM_NODEID": str(node_rank),
                    "SLURM_JOB_NODELIST": expr, "SLURM_STEP_NODELIST": expr,
                    "SLURM_STEP_NUM_TASKS": str(spec.world_size),
                    "SLURM_STEP_TASKS_PER_NODE": f"{tasks}(x{spec.nodes})", "SLURM_JOB_ID": job,
                }
            else:
                environ = {
                    "RANK": str(rank), "WORLD_SIZE": str(spec.world_size), "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node_rank),
                    "MASTER_ADDR": task.master_addr, "MASTER_PORT": str(task.master_port),
                }
            dist = ranks.resolve(environ)
            port = str(dist.master_port) if job_id else f"{ranks.PORT_BASE}+JOBID%{ranks.PORT_SPAN}"
            rows.append((str(dist.rank), str(dist.local_rank), str(dist.node_rank), host, dist.master_addr,
                         port, dist.source))
    header = ("rank", "local_rank", "node_rank", "node", "master_addr", "master_port", "source")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "# What each rank will see: hpc.ranks.resolve on the environment its launcher gives it.",
        f"# {spec.world_size} rank(s) = {spec.nodes} node(s) x {per_node}; "
        f"rank = node_rank * {per_node} + local_rank.",
        "# Every rank is listed." if full else
        f"# Over {full_up_to} ranks: only the first and last rank of each node are listed; the ranks between "
        "see the same node, master_addr and master_port.",
        *("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in (header, *rows)),
    ]
    return "\n".join(lines) + "\n"


def spec_yaml(spec: JobSpec, profile: Profile) -> str:
    data = {"cluster_profile": profile.name, "world_size": spec.world_size,
            "procs_per_node": spec.procs_per_node, **spec.to_dict()}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def render(spec: JobSpec, profile: Profile, job_dir: str | Path | None = None, *,
           search: tuple[str, ...] | None = None, job_id: str | None = None,
           cpus: dsconfig.Cpus | None = None) -> Rendered:
    """Every file of the job directory as text; checks the spec first and writes nothing. ``cpus``: the
    CPUs the job runs on, when not the profile's nodes (the local executor runs on this machine)."""
    if job_dir is not None:
        spec = replace(spec, job_dir=os.path.abspath(job_dir))
    spec, ds_config, precision_reason = settle(check(spec, profile), cpus or profile.cpus())
    jdir = Path(spec.job_dir)
    boxed = container_context(spec, profile)
    context = {
        **boxed,
        "spec": spec,
        "profile": profile,
        "job_dir": spec.job_dir,
        "run_dir": str(jdir / vocab.RUN_DIR),
        "vocab": TEMPLATE_VOCAB,
        "python": spec.python,
        "environment": sorted(profile.environment().items()),
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
    files[vocab.SPEC_YAML] = spec_yaml(spec, profile)
    files[vocab.RANKS_TXT] = ranks_table(spec, job_id)
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
        return {"container": None, "binds": (), "gpu_flag": False, "passed_env": (), "step_options": ()}
    binds = containers.binds((spec.job_dir, spec.pythonpath, spec.python,
                              train_value(spec.train_args, "--data-dir")), box)
    return {"container": box, "binds": binds, "gpu_flag": bool(spec.gpus_per_node) and box.gpus,
            "passed_env": containers.passed_env(box), "step_options": containers.srun_options(box, binds)}


def render_template(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    """One template rendered in ``env``, any failure of a (site's) template a RenderError in one line."""
    try:
        return env.get_template(name).render(context)
    except RenderError:
        raise
    except jinja2.sandbox.SecurityError as exc:
        raise RenderError(f"template {name} reaches outside its values ({_first_line(exc)}); templates may "
                          "only read values and call macros: fix the site template directory") from None
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {getattr(exc, 'name', None) or name}: {_first_line(exc)}") from None
    except RecursionError:
        raise RenderError("a template includes itself without end; fix the site template directory") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise RenderError(f"cannot read a template: {_first_line(exc)}; fix the site template directory") from None
    except Exception as exc:  # noqa: BLE001 - a site template's own runtime error (1/0, a bad call)
        raise RenderError(f"a template failed to render: {type(exc).__name__}: {_first_line(exc)}; fix the "
                          "site template directory") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def protected_dirs(cwd: str, home: str | None) -> tuple[str, ...]:
    """Directories a job directory may never be, nor replace: /, the home and current directories and
    every directory above them."""
    out = {"/"}
    for base in (cwd, home):
        if not base:
            continue
        path = os.path.realpath(base)
        while True:
            out.add(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return tuple(sorted(out))


def refuse_protected(target: Path, what: str, environ: Mapping[str, str] | None = None,
                     cwd: str | None = None) -> None:
    """RenderError when ``target`` is /, the home or current directory or one above them: hpcdist never
    writes a job (or sweep) there, since replacing it would remove everything of the user's inside."""
    environ = os.environ if environ is None else environ
    real = os.path.realpath(target)
    if real in protected_dirs(os.getcwd() if cwd is None else cwd, environ.get("HOME")):
        raise RenderError(f"{what} {target} is /, the home or current directory or one above them; "
                          f"pick a new directory for the {what.split()[0]}")


def _refuse_target(target: Path, what: str, force: bool, environ: Mapping[str, str], cwd: str) -> None:
    """RenderError unless ``target`` may become the job (or sweep) directory (see ``write_tree``)."""
    refuse_protected(target, what, environ, cwd)
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise RenderError(f"{what} {target} exists and is not a directory; pick another --job-dir")
    if not any(target.iterdir()):
        return
    if not force:
        raise RenderError(f"{what} {target} already exists; pass another --job-dir, or --force to "
                          f"replace a {what} hpcdist wrote")
    refusal = unreplaceable(target, what.split()[0])
    if refusal:
        raise RenderError(f"--force {refusal}; pick another --job-dir")


def marker_text(kind: str, paths: Iterable[str]) -> str:
    """The marker of a ``kind`` ("job" or "sweep") directory holding ``paths`` (relative; folders end in /)."""
    return json.dumps({"hpcdist": MARKER_NOTE, "kind": kind, "paths": sorted(paths)}, indent=0) + "\n"


def read_marker(path: Path) -> tuple[str, frozenset[str]] | None:
    """(kind, paths) from the marker in ``path``, or None: no marker, a link, not ours, or damaged."""
    try:
        fd = os.open(Path(path) / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        raw = f.read(_MARKER_MAX_BYTES + 1)
    try:
        data = json.loads(raw.decode()) if len(raw) <= _MARKER_MAX_BYTES else None
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return None
    paths = data.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    return data["kind"], frozenset(paths)


def unreplaceable(target: Path, kind: str) -> str | None:
    """Why ``target`` may not be replaced as a ``kind`` directory, or None when it is exactly what hpcdist
    wrote: its marker names that kind, and it holds no path the marker does not list (nothing ran there)."""
    marker = None if Path(target).is_symlink() else read_marker(target)
    if marker is None:
        return (f"replaces only a {kind} directory hpcdist wrote (one holding a readable {MARKER}), and "
                f"{target} is not one")
    if marker[0] != kind:
        return f"of a {kind} never replaces a {marker[0]} directory, and {target} is one"
    found = _unlisted(Path(target), marker[1])
    if found:
        shown = ", ".join(ascii(p)[1:-1] for p in found[:3]) + (", ..." if len(found) > 3 else "")
        return (f"replaces only a {kind} that never ran, and {target} holds what was made since it was written "
                f"({shown})")
    return None


def _unlisted(root: Path, listed: frozenset[str], most: int = 4) -> list[str]:
    """Up to ``most`` paths under ``root`` that ``listed`` does not name (links are not followed)."""
    found: list[str] = []
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for name in sorted(dirs) + sorted(files):
            path = name if rel == "." else f"{rel}/{name}"
            if name == MARKER and name in files:
                continue
            if (f"{path}/" if name in dirs and not os.path.islink(os.path.join(top, name)) else path) not in listed:
                found.append(path)
                if len(found) >= most:
                    return found
        dirs[:] = [d for d in dirs if (f"{d}/" if rel == "." else f"{rel}/{d}/") in listed]
    return found


def is_job_dir(path: Path) -> bool:
    """Whether ``path`` is a job directory hpcdist wrote: it holds a job marker (not a link to one)."""
    marker = None if Path(path).is_symlink() else read_marker(path)
    return marker is not None and marker[0] == "job"


def write(rendered: Rendered, *, force: bool = False, environ: Mapping[str, str] | None = None,
          cwd: str | None = None) -> Path:
    """Write the job directory: its files, ``logs/`` and ``run/``, all at once (see ``write_tree``)."""
    return write_tree(rendered.job_dir, rendered.files, dirs=(vocab.LOGS_DIR, vocab.RUN_DIR), force=force,
                      environ=environ, cwd=cwd)


def write_tree(target: Path, files: Mapping[str, str], *, dirs: Iterable[str] = (), what: str = "job directory",
               force: bool = False, environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Path:
    """Write a directory hpcdist owns all at once: into a temporary sibling, then renamed into place.

    ``files`` maps paths relative to ``target`` to their text (scripts become executable); ``dirs`` are
    empty folders to create. ``target`` gets ``MARKER``, naming ``what``'s kind and every path written. A
    failure leaves nothing behind. ``force`` replaces an existing directory, but only one that hpcdist wrote
    as this kind and that holds nothing since (see ``unreplaceable``); nothing else is ever removed, and
    ``target`` is never /, the home or current directory or one above them (``environ``'s HOME, ``cwd``).
    """
    import shutil
    import tempfile

    _refuse_target(target, what, force, os.environ if environ is None else environ,
                   os.getcwd() if cwd is None else cwd)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A short name of our own: the directory's name may already use most of the 255 bytes.
        staging = Path(tempfile.mkdtemp(prefix=".hpcdist-new-", dir=target.parent))
    except OSError as exc:
        raise RenderError(f"cannot write the {what} under {target.parent}: {exc.strerror or exc}; "
                          "pick a writable --job-dir") from None
    old = None
    try:
        os.chmod(staging, 0o755)
        (staging / MARKER).write_text(marker_text(what.split()[0], written_paths(files, dirs)))
        for sub in dirs:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".hpcdist-old-", dir=target.parent))
            target.rename(old / "replaced")
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            (old / "replaced").rename(target)
        raise RenderError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def written_paths(files: Iterable[str], dirs: Iterable[str]) -> set[str]:
    """Every path ``write_tree`` makes for ``files`` and ``dirs``: each file, and each folder with a /."""
    out: set[str] = set()
    for name in (*files, *(f"{d}/" for d in dirs)):
        out.add(name)
        parent = os.path.dirname(name.rstrip("/"))
        while parent:
            out.add(f"{parent}/")
            parent = os.path.dirname(parent)
    out.discard(MARKER)
    return out


def discard(job_dir: Path) -> None:
    """Remove a job directory that was just written but will not run (a refused submission).

    Only a directory holding hpcdist's marker goes; anything else is left as it is.
    """
    import shutil

    if is_job_dir(job_dir):
        shutil.rmtree(job_dir, ignore_errors=True)
