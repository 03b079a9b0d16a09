"""``hpcdist clusters``: every cluster profile on the search path, where it came from, the default, what is shadowed.

    hpcdist clusters
    hpcdist clusters --json
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import click

from hpc import profiles, shown, sites
from hpc.commands.options import fail


def _extends(found: sites.Found) -> str | None:
    try:
        value = profiles.read(found.path).get("extends")
    except profiles.ProfileError:
        # The listing still shows the file; `hpcdist profile check` names what is wrong with it.
        return None
    return value if isinstance(value, str) else None


def report(environ: Mapping[str, str]) -> dict[str, Any]:
    """The listing as plain values: what ``--json`` prints and the table is drawn from."""
    search = sites.levels(environ)
    name, set_by = sites.default_cluster(environ)
    found = sites.discover(search)
    winner = next((f for f in found if f.name == name and f.shadowed_by is None), None)
    named_file = profiles.is_path(name) and os.path.isfile(os.path.expanduser(name))  # False for an overlong name
    return {
        "default": {"name": name, "set_by": set_by, "found": winner is not None or named_file},
        "profiles": [{"name": f.name, "origin": f.origin, "path": str(f.path),
                      "default": f is winner, "shadowed_by": f.shadowed_by, "extends": _extends(f)}
                     for f in found],
        "search_path": [{"origin": level.origin, "clusters": str(level.clusters), "templates": str(level.templates),
                         "exists": level.clusters.is_dir()} for level in search],
    }


def table(rep: Mapping[str, Any]) -> str:
    rows = [("NAME", "FROM", "NOTE", "PATH")]
    for p in rep["profiles"]:
        notes = ["default"] if p["default"] else []
        notes += [f"shadowed by {p['shadowed_by']}"] if p["shadowed_by"] else []
        notes += [f"extends {p['extends']}"] if p["extends"] else []
        rows.append((p["name"], p["origin"], ", ".join(notes) or "-", p["path"]))
    lines = shown.aligned(rows)
    d = rep["default"]
    lines.append(f"default cluster: {d['name']} (set by {d['set_by']})" + ("" if d["found"] else " -- NOT FOUND"))
    lines.append("search path (first wins): " + "; ".join(
        f"{s['origin']} {s['clusters']}" + ("" if s["exists"] else " (absent)") for s in rep["search_path"]))
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def clusters(as_json: bool) -> None:
    """List the cluster profiles found ($HPCDIST_CLUSTERS, user, system, built-in), the default, and shadowing."""
    try:
        rep = report(os.environ)
    except sites.SiteError as exc:
        fail("clusters", exc)
    click.echo(json.dumps(rep, indent=2) if as_json else table(rep))
