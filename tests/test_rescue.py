"""Specifications of hpc/rescue.py: when a waiter calls the batch host dead, and what it records and submits."""

from __future__ import annotations

import json
from pathlib import Path

from hpc import jobdir, registry, rescue
from hpc.job import Poll
from hpc.jobs import JobState
from hpc.monitor import Heartbeat


def beat(rank: int, at: float, attempt: int = 0) -> Heartbeat:
    return Heartbeat(rank=rank, hostname=f"n{rank + 1}", attempt=attempt, time=at, phase="train")


def test_the_batch_host_is_lost_when_the_ranks_named_it_or_everything_went_silent_and_it_does_not_answer():
    asked = []

    def answers(node: str) -> bool:
        asked.append(node)
        return False

    fresh = {0: beat(0, 100.0), 1: beat(1, 99.0)}
    assert rescue.lost_batch_host("n1", {"node": "n1"}, fresh, now=100.0, answers=answers) == "n1"
    assert not asked  # the ranks' verdict needs no second opinion
    # Another node named lost is requeue.sh's to relaunch (the batch host lives); fresh beats: nothing to do.
    assert rescue.lost_batch_host("n1", {"node": "n2"}, fresh, now=100.0, answers=answers) is None
    silent = {0: beat(0, 80.0), 1: beat(1, 81.0)}
    assert rescue.lost_batch_host("n1", None, silent, now=100.0, answers=answers) == "n1" and asked == ["n1"]
    # A slurmd that answers: the ranks are stuck, not gone (the hang watchdog's case), and an earlier attempt's
    # silent files do not count.
    assert rescue.lost_batch_host("n1", None, silent, now=100.0, answers=lambda node: True) is None
    mixed = {0: beat(0, 10.0, attempt=0), 1: beat(1, 99.0, attempt=1)}
    assert rescue.lost_batch_host("n1", None, mixed, now=100.0, answers=answers) is None
    assert rescue.lost_batch_host("", {"node": "n1"}, fresh, now=100.0, answers=answers) is None


def test_a_heartbeat_whose_time_is_unknown_is_no_evidence_of_silence():
    # 0.0: the time a beat that wrote none, or one no clock gives (1e300), reads as; nothing says the rank stopped.
    unknown = {0: beat(0, 0.0), 1: beat(1, 80.0)}
    assert rescue.lost_batch_host("n1", None, unknown, now=100.0, answers=lambda node: False) is None
    assert rescue.lost_batch_host("n1", None, {0: beat(0, 0.0)}, now=100.0, answers=lambda node: False) is None


def test_a_watcher_reads_the_heartbeats_every_2_s_or_at_most_a_tenth_of_its_time(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(rescue.monitor, "read_heartbeats", lambda run_dir: reads.append(run_dir) or {0: beat(0, 100.0)})
    record = registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted="then")
    # Each look: its start, then the end of its read if it read. A fast read: the next 2 s on; a 1 s read: 10 s on.
    clock = iter([100.0, 100.0, 102.0, 103.0, 104.0, 106.0, 108.0, 110.0, 112.0, 112.0])
    watcher = rescue.Watcher(record, clock=lambda: next(clock))
    assert [watcher.lost_host() for _ in range(7)] == [None] * 7
    assert len(reads) == 3  # at 100 (fast), at 102 (it took 1 s), at 112: none at 104-110


def test_a_resubmission_asks_for_its_spares_only_as_far_as_the_cluster_has_them():
    plain = registry.Record(job_id="7", job_dir="/j", via="sbatch", submitted="then", nodes=2)
    assert rescue.resubmit_options(plain, ["n1"]) == ["--exclude=n1"]
    spared = registry.Record(job_id="7", job_dir="/j", via="sbatch", submitted="then", nodes=2, spare_nodes=1)
    assert rescue.resubmit_options(spared, ["n1", "n4"]) == ["--exclude=n1,n4", "--nodes=2-3"]


def test_a_resubmission_cancels_the_old_job_records_the_attempt_and_registers_the_new_job(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    (job_dir / "run").mkdir(parents=True)
    (job_dir / "job.sbatch").write_text("#!/bin/bash\n")
    (job_dir / jobdir.MARKER).write_text(jobdir.marker_text("job", ["job.sbatch", "run/"]))
    (job_dir / "run" / "lost.json").write_text(json.dumps({"node": "n1", "attempt": 0}))
    (job_dir / "attempts.jsonl").write_text(json.dumps(
        {"attempt": 0, "job_id": "7", "started": "", "ended": "", "ending": "rank_crashed", "node": "n3",
         "action": "relaunch", "excluded": ["n3"]}) + "\n")
    calls = []
    monkeypatch.setattr(rescue.commands, "scancel", lambda ids: calls.append(("scancel", *ids)) or True)
    monkeypatch.setattr(rescue.commands, "sbatch",
                        lambda script, options=(), env=None: calls.append(("sbatch", *options, str(script))) or "8")
    record = registry.Record(job_id="7", job_dir=str(job_dir), via="submitit", submitted="then", nodes=2)
    new = rescue.resubmit(record, "n1", {"HPCDIST_HOME": str(tmp_path / "home")}, clock=lambda: 0.0)
    assert calls == [("scancel", "7"), ("sbatch", "--exclude=n1,n3", str(job_dir / "job.sbatch"))]
    assert (new.job_id, new.via, new.previous, new.nodes) == ("8", "sbatch", "7", 2)
    line = json.loads((job_dir / "attempts.jsonl").read_text().splitlines()[-1])
    assert (line["attempt"], line["ending"], line["node"], line["action"], line["source"]) == (
        1, "node_failure", "n1", "resubmit", "waiter")
    assert line["reason"] == ("retry 2 of 2 through the queue as a new job without n1, n3 from the start "
                              "(no checkpoint) (requeued, it would wait until Slurm declares n1 down): job 8")
    # The ranks' verdict was acted on; the registry and the job's own marker name the new job.
    assert not (job_dir / "run" / "lost.json").exists()
    assert registry.lookup("8", {"HPCDIST_HOME": str(tmp_path / "home")}).previous == "7"
    assert json.loads((job_dir / "submitted.json").read_text())["job_id"] == "8"
    assert Path(new.job_dir) == job_dir


def test_a_waiter_submits_a_run_whose_batch_host_died_again_only_within_its_max_retries(tmp_path, monkeypatch):
    """Each dead batch host was resubmitted whatever the budget: a job whose every batch host dies (it takes its
    node down) went on as new job after new job, one node fewer each time, past --max-retries."""
    job_dir = tmp_path / "job"
    (job_dir / "run").mkdir(parents=True)
    (job_dir / "job.sbatch").write_text("#!/bin/bash\n")
    (job_dir / "spec.yaml").write_text("nodes: 2\nmax_retries: 2\n")
    (job_dir / "attempts.jsonl").write_text("".join(json.dumps(
        {"attempt": a, "job_id": job, "started": "", "ended": "", "ending": "node_failure", "node": node,
         "action": "resubmit", "excluded": excluded, "source": "waiter"}) + "\n"
        for a, job, node, excluded in ((0, "7", "n1", ["n1"]), (1, "8", "n2", ["n1", "n2"]))))
    calls = []
    monkeypatch.setattr(rescue.commands, "scancel", lambda ids: calls.append(("scancel", *ids)) or True)
    monkeypatch.setattr(rescue.commands, "sbatch", lambda script, options=(), env=None: calls.append("sbatch") or "10")
    record = registry.Record(job_id="9", job_dir=str(job_dir), via="sbatch", submitted="then", nodes=2)
    assert rescue.resubmit(record, "n3", {"HPCDIST_HOME": str(tmp_path / "home")}) is None
    assert calls == [("scancel", "9")]  # cancelled, so that Slurm does not requeue it either
    line = json.loads((job_dir / "attempts.jsonl").read_text().splitlines()[-1])
    assert (line["attempt"], line["node"], line["action"]) == (2, "n3", "none")
    assert line["reason"] == "the job has used its 2 retry(ies) (--max-retries)"
    (job_dir / "spec.yaml").write_text("nodes: 2\nmax_retries: 3\n")
    record = registry.Record(job_id="11", job_dir=str(job_dir), via="sbatch", submitted="then", nodes=2)
    assert rescue.resubmit(record, "n4", {"HPCDIST_HOME": str(tmp_path / "home")}).job_id == "10"


def test_a_resubmission_to_a_registry_that_is_a_link_submits_nothing_and_records_the_registrys_one_line(
        tmp_path, monkeypatch):
    job_dir, home = tmp_path / "job", tmp_path / "home"
    (job_dir / "run").mkdir(parents=True)
    (job_dir / "job.sbatch").write_text("#!/bin/bash\n")
    home.mkdir()
    (home / registry.REGISTRY).symlink_to(tmp_path / "elsewhere.jsonl")
    calls = []
    monkeypatch.setattr(rescue.commands, "scancel", lambda ids: calls.append(("scancel", *ids)) or True)
    monkeypatch.setattr(rescue.commands, "sbatch", lambda script, options=(), env=None: calls.append("sbatch") or "8")
    record = registry.Record(job_id="7", job_dir=str(job_dir), via="sbatch", submitted="then", nodes=2)
    assert rescue.resubmit(record, "n1", {"HPCDIST_HOME": str(home)}) is None
    assert calls == [("scancel", "7")]  # no job runs that no registry line names
    line = json.loads((job_dir / "attempts.jsonl").read_text())
    assert (line["ending"], line["action"]) == ("node_failure", "none")
    assert line["reason"] == (f"could not submit it again: job registry: {home}/jobs.jsonl is a symbolic link, not a "
                              "file; move it away, or set HPCDIST_HOME to a folder of your own")


def test_a_registry_that_refuses_the_line_once_sbatch_submitted_still_leaves_the_new_job_followed_not_given_up(
        tmp_path, monkeypatch, capsys):
    # Given up (or, in the batch shell, requeued), the run would have two jobs resuming it.
    job_dir, home = tmp_path / "job", tmp_path / "home"
    (job_dir / "run").mkdir(parents=True)
    (job_dir / "job.sbatch").write_text("#!/bin/bash\n")
    home.mkdir()

    def sbatch(script, options=(), env=None):  # the registry turns into a link while Slurm takes the job
        (home / registry.REGISTRY).symlink_to(tmp_path / "elsewhere.jsonl")
        return "8"
    monkeypatch.setattr(rescue.commands, "scancel", lambda ids: True)
    monkeypatch.setattr(rescue.commands, "sbatch", sbatch)
    record = registry.Record(job_id="7", job_dir=str(job_dir), via="sbatch", submitted="then", nodes=2)
    assert rescue.resubmit(record, "n1", {"HPCDIST_HOME": str(home)}).job_id == "8"
    line = json.loads((job_dir / "attempts.jsonl").read_text())
    assert line["action"] == "resubmit" and line["reason"].endswith(": job 8"), line
    assert registry.read_marker(job_dir).job_id == "8"
    assert capsys.readouterr().err == (f"hpcdist: job 8 was submitted but is not in the job registry: job registry: "
                                       f"{home}/jobs.jsonl is a symbolic link, not a file; move it away, or set "
                                       "HPCDIST_HOME to a folder of your own\n")
    assert not (tmp_path / "elsewhere.jsonl").exists()


class FakeJob:
    """A job that is RUNNING for ``polls`` polls, then ends ``final``; the one wait loop's contract, no Slurm."""

    def __init__(self, record: registry.Record, polls: int = 2, final: str = "COMPLETED") -> None:
        self.record, self.job_id, self.polls, self.final = record, record.job_id, polls, final

    def clock(self) -> float:
        return 0.0

    def wait(self, poll_s, timeout_s, on_poll, until):
        for _ in range(self.polls):
            now = Poll(JobState(self.job_id, "RUNNING"), [])
            if until(now):
                return now.state
            on_poll(now)
            if until(now):
                return now.state
        return JobState(self.job_id, self.final)


def test_a_waiter_goes_on_following_the_new_job_its_dead_batch_host_was_resubmitted_as(monkeypatch):
    old = registry.Record(job_id="7", job_dir="/jobs/a", via="sbatch", submitted="then")
    new = registry.Record(job_id="8", job_dir="/jobs/a", via="sbatch", submitted="now", previous="7")

    class Watcher:
        def __init__(self, record):
            self.record = record

        def start_soon(self, state):
            pass

        def lost_host(self):
            return "n1" if self.record.job_id == "7" else None

    monkeypatch.setattr(rescue, "Watcher", Watcher)
    monkeypatch.setattr(rescue, "resubmit", lambda record, host, environ: new if record.job_id == "7" else None)
    polled, rescues = [], []
    job, final = rescue.wait(FakeJob(old), on_poll=lambda job, now: polled.append(job.job_id),
                             on_rescue=lambda a, b: rescues.append((a.job_id, b.job_id)), follow_as=FakeJob)
    assert (job.job_id, final.state) == ("8", "COMPLETED")
    assert rescues == [("7", "8")] and polled == ["7", "8", "8"]


def test_a_local_job_is_followed_without_a_batch_host_watch(monkeypatch):
    monkeypatch.setattr(rescue, "Watcher", lambda record: (_ for _ in ()).throw(AssertionError("watched")))
    local = registry.Record(job_id="local-1", job_dir="/jobs/l", via="local", submitted="then")
    job, final = rescue.wait(FakeJob(local, final="FAILED"))
    assert (job.job_id, final.state) == ("local-1", "FAILED")


def test_a_run_submitted_again_from_inside_its_job_passes_on_none_of_the_old_jobs_variables(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    seen = {}

    def sbatch(script, options=(), env=None):
        seen.update(options=list(options), env=env)
        return "9"
    monkeypatch.setattr(rescue.commands, "sbatch", sbatch)
    record = registry.Record(job_id="8", job_dir=str(job_dir), via="sbatch", submitted="then", nodes=2)
    inside = {"PATH": "/usr/bin", "HPCDIST_HOME": str(tmp_path / "home"), "SLURM_JOB_ID": "8",
              "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CONF": "/etc/slurm/slurm.conf", "HPCDIST_ATTEMPT": "1",
              "HPCDIST_EXCLUDE": "n2", "HPCDIST_ELASTIC_NODES": ""}
    new = rescue.submit_again(record, ["n2"], inside)
    assert seen["options"] == ["--exclude=n2"]
    assert seen["env"] == {"PATH": "/usr/bin", "HPCDIST_HOME": str(tmp_path / "home"),
                           "SLURM_CONF": "/etc/slurm/slurm.conf"}
    assert (new.job_id, new.previous) == ("9", "8") and registry.read_marker(job_dir).job_id == "9"
    assert registry.lookup("9", inside).previous == "8"


def test_a_waiter_goes_on_following_the_new_job_its_batch_shell_submitted(tmp_path, monkeypatch):
    old = registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted="then")
    registry.write_marker(old)

    class Watcher:
        def __init__(self, record):
            pass

        def start_soon(self, state):
            pass

        def lost_host(self):
            return None

    class Submitting(FakeJob):
        def wait(self, poll_s, timeout_s, on_poll, until):
            if self.job_id == "7":  # the batch shell submits the run again while the old job is still completing
                registry.write_marker(registry.Record(job_id="8", job_dir=str(tmp_path), via="sbatch",
                                                      submitted="now", previous="7"))
            return super().wait(poll_s, timeout_s, on_poll, until)

    monkeypatch.setattr(rescue, "Watcher", Watcher)
    rescues = []
    job, final = rescue.wait(Submitting(old), on_rescue=lambda a, b: rescues.append((a.job_id, b.job_id)),
                             follow_as=Submitting)
    assert (job.job_id, final.state) == ("8", "COMPLETED") and rescues == [("7", "8")]
    assert rescue.successor(job.record) is None
