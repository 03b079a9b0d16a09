"""Specifications of hpc/drill_run.py's parts that need no cluster: waiting for the fault step. The rest runs the
drill for real (tests/test_drill.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

from hpc import drill, drill_run, jobs, registry


def drill_job(tmp_path, queue: str, accounted: str = "") -> drill_run.Job:
    """A drill job Slurm's canned answers call ``queue`` (squeue's row) or ``accounted`` (sacct's) once gone."""
    def runner(argv):
        out = queue if argv[0] == "squeue" else accounted if argv[0] == "sacct" else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    record = registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted="")
    return drill_run.Job(record, runner=runner, sleep=lambda s: None)


def log_steps(tmp_path, *steps: int) -> None:
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                            for s in steps))


def test_the_fault_waits_for_its_step_in_the_jobs_metrics(tmp_path):
    log_steps(tmp_path, 1, 2, 3)
    job = drill_job(tmp_path, "7|RUNNING|n1|0:05\n")
    assert drill_run.wait_for_step(job, 3, timeout_s=60) == 3
    assert job.losses() == {1: 1.0, 2: 0.5, 3: 1.0 / 3} and job.steps_after(2) == [3]


def test_waiting_for_the_fault_step_reads_the_metrics_each_poll_and_asks_slurm_every_5_s(tmp_path, monkeypatch):
    log_steps(tmp_path, 1)
    now, asked = [0.0], []
    monkeypatch.setattr(drill_run.Job, "state", lambda self: asked.append(now[0]) or jobs.JobState("7", "RUNNING"))

    def sleep(seconds):
        now[0] += seconds
        if now[0] >= 12:
            log_steps(tmp_path, 1, 2, 3)
    job = drill_run.Job(registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted=""),
                        clock=lambda: now[0], sleep=sleep)
    polls = []
    assert drill_run.wait_for_step(job, 3, timeout_s=60, beside=lambda: polls.append(now[0])) == 3
    assert 12 <= now[0] < 12.5 and [round(t) for t in asked] == [0, 5, 10]
    # What runs beside the wait (the drill lets its reference go there) sees every poll, 0.2 s apart.
    assert len(polls) == round(now[0] / drill.POLL_S) + 1 and polls == sorted(set(polls))


def test_a_job_that_ends_before_the_fault_step_is_a_problem_named_at_once(tmp_path):
    log_steps(tmp_path, 1)
    job = drill_job(tmp_path, "", accounted="7|FAILED|1:0|n1|00:00:05|1\n")
    with pytest.raises(RuntimeError, match="job 7 ended before step 10"):
        drill_run.wait_for_step(job, 10, timeout_s=60)


def publish_beat(tmp_path, snapshot_step):
    from hpc import beatfile

    folder = beatfile.folder(tmp_path / "run")
    folder.mkdir(parents=True, exist_ok=True)
    beat = {"rank": 0, "step": 12, "time": 1.0, "snapshot_step": snapshot_step}
    document = beatfile.node_document(0, "n1", 0, 1.0, [beat])
    beatfile.node_path(tmp_path / "run", 0).write_bytes(beatfile.encode(document))


def test_with_the_job_defaults_the_fault_comes_half_an_interval_after_a_node_published_a_snapshot(tmp_path):
    publish_beat(tmp_path, None)
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds
        if now[0] >= 3:
            publish_beat(tmp_path, 40)
    job = drill_run.Job(registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted=""),
                        clock=lambda: now[0], sleep=sleep)
    drill_run.wait_for_snapshot(job, timeout_s=60)
    assert 3 + drill.SNAPSHOT_PHASE_S <= now[0] < 3.5 + drill.SNAPSHOT_PHASE_S


def test_a_job_that_publishes_no_snapshot_is_a_problem_named(tmp_path):
    publish_beat(tmp_path, None)
    now = [0.0]
    job = drill_run.Job(registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted=""),
                        clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    with pytest.raises(RuntimeError, match="job 7 published no snapshot within 30 s"):
        drill_run.wait_for_snapshot(job, timeout_s=30)


def test_the_drill_cancels_its_jobs_and_the_new_jobs_their_batch_shells_submitted_the_runs_again_as(tmp_path,
                                                                                                   monkeypatch):
    # The reference lost a node with no spare: its batch shell submitted it again as job 9 (the marker names it).
    registry.write_marker(registry.Record(job_id="9", job_dir=str(tmp_path), via="sbatch", submitted="",
                                          previous="7"))
    live = {"7": "COMPLETING", "8": "COMPLETED", "9": "RUNNING"}
    monkeypatch.setattr(drill_run.jobs, "slurm_states",
                        lambda ids: {j: jobs.JobState(j, live[j]) for j in ids})
    cancelled = []
    monkeypatch.setattr(drill_run.commands, "scancel", lambda ids: cancelled.extend(ids) or True)
    drill_run.cancel_all(["7", "8"], [tmp_path])
    assert cancelled == ["7", "9"]
