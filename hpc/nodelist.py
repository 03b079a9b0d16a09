"""Expand and compress Slurm hostlist expressions such as ``gpu-[001-003,010],cpu[1-2]``."""

from __future__ import annotations

import re


class NodelistError(ValueError):
    """A hostlist expression that Slurm would not accept."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            if depth:
                raise NodelistError(f"nested '[' at offset {i} in {expr!r}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise NodelistError(f"unmatched ']' at offset {i} in {expr!r}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise NodelistError(f"unclosed '[' in {expr!r}")
    parts.append(expr[start:])
    return parts


def _expand_brackets(body: str, expr: str) -> list[str]:
    """``001-003,010`` -> ['001', '002', '003', '010'] (zero padding follows the lower bound)."""
    values = []
    for item in body.split(","):
        m = _RANGE.match(item)
        if not m:
            raise NodelistError(f"bad range {item!r} in {expr!r}: expected N or N-M with digits only")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise NodelistError(f"range {item!r} in {expr!r} runs backwards")
        width = len(lo)
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def _expand_host(term: str, expr: str) -> list[str]:
    """Expand one comma-free term, taking the product of all of its bracket groups."""
    hosts = [""]
    for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", term):
        if body:
            hosts = [h + literal + v for h in hosts for v in _expand_brackets(body, expr)]
        else:
            hosts = [h + literal for h in hosts]
    return hosts


def expand(expr: str) -> list[str]:
    """Return the host names of a Slurm nodelist, in Slurm's order, duplicates kept out."""
    expr = expr.strip()
    if not expr:
        raise NodelistError("empty nodelist")
    if any(ch.isspace() for ch in expr):
        raise NodelistError(f"whitespace inside nodelist {expr!r}")
    seen: dict[str, None] = {}
    for term in _split_top_level(expr):
        if not term:
            raise NodelistError(f"empty host name in {expr!r} (doubled or trailing comma?)")
        if "[]" in term:
            raise NodelistError(f"empty brackets in {expr!r}")
        for host in _expand_host(term, expr):
            seen.setdefault(host, None)
    return list(seen)


def first(expr: str) -> str:
    """The first host of a nodelist: where rank 0 runs and MASTER_ADDR points."""
    return expand(expr)[0]
