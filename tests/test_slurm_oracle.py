"""Slurm as the oracle: whatever hpcdist accepts, the local cluster's sbatch accepts too, on both submit paths
(job.sbatch and submitit's generated script), and both paths make Slurm record the same values."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slurm_fixtures import requires_slurm

from hpc import profiles, render, submit
from hpc.cli import main

pytestmark = [pytest.mark.slurm, requires_slurm]

def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid five times in six, so that many examples get as far as asking Slurm."""
    return st.integers(0, 5).flatmap(lambda pick: valid if pick else invalid)


DIGITS = st.text("0123456789", min_size=1, max_size=3)
times = mostly(st.one_of(
    st.builds("{}".format, DIGITS), st.builds("{}:{}".format, DIGITS, DIGITS),
    st.builds("{}:{}:{}".format, DIGITS, DIGITS, DIGITS), st.builds("{}-{}".format, DIGITS, DIGITS),
    st.builds("{}-{}:{}:{}".format, DIGITS, DIGITS, DIGITS, DIGITS), st.sampled_from(["0", "UNLIMITED", "infinite"])),
    st.sampled_from([" 30", "30 ", "\u0663\u0660", "1:2:3:4", "-1", "1h", ""]))
signals = mostly(
    st.builds("{}{}{}".format, st.sampled_from(["", "B:", "R:", "RB:", "BR:"]),
              st.one_of(st.builds("{}{}".format, st.sampled_from(["", "SIG", "sig"]),
                                  st.sampled_from(["USR1", "usr2", "TERM", "XCPU", "KILL", "Hup"])),
                        st.sampled_from(["10", "12", "64"])),
              st.sampled_from(["", "@0", "@120", "@65535"])),
    st.builds("{}{}{}".format, st.sampled_from(["", "B:R:", "X:"]),
              st.sampled_from(["PIPE", "FOO", "0", "65", "SIG10", "sig99"]),
              st.sampled_from(["", "@65536", "@99999999", "@", "@\uff11"])))
names = st.one_of(st.text(min_size=1, max_size=20),
                  st.sampled_from(["a\\", "a\\b", "it's", 'say "hi"', "x # y", "%j", "a b"]))
partitions = mostly(st.just("debug"), st.sampled_from(['"debug"', "'debug'", "de\\bug", "debug ", "nosuch"]))
geometry = st.tuples(mostly(st.integers(1, 3), st.sampled_from([0, 4])), mostly(st.integers(1, 2), st.just(3)),
                     st.sampled_from(["srun", "torchrun"]))


def sbatch_test_only(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)


def submitit_script(rendered: render.Rendered) -> str:
    """The batch script submitit's SlurmExecutor would submit for this job (its own generator)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="true", folder=str(rendered.job_dir / "submitit"),
                               **submit.slurm_parameters(rendered))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(time=times, signal=signals, name=names, partition=partitions, geometry=geometry)
def test_what_hpcdist_accepts_sbatch_accepts_on_both_paths(tmp_path_factory, time, signal, name, partition,
                                                           geometry) -> None:
    nodes, tasks, launcher = geometry
    job_dir = tmp_path_factory.mktemp("oracle") / "job"
    args = ["render", "-q", "-o", str(job_dir), "--time", time, "--signal", signal, "-J", name, "-p", partition,
            "--nodes", str(nodes), "--ntasks-per-node", str(tasks), "--launcher", launcher,
            "--", "--batch-size", "12"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code:
        assert len(result.stderr.splitlines()) == 1, result.stderr
        return
    proc = sbatch_test_only(job_dir / "job.sbatch")
    assert proc.returncode == 0, f"hpcdist accepted {args!r} but sbatch refused job.sbatch: {proc.stderr}"
    rendered = render.render(result_spec(job_dir), profiles.load("local"))
    script = job_dir / "submitit.sbatch"
    script.write_text(submitit_script(rendered))
    proc = sbatch_test_only(script)
    assert proc.returncode == 0, f"hpcdist accepted {args!r} but sbatch refused submitit's script: {proc.stderr}"


def result_spec(job_dir: Path):
    """The JobSpec render wrote to spec.yaml, back as a JobSpec."""
    import yaml

    from hpc.spec import FIELDS, JobSpec

    data = yaml.safe_load((job_dir / "spec.yaml").read_text())
    values = {k: v for k, v in data.items() if k in FIELDS}
    for key in ("train_args", "after"):
        values[key] = tuple(values.get(key) or ())
    return JobSpec(**values)


def recorded(job_id: str) -> dict[str, str]:
    """What Slurm recorded for a job: its name (the rest of scontrol's first line), time limit, partition."""
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    name = re.match(r"JobId=\d+ JobName=(.*)$", text.splitlines()[0]).group(1)
    fields = dict(re.findall(r"\b(TimeLimit|Partition|Requeue)=(\S+)", text))
    return {"name": name, **fields}


@pytest.mark.parametrize("name,time", [("a\\", "30"), ("a\\b c", "0"), ("it's \"q\" # x $(y)", "1-02:03:04"),
                                       ("tab\\t%j", "UNLIMITED")])
def test_both_submit_paths_make_slurm_record_the_same_job(tmp_path: Path, name: str, time: str) -> None:
    """Held submissions of job.sbatch and of submitit's script; Slurm's own record of each compared."""
    job_dir = tmp_path / "job"
    result = CliRunner().invoke(main, ["render", "-q", "-o", str(job_dir), "-J", name, "--time", time],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    rendered = render.render(result_spec(job_dir), profiles.load("local"))
    (job_dir / "submitit.sbatch").write_text(submitit_script(rendered))
    ids = []
    try:
        for script in ("job.sbatch", "submitit.sbatch"):
            proc = subprocess.run(["sbatch", "--hold", "--parsable", str(job_dir / script)], capture_output=True,
                                  text=True, timeout=60, cwd=job_dir)
            assert proc.returncode == 0, proc.stderr
            ids.append(proc.stdout.strip().split(";")[0])
        ours, theirs = recorded(ids[0]), recorded(ids[1])
    finally:
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    assert ours == theirs
    assert ours["name"] == name
    assert ours["TimeLimit"] == ("UNLIMITED" if time in ("0", "UNLIMITED") else ours["TimeLimit"])


def test_the_time_limit_is_the_exact_one_on_both_paths(tmp_path: Path) -> None:
    """Before, the submitit path sent a rounded minute count: 1:30 became 2 minutes there, 1:30 here."""
    job_dir = tmp_path / "job"
    assert CliRunner().invoke(main, ["render", "-q", "-o", str(job_dir), "--time", "1:30"]).exit_code == 0
    script = submitit_script(render.render(result_spec(job_dir), profiles.load("local")))
    assert "#SBATCH --time=1:30" in script and "#SBATCH --time=1:30" in (job_dir / "job.sbatch").read_text()


@pytest.mark.parametrize("exclude", ["n9", "n[1-3]", "n[2-3]", "n3", "n[1-2]"])
def test_hpcdist_refuses_the_excludes_sbatch_refuses_and_takes_the_rest(tmp_path: Path, exclude: str) -> None:
    sbatch = subprocess.run(["sbatch", "--test-only", "-p", "debug", "-N2", "-x", exclude, "--wrap", "true"],
                            capture_output=True, text=True, timeout=60)
    result = CliRunner().invoke(main, ["render", "-q", "--nodes", "2", "--exclude", exclude, "-o",
                                       str(tmp_path / "j")])
    assert (result.exit_code == 0) == (sbatch.returncode == 0), (result.stderr, sbatch.stderr)
    if result.exit_code:
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
