"""Locate hpcdist's data folders (templates/, configs/) in a checkout or in an installed wheel."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """``templates`` or ``configs``: beside the package in a wheel, at the repository root in a checkout."""
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"hpcdist's {name}/ folder is missing: reinstall hpcdist (pip install .)")


def templates_dir() -> Path:
    return data_dir("templates")


def configs_dir() -> Path:
    return data_dir("configs")
