"""Expand, count and compress Slurm hostlist expressions such as ``gpu-[001-003,010],cpu[1-2]``, as Slurm does.

    >>> expand("a[1-2]b[3-4]")
    ['a1b3', 'a1b4', 'a2b3', 'a2b4']

The grammar and the order are Slurm 22.05's (``scontrol show hostnames``, checked by a property test):
commas and blanks separate hosts; a host is literal text and bracket groups of ``N`` or ``N-M`` items,
zero padding taken from the lower bound; a bracket group may not be followed by plain text (``n[1-3]-ib``
is refused, as Slurm refuses it); one range names at most 65,536 hosts. Where Slurm quietly makes
something of a malformed list (unbalanced brackets, ``n[1-]``, ``n[+1]``, blanks inside brackets) or of a
non-ASCII name, this module refuses it instead. Sizes are counted before anything is expanded.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from typing import Iterable, Iterator

# Slurm's MAX_RANGE: "Too many hosts in range" beyond this many in one N-M.
MAX_RANGE_HOSTS = 65536
# The most hosts expand() builds a list of by default: no job has more nodes than one range can name.
MAX_HOSTS = 65536
# Slurm reads bounds with strtoul, which saturates silently above this.
MAX_NUMBER = 2**64 - 1

# A term is plain characters and bracket groups; a group starts with '[' and nothing else does, so the
# pattern matches in one pass. What it leaves between terms must be separators, or brackets are unbalanced.
# Slurm separates on commas, blanks, tabs and newlines only (a \r or a no-break space is part of a name).
_TERM = re.compile(r"(?:[^, \t\n\[\]]|\[[^\[\]]*\])+")
_SEPARATORS = re.compile(r"[, \t\n]*")
_BODY = re.compile(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*")
_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_GROUP = re.compile(r"\[([^\]]*)\]")
_TRAILING_DIGITS = re.compile(r"(.*?)([0-9]+)")


class NodelistError(ValueError):
    """A hostlist expression that Slurm would not accept, or one too large to expand."""


# A term is one host pattern: literal text, then (group, literal) pairs; a group is ranges (lo, hi, width).
Range = tuple[int, int, int]
Term = tuple[str, tuple[tuple[tuple[Range, ...], str], ...]]


def _bracket_error(expr: str) -> None:
    """Raise NodelistError naming the first bracket out of place (only called when there is one)."""
    depth = False
    for i, ch in enumerate(expr):
        if ch == "[":
            if depth:
                raise NodelistError(f"nested '[' at offset {i} in {expr!r}")
            depth = True
        elif ch == "]":
            if not depth:
                raise NodelistError(f"unmatched ']' at offset {i} in {expr!r}")
            depth = False
    raise NodelistError(f"unclosed '[' in {expr!r}")


def _group(body: str, expr: str) -> tuple[Range, ...]:
    """``001-003,010`` -> ((1, 3, 3), (10, 10, 2)): each range with the width its lower bound is written in."""
    if not body:
        raise NodelistError(f"empty brackets in {expr!r}")
    if not _BODY.fullmatch(body):
        if any(ch.isspace() for ch in body):
            raise NodelistError(f"blank inside brackets [{body}] in {expr!r}")
        item = next(i for i in body.split(",") if not _ITEM.fullmatch(i))
        raise NodelistError(f"bad range {item!r} in {expr!r}: expected N or N-M with digits 0-9 only")
    ranges = []
    for low, high in _ITEM.findall(body):
        lo, hi = _bound(low, expr), _bound(high or low, expr)
        if hi < lo:
            raise NodelistError(f"range {low}-{high} in {expr!r} runs backwards")
        if hi - lo + 1 > MAX_RANGE_HOSTS:
            raise NodelistError(f"range {low}-{high} in {expr!r} names {hi - lo + 1:,} hosts; Slurm allows at "
                                f"most {MAX_RANGE_HOSTS:,} in one range")
        ranges.append((lo, hi, len(low)))
    return tuple(ranges)


def _bound(digits: str, expr: str) -> int:
    """A range's bound; its leading zeros are only its width. Counted before int() reads it: int() of more than
    4,300 digits raises an error of its own."""
    value = digits.lstrip("0") or "0"
    if len(value) > len(str(MAX_NUMBER)) or int(value) > MAX_NUMBER:
        raise NodelistError(f"bound {_short(digits, 30)} in {_short(expr)} is over {MAX_NUMBER}, which Slurm "
                            "cannot read")
    return int(value)


def _where(term: str, expr: str) -> str:
    """Name a term for an error: alone when it is the whole list (built only when raising: expr may be long)."""
    return repr(term) if term == expr.strip() else f"{term!r} in {_short(expr)}"


def _parse_term(term: str, expr: str) -> Term:
    if not term.isascii() or not term.isprintable():
        raise NodelistError(f"host {_where(term, expr)} has a non-ASCII or control character; host names are ASCII")
    pieces = _GROUP.split(term)  # literal, body, literal, body, ..., literal
    groups = tuple((_group(body, expr), literal) for body, literal in zip(pieces[1::2], pieces[2::2]))
    if groups and groups[-1][1]:
        raise NodelistError(f"{_where(term, expr)} has text after its last ']', which Slurm refuses "
                            f"(Invalid hostlist); write it as a list, e.g. n1-ib,n2-ib")
    return pieces[0], groups


@functools.lru_cache(maxsize=64)
def parse(expr: str) -> tuple[Term, ...]:
    """Check ``expr`` and return its terms; cost linear in the text, however many hosts it names."""
    if not _SEPARATORS.fullmatch(_TERM.sub("", expr)):
        _bracket_error(expr)
    terms = tuple(_parse_term(t, expr) for t in _TERM.findall(expr))
    if not terms:
        raise NodelistError("empty nodelist")
    return terms


def _term_size(term: Term) -> int:
    return math.prod(sum(hi - lo + 1 for lo, hi, _ in ranges) for ranges, _ in term[1])


@functools.lru_cache(maxsize=64)  # every rank of a ranks.txt counts the one nodelist again
def count(expr: str) -> int:
    """How many hosts ``expr`` names, repeats included, without building them."""
    return sum(_term_size(t) for t in parse(expr))


def _values(ranges: tuple[Range, ...]) -> list[str]:
    return [str(n).zfill(width) for lo, hi, width in ranges for n in range(lo, hi + 1)]


def _term_hosts(term: Term) -> Iterator[str]:
    """Slurm's order: the last group varies fastest, then the first, second, ... (so a[1-2]b[3-4]c[5-6] starts
    a1b3c5 a1b3c6 a2b3c5)."""
    head, groups = term
    if not groups:
        yield head
        return
    k = len(groups)
    order = [*range(k - 2, -1, -1), k - 1]  # slowest first, as itertools.product varies the last fastest
    pools = [_values(groups[g][0]) for g in order]
    for combo in itertools.product(*pools):
        values = dict(zip(order, combo))
        yield head + "".join(values[g] + groups[g][1] for g in range(k))


def expand(expr: str, limit: int = MAX_HOSTS) -> list[str]:
    """The host names of a Slurm nodelist, in Slurm's order, each once; refuses more than ``limit``."""
    size = count(expr)
    if size > limit:
        raise NodelistError(f"nodelist {_short(expr)} names {size:,} hosts; hpcdist handles at most {limit:,}")
    return list(dict.fromkeys(host for term in parse(expr) for host in _term_hosts(term)))


def expand_for(option: str, expr: str, error: type[ValueError]) -> list[str]:
    """``expand``, a refusal raised as ``error`` naming ``option`` and the form a nodelist takes."""
    try:
        return expand(expr)
    except NodelistError as exc:
        raise error(f"{option}: {exc}; give one Slurm nodelist such as n[1-2]") from None


def first(expr: str) -> str:
    """The first host of a nodelist (where rank 0 runs): the whole list is checked, nothing else expanded."""
    head, groups = parse(expr)[0]
    return head + "".join(str(ranges[0][0]).zfill(ranges[0][2]) + literal for ranges, literal in groups)


def compress(hosts: Iterable[str]) -> str:
    """A nodelist naming ``hosts`` in their order: runs of one prefix share brackets (n1,n2,n3,n7 -> n[1-3,7])."""
    out: list[str] = []
    # A host without trailing digits is its own run (prefix None), written as it is.
    split = ((m.group(1), m.group(2)) if (m := _TRAILING_DIGITS.fullmatch(h)) else (None, h) for h in hosts)
    for prefix, run in itertools.groupby(split, key=lambda pair: pair[0]):
        if prefix is None:
            out.extend(host for _, host in run)
            continue
        ranges: list[list[int]] = []  # [lo, hi, width]
        for _, digits in run:
            n, last = int(digits), ranges[-1] if ranges else None
            if last and n == last[1] + 1 and str(n).zfill(last[2]) == digits and n - last[0] < MAX_RANGE_HOSTS:
                last[1] = n
            else:
                ranges.append([n, n, len(digits)])
        items = [f"{str(lo).zfill(w)}" + (f"-{str(hi).zfill(w)}" if hi > lo else "") for lo, hi, w in ranges]
        single = len(ranges) == 1 and ranges[0][0] == ranges[0][1]
        out.append(prefix + (items[0] if single else f"[{','.join(items)}]"))
    return ",".join(out)


def _short(expr: str, width: int = 60) -> str:
    return repr(expr if len(expr) <= width else expr[:width] + "...")

