"""Every bad job input ends with exit status 2, one line naming the fix, and no job directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc.cli import main
from hpc.commands.options import values_from_options
from hpc.spec import SpecError, from_mapping, time_seconds

BAD = [
    (["--backend", "dp", "--nodes", "2"], "--backend dp runs one process on one node"),
    (["--backend", "dp", "--launcher", "torchrun"], "cannot run under --launcher torchrun"),
    (["--backend", "dp", "--launcher", "deepspeed"], "cannot run under --launcher deepspeed"),
    (["--backend", "ddp", "--launcher", "deepspeed"], "cannot run under --launcher deepspeed"),
    (["--cluster", "example-ib", "--launcher", "torchrun", "--ntasks-per-node", "8"], "one task per node"),
    (["--cluster", "example-ib", "--ntasks-per-node", "3"], "one task per GPU"),
    (["--gpus-per-node", "1"], "exceeds the 0 GPU(s) per node"),
    (["--cluster", "example-ib", "--gpus-per-node", "9"], "exceeds the 8 GPU(s)"),
    (["--nodes", "0"], "at least one node"),
    (["--nodes", "4"], "max_nodes 3"),
    (["--backend", "deepspeed", "--zero-stage", "5"], "use 0, 1, 2 or 3"),
    (["--backend", "ddp", "--zero-stage", "2"], "--zero-stage applies to DeepSpeed only"),
    (["--backend", "megatron"], "unknown --backend 'megatron'"),
    (["--launcher", "mpirun"], "unknown --launcher 'mpirun'"),
    (["--precision", "fp8"], "unknown --precision"),
    (["--job-name", "two\nlines"], "newline or control character"),
    (["--job-name", "x" * 300], "shorten it"),
    (["--partition", "a b"], "whitespace"),
    (["--time", "1h"], "is not a Slurm time"),
    (["--time", "1:2:3:4"], "is not a Slurm time"),
    (["--signal", "USR1@soon"], "not a Slurm signal spec"),
    # B: warns the batch shell alone, whom USR1 ends before requeue.sh; the ranks checkpoint on USR1 and TERM only.
    (["--signal", "B:USR1@120"], "signals the batch shell"),
    (["--signal", "RB:TERM@60"], "signals the batch shell"),
    (["--signal", "USR2@120"], "the ranks checkpoint on USR1 or TERM"),
    (["--signal", "STOP"], "the ranks checkpoint on USR1 or TERM"),
    (["--nodelist", "n[1-"], "--nodelist: unclosed '['"),
    (["--nodes", "2", "--nodelist", "n[3-1]"], "runs backwards; give one Slurm nodelist such as n[1-2]"),
    (["--nodes", "2", "--nodelist", "n[1-3]"], "names 3 node(s) but --nodes is 2"),
    (["--cluster", "nowhere"], "unknown cluster 'nowhere'"),
    (["--max-requeues", "-1"], "--max-requeues -1: give 0 to 10000"),
    (["--", "--backend", "dp"], "set by hpcdist"),
    (["--", "--run-dir=/x"], "set by hpcdist"),
    (["--params", "lots"], "params:"),
]


def run(args: list[str], tmp_path: Path):
    result = CliRunner().invoke(main, ["render", "-q", *args], catch_exceptions=False)
    return result.exit_code, result.stderr


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_exit_2_one_line_no_job_dir(tmp_path: Path, args: list[str], message: str) -> None:

    job_dir = tmp_path / "job"
    head, sep, tail = (args[:args.index("--")], ["--"], args[args.index("--") + 1:]) if "--" in args else (
        args, [], [])
    code, err = run([*head, "--job-dir", str(job_dir), *sep, *tail], tmp_path)
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("hpcdist render: ")
    assert not job_dir.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_job_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run(["--job-dir", str(blocker / "job")], tmp_path)
    assert code == 2 and "pick a writable --job-dir" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_existing_job_dir_is_kept(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "precious").write_text("x")
    code, err = run(["--job-dir", str(tmp_path / "job")], tmp_path)
    assert code == 2 and "already exists" in err
    assert [p.name for p in (tmp_path / "job").iterdir()] == ["precious"]


def test_bad_cluster_profile_key(tmp_path: Path) -> None:
    yaml_path = tmp_path / "site.yaml"
    yaml_path.write_text("partiton: gpu\n")
    code, err = run(["--cluster", str(yaml_path), "--job-dir", str(tmp_path / "job")], tmp_path)
    assert code == 2 and "1 unknown key(s), the first 'partiton'; valid keys: partition" in err
    assert not (tmp_path / "job").exists()


def test_job_file_and_flags(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("nodes: 2\nbackend: deepspeed\nlauncher: deepspeed\njob_name: fromfile\n"
                   "train_args: [--epochs, 3]\noutput_dir: out\n")
    spec = from_mapping(values_from_options(str(job), nodes=3, job_name=None, train_args=()))
    assert (spec.nodes, spec.backend, spec.launcher, spec.job_name) == (3, "deepspeed", "deepspeed", "fromfile")
    assert spec.train_args == ("--epochs", "3") and spec.job_dir.endswith("/out")
    spec = from_mapping(values_from_options(str(job), train_args=("--epochs", "1")))
    assert spec.train_args == ("--epochs", "1")
    job.write_text("nodez: 2\n")
    with pytest.raises(SpecError, match="job file: 1 unknown key.s., the first 'nodez'; valid keys: job_dir"):
        from_mapping(values_from_options(str(job)))
    job.write_text("nodes: two\n")
    with pytest.raises(SpecError, match="nodes must be a whole number"):
        from_mapping(values_from_options(str(job)))


def test_job_file_through_cli(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("backend: dp\nnodes: 2\n")
    code, err = run(["-c", str(job), "--job-dir", str(tmp_path / "j")], tmp_path)
    assert code == 2 and "--backend dp runs one process on one node" in err
    code, err = run(["-c", str(job), "--nodes", "1", "--job-dir", str(tmp_path / "j")], tmp_path)
    assert code == 0, err
    assert (tmp_path / "j" / "job.sbatch").is_file() and (tmp_path / "j" / "logs").is_dir()


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("5:30", 330), ("01:00:00", 3600),
                                           ("2-0", 172800), ("1-02:03", 93780), ("1-00:00:01", 86401)])
def test_time_forms(value: str, seconds: int) -> None:
    assert time_seconds(value) == seconds


def test_from_mapping_requires_job_dir() -> None:
    with pytest.raises(SpecError, match="--job-dir"):
        from_mapping({"nodes": 1})
