"""Load cluster profiles (configs/clusters/*.yaml) into frozen dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from hpc import paths, plan

# The network section names the variables NCCL and Gloo read, spelled as they are exported.
NETWORK_VARS = ("NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_IB_GID_INDEX", "NCCL_NET_GDR_LEVEL",
                "GLOO_SOCKET_IFNAME")
NETWORK_KEYS = ("ib",) + NETWORK_VARS
KEYS = ("partition", "account", "gpus_per_node", "gpu_memory", "cpus_per_task", "max_nodes", "modules", "setup",
        "env", "templates", "python", "network")
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
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = 0
    gpu_memory: int | None = None
    cpus_per_task: int = 1
    max_nodes: int | None = None
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    templates: str | None = None
    python: str | None = None
    network: Network = field(default_factory=Network)

    def environment(self) -> dict[str, str]:
        """Every variable setup.sh exports: the network's, then the profile's own env (which wins)."""
        return {**self.network.env(), **dict(self.env)}


def available() -> list[str]:
    return sorted(p.stem for p in (paths.configs_dir() / "clusters").glob("*.yaml"))


def locate(name: str) -> Path:
    """A profile name (``local``) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ProfileError(f"cluster profile file {name} does not exist")
        return path.resolve()
    path = paths.configs_dir() / "clusters" / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown cluster {name!r}; choose one of {', '.join(available())} or pass a "
                           "path to a YAML file")
    return path


def _int(name: str, value: Any, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ProfileError(f"{name} must be a whole number >= {lowest}, got {value!r}")
    return value


def _str(name: str, value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ProfileError(f"{name} must be a string, got {value!r}")
    return str(value)


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ProfileError(f"{name} must be a list of strings, got {value!r}")
    return tuple(_str(name, v) for v in value)


def _variables(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ProfileError(f"{name} must be a mapping of variable names to values, got {value!r}")
    out = []
    for key, val in value.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise ProfileError(f"{name}: {key!r} is not a shell variable name")
        out.append((key, "1" if val is True else "0" if val is False else _str(f"{name}.{key}", val)))
    return tuple(out)


def parse(name: str, data: Mapping[str, Any], base: Path | None = None) -> Profile:
    """A Profile from a YAML mapping; ``base`` anchors a relative ``templates`` directory."""
    if not isinstance(data, dict):
        raise ProfileError(f"cluster profile {name!r} must be a YAML mapping")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ProfileError(f"cluster profile {name!r}: unknown key(s) {', '.join(map(str, unknown))}; valid "
                           f"keys: {', '.join(KEYS)}")
    values: dict[str, Any] = {"name": name}
    for key in ("partition", "account", "python"):
        if data.get(key) is not None:
            values[key] = _str(key, data[key])
    for key, lowest in (("gpus_per_node", 0), ("cpus_per_task", 1), ("max_nodes", 1)):
        if data.get(key) is not None:
            values[key] = _int(key, data[key], lowest)
    if data.get("gpu_memory") is not None:
        try:
            values["gpu_memory"] = plan.parse_bytes(str(data["gpu_memory"]))
        except plan.PlanError as exc:
            raise ProfileError(f"cluster profile {name!r}: gpu_memory: {exc}") from None
    for key in ("modules", "setup"):
        if data.get(key) is not None:
            values[key] = _strings(key, data[key])
    if data.get("env") is not None:
        values["env"] = _variables("env", data["env"])
    if data.get("templates") is not None:
        templates = Path(_str("templates", data["templates"])).expanduser()
        values["templates"] = str(templates if templates.is_absolute() or base is None else base / templates)
    if data.get("network") is not None:
        net = data["network"]
        if not isinstance(net, dict):
            raise ProfileError("network must be a mapping")
        bad = sorted(set(net) - set(NETWORK_KEYS))
        if bad:
            raise ProfileError(f"network: unknown key(s) {', '.join(map(str, bad))}; valid keys: "
                               f"{', '.join(NETWORK_KEYS)}")
        ib = net.get("ib", True)
        if not isinstance(ib, bool):
            raise ProfileError(f"network.ib must be true or false, got {ib!r}")
        values["network"] = Network(ib=ib, variables=_variables(
            "network", {k: v for k, v in net.items() if k != "ib" and v is not None}))
    return Profile(**values)


def load(name: str) -> Profile:
    """Load a profile by name from configs/clusters/ or from a YAML path."""
    path = locate(name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read cluster profile {path}: {str(exc).splitlines()[0]}") from None
    return parse(path.stem if path.parent == paths.configs_dir() / "clusters" else str(path),
                 data or {}, path.parent)
