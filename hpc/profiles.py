"""Load cluster profiles into frozen dataclasses: found through the site search path, parents merged in."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from hpc import container as containers
from hpc import dsconfig, jobfiles, plan, ranks, shown, sites
from hpc.container import Container
from hpc.spec import MAX_INT, SpecError, time_seconds, unwritable

# The network section names the variables NCCL and Gloo read, spelled as they are exported, each with what
# NCCL and Gloo accept for it: a value outside it is ignored or misread at run time, far from the profile
# that set it.
_IFNAMES = re.compile(r"\^?=?[A-Za-z0-9_.:-]+(,\^?=?[A-Za-z0-9_.:-]+)*")
NETWORK_VALUES = {
    "NCCL_IB_HCA": (re.compile(r"\^?=?[A-Za-z0-9_.-]+(:[0-9]+)?(,[A-Za-z0-9_.-]+(:[0-9]+)?)*"),
                    "HCA names, e.g. mlx5_0,mlx5_1 (optionally ^ or = first, :PORT after a name)"),
    "NCCL_SOCKET_IFNAME": (_IFNAMES, "interface names or prefixes, e.g. ib0 or ^docker,lo"),
    "NCCL_IB_GID_INDEX": (re.compile(r"[0-9]{1,3}"), "a GID index from 0 to 255"),
    "NCCL_NET_GDR_LEVEL": (re.compile(r"[0-5]|LOC|PIX|PXB|PHB|SYS|NVL"),
                           "LOC, PIX, PXB, PHB, SYS (or a level 0-5)"),
    "GLOO_SOCKET_IFNAME": (_IFNAMES, "interface names, e.g. ib0"),
}
NETWORK_KEYS = ("ib", *NETWORK_VALUES)
KEYS = ("partition", "account", "time", "gpus_per_node", "gpu_memory", "cpus_per_task", "cpu_bf16", "max_nodes",
        "modules", "setup", "env", "templates", "python", "network", "extends", "slurm_cluster", "container")
# Mappings a child profile merges key by key into its parent's; every other key (lists included) replaces.
MERGED_KEYS = ("env", "network", "container")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ProfileError(ValueError):
    """A cluster profile that is missing or malformed; the message is one line naming the fix."""


@dataclass(frozen=True)
class Network:
    """How ranks reach each other: InfiniBand HCAs and interfaces, or plain TCP sockets."""

    ib: bool = True
    variables: tuple[tuple[str, str], ...] = ()

    def env(self) -> dict[str, str]:
        out = dict(self.variables)
        if not self.ib:
            out["NCCL_IB_DISABLE"] = "1"
        return out


@dataclass(frozen=True)
class Profile:
    """One site's defaults: where jobs go, what each node has, and how a job's shell is prepared."""

    name: str
    slurm_cluster: str | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    gpus_per_node: int = 0
    gpu_memory: int | None = None
    cpus_per_task: int = 1
    cpu_bf16: bool | None = None  # the CPU nodes compute bf16 natively (--precision auto); None: not known
    max_nodes: int | None = None
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    templates: str | None = None
    python: str | None = None
    network: Network = field(default_factory=Network)
    container: Container | None = None  # the site's runtime, mounts and GPU flag; an image every job gets
    source: str | None = None  # the file it was loaded from

    def cpus(self) -> dsconfig.Cpus:
        """What --precision auto knows of this site's CPU nodes."""
        return dsconfig.Cpus(self.cpu_bf16, f"cluster {self.name}'s CPU nodes")

    def environment(self) -> dict[str, str]:
        """Every variable setup.sh exports: the network's, then the profile's own env (which wins)."""
        return {**self.network.env(), **dict(self.env)}


def is_path(name: str) -> bool:
    """A YAML path (``site.yaml``, ``./x``) rather than a profile name looked up on the search path."""
    return name.endswith(sites.SUFFIXES) or "/" in name


def _find(name: str, search: tuple[sites.Level, ...]) -> sites.Found:
    if not name or unwritable(name):
        raise ProfileError(f"cluster {ascii(name)} is not a profile name or a file name; give one")
    if jobfiles.name_too_long(name if is_path(name) else name + sites.SUFFIXES[0]):
        raise ProfileError(f"cluster {name[:40]!r}... is longer than a file name can be "
                           f"({jobfiles.MAX_NAME_BYTES} bytes); give a shorter one")
    if is_path(name):
        path = Path(name).expanduser()
        if path.is_dir():
            raise ProfileError(f"cluster profile {name} is a directory; give the YAML file itself")
        if not path.is_file():
            raise ProfileError(f"cluster profile file {name} does not exist")
        path = path.resolve()
        level = sites.level_of(path, search)
        return sites.Found(path.stem, path, search[level].origin if level >= 0 else sites.COMMAND_LINE, level)
    found = sites.find(name, search)
    if found is None:
        known = sorted({f.name for f in sites.discover(search)})
        raise ProfileError(f"unknown cluster {name!r}; choose one of {', '.join(known)} or pass a path to a YAML "
                           "file (see `hpcdist clusters`)")
    return found


def _int(name: str, value: Any, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= MAX_INT:
        raise ProfileError(f"{name} must be a whole number from {lowest} to {MAX_INT}, got {shown.value(value)}")
    return value


def _str(name: str, value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ProfileError(f"{name} must be a string, got {shown.value(value)}")
    text = str(value)
    if unwritable(text):
        raise ProfileError(f"{name} {shown.value(text)} holds a NUL byte or a lone surrogate, which no script can "
                           "carry; remove it")
    return text


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ProfileError(f"{name} must be a list of strings, got {shown.value(value)}")
    return tuple(_str(name, v) for v in value)


def _variables(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ProfileError(f"{name} must be a mapping of variable names to values, got {shown.value(value)}")
    out = []
    for key, val in value.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise ProfileError(f"{name}: {shown.value(key)} is not a shell variable name")
        out.append((key, "1" if val is True else "0" if val is False else _str(f"{name}.{key}", val)))
    return tuple(out)


def _env(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    variables = _variables(name, value)
    # setup.sh exports env to every task, where these would beat the ranks srun gives (RANK, WORLD_SIZE and
    # LOCAL_RANK make each task rank 0 of a world of one); MASTER_ADDR/PORT only move the rendezvous.
    rank = next((k for k, _ in variables if k in ranks.TORCHRUN.values()), None)
    if rank:
        raise ProfileError(f"{name}.{rank} would give every task of every job the same rank geometry; remove it "
                           "(the launcher sets it per rank; only MASTER_ADDR and MASTER_PORT may be set here)")
    return variables


def _network_value(key: str, value: str) -> str:
    pattern, accepted = NETWORK_VALUES[key]
    if not pattern.fullmatch(value) or (key == "NCCL_IB_GID_INDEX" and int(value) > 255):
        raise ProfileError(f"network.{key} {shown.value(value)} is not one NCCL reads; give {accepted}")
    return value


def parse(name: str, data: Mapping[str, Any]) -> Profile:
    """A Profile from a YAML mapping (``load`` has made a relative ``templates`` directory absolute)."""
    if not isinstance(data, dict):
        raise ProfileError(f"cluster profile {name!r} must be a YAML mapping")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ProfileError(f"cluster profile {shown.value(name)}: {shown.unknown_keys(unknown, KEYS)}")
    values: dict[str, Any] = {"name": name}
    for key in ("slurm_cluster", "partition", "account", "python"):
        if data.get(key) is not None:
            values[key] = _str(key, data[key])
    # Only absurd values here; hpc.spec's bounds judge the job that uses them.
    for key, lowest in (("gpus_per_node", 0), ("cpus_per_task", 1), ("max_nodes", 1)):
        if data.get(key) is not None:
            values[key] = _int(key, data[key], lowest)
    if data.get("cpu_bf16") is not None:
        if not isinstance(data["cpu_bf16"], bool):
            raise ProfileError(f"cluster profile {shown.value(name)}: cpu_bf16 must be true or false, got "
                               f"{shown.value(data['cpu_bf16'])}")
        values["cpu_bf16"] = data["cpu_bf16"]
    if data.get("time") is not None:
        values["time"] = _str("time", data["time"])
        try:
            time_seconds(values["time"])
        except SpecError as exc:
            raise ProfileError(f"cluster profile {name!r}: time: {exc}") from None
    if data.get("gpu_memory") is not None:
        try:
            values["gpu_memory"] = plan.parse_bytes(str(data["gpu_memory"]))
        except plan.PlanError as exc:
            raise ProfileError(f"cluster profile {name!r}: gpu_memory: {exc}") from None
    for key, convert in (("modules", _strings), ("setup", _strings), ("env", _env)):
        if data.get(key) is not None:
            values[key] = convert(key, data[key])
    if data.get("templates") is not None:
        values["templates"] = str(Path(_str("templates", data["templates"])).expanduser())
    if data.get("container") is not None:
        if not isinstance(data["container"], dict):
            raise ProfileError("container must be a mapping (runtime, image, mounts, gpus, env)")
        try:
            values["container"] = containers.from_mapping(data["container"], image_required=False)
        except containers.ContainerError as exc:
            raise ProfileError(f"cluster profile {shown.value(name)}: {exc}") from None
    if data.get("network") is not None:
        net = data["network"]
        if not isinstance(net, dict):
            raise ProfileError("network must be a mapping")
        bad = [k for k in net if k not in NETWORK_KEYS]
        if bad:
            raise ProfileError(f"network: {shown.unknown_keys(bad, NETWORK_KEYS)}")
        ib = net.get("ib", True)
        if not isinstance(ib, bool):
            raise ProfileError(f"network.ib must be true or false, got {shown.value(ib)}")
        variables = _variables("network", {k: v for k, v in net.items() if k != "ib" and v is not None})
        values["network"] = Network(ib=ib, variables=tuple((k, _network_value(k, v)) for k, v in variables))
    return Profile(**values)


def read(path: Path) -> dict[str, Any]:
    """One profile file's own mapping, its ``extends`` unresolved ({} for an empty file); ProfileError if none."""
    return sites.read_mapping(path, "cluster profile", ProfileError,
                              f"cluster profile {str(path)!r} must be a YAML mapping")


# Site profiles extend one or two others; a deeper chain is a mistake, and each link is a file to read.
MAX_EXTENDS = 16


def merge(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """A child profile over its parent: env and network merge key by key, any other key (lists too) replaces.

    A key set to null in the child drops the parent's value (``account: null``, ``env: {NCCL_DEBUG: null}``).
    """
    out = dict(parent)
    for key, value in child.items():
        if key in MERGED_KEYS and isinstance(value, dict) and isinstance(parent.get(key), dict):
            value = {**parent[key], **value}
        out[key] = value
    for key in MERGED_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if v is not None}
    return out


def _chain_text(chain: list[sites.Found]) -> str:
    return " -> ".join(f"{f.name} ({f.path})" for f in chain)


def resolve_data(found: sites.Found, search: tuple[sites.Level, ...],
                 chain: tuple[sites.Found, ...] = ()) -> dict[str, Any]:
    """The profile's mapping with every ``extends`` parent merged in; ``chain``: the files that extend it."""
    chain = (*chain, found)
    data = read(found.path)
    if data.get("templates") is not None and not isinstance(data["templates"], (dict, list, bool)):
        # Relative to the file that says it, not to the child that inherits it.
        templates = Path(str(data["templates"])).expanduser()
        data["templates"] = str(templates if templates.is_absolute() else found.path.parent / templates)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ProfileError(f"cluster profile {found.name!r} ({found.path}): extends must be a profile name or path, "
                           f"got {parent!r}")
    parent = parent.strip()
    if len(chain) >= MAX_EXTENDS:
        raise ProfileError(f"cluster profile {chain[0].name!r} extends more than {MAX_EXTENDS} profiles deep "
                           f"({_chain_text([chain[0], chain[-1]]).replace(' -> ', ' -> ... -> ')}); shorten the chain")
    if jobfiles.name_too_long(parent if is_path(parent) else parent + sites.SUFFIXES[0]):
        raise ProfileError(f"cluster profile {found.name!r} ({found.path}): extends names {parent[:40]!r}..., longer "
                           "than a file name can be; fix extends")
    if is_path(parent) and not Path(parent).expanduser().is_absolute():
        parent = str(found.path.parent / parent)
    if is_path(parent):
        parent_found = _find(parent, search)
    else:
        # A profile may extend its own name: the site's `local` over the built-in `local`.
        parent_found = sites.find(parent, search, below=found.level if parent == found.name else -1)
        if parent_found is None:
            raise ProfileError(f"cluster profile {found.name!r} extends unknown profile {parent!r} (chain: "
                               f"{_chain_text(list(chain))} -> {parent}); fix extends or add {parent}.yaml to a "
                               "clusters directory")
    if any(f.path.resolve() == parent_found.path.resolve() for f in chain):
        raise ProfileError(f"cluster profile {chain[0].name!r} extends itself: "
                           f"{_chain_text([*chain, parent_found])}; remove one extends")
    return merge(resolve_data(parent_found, search, chain), data)


def load(name: str, environ: Mapping[str, str] | None = None) -> Profile:
    """Load a profile by name from the search path (see hpc.sites) or from a YAML path, parents merged in."""
    try:
        search = sites.levels(os.environ if environ is None else environ)
    except sites.SiteError as exc:
        raise ProfileError(str(exc)) from None
    found = _find(name, search)
    display = found.name if found.level >= 0 else str(found.path)
    return replace(parse(display, resolve_data(found, search)), source=str(found.path))
