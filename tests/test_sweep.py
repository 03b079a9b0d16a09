"""hpc.sweep (plan and write a sweep) and ``hpcdist sweep``, without Slurm: the arrays, the refusals naming an
axis, the dry run, --force; and the --after/--exclude job keys. The matrix is tests/test_sweep_matrix.py's, reading
a sweep back tests/test_sweep_results.py's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from slurm_fixtures import requires_slurm
from test_submit_unit import sbatch_directives

from hpc import profiles, render, shown, submit, sweep_matrix, sweep_results
from hpc import sweep as sweeps
from hpc.cli import main
from hpc.commands.sweep import current_rows, spread_grid
from hpc.spec import JobSpec, SpecError, from_mapping, parse_after


def base(**kw) -> dict:
    return {"python": sys.executable, "pythonpath": None, "job_name": "sw", **kw}


def plan(tmp_path: Path, matrix: sweep_matrix.Matrix, max_parallel: int | None = None, **kw) -> sweeps.Sweep:
    return sweeps.plan(base(**kw), matrix, tmp_path / "sweep", max_parallel=max_parallel, load_profile=profiles.load)


def axes(*texts: str) -> sweep_matrix.Matrix:
    return sweep_matrix.Matrix(axes=tuple(sweep_matrix.parse_axis(t) for t in texts))


# ---- dependencies and exclusions ----------------------------------------------------------------

@pytest.mark.parametrize("given,slurm", [
    ("123", "afterok:123"), ("123:ok", "afterok:123"), ("123:any", "afterany:123"),
    ("123:notok", "afternotok:123"), ("123:corr", "aftercorr:123"), ("123:start", "after:123"),
    ("123_4", "afterok:123_4"), ("123_4:notok", "afternotok:123_4"), ("afterany:77", "afterany:77"),
    ("afternotok:77_0", "afternotok:77_0"), ("singleton", "singleton"),
])
def test_after_takes_short_and_slurm_forms(given, slurm):
    assert parse_after(given) == slurm


@pytest.mark.parametrize("bad", ["", "abc", "12:maybe", "12:", "0", "012", "12_", "12_x", "afterok:", "afterok:x",
                                 "singleton:12", "12 13", "12,13", "afterok:12:13", "-1",
                                 "1\u0662", "afterok:\u0663", "12_\u0664"])
def test_after_refuses_what_slurms_grammar_does_not_have(bad):
    with pytest.raises(SpecError, match="is not a dependency"):
        parse_after(bad)


def test_dependency_groups_jobs_by_type_in_first_seen_order():
    spec = from_mapping({"job_dir": "/j", "after": ["12", "13:any", "afternotok:14_2", 15, "singleton"]})
    assert spec.after == ("afterok:12", "afterany:13", "afternotok:14_2", "afterok:15", "singleton")
    assert spec.dependency == "afterok:12:15,afterany:13,afternotok:14_2,singleton"
    assert from_mapping({"job_dir": "/j", "after": 9}).dependency == "afterok:9"
    assert from_mapping({"job_dir": "/j"}).dependency is None


def test_both_submit_paths_carry_dependency_and_exclude_alike(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    spec = JobSpec(job_dir=str(tmp_path / "job"), python=sys.executable, nodes=2, after=("afterok:12", "afterany:13"),
                   exclude="n[2-3]")
    rendered = render.render(spec, profiles.load("local"))
    ours = sbatch_directives(rendered.files["job.sbatch"])
    theirs = sbatch_directives(_make_sbatch_string(command="x", folder=str(tmp_path / "s"),
                                                   **submit.slurm_parameters(rendered)))
    assert ours["dependency"] == theirs["dependency"] == "afterok:12,afterany:13"
    assert ours["exclude"] == theirs["exclude"] == "n[2-3]"
    plain = render.render(JobSpec(job_dir=str(tmp_path / "plain"), python=sys.executable), profiles.load("local"))
    assert not {"dependency", "exclude"} & set(sbatch_directives(plain.files["job.sbatch"]))


@pytest.mark.parametrize("args,message", [
    (["--after", "12:maybe"], "--after '12:maybe' is not a dependency"),
    (["--exclude", "n[2-"], "--exclude: unclosed '['"),
    (["--exclude", "n1 n2"], "whitespace"),
    (["--nodelist", "n2", "--exclude", "n[1-2]"], "keeps off n2, which --nodelist asks for"),
])
def test_bad_after_or_exclude_exit_2_one_line_no_job_dir(tmp_path, args, message):
    result = CliRunner().invoke(main, ["render", "-q", "-o", str(tmp_path / "job"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "job").exists()


def test_a_job_files_after_is_kept_unless_the_flag_is_given(tmp_path):
    from hpc.commands.options import values_from_options
    from hpc.spec import from_mapping

    job_file = tmp_path / "job.yaml"
    job_file.write_text("after: [5, '6:any']\nexclude: n3\n")
    spec = from_mapping(values_from_options(str(job_file), job_dir=str(tmp_path / "j"), after=()))
    assert spec.after == ("afterok:5", "afterany:6") and spec.exclude == "n3"
    assert from_mapping(values_from_options(str(job_file), job_dir=str(tmp_path / "j"), after=("7",))).after == (
        "afterok:7",)


# ---- the matrix on the command line, and the refusals --------------------------------------------

def test_grid_words_after_one_grid_flag_are_axes_until_the_next_option():
    assert spread_grid(["--grid", "a=1", "b=2,3", "--nodes", "2", "--", "--grid", "x=y"]) == [
        "--grid", "a=1", "--grid", "b=2,3", "--nodes", "2", "--", "--grid", "x=y"]


@pytest.mark.parametrize("grid,message", [
    (["zero_stage=1,5", "backend=deepspeed"], "axis zero_stage=5: --zero-stage 5 is not a ZeRO stage"),
    (["zero_stage=1,2", "nodes=2,4", "backend=deepspeed"], "axis nodes=4: --nodes 4 exceeds"),
    (["backend=dp", "nodes=1,2"], "task backend=dp nodes=2: --backend dp runs one process on one node"),
    (["precision=fp32,fp8"], "axis precision=fp8: unknown --precision 'fp8'"),
    (["time=5,soon"], "axis time=soon: --time 'soon' is not a Slurm time"),
    # Escaped as the task labels are: a raw newline cut the line before the reason.
    (["partition=debug,x\ny"], "axis partition=x\\ny: --partition 'x\\ny' contains a newline"),
])
def test_a_value_that_fails_the_job_check_names_its_axis_and_nothing_is_written(tmp_path, grid, message):
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--grid", *grid])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"hpcdist sweep: {message}") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("grid,message", [
    (["--backend", "deepspeed", "--grid", "zero_stage=1,01"], "tasks zero_stage=1 and zero_stage=01 are the same job"),
    (["--grid", "nodes=2,02"], "tasks nodes=2 and nodes=02 are the same job"),
])
def test_values_spelled_apart_that_make_the_same_job_are_refused_as_a_value_listed_twice(tmp_path, grid, message):
    """Two spellings of one value would run the same job twice, each task's compute spent for one result."""
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), *grid])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"hpcdist sweep: {message}") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
@requires_slurm
def test_the_live_partitions_limits_refuse_a_task_naming_its_axis(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--grid",
                                       "cpus_per_task=1,64"])
    assert result.exit_code == 2
    assert result.stderr.startswith("hpcdist sweep: axis cpus_per_task=64: 1 task(s) x 64 CPU(s) per node exceed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
@requires_slurm
def test_a_sweep_says_when_its_tasks_take_the_partitions_default_time_as_submit_does(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "-p", "hpcdist-short",
                                       "--grid", "backend=ddp"])
    assert result.exit_code == 0, result.output
    assert "hpcdist: --time 00:02:00: partition 'hpcdist-short''s DefaultTime" in result.stderr
    assert "--time=00:02:00" in result.stdout


@pytest.mark.parametrize("bad,message", [
    ({"nodes": "x"}, "nodes must be a whole number (ASCII digits), got 'x'"),
    ({"train_args": True}, "train_args must be a list of strings"),
    ({"train_args": "--max-steps 5"}, "train_args must be a list of strings"),
    ({"train_args": {"--channels-last": 1}}, "train_args must be a list of strings"),
])
def test_the_base_is_read_as_a_job_file_even_where_every_task_sets_the_key(tmp_path, bad, message):
    with pytest.raises(sweep_matrix.SweepError, match=f"^{re.escape(message)}"):
        plan(tmp_path, sweep_matrix.PRESETS["compare"], **bad)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_file_naming_a_key_twice_is_refused_as_a_job_file_is(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("axes:\n  backend: [ddp]\n  backend: [deepspeed]\n")
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-f", str(sweep_file), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "key 'backend' appears twice (line 3)" in result.stderr
    assert not (tmp_path / "s").exists()


def test_submitit_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--via", "submitit", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert result.stderr == "hpcdist sweep: job arrays are submitted with sbatch only; drop --via submitit\n"
    assert list(tmp_path.iterdir()) == []


def test_a_registry_that_cannot_take_the_tasks_lines_refuses_the_sweep_before_slurm_has_it(tmp_path):
    """A linked jobs.jsonl was refused after sbatch: a traceback, the arrays queued and unregistered."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    partition = "PartitionName=debug Default=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED Nodes=n[1-3] State=UP"
    for name, out in (("scontrol", partition), ("sbatch", "5555")):
        (stubs / name).write_text(f"#!/bin/sh\necho \"$0\" >> {tmp_path}/calls\necho '{out}'\n")
        (stubs / name).chmod(0o755)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "jobs.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    result = CliRunner().invoke(main, ["sweep", "-o", str(tmp_path / "s"), "--grid", "backend=ddp,dp"],
                                env={"PATH": f"{stubs}:{os.environ['PATH']}", "HPCDIST_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    assert "sbatch" not in (tmp_path / "calls").read_text() and not (tmp_path / "s").exists()


# ---- the arrays ------------------------------------------------------------------------------------

def test_one_array_per_geometry_with_its_throttle(tmp_path):
    sweep = plan(tmp_path, sweep_matrix.PRESETS["compare"], max_parallel=3)
    assert [(a.name, a.range) for a in sweep.arrays] == [("array-0", "0-0%1"), ("array-1", "0-4%3")]
    assert [t.label for t in sweep.arrays[1].tasks] == [
        "backend=ddp nodes=2", *(f"backend=deepspeed zero_stage={s} nodes=2" for s in range(4))]
    dp, ddp = sweep.arrays[0].job_sbatch, sweep.arrays[1].job_sbatch
    assert "#SBATCH --nodes=1\n" in dp and "#SBATCH --array=0-0%1\n" in dp
    assert "#SBATCH --nodes=2\n" in ddp and "#SBATCH --array=0-4%3\n" in ddp
    assert f"#SBATCH --output={tmp_path}/sweep/array-1/task-%a/logs/batch-%A_%a.out" in ddp


def test_tasks_that_hold_different_spare_nodes_get_an_array_each_allocating_them(tmp_path):
    """`--grid spare_nodes=0,1`: one array would allocate its first task's nodes for both, no spare for the second."""
    sweep = plan(tmp_path, axes("spare_nodes=0,1"))
    assert [(a.range, a.tasks[0].label) for a in sweep.arrays] == [("0-0%1", "spare_nodes=0"),
                                                                   ("0-0%1", "spare_nodes=1")]
    assert ["#SBATCH --nodes=1\n" in a.job_sbatch for a in sweep.arrays] == [True, False]
    assert "#SBATCH --nodes=2\n" in sweep.arrays[1].job_sbatch


def test_each_array_task_selects_its_own_rendered_directory(tmp_path):
    sweep = plan(tmp_path, axes("zero_stage=1,3", "precision=fp32,bf16"), backend="deepspeed",
                 train_args=["--max-steps", "5"], job_dir="ignored")
    sweeps.write(sweep)
    array = tmp_path / "sweep" / "array-0"
    for task in sweep.tasks:
        tdir = array / f"task-{task.array_index}"
        config = json.loads((tdir / "deepspeed.json").read_text())
        assert str(config["zero_optimization"]["stage"]) == task.values["zero_stage"]
        assert config["bf16"]["enabled"] == (task.values["precision"] == "bf16")
        # The precision travels in the task's own deepspeed.json, which its task.sh names.
        assert f"--deepspeed-config {tdir / 'deepspeed.json'} " in (tdir / "task.sh").read_text()
        assert f"run_dir={tdir}/run" in (tdir / "task.sh").read_text()
        assert f"rm -f {tdir}/run/preempted" in (tdir / "requeue.sh").read_text()
        assert not (tdir / "job.sbatch").exists() and (tdir / "logs").is_dir() and (tdir / "run").is_dir()
    # The batch shell of array task i runs task-i: run the case statement alone with each id.
    script = (array / "job.sbatch").read_text()
    case = script[script.index("case "):script.index("esac") + 4]
    for i in range(4):
        out = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID={i}; {case}; echo \"$job_dir\""],
                             capture_output=True, text=True)
        assert out.stdout.strip() == str(array / f"task-{i}")
    out = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID=4; {case}; echo ran"], capture_output=True, text=True)
    assert out.returncode == 2 and "ran" not in out.stdout
    assert subprocess.run(["bash", "-n", str(array / "job.sbatch")]).returncode == 0
    resolved = sweep_results.load(tmp_path / "sweep")[0]["resolved"]
    assert [(r["array_index"], r["zero_stage"], r["precision"]) for r in resolved] == [
        (0, 1, "fp32"), (1, 1, "bf16"), (2, 3, "fp32"), (3, 3, "bf16")]


def test_values_reach_the_scripts_quoted(tmp_path):
    sweep = plan(tmp_path, axes("train.data-dir=/d/a b,/d/$(touch x)"), train_args=["--max-steps", "5"])
    sweeps.write(sweep)
    for task, value in zip(sweep.tasks, ["/d/a b", "/d/$(touch x)"]):
        assert f"--data-dir '{value}'" in (task.rendered.job_dir / "task.sh").read_text()


def test_the_dry_run_prints_every_task_and_writes_but_submits_nothing(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--max-parallel", "2",
                                       "--grid", "backend=ddp,deepspeed", "zero_stage=1,2", "--", "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("==> task ") == 3 and "#SBATCH --array=0-2%2" in result.stdout
    # The local profile does not say its CPU nodes have native bf16: auto is fp32 there.
    assert "# deepspeed zero_stage=2 precision=fp32" in result.stdout and "stage=2 fp16=False" in result.stdout
    assert not (tmp_path / "s" / sweeps.SUBMITTED_FILE).exists()
    rows = sweep_results.rows(*sweep_results.load(tmp_path / "s"), {})
    assert {r.state for r in rows} == {"NOT_SUBMITTED"}


def test_sweep_status_takes_a_requeued_tasks_state_from_the_controller_and_a_cancelled_waiting_tasks_from_its_array(
        tmp_path, monkeypatch):
    """As `hpcdist status` does: accounting keeps a stale REQUEUED row for a task the controller runs again, and no
    row of its own for a task cancelled before it started (only its array's folded one)."""
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--grid",
                                       "train.lr=0.1,0.2,0.3", "--", "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    (tmp_path / "s" / sweeps.SUBMITTED_FILE).write_text('{"arrays": {"array-0": "77"}}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = {"squeue": "77_0|RUNNING|n[1,3]|0:41\n",
               "sacct": "77_0|REQUEUED|0:0|n[1-2]|00:00:00|2\n77_1|COMPLETED|0:0|n1|00:01:00|1\n"
                        "77_[2]|CANCELLED by 0|0:0|None assigned|00:00:00|1\n"}
    for name, out in answers.items():
        (bin_dir / name).write_text(f"#!/bin/sh\nprintf '{out}'\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert [r.state for r in current_rows(tmp_path / "s")] == ["RUNNING", "COMPLETED", "CANCELLED"]


@pytest.mark.parametrize("option", [["--zero-stage", "2"], ["--zero-stage", "2", "--offload"]])
def test_a_fixed_deepspeed_only_option_does_not_apply_to_the_tasks_an_axis_gives_another_backend(tmp_path, option):
    """As a one-value zero_stage axis would: `--zero-stage 2 --grid backend=ddp,deepspeed` compares DDP with ZeRO-2;
    refused, it named fixes that cannot work in a sweep (drop it, or --backend deepspeed, which the axis overrides)."""
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), *option,
                                       "--grid", "backend=ddp,deepspeed"])
    assert result.exit_code == 0, result.output
    assert "# ddp precision=" in result.stdout and "# deepspeed zero_stage=2 " in result.stdout
    deepspeed_json = (tmp_path / "s" / "array-0" / "task-1" / "deepspeed.json").read_text()
    assert ("offload_optimizer" in deepspeed_json) == ("--offload" in option)


@pytest.mark.parametrize("name,message", [("x\nb", "contains a newline or control character"),
                                          ("x%b", "contains '%' or a backslash")])
def test_a_sweep_directory_slurm_would_refuse_is_blamed_on_itself_not_on_the_first_task(tmp_path, name, message):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(out), "--grid", "nodes=1,2"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"hpcdist sweep: --job-dir {shown.value(str(out))} {message}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not out.exists()


def test_max_parallel_0_is_refused_not_taken_for_all_at_once(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--max-parallel", "0",
                                       "--grid", "backend=ddp,deepspeed"])
    assert result.exit_code == 2 and "--max-parallel (max_parallel: in a sweep file) must be a whole number of at " \
        "least 1, got 0" in result.output
    assert not (tmp_path / "s").exists()


def test_a_sweep_files_bad_max_parallel_is_refused_naming_the_files_key_too(tmp_path):
    """Named only as --max-parallel, a file's `max_parallel: "2"` sent its author looking for a flag never given."""
    (tmp_path / "s.yaml").write_text("max_parallel: '2'\naxes: {nodes: [1]}\n")
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "-f", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "max_parallel: in a sweep file" in result.stderr and "got '2'" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_task_whose_container_cannot_run_is_refused_as_submit_refuses_it(tmp_path):
    args = ["--container", "/no/such/img", "--container-runtime", "oci"]
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--grid", "backend=ddp", *args])
    assert result.exit_code == 2 and "image '/no/such/img' does not exist here" in result.output
    assert not (tmp_path / "s").exists()


def test_a_sweep_file_gives_base_axes_excludes_and_throttle(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("name: lr\nmax_parallel: 1\nbase: {nodes: 2, after: [5], train_args: [--max-steps, '3']}\n"
                          "axes: {backend: [ddp, deepspeed], train.lr: [0.001, 0.01]}\n"
                          "exclude: [{backend: deepspeed, train.lr: 0.01}]\n")
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-f", str(sweep_file), "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=0-2%1" in result.stdout and "#SBATCH --dependency=afterok:5" in result.stdout
    assert "#SBATCH --job-name=lr" in result.stdout and "--lr 0.01" in result.stdout
    assert result.stdout.count("==> task ") == 3


def test_force_keeps_a_directory_hpcdist_did_not_write(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mine").write_text("x")
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--force"])
    assert result.exit_code == 2 and "replaces only a sweep directory hpcdist wrote" in result.stderr
    assert (tmp_path / "s" / "mine").read_text() == "x"


def test_force_keeps_a_users_own_sweep_yaml(tmp_path):
    """A file named sweep.yaml (a W&B or Hydra sweep, say) does not make a directory hpcdist's to remove."""
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "sweep.yaml").write_text("method: grid\n")
    (tmp_path / "project" / "train.py").write_text("print('mine')\n")
    result = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "project"), "--force"])
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["sweep.yaml", "train.py"]


def test_force_replaces_a_sweep_hpcdist_wrote(tmp_path):
    first = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s")])
    assert again.exit_code == 2 and "already exists" in again.stderr
    forced = CliRunner().invoke(main, ["sweep", "--dry-run", "-o", str(tmp_path / "s"), "--force"])
    assert forced.exit_code == 0, forced.output
    tasks = list((tmp_path / "s").glob("array-*/task-*"))
    assert tasks and all((t / ".hpcdist-job").is_file() for t in tasks)
