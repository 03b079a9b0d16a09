"""Where cluster profiles, site templates and the default cluster come from: the search path, highest level first.

    levels(os.environ)           # $HPCDIST_CLUSTERS entries, user, system, built-in
    find("gpu", levels(env))      # the first profile of that name, or None
    default_cluster(os.environ)   # ("gpu", "/etc/hpcdist/config.yaml")

A profile named on the command line as a YAML path sits above every level. Each level is a ``clusters/``
directory of ``NAME.yaml`` files with a ``templates/`` directory beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpc import jobfiles, paths, shown

CLUSTERS_ENV = "HPCDIST_CLUSTERS"
CLUSTER_ENV = "HPCDIST_CLUSTER"
SYSTEM_ENV = "HPCDIST_SYSTEM_DIR"
SYSTEM_DIR = "/etc/hpcdist"
CONFIG_FILE = "config.yaml"
CONFIG_KEYS = ("default_cluster",)
BUILTIN_DEFAULT = "local"
SUFFIXES = (".yaml", ".yml")
# What `hpcdist clusters` calls each level; the command line (a YAML path) is above all of them.
COMMAND_LINE = "command line"
FROM_ENV = "$" + CLUSTERS_ENV
USER = "user"
SYSTEM = "system"
BUILTIN = "built-in"


class SiteError(ValueError):
    """A site or user configuration file that cannot be read; the message is one line naming the fix."""


@dataclass(frozen=True)
class Level:
    """One place profiles are looked up: its clusters/ directory and the templates/ beside it."""

    origin: str
    clusters: Path
    templates: Path


@dataclass(frozen=True)
class Found:
    """A profile file at one level; ``shadowed_by`` names the higher level whose file of that name wins."""

    name: str
    path: Path
    origin: str
    level: int
    shadowed_by: str | None = None


def user_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/hpcdist``, by default ``~/.config/hpcdist``."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or "~").expanduser() / ".config")
    return Path(base).expanduser() / "hpcdist"


def system_dir(environ: Mapping[str, str]) -> Path:
    """``/etc/hpcdist`` unless $HPCDIST_SYSTEM_DIR moves it (tests, installs without root)."""
    return Path(environ.get(SYSTEM_ENV) or SYSTEM_DIR).expanduser()


def levels(environ: Mapping[str, str]) -> tuple[Level, ...]:
    """The search path, highest precedence first: $HPCDIST_CLUSTERS (``:``-separated), user, system, built-in."""
    listed = [Path(entry.strip()).expanduser() for entry in environ.get(CLUSTERS_ENV, "").split(":") if entry.strip()]
    out = [Level(FROM_ENV, clusters, clusters.parent / "templates") for clusters in listed]
    for origin, root in ((USER, user_dir(environ)), (SYSTEM, system_dir(environ))):
        out.append(Level(origin, root / "clusters", root / "templates"))
    out.append(Level(BUILTIN, paths.configs_dir() / "clusters", paths.templates_dir()))
    for level in out:
        if jobfiles.name_too_long(str(level.clusters)):
            raise SiteError(f"the {level.origin} clusters directory {str(level.clusters)[:60]}... has a name longer "
                            f"than {jobfiles.MAX_NAME_BYTES} bytes; fix ${CLUSTERS_ENV}, $HOME or $XDG_CONFIG_HOME")
    return tuple(out)


def find(name: str, search: Sequence[Level], below: int = -1) -> Found | None:
    """The first profile called ``name`` at a level after index ``below`` (a profile extending its own name
    looks below itself)."""
    if jobfiles.name_too_long(name + SUFFIXES[0]):
        return None
    for index, level in enumerate(search[below + 1:], start=below + 1):
        for suffix in SUFFIXES:
            path = level.clusters / f"{name}{suffix}"
            if path.is_file():
                return Found(name, path, level.origin, index)
    return None


def level_of(path: Path, search: Sequence[Level]) -> int:
    """The index of the level whose clusters/ holds ``path``, or -1 (a file named on the command line)."""
    parent = path.resolve().parent
    for index, level in enumerate(search):
        try:
            if level.clusters.resolve() == parent:
                return index
        except OSError:
            continue
    return -1


def discover(search: Sequence[Level]) -> list[Found]:
    """Every profile file at every level, in search order; a name seen at a higher level is shadowed."""
    out: list[Found] = []
    winner: dict[str, str] = {}
    for index, level in enumerate(search):
        try:
            files = sorted(p for p in level.clusters.iterdir() if p.suffix in SUFFIXES and p.is_file())
        except OSError:
            continue
        seen_here: set[str] = set()
        for path in files:
            if path.stem in seen_here:  # local.yaml and local.yml side by side: .yaml wins, as find() does
                continue
            seen_here.add(path.stem)
            out.append(Found(path.stem, path, level.origin, index, winner.get(path.stem)))
            winner.setdefault(path.stem, level.origin)
    return out


def template_dirs(environ: Mapping[str, str]) -> tuple[str, ...]:
    """Every level's templates/ that exists, in search order; the built-in templates come last."""
    return tuple(str(level.templates) for level in levels(environ) if level.templates.is_dir())


def read_mapping(path: Path, what: str, error: type[ValueError], not_mapping: str) -> dict[str, Any]:
    """The YAML mapping in a profile or config file, {} for an empty one; else ``error``, saying ``not_mapping``
    where the file holds something else."""
    from hpc import yamlfile

    try:
        data = yamlfile.load(path, what)
    except yamlfile.YamlError as exc:
        raise error(str(exc)) from None
    if data is not None and not isinstance(data, dict):
        raise error(not_mapping)
    return data or {}


def read_config(path: Path) -> dict[str, Any]:
    """A config file's mapping, checked: unknown keys and non-string values are errors; {} for no file."""
    if not os.path.lexists(path):
        return {}
    data = read_mapping(path, "config file", SiteError, f"{path} must be a YAML mapping (e.g. default_cluster: NAME)")
    unknown = [k for k in data if k not in CONFIG_KEYS]
    if unknown:
        raise SiteError(f"{path}: {shown.unknown_keys(unknown, CONFIG_KEYS)}")
    value = data.get("default_cluster")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SiteError(f"{path}: default_cluster must be a profile name or path, got {value!r}")
    return {k: v for k, v in data.items() if v is not None}


def default_cluster(environ: Mapping[str, str]) -> tuple[str, str]:
    """(profile, where it was set): $HPCDIST_CLUSTER, else the user's then the system's config, else local."""
    if environ.get(CLUSTER_ENV, "").strip():
        return environ[CLUSTER_ENV].strip(), "$" + CLUSTER_ENV
    for path in (user_dir(environ) / CONFIG_FILE, system_dir(environ) / CONFIG_FILE):
        value = read_config(path).get("default_cluster")
        if value:
            return value.strip(), str(path)
    return BUILTIN_DEFAULT, "built-in default"
