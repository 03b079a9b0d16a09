"""Specifications of hpc/job.py: one job handle, the one follow loop every waiter makes (submit --wait, watch,
logs -f, doctor, the drill; sweep --wait through its loop), against canned Slurm answers."""

from __future__ import annotations

import json
import subprocess

import pytest

from hpc import job, jobdir, registry
from hpc.job import Job

# scontrol's view of a job hpcdist requeued and Slurm holds back for no good reason (nudge it).
HELD_BACK = "JobState=PENDING Reason=BeginTime SubmitTime=2000-01-01T00:00:00 EligibleTime=2099-01-01T00:00:00"


def record(tmp_path, via: str = "sbatch") -> registry.Record:
    return registry.Record(job_id="44", job_dir=str(tmp_path), via=via, submitted="")


class Slurm:
    """Canned answers by command: squeue's rows poll after poll (the last one repeats), one accounting row."""

    def __init__(self, queue: list[str], accounted: str = "", history: str = "", shown: str = HELD_BACK) -> None:
        self.queue, self.accounted, self.history, self.shown = list(queue), accounted, history, shown
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[0] == "squeue":
            out = self.queue.pop(0) if len(self.queue) > 1 else self.queue[0]
        elif argv[0] == "sacct":
            out = self.history if "-D" in argv else self.accounted
        elif argv[:2] == ["scontrol", "show"]:
            out = self.shown
        else:
            out = ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    def asked(self, *command: str) -> int:
        return sum(c[:len(command)] == list(command) for c in self.calls)


class Clock:
    """A clock that moves only when the waiter sleeps."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def handle(tmp_path, slurm: Slurm, clock: Clock | None = None, via: str = "sbatch", **kwargs) -> Job:
    clock = clock or Clock()
    return Job(record(tmp_path, via), runner=slurm, clock=clock, sleep=clock.sleep, **kwargs)


def attempt(action: str, ending: str = "preempted") -> str:
    return json.dumps({"attempt": 0, "job_id": "44", "started": "", "ended": "", "ending": ending,
                       "action": action, "excluded": []}) + "\n"


def test_the_state_comes_from_the_controller_not_a_stale_accounting_requeued_row(tmp_path):
    slurm = Slurm(["44|RUNNING|n1|0:05\n"], accounted="44|REQUEUED|0:0|n1|00:00:05|1\n")
    assert handle(tmp_path, slurm).state().state == "RUNNING"
    assert slurm.asked("sacct") == 0


def test_a_job_the_controller_no_longer_knows_is_read_from_accounting(tmp_path):
    slurm = Slurm([""], accounted="44|FAILED|3:0|n[1-2]|00:01:00|2\n")
    state = handle(tmp_path, slurm).state()
    assert (state.state, state.exit_code, state.nodelist) == ("FAILED", 3, "n[1-2]")


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED", "CANCELLED"])
def test_wait_stops_at_a_final_state_and_returns_it(tmp_path, final):
    slurm = Slurm(["44|PENDING|(null)|0:00\n", "44|RUNNING|n1|0:01\n", ""],
                  accounted=f"44|{final}|0:0|n1|00:00:10|1\n")
    clock = Clock()
    assert handle(tmp_path, slurm, clock).wait(poll_s=2.0).state == final
    assert clock.slept == [2.0, 2.0]


def test_on_poll_sees_every_state_while_the_job_runs_but_not_the_final_one(tmp_path):
    slurm = Slurm(["44|PENDING|(null)|0:00\n", "44|RUNNING|n1|0:01\n", "44|RUNNING|n1|0:02\n", ""],
                  accounted="44|COMPLETED|0:0|n1|00:00:10|1\n")
    seen = []
    handle(tmp_path, slurm).wait(on_poll=lambda now: seen.append(now.state.state))
    assert seen == ["PENDING", "RUNNING", "RUNNING"]


def test_a_requeued_job_is_nudged_and_still_waited_for(tmp_path):
    (tmp_path / "attempts.jsonl").write_text(attempt("requeue"))
    slurm = Slurm(["44|PENDING|(null)|0:00\n", "44|RUNNING|n2|0:01\n", ""],
                  accounted="44|COMPLETED|0:0|n2|00:00:10|1\n", history="44|PREEMPTED|0:0|T0|T1|n1\n")
    final = handle(tmp_path, slurm).wait()
    assert final.state == "COMPLETED"
    assert slurm.asked("scontrol", "update") == 1
    assert ["scontrol", "update", "JobId=44", "StartTime=now"] in slurm.calls


def test_a_poll_of_a_running_job_reads_its_attempts_and_asks_accounting_nothing(tmp_path):
    (tmp_path / "attempts.jsonl").write_text(attempt("relaunch", "rank_crashed"))
    slurm = Slurm(["44|RUNNING|n1|0:05\n"])
    now = handle(tmp_path, slurm).poll()
    assert [a["action"] for a in now.attempts] == ["relaunch"]
    assert [c[0] for c in slurm.calls] == ["squeue"]


def test_a_poll_of_a_requeued_job_adds_what_accounting_saw_and_starts_it_at_once(tmp_path):
    slurm = Slurm(["44|PENDING|(null)|0:00\n"], history="44|NODE_FAIL|0:0|T0|T1|n[1-2]\n44|PENDING|0:0|T2|Unknown|\n")
    (tmp_path / jobdir.MARKER).write_text(jobdir.marker_text("job", []))
    now = handle(tmp_path, slurm).poll()
    assert [(a["ending"], a["action"], a["source"]) for a in now.attempts] == [("node_failure", "retry", "sacct")]
    assert [c[:2] for c in slurm.calls] == [["squeue", "-h"], ["sacct", "-D"], ["scontrol", "show"],
                                            ["scontrol", "update"]]
    assert json.loads((tmp_path / "attempts.jsonl").read_text())["source"] == "sacct"


def test_wait_gives_up_after_its_timeout_with_the_last_state_seen(tmp_path):
    slurm = Slurm(["44|RUNNING|n1|0:05\n"])
    clock = Clock()
    assert handle(tmp_path, slurm, clock).wait(poll_s=1.0, timeout_s=2.5).state == "RUNNING"
    assert clock.slept == [1.0, 1.0, 1.0]


def test_wait_stops_when_until_holds_though_the_job_runs_on(tmp_path):
    slurm = Slurm(["44|RUNNING|n1|0:05\n"])
    polls = []
    state = handle(tmp_path, slurm).wait(until=lambda now: polls.append(now) or len(polls) == 2)
    assert state.state == "RUNNING" and len(polls) == 2


def test_a_local_job_this_process_started_runs_while_its_controller_does_and_slurm_is_never_asked(tmp_path):
    class Started:
        def __init__(self) -> None:
            self.polls = 0

        def done(self) -> bool:
            self.polls += 1
            return False

    slurm, started = Slurm([""]), Started()
    local = handle(tmp_path, slurm, via="local", handle=started)
    assert local.state().state == "RUNNING" and local.poll().attempts == []
    assert started.polls == 2 and slurm.calls == []


def test_attempts_after_the_end_add_the_runs_accounting_saw_end_unrecorded(tmp_path):
    slurm = Slurm([""], history="44|NODE_FAIL|0:0|T0|T1|n1\n44|COMPLETED|0:0|T2|T3|n2\n")
    ended = handle(tmp_path, slurm)
    assert ended.attempts() == []
    assert [a["ending"] for a in ended.attempts(accounted=True)] == ["node_failure", "completed"]


def test_the_follow_loop_returns_the_step_that_ended_it_and_shows_the_others():
    results, shown, clock = iter([1, 2, 3, 4]), [], Clock()
    last = job.follow(lambda: next(results), lambda n: n == 3, 0.5, on_poll=shown.append, clock=clock,
                      sleep=clock.sleep)
    assert (last, shown, clock.slept) == (3, [1, 2], [0.5, 0.5])
