"""Specifications of hpc/failures/reconcile.py: attempts accounting saw end unrecorded, and the nudge."""

from __future__ import annotations

import subprocess

import pytest

from hpc import jobdir
from hpc.failures import reconcile
from hpc.failures import record as records
from hpc.slurm import parse


def test_runs_the_batch_shell_never_recorded_come_from_accounting():
    text = "7|NODE_FAIL|0:0|T0|T1|n[1-2]\n7|RUNNING|0:0|T2|Unknown|n[1,3]\n"
    runs = parse.rows(text, reconcile.SACCT_RUN_FIELDS, job="7")
    log = "hpcdist: attempt 0 started on n1 at T0\nsrun: error: Node failure on n2\n"
    lines = reconcile.from_sacct(runs, [], "7", None, log)
    assert len(lines) == 1
    assert (lines[0]["attempt"], lines[0]["ending"], lines[0]["node"], lines[0]["action"], lines[0]["excluded"]) == (
        0, "node_failure", "n2", "retry", ["n2"])
    assert lines[0]["source"] == "sacct"


def test_a_run_whose_relaunched_attempt_died_unrecorded_gets_that_attempts_line_not_its_first_attempts():
    # Run 0 held attempt 0 (relaunched in the allocation without n2) and attempt 1, whose batch host n3 died:
    # Slurm requeued the job, and only attempt 0's line, carrying the run's StartTime, was written.
    text = ("7|NODE_FAIL|0:0|2026-12-07T03:00:00|2026-12-07T03:04:00|n[1,3]\n"
            "7|RUNNING|0:0|2026-12-07T03:09:00|Unknown|n1\n")
    runs = parse.rows(text, reconcile.SACCT_RUN_FIELDS, job="7")
    relaunched = {"attempt": 0, "job_id": "7", "started": "2026-12-07T03:00:00", "ended": "", "ending": "node_failure",
                  "node": "n2", "action": "relaunch", "excluded": ["n2"]}
    log = ("hpcdist: attempt 0 started on n1 at T0\nsrun: error: Node failure on n2\n"
           "hpcdist: attempt 1 started on n1 at T1\nsrun: error: Node failure on n3\n")
    [line] = reconcile.from_sacct(runs, [relaunched], "7", None, log)
    assert (line["attempt"], line["ending"], line["node"], line["action"], line["excluded"]) == (
        1, "node_failure", "n3", "retry", ["n2", "n3"])
    # Once a line of the run ends it (no relaunch), accounting adds nothing for it.
    ended = {**relaunched, "attempt": 1, "action": "retry", "node": "n3"}
    assert reconcile.from_sacct(runs, [relaunched, ended], "7", None, log) == []


def test_a_cancelled_last_run_is_cancelled_and_not_retried():
    runs = parse.rows("7|CANCELLED by 0|0:15|T0|T1|n1\n", reconcile.SACCT_RUN_FIELDS, job="7")
    [line] = reconcile.from_sacct(runs, [], "7")
    assert (line["ending"], line["action"]) == ("cancelled", "none")


def accounting(text: str):
    return lambda argv: subprocess.CompletedProcess(argv, 0, text, "")


def test_a_folder_hpcdist_did_not_make_gets_no_attempt_lines_yet_status_shows_them(tmp_path):
    """A registry line may name any folder (hand-edited, or another user's line in a shared $HPCDIST_HOME):
    `status` and `list` wrote attempts.jsonl into it."""
    (tmp_path / "notes.txt").write_text("mine\n")
    lines = reconcile.reconcile_all([(tmp_path, "7")], accounting("7|CANCELLED by 0|0:15|T0|T1|n1\n"))[0]
    assert [(a["ending"], a["source"]) for a in lines] == [("cancelled", "sacct")]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_job_directory_hpcdist_made_records_what_accounting_saw(tmp_path):
    (tmp_path / jobdir.MARKER).write_text(jobdir.marker_text("job", []))
    reconcile.reconcile_all([(tmp_path, "7")], accounting("7|CANCELLED by 0|0:15|T0|T1|n1\n"))
    assert [a["ending"] for a in records.load(tmp_path)] == ["cancelled"]


def test_a_batch_script_whose_log_could_not_be_opened_is_a_storage_ending_naming_the_host_and_never_retried(
        tmp_path):
    # Slurm 22.05 on a job directory mounted here but not on n1: "Could not open stdout file ...: No such file or
    # directory", "IO setup failed", the job FAILED with 0:53 and no batch log (captured on the local cluster).
    (tmp_path / "logs").mkdir()
    runs = parse.rows("9|FAILED|0:53|T0|T0|n[1-2]\n", reconcile.SACCT_RUN_FIELDS, job="9")
    [line] = reconcile.from_sacct(runs, [], "9", tmp_path, "")
    assert (line["ending"], line["node"], line["action"]) == ("storage", "n1", "none")
    assert line["detail"] == (f"the job directory {tmp_path} is not visible (or not writable) on n1: Slurm could "
                              f"not open {tmp_path}/logs/batch-9.out there, so the batch script never ran; put "
                              "--job-dir on a file system every compute node mounts, then resubmit")


def test_a_failure_after_the_batch_script_ran_or_with_another_signal_is_not_taken_for_an_unseen_job_directory(
        tmp_path):
    (tmp_path / "logs").mkdir()
    runs = parse.rows("9|FAILED|0:53|T0|T0|n1\n", reconcile.SACCT_RUN_FIELDS, job="9")
    ran = reconcile.from_sacct(runs, [], "9", tmp_path, "hpcdist: attempt 0 started on n1 at T0\n")
    other = reconcile.from_sacct(parse.rows("9|FAILED|1:0|T0|T0|n1\n", reconcile.SACCT_RUN_FIELDS, job="9"), [],
                                 "9", tmp_path, "")
    assert [ran[0]["ending"], other[0]["ending"]] == ["unknown", "unknown"]


@pytest.mark.parametrize("fields,now,nudge", [
    # Slurm's requeue delay, the old run finished completing 3 s ago: start it.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:02:01"}, "09:00:03", True),
    # Within 2 s of the requeue the nodes may still refuse the old credential: wait.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:02:01"}, "09:00:01", False),
    # requeue.sh's own begin time, 2 s ahead (15 s for an oci container's step): let it come.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:00:04"}, "09:00:02", False),
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:00:17"}, "09:00:02", False),
    # Eligible, but waiting for the next scheduling pass: start it.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:00:02"}, "09:00:05", True),
])
def test_should_nudge(fields, now, nudge):
    import time as clock

    job = {"JobState": "PENDING", "Reason": "BeginTime", **fields}
    at = clock.mktime(clock.strptime(f"2026-12-01T{now}", "%Y-%m-%dT%H:%M:%S"))
    assert reconcile.should_nudge(job, at) is nudge


def test_nudge_only_follows_hpcdists_own_requeue():
    calls = []

    def runner(argv):
        calls.append(argv)
        shown = ("JobState=PENDING Reason=BeginTime SubmitTime=2000-01-01T00:00:00 "
                 "EligibleTime=2099-01-01T00:00:00")
        return subprocess.CompletedProcess(argv, 0, shown, "")
    assert reconcile.nudge("5", [{"attempt": 0, "action": "none"}], runner) is False and not calls
    assert reconcile.nudge("5", [{"attempt": 0, "action": "retry", "excluded": ["n2"]}], runner) is True
    assert calls[-1] == ["scontrol", "update", "JobId=5", "StartTime=now", "ExcNodeList=n2"]
