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
    assert drill.time_limit_steps(10.0, least=40) == 10 + 350 + 10
    assert drill.time_limit_steps(0.0, least=40) == 40
    assert drill.step_rate("") is None


def test_the_diagonal_drills_every_scenario_and_every_pair_once():
    from hpc.drill import MATRIX, SCENARIOS, diagonal

    cells = diagonal()
    assert sorted(cells) == sorted(MATRIX) and sorted(cells.values()) == sorted(SCENARIOS)

