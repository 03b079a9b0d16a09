"""Nodelist expansion: Slurm's hostlist grammar, by example and against ``scontrol show hostnames``."""

import shutil
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
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
    ("n[1-003]", ["n1", "n2", "n3"]),              # padding follows the lower bound only
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ("[1-2]", ["1", "2"]),
    # What scontrol show hostnames prints for three and more groups: the last group varies fastest,
    # then the first, then the second, ...
    ("a[1-2]b[3-4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]),
    ("a[1-3]b[4-5]c[6-7]", ["a1b4c6", "a1b4c7", "a2b4c6", "a2b4c7", "a3b4c6", "a3b4c7",
                            "a1b5c6", "a1b5c7", "a2b5c6", "a2b5c7", "a3b5c6", "a3b5c7"]),
    ("a[2,1]b[4,3]c[6,5]", ["a2b4c6", "a2b4c5", "a1b4c6", "a1b4c5", "a2b3c6", "a2b3c5", "a1b3c6", "a1b3c5"]),
    ("a[1-2]b[3-4]c[5-6]d[7-8]", ["a1b3c5d7", "a1b3c5d8", "a2b3c5d7", "a2b3c5d8", "a1b4c5d7", "a1b4c5d8",
                                  "a2b4c5d7", "a2b4c5d8", "a1b3c6d7", "a1b3c6d8", "a2b3c6d7", "a2b3c6d8",
                                  "a1b4c6d7", "a1b4c6d8", "a2b4c6d7", "a2b4c6d8"]),
    # Blanks separate hosts like commas (Slurm and Lightning accept "n1 n2"); runs of them are one separator.
    ("n[1-2] n5", ["n1", "n2", "n5"]),
    (" n1,,  n2\t", ["n1", "n2"]),
    ("n1,n1,n[1-2]", ["n1", "n2"]),                # a host runs once
]


@pytest.mark.parametrize("expr,hosts", EXAMPLES)
def test_expand(expr, hosts):
    assert nodelist.expand(expr) == hosts
    assert nodelist.first(expr) == hosts[0]


@pytest.mark.parametrize("expr,message", [
    # Refused by scontrol show hostnames as well (Slurm 22.05: "Invalid hostlist").
    ("n[1-3]-ib", "text after its last ']'"), ("n[1-2]x[3]y", "text after its last ']'"),
    ("n[3-1]", "backwards"), ("n[]", "empty brackets"), ("n[1-2,]", "bad range"), ("n[-1]", "bad range"),
    ("n[[1]]", "nested"), ("n[1-2]]", "unmatched"), ("n[١-٣]", "non-ASCII"), ("n[0-65536]", "at most 65,536"),
    ("n[0-99999999]", "at most 65,536"),
    # Slurm makes something of these; we refuse them.
    ("", "empty nodelist"), (" , ", "empty nodelist"), ("n[1-", "unclosed"), ("n1]", "unmatched"),
    ("n[1-]", "bad range"), ("n[+1]", "bad range"), ("n[1 -2]", "blank inside brackets"),
    ("n١", "non-ASCII"), ("n\x01", "control character"),
    ("n1\rn2", "control character"), ("n1\xa0n2", "non-ASCII"), ("n[99999999999999999999]", "cannot read"),
])
def test_malformed_nodelists_are_errors(expr, message):
    with pytest.raises(nodelist.NodelistError, match=message):
        nodelist.expand(expr)
    with pytest.raises(nodelist.NodelistError, match=message):
        nodelist.first(expr)


def test_a_bound_of_thousands_of_digits_is_refused_as_any_bound_slurm_cannot_read():
    """Python's int() refuses over 4,300 digits with an error of its own; the bound is judged before it reads."""
    for expr in ("n[" + "9" * 5000 + "]", "n[1-" + "9" * 5000 + "]", "n[1-2]x[" + "1" * 4301 + "]"):
        with pytest.raises(nodelist.NodelistError, match="cannot read"):
            nodelist.expand(expr)
        with pytest.raises(nodelist.NodelistError, match="cannot read"):
            nodelist.first(expr)


def test_leading_zeros_are_width_however_many():
    zeros = "0" * 5000
    assert nodelist.expand(f"n[{zeros}1-{zeros}2]") == [f"n{zeros}1", f"n{zeros}2"]
    assert nodelist.expand("n[18446744073709551615]") == ["n18446744073709551615"]


def test_the_largest_range_slurm_allows_is_accepted():
    assert nodelist.count("n[0-65535]") == 65536
    assert nodelist.expand("n[1-65536]")[-1] == "n65536"


def test_sizes_are_counted_not_built():
    huge = "a[0-65535]b[0-65535]c[0-65535]"
    started = time.process_time()  # CPU time: the CPUs may be shared (scripts/test.sh)
    assert nodelist.count(huge) == 65536 ** 3
    assert nodelist.first(huge) == "a0b0c0"
    with pytest.raises(nodelist.NodelistError, match=r"names 281,474,976,710,656 hosts; hpcdist handles at most"):
        nodelist.expand(huge)
    assert time.process_time() - started < 1  # the guard against building 2**48 names, not a speed goal


def test_first_is_where_rank_zero_runs():
    assert nodelist.first("gpu-[010,001]") == "gpu-010"


def test_expand_limit_is_the_callers():
    with pytest.raises(nodelist.NodelistError, match="names 3 hosts; hpcdist handles at most 2"):
        nodelist.expand("n[1-3]", limit=2)


@pytest.mark.parametrize("hosts,expr", [
    (["n1", "n2", "n3", "n7"], "n[1-3,7]"),
    (["n09", "n10", "n9"], "n[09-10,9]"),
    (["a", "n1", "b"], "a,n1,b"),
    (["gpu-001", "cpu1", "gpu-002"], "gpu-001,cpu1,gpu-002"),   # order is kept: rank 0 stays first
])
def test_compress(hosts, expr):
    assert nodelist.compress(hosts) == expr


host_names = st.builds(lambda p, n, w: f"{p}{str(n).zfill(w)}", st.sampled_from(["n", "gpu-", "r1-x", "a"]),
                       st.integers(0, 2000), st.integers(1, 4)) | st.sampled_from(["login", "x-y"])


@given(st.lists(host_names, min_size=1, max_size=40))
def test_compress_round_trips(hosts):
    assert nodelist.expand(nodelist.compress(hosts)) == list(dict.fromkeys(hosts))


# --- Slurm as the oracle -------------------------------------------------------------------------------

def _padded(n: int, width: int) -> str:
    return str(n).zfill(width)


ranges = st.tuples(st.integers(0, 120), st.integers(-2, 6), st.integers(1, 3)).map(
    # a negative span writes a backwards range, which both sides must refuse
    lambda t: f"{_padded(t[0], t[2])}-{_padded(t[0] + t[1], t[2])}" if t[1] else _padded(t[0], t[2]))
group = st.lists(ranges, min_size=1, max_size=3).map(lambda rs: f"[{','.join(rs)}]")
term = st.builds(
    lambda pre, groups, tail: pre + "".join(f"{sep}{g}" for sep, g in groups) + tail,
    st.sampled_from(["n", "gpu-", "rack", "x", "10.0.0."]),
    st.lists(st.tuples(st.sampled_from(["", "-", "b", "-ib"]), group), min_size=0, max_size=3),
    st.sampled_from([""] * 6 + ["-ib", "x"]),   # text after the last group: Slurm refuses it
) | st.sampled_from(["n[0-65535]", "n[0-65536]", "n[]"])
separators = st.sampled_from([",", " ", ", ", ",,", "  ", "\t", ",\n"])
nodelists = st.builds(lambda first, rest: first + "".join(sep + t for sep, t in rest), term,
                      st.lists(st.tuples(separators, term), max_size=2))


def scontrol_hostnames(expr: str) -> list[str] | None:
    """Slurm's expansion, or None where it refuses.

    22.05 exits 0 either way: it says "Invalid hostlist", or with three or more bracket groups only logs
    "error: ... Invalid range" and silently drops that term, which counts as a refusal here.
    """
    proc = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30)
    if proc.returncode or "Invalid hostlist" in proc.stderr or "error:" in proc.stderr:
        return None
    return proc.stdout.split()


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's scontrol")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodelists)
def test_expansion_and_refusal_match_scontrol(expr):
    theirs = scontrol_hostnames(expr)
    try:
        ours = nodelist.expand(expr, limit=200_000)
    except nodelist.NodelistError as exc:
        assert theirs is None, f"we refuse {expr!r} ({exc}) but Slurm expands it"
        return
    assert theirs is not None, f"Slurm refuses {expr!r} but we expand it"
    # Slurm keeps repeats when terms overlap; we drop them (a host runs once). Order must match.
    assert ours == list(dict.fromkeys(theirs))
    assert nodelist.first(expr) == theirs[0]
    assert nodelist.count(expr) == len(theirs)
