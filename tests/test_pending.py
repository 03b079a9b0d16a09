"""Slurm's pending reasons become a sentence with what to do, and the jobs ahead are counted from squeue."""

from __future__ import annotations

import subprocess
from typing import Sequence

import pytest

from hpc import pending, registry


@pytest.mark.parametrize("reason,words", [
    ("Resources", ["waiting for resources", "fewer --nodes or a shorter --time"]),
    ("Priority", ["waiting behind jobs of higher priority"]),
    ("(ReqNodeNotAvail, UnavailableNodes:n2)", ["a node it needs is unavailable", "(n2)", "drop --nodelist"]),
    ("QOSMaxJobsPerUserLimit", ["per-user or per-job limit of its QOS (QOSMaxJobsPerUserLimit)"]),
    ("QOSMaxWallDurationPerJobLimit", ["will never start", "shorter --time"]),
    ("AssocMaxCpuPerJobLimit", ["limit on your account's association (AssocMaxCpuPerJobLimit)"]),
    ("AssocGrpGRES", ["group limit of your account"]),
    ("Dependency", ["waiting for the jobs it depends on"]),
    ("DependencyNeverSatisfied", ["will never start", "hpcdist cancel 77"]),
    ("BeginTime", ["begin time", "scontrol update JobId=77 StartTime=now"]),
    ("JobHeldUser", ["held by its owner", "scontrol release 77"]),
    ("JobHeldAdmin", ["held by an administrator"]),
    ("PartitionTimeLimit", ["will never start", "exceeds the partition's MaxTime", "shorter --time"]),
    ("SomethingNew", ["Slurm's reason: SomethingNew", "JOB REASON CODES"]),
])
def test_reasons_become_sentences_with_a_remedy(reason: str, words: list[str]) -> None:
    text = pending.explain(reason, "77")
    assert text.startswith("pending: ") and "\n" not in text
    for word in words:
        assert word in text


def test_jobs_ahead_and_expected_start_are_said_where_slurm_tells() -> None:
    text = pending.explain("Resources", "7", ahead={"debug": ("5", "6")}, start="2026-12-01T10:00:00")
    assert text.endswith("; 2 job(s) ahead of it in its partition; Slurm expects it to start by 2026-12-01T10:00:00")
    assert "ahead" not in pending.explain("JobHeldUser", "7", ahead={"debug": ("5", "6")})
    assert "expects" not in pending.explain("Resources", "7", start="N/A")


QUEUE = """\
10|PENDING|Priority|debug|100|N/A
11|PENDING|Resources|debug|90|N/A
12|PENDING|Priority|debug|90|N/A
13|PENDING|Priority|other|500|N/A
14|RUNNING|None|debug|900|2026-12-01T09:00:00
15|PENDING|Priority|debug,other|95|N/A
"""


def test_ahead_counts_pending_jobs_of_the_same_partition_slurm_considers_first() -> None:
    queue = pending.parse_squeue(QUEUE)
    # 10 (higher), 15 (higher, also in debug), 11 (same, older)
    assert sorted(pending.ahead_of(queue["12"], queue)["debug"]) == ["10", "11", "15"]
    assert pending.ahead_of(queue["10"], queue) == {"debug": ()}
    assert pending.ahead_of(queue["13"], queue) == {"other": ()}


# squeue --array: a row per pending task of an array (another user's 900, of higher priority; 5, older, of equal).
ARRAYS = "".join(f"900_{t}|PENDING|Priority|debug|200|N/A\n" for t in range(500)) + "".join(
    f"5_{t}|PENDING|Priority|debug|90|N/A\n" for t in range(3)) + QUEUE


def test_an_array_ahead_counts_as_one_job_and_its_pending_tasks_are_said_apart() -> None:
    queue = pending.parse_squeue(ARRAYS)
    assert pending.explain("Priority", "12", ahead=pending.ahead_of(queue["12"], queue)).endswith(
        "; 5 job(s) ahead of it in its partition, 2 of them arrays of 503 pending task(s) in all")
    assert pending.explain("Priority", "10", ahead=pending.ahead_of(queue["10"], queue)).endswith(
        "; 1 job(s) ahead of it in its partition, one of them an array of 500 pending task(s)")
    # An array's own earlier tasks are ahead of its later ones.
    assert set(pending.ahead_of(queue["5_2"], queue)["debug"]) == {*(f"900_{t}" for t in range(500)), "5_0", "5_1",
                                                                    "10", "15"}


def test_a_job_pending_in_several_partitions_is_told_who_is_ahead_of_it_in_each() -> None:
    # Slurm starts it in whichever partition lets it first, so one count over all would say nothing true.
    queue = pending.parse_squeue(QUEUE)
    ahead = pending.ahead_of(queue["15"], queue)
    assert ahead == {"debug": ("10",), "other": ("13",)}
    assert pending.explain("Priority", "15", ahead=ahead).endswith(
        "; 1 job(s) ahead of it in partition debug; 1 job(s) ahead of it in partition other")


# squeue gives each component of a heterogeneous job a row (30+0, 30+1, ...); Slurm starts the components together.
HETEROGENEOUS = "".join(f"30+{c}|PENDING|Priority|debug|200|N/A\n" for c in range(3)) + \
    "8+0|PENDING|Priority|debug|90|N/A\n8+1|PENDING|Priority|debug|90|N/A\n" + QUEUE


def test_a_heterogeneous_job_ahead_counts_as_one_job_and_its_own_components_are_not_ahead_of_it() -> None:
    queue = pending.parse_squeue(HETEROGENEOUS)
    # 10, 11, 15, the higher 30 and the older 8 of equal priority
    assert pending.explain("Priority", "12", ahead=pending.ahead_of(queue["12"], queue)).endswith(
        "; 5 job(s) ahead of it in its partition")
    assert set(pending.ahead_of(queue["8+1"], queue)["debug"]) == {"10", "15", "30+0", "30+1", "30+2"}


def test_a_task_s_own_array_is_no_job_ahead_of_it_but_its_earlier_tasks_are_said_apart() -> None:
    queue = pending.parse_squeue(ARRAYS)
    assert pending.explain("Priority", "5_2", ahead=pending.ahead_of(queue["5_2"], queue)).endswith(
        "; 3 job(s) ahead of it in its partition, one of them an array of 500 pending task(s); 2 earlier "
        "task(s) of its own array before it")
    alone = pending.parse_squeue("".join(f"5_{t}|PENDING|Priority|debug|90|N/A\n" for t in range(3)))
    assert pending.explain("Priority", "5_2", ahead=pending.ahead_of(alone["5_2"], alone)).endswith(
        "; 0 job(s) ahead of it in its partition; 2 earlier task(s) of its own array before it")


def test_describe_asks_squeue_for_the_jobs_then_their_partitions() -> None:
    calls: list[list[str]] = []

    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        if "-j" in argv:
            rows = "12|PENDING|Priority|debug|90|N/A\n14|RUNNING|None|debug|900|x\n"
            return subprocess.CompletedProcess(argv, 0, rows, "")
        return subprocess.CompletedProcess(argv, 0, QUEUE, "")

    said = pending.describe(["12", "14"], runner)
    assert list(said) == ["12"] and "3 job(s) ahead" in said["12"]
    assert calls[1] == ["squeue", "-h", "-o", pending.SQUEUE_FORMAT, "--array", "-t", "PD", "-p", "debug"]
    failing = lambda argv: subprocess.CompletedProcess(argv, 1, "", "error")  # noqa: E731
    assert pending.describe(["12"], failing) == {}
    assert pending.describe([], failing) == {}


def test_submit_wait_says_why_when_the_reason_changes_not_at_every_poll(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from hpc import jobs
    from hpc.commands import submit

    clock = [1000.0]
    answers = iter(["pending: waiting behind jobs; 2 ahead", "pending: waiting behind jobs; 1 ahead",
                    "pending: waiting for resources; 0 ahead"])
    monkeypatch.setattr(submit.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pending, "describe", lambda ids: {ids[0]: next(answers)})
    report = submit._pending_reporter(registry.Record(job_id="9", job_dir="/j", via="sbatch", submitted="now"))
    report(jobs.JobState("9", "PENDING"))
    clock[0] += 1
    report(jobs.JobState("9", "PENDING"))  # within PENDING_POLL_S: squeue is not asked
    clock[0] += submit.PENDING_POLL_S
    report(jobs.JobState("9", "PENDING"))  # the count moved, the reason did not: quiet
    clock[0] += submit.PENDING_POLL_S
    report(jobs.JobState("9", "RUNNING"))
    report(jobs.JobState("9", "PENDING"))  # a new reason: said at once
    assert capsys.readouterr().err.splitlines() == [
        "hpcdist submit: job 9 pending: waiting behind jobs; 2 ahead",
        "hpcdist submit: job 9 pending: waiting for resources; 0 ahead"]


def test_squeue_fields_of_non_ascii_digits_are_read_as_no_number_not_a_crash() -> None:
    # str.isdigit() passes "²", which int() refuses: a damaged or hostile row must not end `hpcdist status`.
    queue = pending.parse_squeue("12|PENDING|Priority|debug|²|N/A\n1²|PENDING|Priority|debug|90|N/A\n"
                                 "14|PENDING|Priority|debug|4294967295|N/A\n")
    assert queue["12"].priority == 0 and queue["14"].priority == 4294967295
    assert set(pending.ahead_of(queue["12"], queue)["debug"]) == {"1²", "14"}  # both of a higher priority
    assert pending.ahead_of(queue["1²"], queue)["debug"] == ("14",)
