"""Specifications of hpc/drill.py's pure parts: the verdict, the loss comparison, the recovery table."""

from __future__ import annotations

import json

import pytest

from hpc import drill
from hpc.drill import Observed

REFERENCE = {s: 2.0 - s / 100 for s in range(1, 41)}


def observed(scenario: str, **kw) -> Observed:
    seen = Observed(scenario, job_id="7", victim_rank=1, victim_node="n2", fault_at=100.0, recorded_at=104.0,
                    restarted_at=107.0, next_step_at=118.0, back_at=121.5, final_state="COMPLETED", resumed_step=10,
                    losses=dict(REFERENCE))
    seen.attempts = [{"attempt": 0, "ending": "rank_crashed", "action": "relaunch", "excluded": ["n2"], "rank": 1,
                      "detail": "rank 1 on n2: killed by SIGKILL"},
                     {"attempt": 1, "ending": "completed", "action": "none", "excluded": ["n2"]}]
    for key, value in kw.items():
        setattr(seen, key, value)
    return seen


def test_a_clean_relaunch_on_the_spare_passes_with_its_recovery_split_and_the_time_lost():
    result = drill.check(observed("rank_kill"), REFERENCE, 40, spare_nodes=1)
    assert result.ok, result.problems
    assert (result.retries, result.excluded, result.resumed_step, result.recovery_s) == (1, ["n2"], 10, 18.0)
    assert result.lost_s == 21.5
    assert result.phases == {"classified": 4.0, "restarted": 3.0, "first_step": 11.0}
    assert result.losses_equal and result.compared_steps == 40


def test_a_loss_that_differs_after_the_resume_fails():
    losses = dict(REFERENCE)
    losses[23] += 1e-3
    result = drill.check(observed("rank_kill", losses=losses), REFERENCE, 40, spare_nodes=1)
    assert not result.ok and not result.losses_equal
    assert any("losses differ" in p for p in result.problems)


def test_the_wrong_ending_or_a_missing_exclusion_fails():
    seen = observed("node_loss")
    result = drill.check(seen, REFERENCE, 40, spare_nodes=1)
    assert "first attempt ended rank_crashed, expected node_failure" in result.problems
    seen.attempts[0]["excluded"] = []
    assert any("n2 was not excluded" in p for p in drill.check(seen, REFERENCE, 40, spare_nodes=1).problems)


def test_without_a_spare_a_killed_rank_goes_on_in_place_and_a_lost_node_through_the_queue():
    assert (drill.expect("rank_kill").action, drill.expect("rank_kill").excludes) == ("relaunch", False)
    assert (drill.expect("node_loss").action, drill.expect("node_loss").excludes) == ("retry", True)
    assert drill.expect("node_loss", spare_nodes=1).action == "relaunch"
    # Killed for real with no spare: a new job, since a requeued one would wait for Slurm's SlurmdTimeout.
    assert (drill.expect("node_loss", real_death=True).action, drill.expect("node_loss", 1, True).action) == (
        "resubmit", "relaunch")
    seen = observed("rank_kill")
    assert "n2 excluded, though the job could go on in place" in drill.check(seen, REFERENCE, 40).problems


def test_a_hang_must_be_blamed_on_the_stopped_rank():
    seen = observed("hang")
    seen.attempts[0].update(ending="hung", rank=0)
    assert "the hang was blamed on rank 0, not the stopped rank 1" in drill.check(seen, REFERENCE, 40, 1).problems


def test_no_step_after_the_fault_fails():
    result = drill.check(observed("rank_kill", next_step_at=None), REFERENCE, 40, 1)
    assert "no training step was seen after the fault's attempt ended" in result.problems


def test_logged_steps_keeps_a_resumed_runs_records():
    text = "\n".join(json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 2, 3, 4)) + "\n{partial"
    assert drill.logged_steps(text) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}


def test_resumed_from_is_the_first_resume_after_the_fault():
    log = "resumed from /r/checkpoints/step00000010 at step 10\n...\nresumed from /r/step00000040 at step 40\n"
    assert drill.resumed_from(log) == 10 and drill.resumed_from("no resume") is None


def test_restart_time_reads_the_attempts_start_line():
    text = "hpcdist: attempt 0 started on n1 at 2026-12-01T09:00:00\nhpcdist: attempt 1 started on n3 at " \
           "2026-12-01T09:00:20\n"
    assert drill.restart_time(text, 1) - drill.restart_time(text, 0) == 20



def test_the_table_names_each_failure():
    result = drill.check(observed("node_loss"), REFERENCE, 40, spare_nodes=1)
    text = drill.table([result])
    assert text.splitlines()[1].startswith("node_loss  FAIL  rank_crashed  relaunch")
    assert "node_loss: FAIL: first attempt ended rank_crashed, expected node_failure" in text


def test_the_step_rate_skips_start_up_and_sizes_the_time_limit_job_to_outlast_slurms_check():
    lines = [json.dumps({"step": s, "loss": 2.0, "time_s": 20.0 + (s - 1) * 0.1 + (5.0 if s > 1 else 0)})
             for s in range(1, 41)]
    rate = drill.step_rate("\n".join(lines) + "\n{\"step\": 41")  # a line being written is skipped
    assert rate == pytest.approx(10.0)
    # At 10 steps/s: the fault at step 10, 35 s of steps after it, two checkpoints' worth to resume into.
    assert drill.steps_at(10.0, least=40, reach_s=drill.TIME_LIMIT_REACH_S) == 10 + 350 + 10
    assert drill.steps_at(0.0, least=40, reach_s=drill.TIME_LIMIT_REACH_S) == 40
    assert drill.step_rate("") is None


def test_the_diagonal_drills_every_scenario_once_and_every_pair_at_least_once():
    from hpc.drill import DIAGONAL, MATRIX, SCENARIOS

    assert [s for _, s in DIAGONAL] == list(SCENARIOS) and {p for p, _ in DIAGONAL} == set(MATRIX)
    # The hang runs two ranks a node, and a ddp pair runs it with the fewest processes to start.
    assert ("ddp/torchrun", "hang") in DIAGONAL and ("ddp/srun", "time_limit") in DIAGONAL


def test_a_batch_host_loss_passes_when_the_run_goes_on_as_a_new_job_without_it():
    seen = observed("batch_host_loss", victim_rank=0, victim_node="n1")
    seen.attempts = [{"attempt": 0, "ending": "node_failure", "action": "resubmit", "excluded": ["n1"], "node": "n1",
                      "source": "waiter"}, {"attempt": 1, "ending": "completed", "action": "none"}]
    result = drill.check(seen, REFERENCE, 40, spare_nodes=1)
    assert result.ok, result.problems
    assert (result.retries, result.excluded, result.victim) == (1, ["n1"], "rank 0 on n1")


def full_disk(**kw) -> Observed:
    detail = ("rank 0 on n1: no space left on device writing checkpoint step00000015 in /d/run/checkpoints: "
              "1,048,576 bytes free, about 3,812,345 needed; the previous checkpoint (step00000010) is intact: ...")
    seen = observed("disk_full", victim_rank=None, victim_node=None, final_state="FAILED", resumed_step=None,
                    next_step_at=None, back_at=None, restarted_at=None, losses={s: REFERENCE[s] for s in range(1, 15)})
    seen.attempts = [{"attempt": 0, "ending": "storage", "action": "none", "excluded": [], "detail": detail}]
    for key, value in kw.items():
        setattr(seen, key, value)
    return seen


def test_a_full_disk_passes_when_the_job_fails_naming_the_room_with_its_losses_exact_up_to_it():
    result = drill.check(full_disk(), REFERENCE, 40, spare_nodes=1)
    assert result.ok, result.problems
    assert (result.ending, result.action, result.retries, result.recovery_s, result.lost_s) == (
        "storage", "none", 0, None, None)
    assert result.compared_steps == 14


def test_a_full_disk_fails_when_it_was_retried_or_completed_or_left_something_half_written():
    retried = full_disk(final_state="COMPLETED")
    retried.attempts = [{**retried.attempts[0], "action": "retry"}, {"attempt": 1, "ending": "completed"}]
    problems = drill.check(retried, REFERENCE, 40, spare_nodes=1).problems
    assert "first attempt's action was retry, expected none" in problems
    assert "the job ended COMPLETED, not FAILED" in problems and "2 attempts were recorded, not the one that failed" \
        in problems
    vague = full_disk()
    vague.attempts[0]["detail"] = "could not classify it: No space left on device"
    assert any("does not say the room" in p for p in drill.check(vague, REFERENCE, 40).problems)
    half = full_disk(problems=["/d/run/checkpoints/.tmp-step00000015 was left half-written"])
    assert not drill.check(half, REFERENCE, 40).ok


def test_the_default_scenarios_are_the_basic_ones_and_each_whose_site_option_is_given():
    assert drill.choose(None, {}) == ["preempt", "time_limit", "rank_kill", "node_loss", "hang"]
    assert drill.choose(None, {"--node-control": "bash x.sh"})[-1] == "batch_host_loss"
    assert drill.choose(None, {"--node-control": "c", "--small-disk": "/d"}) == list(drill.SCENARIOS)
    assert drill.choose("hang, disk_full", {"--small-disk": "/d"}) == ["hang", "disk_full"]
    with pytest.raises(ValueError, match="disk_full needs --small-disk, a folder on a small file system"):
        drill.choose("disk_full", {})
    with pytest.raises(ValueError, match="unknown scenario.*flood"):
        drill.choose("flood", {})


def test_with_the_job_defaults_only_disk_full_keeps_the_drills_checkpoint_cadence():
    assert drill.train_args("rank_kill", job_defaults=False)[-2:] == ("--checkpoint-every", "5")
    assert "--checkpoint-every" not in drill.train_args("rank_kill", job_defaults=True)
    assert "--checkpoint-every" not in drill.train_args("reference", job_defaults=True)
    # Its fault is a checkpoint that does not fit: it needs one to come.
    assert drill.train_args("disk_full", job_defaults=True)[-2:] == ("--checkpoint-every", "5")
    # At 10 steps/s: the fault at step 10, 15 s of steps past it for a snapshot, half an interval and the recovery.
    assert drill.steps_at(10.0, least=40, reach_s=drill.DEFAULTS_REACH_S) == 10 + 150 + 10
    assert drill.SNAPSHOT_PHASE_S == 2.5
