"""Nodelist expansion: Slurm's hostlist grammar, by example and against ``scontrol show hostnames``."""

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc import nodelist

EXAMPLES = [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu-[001-003,010],cpu[1-2]", ["gpu-001", "gpu-002", "gpu-003", "gpu-010", "cpu1", "cpu2"]),
    ("rack[1-2]-node[09-10]", ["rack1-node09", "rack1-node10", "rack2-node09", "rack2-node10"]),
    ("a,b[7],c", ["a", "b7", "c"]),
    ("x[8-11]", ["x8", "x9", "x10", "x11"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
]


@pytest.mark.parametrize("expr,hosts", EXAMPLES)
def test_expand(expr, hosts):
    assert nodelist.expand(expr) == hosts


@pytest.mark.parametrize("expr,message", [
    ("", "empty nodelist"), ("n[1-", "unclosed"), ("n1]", "unmatched"), ("n[a-b]", "bad range"),
    ("n[3-1]", "backwards"), ("n[]", "empty brackets"), ("a,,b", "empty host"), ("n[[1]]", "nested"),
    ("a b", "whitespace"),
])
def test_malformed_nodelists_are_errors(expr, message):
    with pytest.raises(nodelist.NodelistError, match=message):
        nodelist.expand(expr)


def test_first_is_where_rank_zero_runs():
    assert nodelist.first("gpu-[010,001]") == "gpu-010"


ranges = st.tuples(st.integers(0, 120), st.integers(0, 6), st.integers(1, 3)).map(
    lambda t: f"{str(t[0]).zfill(t[2])}-{str(t[0] + t[1]).zfill(t[2])}" if t[1] else str(t[0]).zfill(t[2]))
term = st.tuples(st.sampled_from(["n", "gpu-", "rack", "x"]),
                 st.lists(ranges, min_size=1, max_size=3),
                 st.sampled_from(["", "-b[1-2]", "-ib[0-1]"]))


def _render_term(t):
    pre, rs, suffix = t
    return f"{pre}[{','.join(rs)}]{suffix}"


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's scontrol")
@settings(max_examples=60, deadline=None)
@given(st.lists(term, min_size=1, max_size=3))
def test_expansion_matches_scontrol(terms):
    expr = ",".join(_render_term(t) for t in terms)
    out = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True)
    ours = nodelist.expand(expr)
    theirs = out.stdout.split()
    assert out.returncode == 0, out.stderr
    # Slurm keeps repeats when terms overlap; we drop them (a host runs once). Order must match.
    assert ours == list(dict.fromkeys(theirs))
