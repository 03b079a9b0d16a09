"""hpc.submit's pure parts and `hpcdist submit`'s input errors; nothing here needs Slurm."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from slurm_fixtures import REPO, environ, hpcdist, path_without_slurm

from hpc import profiles, registry, render, submit
from hpc.cli import main
from hpc.commands import submit as commands_submit
from hpc.job import Job
from hpc.spec import JobSpec, signal_name


def rendered_for(tmp_path: Path, **kw) -> render.Rendered:
    # A global batch that splits over any of these tests' world sizes (1 to 6 ranks).
    kw.setdefault("train_args", ("--batch-size", "60"))
    spec = JobSpec(job_dir=str(tmp_path / "job"), python=sys.executable, **kw)
    return render.render(spec, profiles.load(spec.cluster))


def sbatch_lines(text: str) -> list[tuple[str, str]]:
    """Each #SBATCH option as (name, value), sorted: two scripts asking Slurm for the same compare equal."""
    found = (re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?$", line) for line in text.splitlines())
    return sorted((m.group(1), (m.group(2) or "").strip("'\"")) for m in found if m)


def sbatch_directives(text: str) -> dict[str, str]:
    return dict(sbatch_lines(text))


# ---- choose --------------------------------------------------------------------------------------

@pytest.mark.parametrize("via,executor,have_slurm,where", [
    ("submitit", "auto", True, "submitit"),
    ("sbatch", "auto", True, "sbatch"),
    ("submitit", "auto", False, "local"),
    ("submitit", "local", True, "local"),
    ("sbatch", "slurm", True, "sbatch"),
])
def test_choose(via, executor, have_slurm, where):
    assert submit.choose(via, executor, have_slurm) == where


@pytest.mark.parametrize("via,executor,have_slurm,message", [
    ("sbatch", "auto", False, "--via sbatch needs Slurm"),
    ("sbatch", "local", True, "--via sbatch needs Slurm"),
    ("submitit", "slurm", False, "sbatch is not on PATH"),
])
def test_choose_refuses(via, executor, have_slurm, message):
    with pytest.raises(ValueError, match=message):
        submit.choose(via, executor, have_slurm)


@pytest.mark.parametrize("option,value", [("--via", "mpirun"), ("--executor", "cloud")])
def test_an_unknown_via_or_executor_is_refused_by_the_command_line(option, value):
    result = CliRunner().invoke(main, ["submit", option, value])
    assert result.exit_code == 2 and option in result.stderr and value in result.stderr


# ---- what submitit is asked to submit ------------------------------------------------------------

@pytest.mark.parametrize("backend,launcher,nodes", [("ddp", "srun", 2), ("deepspeed", "deepspeed", 2),
                                                    ("ddp", "torchrun", 3), ("dp", "srun", 1)])
def test_submitit_script_carries_job_sbatchs_allocation_setup_and_step(tmp_path, backend, launcher, nodes):
    from submitit.slurm.slurm import _make_sbatch_string

    rendered = rendered_for(tmp_path, nodes=nodes, backend=backend, launcher=launcher, time="00:30:00",
                            job_name="agree", signal="USR1@90", max_requeues=2)
    params = submit.slurm_parameters(rendered)
    text = _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=str(tmp_path / "job" / "submitit"), **params)
    assert sbatch_lines(text) == sbatch_lines(rendered.files["job.sbatch"])
    assert f"source {tmp_path / 'job' / 'setup.sh'}" in text.split("# command")[0]
    srun_line = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun_line
    assert srun_line.rindex(f"--output={tmp_path / 'job' / 'logs' / 'task-%t.log'}") > srun_line.index("--output ")
    teardown = text.split("# teardown")[1]
    assert f'bash {tmp_path / "job" / "requeue.sh"} "$?"' in teardown
    assert 'exec bash "$job_dir/requeue.sh" "$status"' in rendered.files["job.sbatch"]
    assert submit.task_command(rendered) == ("bash", str(tmp_path / "job" / "task.sh"))


@pytest.mark.parametrize("kw", [
    {"nodes": 2, "spare_nodes": 1, "launcher": "torchrun", "time": "0", "cluster": "example-ib", "gpus_per_node": 2},
    {"nodes": 2, "backend": "deepspeed", "launcher": "deepspeed", "account": "acct", "nodelist": "n[1-2]",
     "after": ("afterok:12",), "exclude": "n3", "cpus_per_task": 2},
], ids=["spares-gpus-no-limit", "every-allocation-option"])
def test_submitit_writes_exactly_the_sbatch_lines_of_job_sbatch(tmp_path, kw):
    """What the dry run shows is what runs: a line submitit adds of its own (its --wckey=submitit, which a site
    enforcing wckeys refuses or charges to a key nobody asked for) is one job.sbatch never showed."""
    from submitit.slurm.slurm import _make_sbatch_string

    rendered = rendered_for(tmp_path, **kw)
    text = _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=str(tmp_path / "job" / "submitit"), **submit.slurm_parameters(rendered))
    assert sbatch_lines(text) == sbatch_lines(rendered.files["job.sbatch"])


@pytest.mark.parametrize("launcher,cpus", [("srun", 1), ("srun", 3), ("torchrun", 2)])
def test_submitits_step_asks_srun_for_step_shs_tasks_and_cpus(tmp_path, launcher, cpus):
    from submitit.slurm.slurm import _make_sbatch_string

    rendered = rendered_for(tmp_path, nodes=2, spare_nodes=1, launcher=launcher, cpus_per_task=cpus)
    text = _make_sbatch_string(command="python -u -m submitit.core._submit FOLDER",
                               folder=str(tmp_path / "job" / "submitit"), **submit.slurm_parameters(rendered))
    srun_line = next(line for line in text.splitlines() if line.startswith("srun "))
    for option in ("ntasks-per-node", "cpus-per-task"):
        ours = re.search(rf"--{option}=(\S+)", rendered.files["step.sh"]).group(1)
        assert re.findall(rf"--{option}=(\S+)", srun_line) == [ours], option


def _requeue(tmp_path, status, restarts=None, marker=True, array=False, history=(), release_fails=0):
    """Run the rendered requeue.sh with stand-in scontrol/sinfo that only print what they were asked (scontrol
    release failing its first ``release_fails`` times)."""
    rendered = rendered_for(tmp_path, nodes=2, max_requeues=1)
    script = tmp_path / "requeue.sh"
    script.write_text(rendered.files["requeue.sh"])
    run_dir = tmp_path / "job" / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for line in history:
        with open(tmp_path / "job" / "attempts.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
    if marker:
        (run_dir / "preempted").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("scontrol", "sinfo", "scancel", "sleep"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        (bin_dir / tool).chmod(0o755)
    failing = tmp_path / "release-fails"
    failing.write_text("x" * release_fails)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*"\nleft=$(cat {failing})\n'
                                      f'[ "$1" != release ] || [ -z "$left" ] || {{ echo -n "${{left:1}}" > {failing}; '
                                      'exit 1; }\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "5", "PYTHONPATH": str(REPO)}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    if array:
        env.update(SLURM_ARRAY_JOB_ID="4", SLURM_ARRAY_TASK_ID="7")
    proc = subprocess.run(["bash", str(script), str(status)], capture_output=True, text=True, env=env)
    return proc, (run_dir / "preempted").exists()


@pytest.mark.parametrize("status", [75, 15, 137])
def test_requeue_follows_the_checkpoint_marker_whatever_the_step_status(tmp_path, status):
    proc, left = _requeue(tmp_path, status)
    assert proc.returncode == 0, proc.stderr
    # Held, given a begin time just ahead (so Slurm's ~120 s requeue delay does not apply), released.
    assert proc.stdout.splitlines()[:3] == ["scontrol requeuehold 5", "scontrol update JobId=5 StartTime=now+2",
                                            "scontrol release 5"]
    assert "requeueing job 5 to resume from its checkpoint (restart 1 of 1)" in proc.stdout
    assert not left  # consumed: the rerun's ranks write their own
    line = json.loads((tmp_path / "job" / "attempts.jsonl").read_text())
    assert (line["attempt"], line["ending"], line["action"]) == (0, "preempted", "requeue")


def test_a_release_the_controller_missed_is_tried_again_and_one_never_taken_is_said(tmp_path):
    proc, _ = _requeue(tmp_path, 75, release_fails=2)
    assert proc.stdout.splitlines()[2:7] == ["scontrol release 5", "sleep 1", "scontrol release 5", "sleep 2",
                                             "scontrol release 5"]
    assert "requeueing job 5" in proc.stdout and "stays held" not in proc.stderr
    (tmp_path / "down").mkdir()
    proc, _ = _requeue(tmp_path / "down", 75, release_fails=9)
    assert proc.stdout.count("scontrol release 5") == 3
    assert "job 5 stays held, as scontrol release failed; start it with: scontrol release 5" in proc.stderr


def test_requeue_is_bounded_by_max_requeues(tmp_path):
    earlier = {"attempt": 0, "ending": "preempted", "action": "requeue", "excluded": []}
    proc, _ = _requeue(tmp_path, 75, restarts=1, history=[earlier])
    assert proc.returncode == 75 and "scontrol" not in proc.stdout
    assert "used its 1 requeue(s)" in proc.stderr


def test_requeue_names_an_array_task_by_its_array_id(tmp_path):
    proc, _ = _requeue(tmp_path, 75, array=True)
    assert "scontrol requeuehold 4_7" in proc.stdout


@pytest.mark.parametrize("status", [0, 1, 75])
def test_without_a_marker_the_step_status_stands(tmp_path, status):
    proc, _ = _requeue(tmp_path, status, marker=False)
    assert proc.returncode == status and "scontrol" not in proc.stdout


def test_a_step_relaunched_in_its_allocation_is_stamped_where_its_start_up_begins(tmp_path):
    """setup.sh stamps only the batch shell's first attempt: a relaunch's waterfall began at its tasks' start, its
    srun launch shown nowhere, and goodput left the time from the attempt before's end to it out of the allocation."""
    from hpc import timeline

    job = tmp_path / "job"
    script = tmp_path / "requeue.sh"
    script.write_text(rendered_for(tmp_path, nodes=2, spare_nodes=1).files["requeue.sh"])
    (job / "logs").mkdir(parents=True)
    (job / "logs" / "batch-5.out").write_text("hpcdist: attempt 0 started on n1 at T\n"
                                              "srun: error: n2: task 1: Killed\n")
    (job / "step.sh").write_text(f'date +%s.%N > {job}/relaunched\n')  # the relaunch's srun, begun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, answer in (("scontrol", "JobId=5 JobState=RUNNING Partition=debug"),
                         ("sinfo", "n1|allocated\nn2|allocated\nn3|allocated")):
        (bin_dir / tool).write_text(f'#!/bin/sh\nprintf "{answer}\\n"\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-3]",
           "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), "137"], capture_output=True, text=True, env=env, timeout=120)
    assert "relaunching the step in this allocation" in proc.stdout, proc.stderr
    stamps = timeline.read_shell_stamps(job / "run")
    assert stamps[1]["batch"]["setup_done"] <= float((job / "relaunched").read_text())


def test_local_command_sources_setup_then_execs_task_sh(tmp_path):
    rendered = rendered_for(tmp_path, nodes=2)
    command = submit.local_command(rendered)
    assert command[:2] == ("bash", "-c")
    assert command[2] == f"set -e; source {tmp_path / 'job' / 'setup.sh'}; exec bash {tmp_path / 'job' / 'task.sh'}"


@pytest.mark.parametrize("spec_signal,name", [("USR1@120", "USR1"), ("B:USR2@60", "USR2"), ("SIGTERM", "TERM"),
                                              ("10@5", "USR1")])
def test_signal_name(spec_signal, name):
    # The name the local runner sends ahead of the time limit (SUBMITIT_PREEMPT_SIGNAL).
    assert signal_name(JobSpec(job_dir="/tmp/j", signal=spec_signal).signal) == name


def test_record_for_summarises_the_spec(tmp_path):
    rendered = rendered_for(tmp_path, nodes=2, backend="deepspeed", launcher="torchrun", ntasks_per_node=2)
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    record = submit.record_for(rendered, "12", "sbatch", now)
    assert (record.job_id, record.via, record.submitted) == ("12", "sbatch", "2024-05-06T07:08:09+00:00")
    assert (record.nodes, record.ntasks_per_node, record.world_size) == (2, 1, 4)
    assert record.job_dir == str(tmp_path / "job")


def test_a_registry_that_cannot_take_the_jobs_line_refuses_the_submission_before_slurm_has_it(tmp_path, monkeypatch):
    """A linked jobs.jsonl was refused after sbatch: the job ran on unregistered, its directory removed."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "elsewhere.jsonl").write_text("")
    (home / registry.REGISTRY).symlink_to(tmp_path / "elsewhere.jsonl")
    queued: list[Path] = []
    monkeypatch.setattr(submit, "sbatch", lambda script: queued.append(script) or "5555")
    rendered = rendered_for(tmp_path)
    render.write(rendered)
    with pytest.raises(registry.JobError, match="symbolic link"):
        submit.submit(rendered, "sbatch", {"HPCDIST_HOME": str(home)})
    assert queued == [] and (tmp_path / "elsewhere.jsonl").read_text() == ""


# ---- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes"),
    (["--backend", "dp", "--nodes", "2"], "--backend dp"),
    (["--time", "soon"], "--time"),
    (["--cluster", "nowhere"], "unknown cluster"),
    (["--via", "sbatch", "--executor", "local"], "--via sbatch needs Slurm"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, message):
    job_dir = tmp_path / "job"
    proc = hpcdist(["submit", "--job-dir", str(job_dir), *args, "--", "--max-steps", "1"], tmp_path / "home")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not job_dir.exists()
    assert not (tmp_path / "home" / "jobs.jsonl").exists()


def test_via_sbatch_without_slurm_on_path_is_bad_input(tmp_path):
    env = environ(tmp_path / "home", PATH=path_without_slurm(tmp_path))
    proc = hpcdist(["submit", "--via", "sbatch", "--job-dir", str(tmp_path / "job")], tmp_path / "home", env=env)
    assert proc.returncode == 2
    assert "--via sbatch needs Slurm" in proc.stderr
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("via", ["sbatch", "submitit"])
def test_a_job_submitted_from_inside_an_allocation_starts_from_none_of_its_variables(tmp_path, via):
    """sbatch hands the submitting shell's environment on and Slurm overwrites only what it sets for the new job:
    from an interactive step (srun --pty bash) a stale SLURM_STEP_ID made the new batch shell pass for a task (no
    attempt number, no SIGTERM handler, no lost-node watch), and from an array task SLURM_ARRAY_JOB_ID named its
    attempts after that task. Only SLURM_CONF, which names the cluster, goes on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
env > {tmp_path / "sbatch-env"}
case " $* " in *" --parsable "*) echo 9001;; *) echo "Submitted batch job 9001";; esac
""")
    (bin_dir / "sbatch").chmod(0o755)
    inside = {"SLURM_JOB_ID": "555", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "0",
              "SLURM_STEP_NODELIST": "n3", "SLURM_STEP_NUM_TASKS": "1", "SLURM_ARRAY_JOB_ID": "700",
              "SLURM_ARRAY_TASK_ID": "3", "SLURM_CONF": "/etc/slurm/slurm.conf", "HPCDIST_ATTEMPT": "2"}
    env = environ(tmp_path / "home", PATH=f"{bin_dir}:{os.environ['PATH']}", **inside)
    proc = hpcdist(["submit", "--via", via, "--nodes", "1", "--backend", "ddp", "--job-dir", str(tmp_path / "job")],
                   tmp_path / "home", env=env)
    assert proc.returncode == 0, proc.stderr
    passed = dict(line.split("=", 1) for line in (tmp_path / "sbatch-env").read_text().splitlines() if "=" in line)
    assert {k for k in passed if k.startswith(("SLURM_", "HPCDIST_ATTEMPT"))} == {"SLURM_CONF"}


def test_an_existing_job_dir_is_refused(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "keep").write_text("mine")
    proc = hpcdist(["submit", "--dry-run", "--job-dir", str(tmp_path / "job")], tmp_path / "home")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp_path / "job" / "keep").read_text() == "mine"


def test_two_submits_in_the_same_second_get_a_job_directory_each(tmp_path, monkeypatch):
    """The quick start run from two shells at once: both once picked runs/hpcdist-TIME, to the second second."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *args: "20261207-060045")
    runner = CliRunner(env={"HPCDIST_HOME": str(tmp_path / "home")})
    said = [runner.invoke(main, ["submit", "--dry-run", "--executor", "local"]).stderr.splitlines()[-1]
            for _ in range(2)]
    assert [line.split(" (dry run")[0] for line in said] == [
        f"# job directory: {tmp_path}/runs/hpcdist-20261207-060045",
        f"# job directory: {tmp_path}/runs/hpcdist-20261207-060045-2"]


def test_dry_run_renders_like_render_and_submits_nothing(tmp_path):
    args = ["--nodes", "2", "--backend", "deepspeed", "--launcher", "deepspeed", "--", "--max-steps", "3"]
    dry = hpcdist(["submit", "--dry-run", "--job-dir", str(tmp_path / "a"), *args], tmp_path / "home")
    ren = hpcdist(["render", "--job-dir", str(tmp_path / "a"), "--force", *args], tmp_path / "home")
    assert dry.returncode == 0 and ren.returncode == 0, dry.stderr + ren.stderr
    assert dry.stdout == ren.stdout
    assert not (tmp_path / "a" / "submitit").exists()
    assert not (tmp_path / "home" / "jobs.jsonl").exists()


def test_the_dry_run_says_why_auto_became_its_precision_for_the_cpus_that_will_run_it(tmp_path):
    from hpc import dsconfig

    args = ["--nodes", "2", "--backend", "deepspeed", "--cluster", "local"]
    slurm = hpcdist(["render", "-q", "--job-dir", str(tmp_path / "s"), *args], tmp_path / "home")
    assert slurm.returncode == 0, slurm.stderr
    assert ("hpcdist render: --precision auto → fp32: not known whether cluster local's CPU nodes have native bf16; "
            "set cpu_bf16 in the profile") in slurm.stderr
    local = hpcdist(["submit", "--dry-run", "--executor", "local", "--job-dir", str(tmp_path / "l"), *args],
                    tmp_path / "home")
    assert local.returncode == 0, local.stderr
    here = "bf16" if dsconfig.this_cpu().bf16 else "fp32"
    assert f"hpcdist submit: --precision auto → {here}: " in local.stderr and "on this CPU" in local.stderr
    assert json.loads((tmp_path / "l" / "deepspeed.json").read_text())["bf16"]["enabled"] is (here == "bf16")


def test_without_slurm_the_dry_run_renders_the_job_the_local_executor_will_run(tmp_path):
    env = environ(tmp_path / "home", PATH=path_without_slurm(tmp_path))
    args = ["--nodes", "2", "--backend", "deepspeed", "--cluster", "local"]
    dry = hpcdist(["submit", "--dry-run", "--job-dir", str(tmp_path / "a"), *args], tmp_path / "home", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "--precision auto" in dry.stderr and "on this CPU" in dry.stderr
    assert "it would run here, on the local executor" in dry.stderr
    refused = hpcdist(["submit", "--dry-run", "--via", "sbatch", "--job-dir", str(tmp_path / "b"), *args],
                      tmp_path / "home", env=env)
    assert refused.returncode == 2 and "--via sbatch needs Slurm" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_the_cli_modules_import_neither_submitit_nor_torch():
    code = ("import sys, hpc.cli, hpc.commands.submit, hpc.submit, hpc.jobs, hpc.task\n"
            "bad = [m for m in ('submitit', 'torch', 'deepspeed') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)


def test_list_with_no_jobs(tmp_path):
    proc = hpcdist(["list"], tmp_path / "home")
    assert proc.returncode == 0 and "no jobs" in proc.stdout


@pytest.mark.parametrize("last", ["0", "-1"])
def test_list_of_no_jobs_asked_for_is_refused_not_taken_for_none_submitted(tmp_path, last):
    proc = hpcdist(["list", "--last", last], tmp_path / "home")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--last" in proc.stderr
    assert "no jobs" not in proc.stdout + proc.stderr


def slurm_answering(tmp_path: Path, sacct: str) -> dict[str, str]:
    """An environment whose squeue holds no job and whose sacct prints ``sacct``; each call is logged."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, out in (("squeue", ""), ("sacct", sacct), ("scontrol", "")):
        (bin_dir / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {tmp_path}/calls\nprintf '%s' '{out}'\n")
        (bin_dir / name).chmod(0o755)
    return environ(tmp_path / "home", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_list_asks_accounting_once_however_many_jobs_ended(tmp_path):
    ids = [str(500 + i) for i in range(40)]
    env = slurm_answering(tmp_path, "".join(f"{j}|CANCELLED by 0|0:0|n1|00:00:01|1\n" for j in ids))
    for job_id in ids:
        (tmp_path / job_id).mkdir()
        registry.append(tmp_path / "home" / registry.REGISTRY,
                        registry.Record(job_id=job_id, job_dir=str(tmp_path / job_id), via="sbatch", submitted=""))
    proc = hpcdist(["list", "--last", "40"], tmp_path / "home", env=env)
    assert proc.returncode == 0 and proc.stdout.count("CANCELLED") == 40, proc.stderr
    assert [line.split()[0].rsplit("/", 1)[-1] for line in (tmp_path / "calls").read_text().splitlines()].count(
        "sacct") <= 2


def test_status_of_an_unknown_job_is_exit_2(tmp_path):
    proc = hpcdist(["status", "31337"], tmp_path / "home")
    assert proc.returncode == 2 and "no job '31337'" in proc.stderr


# ---- following a job to its end (hpc/commands/submit.py over hpc.job.Job) --------------------------

def ended_local_job(job_dir: Path, job_id: str, exit_status: str) -> registry.Record:
    """A local job whose controller is gone and whose only task left ``exit_status``."""
    (job_dir / "submitit").mkdir(parents=True)
    (job_dir / "submitit" / f"{job_id}_0_exit").write_text(exit_status)
    return registry.Record(job_id=job_id, job_dir=str(job_dir), via="local", submitted="")


class Running:
    """submitit's handle of a local job still running for ``polls`` polls."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0


# Follower writes to click's stdout stream, which this click release calls deprecated.
@pytest.mark.filterwarnings("ignore:'get_text_stream' is deprecated")
def test_submit_wait_prints_the_final_line_and_exits_with_the_jobs_exit_status(tmp_path, capsys):
    record = ended_local_job(tmp_path / "job", "44", "3")
    with pytest.raises(SystemExit) as ended:
        commands_submit._wait(Job(record, handle=Running(2), sleep=lambda s: None))
    assert ended.value.code == 3
    out, err = capsys.readouterr()
    assert re.search(r"^44  FAILED  exit=3  waited=\d+\.\ds$", out, re.M)
    assert "task 0 (rank 0) failed first: exit status 3" in err


def test_a_run_gone_on_as_a_new_job_is_reported_as_that_job_saying_why(tmp_path, capsys, monkeypatch):
    from hpc import rescue

    old = ended_local_job(tmp_path / "old", "44", "9")
    new = ended_local_job(tmp_path / "new", "45", "0")
    (tmp_path / "old" / "attempts.jsonl").write_text(json.dumps(
        {"attempt": 0, "job_id": "44", "ending": "node_failure", "node": "n1", "action": "resubmit",
         "reason": "resubmitted as job 45 without n1", "detail": "the batch host n1 was lost"}) + "\n")

    def wait(job, poll_s, on_poll, on_rescue):
        on_rescue(job.record, new)  # what hpc/rescue.py's loop does when the batch host died (tests/test_rescue.py)
        return Job(new), Job(new).state()

    monkeypatch.setattr(rescue, "wait", wait)
    commands_submit._wait(Job(old))
    out, err = capsys.readouterr()
    assert out.startswith("45  COMPLETED  exit=0  waited=")
    assert "hpcdist: attempt 0: node_failure" in err and "resubmitted as job 45 without n1" in err


def test_logs_follow_prints_a_job_that_ended_once_and_returns(tmp_path):
    home = tmp_path / "home"
    record = ended_local_job(tmp_path / "job", "44", "0")
    (tmp_path / "job" / "logs").mkdir()
    (tmp_path / "job" / "logs" / "task-0.log").write_text("step 1\nstep 2\n")
    registry.append(registry.registry_path({"HPCDIST_HOME": str(home)}), record)
    proc = hpcdist(["logs", "44", "--follow"], home)
    assert (proc.returncode, proc.stdout) == (0, "step 1\nstep 2\n")


def test_logs_of_a_job_whose_directory_was_deleted_say_so_in_one_line(tmp_path):
    home = tmp_path / "home"
    record = ended_local_job(tmp_path / "job", "44", "0")
    registry.append(registry.registry_path({"HPCDIST_HOME": str(home)}), record)
    shutil.rmtree(tmp_path / "job")
    proc = hpcdist(["logs", "44"], home)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert "no longer exists (deleted or moved)" in proc.stderr


def test_a_local_dry_run_says_its_tasks_run_the_local_task_line_not_job_sbatch(tmp_path):
    runner = CliRunner(env={"HPCDIST_HOME": str(tmp_path / "home")})
    job = tmp_path / "job"
    dry = runner.invoke(main, ["submit", "--dry-run", "--executor", "local", "--nodes", "2", "-o", str(job)])
    assert dry.exit_code == 0, dry.output
    said = dry.stderr.splitlines()[-1]
    assert "it would run here, on the local executor, without job.sbatch, step.sh or requeue.sh" in said
    assert said.endswith(f"each of its 2 task(s) runs: set -e; source {job}/setup.sh; exec bash {job}/task.sh)")


@pytest.mark.parametrize("cancelled,says", [(True, "cancelled the 2 array(s) queued before it"),
                                            (False, "could not be cancelled: run scancel 11 12")])
def test_a_sweep_refused_part_way_cancels_the_arrays_queued_before_or_says_it_could_not(tmp_path, monkeypatch,
                                                                                      cancelled, says):
    from hpc.slurm import commands

    answers = iter(["11", "12", submit.SubmitError("sbatch failed: QOSMaxSubmitJobPerUserLimit")])

    def sbatch(script):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    asked = []
    monkeypatch.setattr(submit, "sbatch", sbatch)
    monkeypatch.setattr(commands, "scancel", lambda ids, **kw: asked.append(list(ids)) or cancelled)
    with pytest.raises(submit.SubmitError) as refused:
        submit.submit_arrays([tmp_path / name / "job.sbatch" for name in ("a0", "a1", "a2")])
    assert asked == [["11", "12"]]
    message = str(refused.value)
    assert message.startswith("a2: sbatch failed: QOSMaxSubmitJobPerUserLimit; ") and says in message
