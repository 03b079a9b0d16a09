"""hpc.jobs: the job registry, Slurm's answers parsed, local job outcomes, and which log to show."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hpc import jobs, registry, vocab
from hpc import logs as job_logs


def rec(job_id="101", job_dir="/runs/a", via="submitit", **kw) -> registry.Record:
    return registry.Record(job_id=job_id, job_dir=job_dir, via=via, submitted="2024-01-01T00:00:00+00:00", **kw)


# ---- registry ------------------------------------------------------------------------------------

def test_registry_path_defaults_to_home_and_follows_hpcdist_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.registry_path({}) == tmp_path / ".hpcdist" / "jobs.jsonl"
    assert registry.registry_path({"HPCDIST_HOME": "/x/y"}) == Path("/x/y/jobs.jsonl")


def test_append_then_load_round_trips(tmp_path):
    path = tmp_path / "home" / "jobs.jsonl"
    first, second = rec("1", backend="ddp", nodes=2, world_size=2), rec("2", via="sbatch")
    registry.append(path, first)
    registry.append(path, second)
    assert registry.load(path) == [first, second]
    assert all(json.loads(line)["job_id"] for line in path.read_text().splitlines())


def test_load_of_a_missing_registry_is_empty(tmp_path):
    assert registry.load(tmp_path / "nothing.jsonl") == []


def test_a_damaged_line_is_skipped():
    text = rec("1").to_json() + "\n{not json\n" + '{"job_id": "3"}\n' + rec("2").to_json() + "\n"
    assert [r.job_id for r in registry.parse_registry(text)] == ["1", "2"]


def test_unknown_keys_from_a_newer_version_are_ignored():
    line = json.dumps({**json.loads(rec("5").to_json()), "future_field": 1})
    assert registry.parse_registry(line)[0].job_id == "5"


def test_find_by_id_takes_the_newest_and_by_directory():
    records = [rec("7", "/runs/old"), rec("8", "/runs/b"), rec("7", "/runs/new")]
    assert registry.find(records, "7").job_dir == "/runs/new"
    assert registry.find(records, "/runs/b").job_id == "8"
    assert registry.find(records, "b", cwd="/runs").job_id == "8"
    assert registry.find(records, "/runs/b/").job_id == "8"
    assert registry.find(records, "9") is None


def test_cancel_of_an_id_that_names_two_jobs_cancels_neither_and_asks_for_the_directory(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    home = tmp_path / "home"
    for job_dir, via in ((tmp_path / "local-run", "local"), (tmp_path / "slurm-run", "sbatch")):
        registry.append(home / registry.REGISTRY, rec("4242", str(job_dir), via=via))
    monkeypatch.setenv("HPCDIST_HOME", str(home))
    monkeypatch.setattr(jobs, "cancel", lambda record: pytest.fail(f"cancelled {record.job_dir}"))
    result = CliRunner().invoke(cancel, ["4242"])
    assert result.exit_code == 2 and "names 2 jobs" in result.output and "slurm-run" in result.output
    assert "job directory" in result.output

def test_list_names_a_registry_it_cannot_read_instead_of_saying_no_jobs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpc.commands.submit import list_jobs

    home = tmp_path / "home"
    monkeypatch.setenv("HPCDIST_HOME", str(home))
    assert CliRunner().invoke(list_jobs, []).output == "no jobs submitted from here yet\n"  # none yet: no file
    elsewhere = tmp_path / "elsewhere.jsonl"
    registry.append(elsewhere, rec("7", str(tmp_path / "job")))
    home.mkdir()
    (home / registry.REGISTRY).symlink_to(elsewhere)
    result = CliRunner().invoke(list_jobs, [])
    assert result.exit_code == 2 and "symbolic link" in result.output and "no jobs" not in result.output

def fake_slurm(tmp_path: Path, **answers: str) -> dict[str, str]:
    """An environment whose Slurm commands are stubs that print ``answers[name]`` (else fail) and log each call to
    tmp_path/calls; HPCDIST_HOME is tmp_path/home."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("squeue", "sacct", "scancel", "scontrol", "sinfo", "sbatch"):
        out = answers.get(name)
        (stubs / name).write_text(f'#!/bin/sh\necho "${{0##*/}} $*" >> {tmp_path}/calls\n'
                                  + (f"printf '%b' '{out}'\n" if out is not None else "exit 1\n"))
        (stubs / name).chmod(0o755)
    return {"PATH": f"{stubs}:{os.environ['PATH']}", "HPCDIST_HOME": str(tmp_path / "home")}


def test_status_of_a_job_whose_run_folder_is_a_link_shows_slurms_state_then_refuses_the_folder(tmp_path):
    from click.testing import CliRunner

    from hpc.commands.submit import status

    env = fake_slurm(tmp_path, sacct="4242|COMPLETED|0:0|n1|00:01:00|1\n")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "run").symlink_to(tmp_path)
    registry.append(tmp_path / "home" / registry.REGISTRY, rec("4242", str(job_dir), via="sbatch"))
    result = CliRunner().invoke(status, ["4242"], env=env)
    assert result.exit_code == 2  # as top, timeline, report and logs refuse a linked folder
    assert result.stdout.startswith("4242  COMPLETED  exit=0  nodes=n1")
    assert result.stderr.count("\n") == 1 and "run is a symbolic link" in result.stderr


@pytest.mark.parametrize("args", [["list"], ["status", "4242"], ["cancel", "4242"], ["logs", "4242"],
                                  ["submit", "--via", "sbatch", "--executor", "slurm", "--backend", "ddp"],
                                  ["sweep", "--grid", "backend=ddp,dp"]], ids=lambda args: args[0])
def test_every_command_refuses_a_registry_that_is_a_link_in_one_line_exit_2_and_leaves_nothing(tmp_path, args):
    """submit and sweep exited 1 on it, list 2, and status, cancel and logs said no such job was submitted."""
    from click.testing import CliRunner

    from hpc.cli import main

    env = fake_slurm(tmp_path)
    elsewhere = tmp_path / "elsewhere.jsonl"
    registry.append(elsewhere, rec("4242", str(tmp_path / "job"), via="sbatch"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / registry.REGISTRY).symlink_to(elsewhere)
    before = elsewhere.read_text()
    writes = ["-o", str(tmp_path / "out")] if args[0] in ("submit", "sweep") else []
    result = CliRunner().invoke(main, [*args, *writes], env=env)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path}/home/jobs.jsonl is a symbolic link" in result.stderr and "HPCDIST_HOME" in result.stderr
    assert elsewhere.read_text() == before and not (tmp_path / "out").exists()
    assert "sbatch" not in (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else True


def test_cancel_of_a_job_arrays_own_id_cancels_the_array_whose_tasks_are_registered(tmp_path):
    """A sweep registers its array's tasks (1234_0, ...): `cancel 1234` said no job 1234 was submitted."""
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    env = fake_slurm(tmp_path, squeue="1234_0|RUNNING|n1|0:05\n1234_1|PENDING|(null)|0:00\n", scancel="")
    for task in range(4):
        registry.append(tmp_path / "home" / registry.REGISTRY, rec(f"1234_{task}", str(tmp_path / f"task-{task}")))
    result = CliRunner().invoke(cancel, ["1234"], env=env)
    assert (result.exit_code, result.output) == (0, "Cancelled job array 1234 (4 tasks registered here)\n")
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "scancel 1234"


def test_cancel_of_a_job_array_that_ended_says_so_and_cancels_nothing(tmp_path):
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    env = fake_slurm(tmp_path, sacct="1234_0|COMPLETED|0:0|n1|0|1\n1234_1|FAILED|1:0|n1|0|1\n", scancel="")
    for task in range(2):
        registry.append(tmp_path / "home" / registry.REGISTRY, rec(f"1234_{task}", str(tmp_path / f"task-{task}")))
    result = CliRunner().invoke(cancel, ["1234"], env=env)
    assert (result.exit_code, result.output) == (0, "job array 1234 (2 tasks registered here) already ended: "
                                                    "COMPLETED, FAILED\n")
    assert "scancel" not in (tmp_path / "calls").read_text()


def test_cancel_of_an_id_both_a_local_jobs_and_a_job_arrays_refuses_in_one_line_and_cancels_neither(tmp_path):
    """A local job's id is a pid, which a sweep's array id may equal: `cancel 1234` took the local job (ended) and
    said so, and the live array it named too went on running; as for two jobs of one id, the user says which."""
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    env = fake_slurm(tmp_path, squeue="1234_0|RUNNING|n1|0:05\n", scancel="")
    home = tmp_path / "home" / registry.REGISTRY
    registry.append(home, rec("1234", str(tmp_path / "local"), via="local"))
    for task in range(2):
        registry.append(home, rec(f"1234_{task}", str(tmp_path / f"task-{task}")))
    result = CliRunner().invoke(cancel, ["1234"], env=env)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "1234 names" in result.stderr and "1234_0" in result.stderr and str(tmp_path / "local") in result.stderr
    assert "scancel" not in ((tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else "")


def test_cancel_of_a_job_answers_from_one_read_of_the_registry_though_it_changes_meanwhile(tmp_path, monkeypatch):
    """`cancel 4242` read the registry for an array of that id, then again for the job: a registry rewritten in
    between (another submission, a hand edit) gave the two reads different answers."""
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    env = fake_slurm(tmp_path, squeue="4242|RUNNING|n1|0:05\n", scancel="")
    reads = [[rec("4242", str(tmp_path / "job"), via="sbatch")], []]  # what each read of the registry finds
    monkeypatch.setattr(registry, "load", lambda path: reads.pop(0))
    result = CliRunner().invoke(cancel, ["4242"], env=env)
    assert (result.exit_code, result.output) == (0, "Cancelled job 4242\n")
    assert len(reads) == 1 and (tmp_path / "calls").read_text().splitlines()[-1] == "scancel 4242"

def test_lookup_falls_back_to_the_job_directory_marker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    record = rec("55", str(job_dir))
    registry.write_marker(record)
    assert registry.lookup(str(job_dir), {"HPCDIST_HOME": str(tmp_path / "empty")}) == record
    with pytest.raises(registry.JobError, match="no job '56'"):
        registry.lookup("56", {"HPCDIST_HOME": str(tmp_path / "empty")})


@pytest.mark.parametrize("job_id", ["--me", "--user=alice", "101,102", "-p debug"])
def test_a_marker_whose_job_id_is_no_slurm_job_id_names_no_job(tmp_path, job_id):
    """The id becomes scancel's argument: a forged `--me` would cancel every job of the user."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / vocab.SUBMITTED_JSON).write_text(json.dumps({"job_id": job_id, "job_dir": str(job_dir), "via": "sbatch",
                                                       "submitted": "t"}) + "\n")
    with pytest.raises(registry.JobError, match="no job"):
        registry.lookup(str(job_dir), {"HPCDIST_HOME": str(tmp_path / "empty")})


def test_array_tasks_and_local_runs_keep_their_ids():
    assert [r.job_id for r in (rec("101_3"), rec("local-1", via="local"), rec("4242", via="sbatch"))] == \
        ["101_3", "local-1", "4242"]


# ---- Slurm's answers -----------------------------------------------------------------------------

def test_sacct_states_read_each_jobs_allocation_row():
    text = "301|CANCELLED by 0|0:15|n[1-2]|00:00:07|2\n301.batch|CANCELLED|0:15|n1|00:00:07|1\n"
    state = jobs.sacct_states(text)["301"]
    assert state == jobs.JobState("301", "CANCELLED", 0, 15, "n[1-2]", "00:00:07", 2)
    assert state.done and not state.ok
    assert "302" not in jobs.sacct_states(text)
    assert jobs.sacct_states(text.replace("|2\n", "|\u00b2\n", 1))["301"].nnodes is None


@pytest.mark.parametrize("row,done,ok", [
    ("9|COMPLETED|0:0|n1|00:00:01|1", True, True),
    ("9|FAILED|3:0|n1|00:00:01|1", True, False),
    ("9|RUNNING|0:0|n1|00:00:01|1", False, False),
    ("9|REQUEUED|0:0|n1|00:00:01|1", False, False),
    ("9|PENDING|0:0|None assigned|00:00:00|2", False, False),
    ("9|TIMEOUT|0:0|n1|00:01:00|1", True, False),
])
def test_done_and_ok(row, done, ok):
    state = jobs.sacct_states(row)["9"]
    assert (state.done, state.ok) == (done, ok)


def test_parse_squeue():
    assert jobs.parse_squeue("12|RUNNING|n[1-2]|0:03\n", "12") == jobs.JobState("12", "RUNNING", None, None,
                                                                             "n[1-2]", "0:03")
    assert jobs.parse_squeue("", "12") is None


def fake_runner(answers):
    """Canned command output keyed by the command's name (a stand-in for the subprocess, not for Slurm)."""
    calls = []

    def run(argv):
        calls.append(list(argv))
        out, code, *err = answers.get(argv[0], ("", 1))
        return subprocess.CompletedProcess(argv, code, out, err[0] if err else "")

    run.calls = calls
    return run


def test_a_job_the_controller_holds_is_its_word_and_accounting_is_not_asked():
    runner = fake_runner({"sacct": ("44|REQUEUED|0:0|None assigned|00:00:00|2\n", 0),
                          "squeue": ("44|PENDING|(null)|0:00\n", 0)})
    assert jobs.slurm_state("44", runner).state == "PENDING"
    assert [c[0] for c in runner.calls] == ["squeue"]


def test_a_job_the_controller_no_longer_holds_is_read_from_accounting():
    runner = fake_runner({"squeue": ("", 1, "slurm_load_jobs error: Invalid job id specified"),
                          "sacct": ("44|COMPLETED|0:0|n1|00:00:02|1\n", 0)})
    assert jobs.slurm_state("44", runner).ok
    assert [c[0] for c in runner.calls] == ["squeue", "sacct"]


LIVE_VS_ACCOUNTING = json.loads((Path(__file__).parent / "data" / "slurm" / "live-vs-accounting.json").read_text())


@pytest.mark.parametrize("case", [*LIVE_VS_ACCOUNTING["cases"], LIVE_VS_ACCOUNTING["issue_report"]],
                         ids=lambda c: f"{c['squeue'].split('|')[1] if c['squeue'] else 'gone'}-vs-"
                                       f"{c['sacct'].split('|')[1]}")
def test_a_live_jobs_state_comes_from_the_controller_not_a_stale_accounting_row(case):
    """Captured squeue/sacct pairs (tests/data/slurm/live-vs-accounting.json): e.g. accounting saying NODE_FAIL
    while the controller still holds the job requeued, which a waiter would have taken for the end."""
    runner = fake_runner({"squeue": (case["squeue"] + "\n" if case["squeue"] else "", 0),
                          "sacct": (case["sacct"] + "\n", 0)})
    found = jobs.slurm_state(case["job_id"], runner)
    assert (found.state, found.done) == (case["state"], case["done"])
    assert jobs.states([rec(case["job_id"], via="sbatch")], runner)[0].state == case["state"]


def test_a_job_that_left_the_queue_while_accounting_is_down_is_done_not_waited_for_forever():
    runner = fake_runner({"sacct": ("", 1, "sacct: error: Unable to connect to database"),
                          "squeue": ("", 1, "slurm_load_jobs error: Invalid job id specified")})
    state = jobs.slurm_state("44", runner)
    assert state.state == "LEFT_QUEUE" and state.done and not state.ok


@pytest.mark.parametrize("squeue", [("", 1, "slurm_load_jobs error: Invalid job id specified"),
                                    ("45|RUNNING|n1|0:02\n", 0)], ids=["queue-holds-none", "queue-holds-another"])
def test_a_job_neither_the_controller_nor_accounting_knows_any_more_has_left_the_queue_not_waited_for_forever(
        squeue):
    """Purged from accounting (or submitted to another cluster): `logs -f`, `top` and `watch` looped on UNKNOWN."""
    runner = fake_runner({"squeue": squeue, "sacct": ("", 0)})
    state = jobs.states([rec("44", via="sbatch"), rec("45", via="sbatch")], runner)[0]
    assert state.state == "LEFT_QUEUE" and state.done and not state.ok


# Captured on the local Slurm 22.05: the first sacct row of a 2-node job that had just ended (NodeList its batch
# host alone), and the controller's view of the same job.
JUST_ENDED = "33998203|COMPLETED|0:0|n1|00:00:01|2\n"
SETTLED = "33998203|COMPLETED|0:0|n[1-2]|00:00:01|2\n"
SCONTROL = "JobId=33998203 JobName=wrap JobState=COMPLETED Reason=None NodeList=n[1-2] BatchHost=n1 NumNodes=2\n"


def test_a_job_that_just_ended_is_shown_on_every_node_it_ran_on_not_only_its_batch_host():
    runner = fake_runner({"squeue": ("", 0), "sacct": (JUST_ENDED, 0), "scontrol": (SCONTROL, 0)})
    state = jobs.slurm_state("33998203", runner)
    assert (state.state, state.nodelist, state.nnodes) == ("COMPLETED", "n[1-2]", 2)
    assert [c[:3] for c in runner.calls] == [["squeue", "-h", "-j"], ["sacct", "-X", "-n"],
                                             ["scontrol", "show", "job"]]
    listed = fake_runner({"squeue": ("", 0), "sacct": (JUST_ENDED, 0), "scontrol": (SCONTROL, 0)})
    assert jobs.states([rec("33998203", via="sbatch")], listed)[0].nodelist == "n[1-2]"


@pytest.mark.parametrize("row", [
    SETTLED,
    "7|CANCELLED by 0|0:0|None assigned|00:00:00|2\n",  # cancelled while pending: it ran nowhere
    "7|RUNNING|0:0|n1|00:00:01|2\n",  # not ended: the queue's answer is live anyway
])
def test_the_controller_is_asked_only_while_accountings_nodelist_is_short(row):
    runner = fake_runner({"squeue": ("", 0), "sacct": (row, 0), "scontrol": (SCONTROL, 0)})
    jobs.slurm_state(row.split("|")[0], runner)
    assert [c[0] for c in runner.calls] == ["squeue", "sacct"]


def test_accountings_short_nodelist_stays_when_the_controller_has_forgotten_the_job():
    runner = fake_runner({"sacct": (JUST_ENDED, 0),
                          "scontrol": ("", 1, "slurm_load_jobs error: Invalid job id specified")})
    assert jobs.slurm_state("33998203", runner).nodelist == "n1"


def test_slurm_state_of_an_unknown_job():
    assert jobs.slurm_state("45", fake_runner({})).state == "UNKNOWN"


def test_states_asks_squeue_then_sacct_once_for_every_slurm_job(tmp_path):
    runner = fake_runner({"squeue": ("4|RUNNING|n1|0:02\n", 0),
                          "sacct": ("1|COMPLETED|0:0|n1|0|1\n2|FAILED|1:0|n2|0|1\n", 0)})
    out = jobs.states([rec("1"), rec("2", via="sbatch"), rec("3"), rec("4")], runner)
    assert [s.state for s in out] == ["COMPLETED", "FAILED", "LEFT_QUEUE", "RUNNING"]
    assert [c[0] for c in runner.calls] == ["squeue", "sacct"]
    assert "1,2,3,4" in runner.calls[0] and "1,2,3" in runner.calls[1]


# ---- local jobs ----------------------------------------------------------------------------------

def test_local_outcome_running_wins():
    assert jobs.local_outcome("5", 2, {}, running=True).state == "RUNNING"


def test_local_outcome_completed_when_every_task_exited_zero():
    state = jobs.local_outcome("5", 2, {"5_0_exit": "0\n", "5_1_exit": "0\n"}, running=False)
    assert state.ok and state.exit_code == 0


def test_local_outcome_reports_the_first_real_failure_not_the_stopped_tasks():
    files = {"5_0_exit": "143\n", "5_1_exit": "3\n"}
    assert jobs.local_outcome("5", 2, files, running=False) == jobs.JobState("5", "FAILED", 3)


def test_local_outcome_missing_status_is_a_failure_and_a_cancel_is_cancelled():
    assert jobs.local_outcome("5", 2, {"5_0_exit": "0\n"}, running=False).state == "FAILED"
    assert jobs.local_outcome("5", 2, {"5_cancelled": ""}, running=False).state == "CANCELLED"


def test_local_state_of_a_dead_controller_reads_the_files(tmp_path):
    record = rec("999999999", str(tmp_path), via="local", nodes=2, ntasks_per_node=1, world_size=2)
    record.submitit_dir.mkdir()
    (record.submitit_dir / "999999999_0_exit").write_text("0\n")
    (record.submitit_dir / "999999999_1_exit").write_text("0\n")
    assert jobs.state(record).state == "COMPLETED"


def test_a_local_job_and_a_slurm_job_of_the_same_number_each_keep_their_own_state(tmp_path):
    """A local job's id is its controller's pid: `list` showed the Slurm job's state on both rows."""
    local = rec("4242", str(tmp_path), via="local")
    local.submitit_dir.mkdir()
    (local.submitit_dir / "4242_0_exit").write_text("3\n")
    slurm = rec("4242", "/runs/b", via="sbatch")
    runner = fake_runner({"squeue": ("", 0), "sacct": ("4242|COMPLETED|0:0|n1|00:00:01|1\n", 0)})
    assert [s.state for s in jobs.states([local, slurm], runner)] == ["FAILED", "COMPLETED"]


# ---- logs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,nodes,per_node,rank,task", [
    (4, 2, 2, 3, 3),   # srun: one task per rank
    (4, 2, 1, 3, 1),   # torchrun/deepspeed: one task per node holds two ranks
    (1, 1, 1, 0, 0),
])
def test_task_of_a_rank(world, nodes, per_node, rank, task):
    record = rec(nodes=nodes, ntasks_per_node=per_node, world_size=world)
    assert job_logs.task_of(record, rank) == task


def test_task_of_a_rank_outside_the_world():
    with pytest.raises(registry.JobError):
        job_logs.task_of(rec(world_size=2, nodes=2), 2)


def test_failing_task_from_sruns_report():
    batch = ("srun: error: n2: task 1: Exited with exit code 3\n"
             "srun: launch/slurm: _step_signal: Terminating StepId=1.0\n"
             "srun: error: n1: task 0: Terminated\n")
    assert job_logs.failing_task(batch, {}) == 1
    assert job_logs.failing_task("srun: error: n1: tasks 2-3: Exited with exit code 1\n", {}) == 2


def test_failing_task_from_local_statuses():
    assert job_logs.failing_task("", {0: 143, 1: 0, 2: 7}) == 2
    assert job_logs.failing_task("", {0: 143, 1: 0}) == 0
    assert job_logs.failing_task("", {0: 0}) is None


def test_a_local_exit_status_that_is_no_ascii_count_is_no_status_not_a_crash():
    for text in ("\u00b2\n", "--1\n", "1_0\n"):
        files = {"5_0_exit": text, "5_1_exit": "0\n"}
        assert jobs.local_outcome("5", 2, files, running=False) == jobs.JobState("5", "FAILED", None), text


def test_log_files_in_task_order_then_batch(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("task-10.log", "task-2.log", "batch-7.out", "task-0.log"):
        (logs / name).write_text(name)
    record = rec("7", str(tmp_path), nodes=11, world_size=11)
    assert [p.name for p in job_logs.log_files(record)] == ["task-0.log", "task-2.log", "task-10.log", "batch-7.out"]
    assert job_logs.log_files(record, rank=2) == [logs / "task-2.log"]


def test_a_logs_folder_that_is_a_link_is_refused_never_listed_or_read_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("id_rsa", "task-0.log"):
        (elsewhere / name).write_text("not the job's\n")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "logs").symlink_to(elsewhere)
    record = rec("7", str(job_dir), nodes=1, world_size=1)
    for rank in (None, 0):
        with pytest.raises(registry.JobError, match="logs is a symbolic link"):
            job_logs.log_files(record, rank)
    # Nor does the failure report that submit --wait and doctor print read the tails there.
    report = job_logs.failure_report(record)
    assert "logs is a symbolic link" in report and "not the job's" not in report


def test_cancel_scancels_the_job_and_logs_are_its_task_logs_then_the_batch_log(tmp_path):
    calls = []
    (tmp_path / "logs").mkdir()
    for name in ("batch-44.log", "task-1.log", "task-0.log"):
        (tmp_path / "logs" / name).write_text("")
    record = rec("44", str(tmp_path), via="sbatch")
    jobs.cancel(record, lambda argv: calls.append(list(argv)) or subprocess.CompletedProcess(argv, 0, "", ""))
    assert calls == [["scancel", "44"]]
    assert [p.name for p in job_logs.log_files(record)] == ["task-0.log", "task-1.log", "batch-44.log"]


def test_cancel_of_a_local_job_whose_folder_was_deleted_still_stops_its_controller(tmp_path, monkeypatch):
    signals = []
    monkeypatch.setattr(jobs, "controller_pid", lambda record: 4321)
    monkeypatch.setattr(jobs.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    assert jobs.cancel(rec("4321", str(tmp_path / "deleted"), via="local")) is True
    assert signals == [(4321, jobs.signal.SIGTERM)] and not (tmp_path / "deleted").exists()


def test_cancel_of_a_local_job_without_a_controller_says_nothing_was_cancelled(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpc.commands.submit import cancel

    home = tmp_path / "home"
    registry.append(home / registry.REGISTRY, rec("999999", str(tmp_path / "deleted"), via="local"))
    monkeypatch.setenv("HPCDIST_HOME", str(home))
    result = CliRunner().invoke(cancel, ["999999"])
    assert result.exit_code == 0 and "Cancelled" not in result.output
    assert result.output == "job 999999 already ended: LEFT_QUEUE\n"  # its folder, with its statuses, is gone


def test_failure_report_shows_the_failing_tasks_tail(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "task-0.log").write_text("fine\n")
    (logs / "task-1.log").write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: boom\n")
    (logs / "batch-7.out").write_text("srun: error: n2: task 1: Exited with exit code 1\n")
    report = job_logs.failure_report(rec("7", str(tmp_path), nodes=2, world_size=2), lines=5)
    assert "task-1.log (the failing task)" in report
    assert "Traceback: boom" in report and "line 95\n" not in report and "line 96" in report
    assert "fine" not in report


def test_the_failure_report_reads_a_task_s_status_only_from_a_file_named_by_its_ascii_index(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "submitit").mkdir()
    for index, status in (("0", "0"), ("1", "0"), ("\u0661", "9")):  # ARABIC-INDIC DIGIT ONE: int() reads 1
        (tmp_path / "submitit" / f"7_{index}_exit").write_text(status)
    report = job_logs.failure_report(rec("7", str(tmp_path), via="local", nodes=2, world_size=2))
    assert "failed first" not in report


def test_tail_reads_only_the_end(tmp_path):
    path = tmp_path / "big.log"
    path.write_text("".join(f"{i}\n" for i in range(100000)))
    assert job_logs.tail(path, 2) == "99998\n99999"
    assert job_logs.tail(tmp_path / "missing", 2) == ""


def test_job_state_line():
    line = jobs.JobState("9", "FAILED", 3, 0, "n[1-2]", "00:00:04").line()
    assert line == "9  FAILED  exit=3  nodes=n[1-2]  elapsed=00:00:04"


def test_a_killed_rank_is_blamed_not_the_peer_that_noticed_it(tmp_path):
    # srun reports the kill -9'd rank first; rank 0 exits 1 only after its collective broke.
    batch = ("srun: error: n2: task 1: Killed\n"
             "srun: error: n1: task 0: Exited with exit code 1\n")
    assert job_logs.failing_task(batch, {}) == 1
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "task-0.log").write_text("RuntimeError: Connection closed by peer\n")
    (logs / "task-1.log").write_text("Epoch: 0 | Batch: 12/16 | Loss: 1.9\n")
    (logs / "batch-8.out").write_text(batch)
    report = job_logs.failure_report(rec("8", str(tmp_path), nodes=2, world_size=2))
    assert report.splitlines()[0] == "hpcdist: task 1 (rank 1) on n2 failed first: Killed"


def test_the_failure_report_of_a_retried_job_names_the_last_attempts_failure_not_the_first(tmp_path):
    batch = ("hpcdist: attempt 0 started on n1 at 2026-12-01T11:23:30\n"
             "srun: error: n2: task 1: Exited with exit code 137\n"
             "hpcdist: attempt 0 ended: rank_crashed: rank 1 on n2: killed by SIGKILL -> retry 1 of 2 without n2\n"
             "hpcdist: attempt 1 started on n1 at 2026-12-01T11:24:00\n"
             "srun: error: n3: task 1: Exited with exit code 137\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "batch-9.out").write_text(batch)
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(
        {"attempt": a, "job_id": "9", "ending": "rank_crashed", "rank": 1, "node": node, "action": action,
         "detail": f"rank 1 on {node}: killed by SIGKILL"}) + "\n" for a, node, action in ((0, "n2", "retry"),
                                                                                              (1, "n3", "none"))))
    report = job_logs.failure_report(rec("9", str(tmp_path), nodes=2, world_size=2))
    assert report.splitlines()[:2] == ["hpcdist: rank_crashed: rank 1 on n3: killed by SIGKILL",
                                       "hpcdist: task 1 (rank 1) on n3 failed first: Exited with exit code 137"]


@pytest.mark.parametrize("fields", [
    {"nodes": "2"}, {"job_id": 4242}, {"job_dir": ["x"]}, {"nodes": 0}, {"world_size": True},
    {"nodes": 10**6, "ntasks_per_node": 10**6}, {"via": "local", "nodes": 2, "ntasks_per_node": 1024},
    {"job_id": "x" * 256}, {"job_id": "--me"}, {"job_id": "5,6"}, {"job_id": "-1"}, {"job_id": "5\n"},
])
def test_a_registry_line_of_the_wrong_type_range_or_length_is_skipped(fields) -> None:
    good = {"job_id": "5", "job_dir": "/j", "via": "sbatch", "submitted": "t"}
    text = json.dumps({**good, **fields}) + "\n" + json.dumps({**good, "job_id": "6"}) + "\n"
    assert [r.job_id for r in registry.parse_registry(text)] == ["6"]


def test_a_registry_of_damaged_bytes_is_empty_but_one_that_is_a_folder_is_refused_naming_the_fix(tmp_path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad").write_bytes(b"\xff\xfe\n")
    assert registry.load(tmp_path / "bad") == []
    with pytest.raises(registry.JobError, match="dir is a directory, not a file; move it away, or set HPCDIST_HOME"):
        registry.load(tmp_path / "dir")


@pytest.mark.parametrize("what", ["link", "folder"])
def test_an_append_to_a_registry_that_became_a_link_or_folder_after_its_check_is_refused_in_the_registrys_one_line(
        tmp_path, what) -> None:
    path, elsewhere = tmp_path / "jobs.jsonl", tmp_path / "elsewhere.jsonl"
    registry.writable(path)  # none yet: the check passes
    path.symlink_to(elsewhere) if what == "link" else path.mkdir()
    with pytest.raises(registry.JobError) as appended:
        registry.append(path, rec("7"))
    with pytest.raises(registry.JobError) as loaded:
        registry.load(path)
    assert str(appended.value) == str(loaded.value) and "\n" not in str(appended.value)
    assert not elsewhere.exists() and (path.is_symlink() or not any(path.iterdir()))


# Captured on the local Slurm 22.05: `squeue -h -j A_0,A_1,A_2,A_3 -o %i|%T|%N|%M` of a 4-task array whose tasks 2
# and 3 wait for nodes (folded into one row), and the same with --array (a row per task).
FOLDED = "23317304_[2-3]|PENDING|(null)|0:00\n23317304_0|RUNNING|n[1-3]|0:02\n23317304_1|RUNNING|n[1-3]|0:02\n"
A_ROW_EACH = ("23317304_2|PENDING|(null)|0:00\n23317304_3|PENDING|(null)|0:00\n23317304_0|RUNNING|n[1-3]|0:02\n"
              "23317304_1|RUNNING|n[1-3]|0:02\n")


def test_the_pending_tasks_of_an_array_are_each_pending_not_gone_from_the_queue():
    def slurm(argv):
        out = (A_ROW_EACH if "--array" in argv or "-r" in argv else FOLDED) if argv[0] == "squeue" else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    tasks = [rec(f"23317304_{i}", via="sbatch") for i in range(4)]
    assert [s.state for s in jobs.states(tasks, slurm)] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]


# Captured on the local Slurm 22.05 after `hpcdist cancel` of a sweep's array whose tasks 2-3 still waited: sacct keeps
# no row under their own ids (asked for A_0,A_2 it answers A_0 alone), only the row the array's own id folds them in.
CANCELLED_ARRAY = ("23317313_0|CANCELLED by 0|0:0|n[1-3]|00:00:09|3\n23317313_1|CANCELLED by 0|0:0|n[1-3]|00:00:09|3\n"
                   "23317313_[2-3%4]|CANCELLED by 0|0:0|None assigned|00:00:00|3\n")


def test_an_array_task_cancelled_before_it_started_is_cancelled_not_gone_from_the_queue():
    def slurm(argv):
        if argv[0] == "squeue":
            return subprocess.CompletedProcess(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
        asked = argv[argv.index("-j") + 1].split(",")
        rows = [r for r in CANCELLED_ARRAY.splitlines(keepends=True)
                if r.split("|")[0] in asked or "[" in r and "23317313" in asked]
        return subprocess.CompletedProcess(argv, 0, "".join(rows), "")

    states = jobs.slurm_states(["23317313_0", "23317313_2", "23317313_3"], slurm)
    assert [s.state for s in states.values()] == ["CANCELLED"] * 3
