"""Hostile values in every user-set field come through literally and execute nothing.

Profile ``setup`` lines are exempt by design: they are the site admin's own shell, pasted verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hpc import profiles, render
from hpc.spec import JobSpec, SpecError
from hpc.speccheck import check

REPO = Path(__file__).resolve().parent.parent
# Each piece would create PWNED if any shell evaluated it instead of passing it on as text.
HOSTILE = "a b'c\"d $(touch PWNED) `touch PWNED`; touch PWNED & $HOME \\ *"
# Partition and account names cannot hold blanks (Slurm splits on them); the rest still applies.
HOSTILE_WORD = "p'q\"$(touch${IFS}PWNED);`touch${IFS}PWNED`|$HOME"

FAKE_PYTHON = """#!{real}
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "hpc"]:
    # hpc's own helpers (env --shell, hostfile) run for real, from the checkout.
    os.environ["PYTHONPATH"] = {repo!r}
    os.execv({real!r}, [{real!r}] + args)
with open(os.environ["ARGV_LOG"], "a") as log:
    log.write(json.dumps({{"argv": args, "hostile_env": os.environ.get("HOSTILE_ENV"),
                          "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")]}}) + "\\n")
"""
# srun stand-in: drop srun's own options and run the task command once, as task 0 of node 0.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
# Only a task of a step has a step id; the batch shell has none.
SLURM_STEP_ID=0 exec "$@"
"""


def sbatch_args(script: str) -> dict[str, str]:
    """#SBATCH options as sbatch's parser reads them: blanks split, double quotes group, \\ escapes."""
    out = {}
    for line in script.splitlines():
        if not line.startswith("#SBATCH "):
            continue
        text, word, quoted, escape = line[len("#SBATCH "):], "", False, False
        for ch in text:
            if escape:
                word, escape = word + ch, False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                quoted = not quoted
            elif ch.isspace() and not quoted:
                break
            else:
                word += ch
        key, _, value = word.partition("=")
        out[key] = value
    return out


def make_fake_bin(root: Path) -> Path:
    fake_bin = root / "bin $(touch PWNED) `x`"
    fake_bin.mkdir()
    for name, text in (("python", FAKE_PYTHON.format(real=sys.executable, repo=str(REPO))),
                       ("srun", FAKE_SRUN)):
        path = fake_bin / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return fake_bin


@pytest.mark.parametrize("backend,launcher", [("ddp", "srun"), ("ddp", "torchrun"),
                                              ("deepspeed", "deepspeed")])
def test_hostile_values_arrive_literally(tmp_path: Path, backend: str, launcher: str) -> None:
    fake_bin = make_fake_bin(tmp_path)
    job_dir = tmp_path / f"job {HOSTILE.replace('/', '_').replace(chr(92), '_')}"
    profile = profiles.parse("hostile", {"env": {"HOSTILE_ENV": HOSTILE}, "modules": []})
    spec = JobSpec(job_dir=str(job_dir), job_name=HOSTILE, nodes=2, ntasks_per_node=2, backend=backend,
                   launcher=launcher, partition=HOSTILE_WORD, account=HOSTILE_WORD,
                   python=str(fake_bin / "python"), train_args=("--data-dir", HOSTILE, "--data-dir", HOSTILE_WORD))
    rendered = render.render(spec, profile)
    render.write(rendered)

    sbatch = sbatch_args(rendered.files["job.sbatch"])
    assert sbatch["--job-name"] == HOSTILE
    assert sbatch["--partition"] == HOSTILE_WORD and sbatch["--account"] == HOSTILE_WORD
    assert sbatch["--output"] == f"{job_dir}/logs/batch-%j.out"

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "argv.jsonl"
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path), "ARGV_LOG": str(log),
           "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": str(rendered.spec.nodes *
                                                                            rendered.spec.slurm_tasks_per_node),
           "SLURM_TASKS_PER_NODE": f"{rendered.spec.slurm_tasks_per_node}(x2)"}
    # The whole batch script runs: setup.sh sourced, then task.sh through the srun stand-in.
    proc = subprocess.run(["bash", str(job_dir / "job.sbatch")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    found = [p for p in tmp_path.rglob("PWNED")] + [p for p in Path.cwd().glob("PWNED")]
    assert not found, f"a hostile value executed: {found}"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1
    argv, hostile_env = calls[0]["argv"], calls[0]["hostile_env"]
    assert hostile_env == HOSTILE
    assert argv[-4:] == ["--data-dir", HOSTILE, "--data-dir", HOSTILE_WORD]
    assert argv[argv.index("--run-dir") + 1] == f"{job_dir}/run"
    if launcher == "srun":
        assert argv[:2] == ["-m", "train"]
    else:
        # The task shell resolved the rendezvous from Slurm's variables: first node, port from job id.
        assert calls[0]["master"] == ["n1", str(12000 + 777 % 20000)]
    if launcher == "deepspeed":
        assert (job_dir / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
        assert argv[:2] == ["-m", "deepspeed.launcher.launch"]


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch is not on PATH")
def test_sbatch_reads_hostile_job_name_literally(tmp_path: Path) -> None:
    spec = JobSpec(job_dir=str(tmp_path / "job $(x)"), job_name=HOSTILE, python="python3")
    rendered = render.render(spec, profiles.load("local"))
    render.write(rendered)
    proc = subprocess.run(["sbatch", "--test-only", "-vvv", str(rendered.job_dir / "job.sbatch")],
                          capture_output=True, text=True, timeout=300)
    names = re.findall(r"^sbatch: job-name\s+: (.*)$", proc.stderr, re.M)
    assert names == [HOSTILE], proc.stderr[-2000:]


@pytest.mark.parametrize("field,value", [
    ("job_name", "two\nlines"), ("job_name", "tab\there"), ("partition", "a b"), ("account", "x\ny"),
    ("job_dir", "/tmp/new\nline"), ("job_dir", "/tmp/100%"),
])
def test_what_slurm_cannot_carry_is_refused(field: str, value: str) -> None:
    spec = replace(JobSpec(job_dir="/tmp/j", python="python3"), **{field: value})
    with pytest.raises(SpecError) as info:
        check(spec, profiles.load("local"))
    assert "\n" not in str(info.value)
