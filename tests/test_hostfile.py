"""DeepSpeed hostfile and --world_info from Slurm nodelists, offline and from inside a job."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import hostfile

REPO = Path(__file__).resolve().parent.parent


def test_hostfile_text() -> None:
    assert hostfile.hostfile(hostfile.hosts("gpu-[001-002],cpu1"), 4) == (
        "gpu-001 slots=4\ngpu-002 slots=4\ncpu1 slots=4\n")


def test_world_info_decodes_like_deepspeed_launch() -> None:
    encoded = hostfile.world_info(["n2", "n1"], 2)
    # deepspeed.launcher.launch: json.loads(base64.urlsafe_b64decode(args.world_info)); keys in node order
    info = json.loads(base64.urlsafe_b64decode(encoded))
    assert list(info) == ["n2", "n1"] and info["n1"] == [0, 1]


def test_errors() -> None:
    with pytest.raises(hostfile.HostfileError, match="unclosed"):
        hostfile.hosts("n[1-")
    with pytest.raises(hostfile.HostfileError, match="at least one slot"):
        hostfile.hostfile(["n1"], 0)
    with pytest.raises(hostfile.HostfileError, match="over the limit of 65,533"):
        hostfile.world_info(["n1"], 10**8)  # would build a list of 10**8 slot ids
    with pytest.raises(hostfile.HostfileError, match="SLURM_JOB_NODELIST is not set"):
        hostfile.nodelist_from_slurm({})
    # A step on part of the allocation (captured by scripts/capture-slurm-steps.sh): its SLURM_NODEID counts
    # the step's nodes, so the launcher's world_info must list those.
    step = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n[2-3]"}
    assert hostfile.nodelist_from_slurm(step) == "n[2-3]"
    assert hostfile.nodelist_from_slurm({"SLURM_JOB_NODELIST": "n[1-3]"}) == "n[1-3]"  # the batch shell
    assert hostfile.slots_from_slurm({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert hostfile.slots_from_slurm({}) == 1


@pytest.mark.parametrize("gpus", ["\u00b2", "9" * 5000, "0", "-2", "x"])  # "²" passes str.isdigit(), not int()
def test_slurm_gpus_on_node_that_is_no_count_of_gpus_means_one_slot(gpus: str) -> None:
    assert hostfile.slots_from_slurm({"SLURM_GPUS_ON_NODE": gpus}) == 1


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "hpc", "hostfile", *args], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_cli_offline_and_from_slurm() -> None:
    assert cli("--nodelist", "n[1-2]", "--slots", "3").stdout == "n1 slots=3\nn2 slots=3\n"
    out = cli("--from-slurm", "--world-info", SLURM_JOB_NODELIST="n[1-3]", SLURM_GPUS_ON_NODE="2").stdout
    assert json.loads(base64.urlsafe_b64decode(out.strip())) == {"n1": [0, 1], "n2": [0, 1], "n3": [0, 1]}
    bad = cli("--from-slurm")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "SLURM_JOB_NODELIST" in bad.stderr
    both = cli("--from-slurm", "--nodelist", "n1")
    assert both.returncode == 2 and "exactly one" in both.stderr


@pytest.mark.parametrize("slots", [" 3 ", "\u0663", "3.0"])
def test_slots_are_a_whole_number_in_ascii_digits_as_every_count_hpcdist_takes(slots: str) -> None:
    bad = cli("--nodelist", "n1", "--slots", slots)
    assert bad.returncode == 2 and "is not a whole number in ASCII digits" in bad.stderr and not bad.stdout


def test_matches_scontrol_show_hostnames() -> None:
    import shutil

    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not on PATH")
    expr = "n[1-3],gpu-[008-010]"
    proc = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert [line.split()[0] for line in cli("--nodelist", expr).stdout.splitlines()] == proc.stdout.split()


@pytest.mark.parametrize("expr,words", [("a\nb", "whitespace"), ("n1 slots=99", "whitespace"),
                                        ("n1\tn2", "whitespace"), ("slots=99", "not a host name"),
                                        ("n[1-2],a#b", "not a host name")])
def test_a_nodelist_whose_hosts_a_hostfile_cannot_carry_is_refused_in_one_line(expr: str, words: str) -> None:
    proc = cli("--nodelist", expr, "--slots", "1")
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert words in proc.stderr
    with pytest.raises(hostfile.HostfileError, match="not a host name"):
        hostfile.world_info(["n1", "a b"], 1)


@pytest.mark.parametrize("expr", ["n[3-1]", "n[1-2", "n[]"])
def test_a_nodelist_that_does_not_parse_is_one_line_showing_a_good_one(expr: str) -> None:
    with pytest.raises(hostfile.HostfileError) as refused:
        hostfile.hosts(expr)
    assert "give one Slurm nodelist such as n[1-2]" in str(refused.value) and "\n" not in str(refused.value)
