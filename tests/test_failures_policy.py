"""Specifications of hpc/failures/policy.py: requeue, relaunch in the allocation, retry through the queue, or
stop."""

from __future__ import annotations

import errno

import pytest

from hpc import runfiles
from hpc.failures.evidence import Evidence
from hpc.failures.policy import Policy, decide
from hpc.failures.rules import Ending, classify
from hpc.vocab import EXIT_STORAGE

# ---- the policy ----------------------------------------------------------------------------------

STATES = {"n1": "idle", "n2": "allocated", "n3": "idle"}


def test_a_crashed_rank_is_retried_without_its_node():
    decision = decide(Ending("rank_crashed", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES)
    assert (decision.action, decision.excluded) == ("retry", ("n2",))
    assert decision.reason == "retry 1 of 2 through the queue without n2 from the checkpoint at step 10"


def test_a_lost_node_is_relaunched_at_once_on_the_allocations_spare():
    decision = decide(Ending("node_failure", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES,
                               allocation=["n1", "n2", "n3"])
    assert (decision.action, decision.excluded) == ("relaunch", ("n2",))
    assert decision.reason == "retry 1 of 2: relaunched in the allocation on n1, n3 from the checkpoint at step 10"


def test_a_relaunch_resumes_from_a_newer_snapshot_held_by_the_nodes_it_runs_on_and_says_so():
    ending, policy = Ending("node_failure", node="n2", step=10), Policy(max_retries=2, nodes=2)
    held = {"n1": 57, "n2": 58, "n3": 0}  # n2's went with it; the spare n3 joined after the last snapshot
    decision = decide(ending, [], policy, STATES, allocation=["n1", "n2", "n3"], held=held)
    assert decision.reason == "retry 1 of 2: relaunched in the allocation on n1, n3 from the snapshot at step 57 " \
                              "in node memory"
    older = decide(ending, [], policy, STATES, allocation=["n1", "n2", "n3"], held={"n1": 8})
    assert older.reason.endswith("from the checkpoint at step 10")
    retried = decide(ending, [], policy, STATES, allocation=["n1", "n2"], held=held)
    assert retried.action == "retry" and retried.reason.endswith("from the checkpoint at step 10")


def test_with_elastic_a_lost_node_without_a_spare_is_relaunched_at_once_on_the_nodes_left():
    ending = Ending("node_failure", node="n2", step=10)
    decision = decide(ending, [], Policy(max_retries=2, nodes=2, elastic=True), STATES, allocation=["n1", "n2"])
    assert (decision.action, decision.excluded, decision.nodes) == ("relaunch", ("n2",), 1)
    assert decision.reason == ("retry 1 of 2: elastic: relaunched in the allocation on n1, 1 of the job's 2 nodes, "
                               "the global batch kept from the checkpoint at step 10")
    spare = decide(ending, [], Policy(max_retries=2, nodes=2, elastic=True), STATES, allocation=["n1", "n2", "n3"])
    assert (spare.action, spare.nodes) == ("relaunch", None)  # a spare keeps the job's size


def test_a_lost_node_without_a_spare_goes_through_the_queue_without_it():
    decision = decide(Ending("node_failure", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES,
                               allocation=["n1", "n2"])
    assert (decision.action, decision.excluded) == ("retry", ("n2",))


def test_a_node_dead_unseen_by_slurm_without_a_spare_goes_through_the_queue_as_a_new_job():
    # Requeued, the job would stay COMPLETING on the dead node until Slurm's SlurmdTimeout (minutes).
    ending, policy = Ending("node_failure", node="n2", step=10), Policy(max_retries=2, nodes=2)
    decision = decide(ending, [], policy, STATES, allocation=["n1", "n2"], unanswered=True)
    assert (decision.action, decision.excluded) == ("resubmit", ("n2",))
    assert decision.reason == ("retry 1 of 2 through the queue as a new job without n2 from the checkpoint at step 10 "
                               "(requeued, it would wait until Slurm declares n2 down)")
    spare = decide(ending, [], policy, STATES, allocation=["n1", "n2", "n3"], unanswered=True)
    assert spare.action == "relaunch"  # a spare still wins: no trip through the queue at all
    used = [{"attempt": 0, "action": "resubmit", "excluded": ["n2"]}, {"attempt": 1, "action": "relaunch"}]
    assert decide(ending, used, policy, STATES, allocation=["n1", "n2"], unanswered=True).action == "none"


def test_a_killed_rank_without_a_spare_is_relaunched_in_place_once_then_its_node_is_kept_off():
    policy, alloc = Policy(max_retries=3, nodes=2), ["n1", "n2"]
    first = decide(Ending("rank_crashed", node="n2", step=10), [], policy, STATES, allocation=alloc)
    assert (first.action, first.excluded) == ("relaunch", ())
    assert "relaunched in the allocation on n1, n2" in first.reason
    history = [{"attempt": 0, "ending": "rank_crashed", "node": "n2", "action": "relaunch", "excluded": []}]
    again = decide(Ending("rank_crashed", node="n2", step=20), history, policy, STATES, allocation=alloc)
    assert (again.action, again.excluded) == ("retry", ("n2",))


def test_relaunches_and_retries_share_one_budget_and_exclusions_accumulate_in_the_allocation():
    history = [{"attempt": 0, "ending": "node_failure", "node": "n2", "action": "relaunch", "excluded": ["n2"]}]
    alloc = ["n1", "n2", "n3", "n4"]
    decision = decide(Ending("hung", node="n3"), history, Policy(max_retries=2, nodes=2),
                               {**STATES, "n4": "idle"}, allocation=alloc)
    assert (decision.action, decision.excluded) == ("relaunch", ("n2", "n3"))
    assert "on n1, n4" in decision.reason
    spent = decide(Ending("hung", node="n3"), history, Policy(max_retries=1, nodes=2), STATES,
                            allocation=alloc)
    assert spent.action == "none" and "used its 1 retry" in spent.reason


def test_retries_are_bounded_and_exclusions_accumulate():
    first = {"attempt": 0, "action": "retry", "excluded": ["n2"]}
    assert decide(Ending("hung", node="n3"), [first], Policy(max_retries=1, nodes=1), STATES).action == "none"
    decision = decide(Ending("hung", node="n3"), [first], Policy(max_retries=2, nodes=1), STATES)
    assert decision.excluded == ("n2", "n3")


def test_no_retry_when_the_job_would_no_longer_fit():
    first = {"attempt": 0, "action": "retry", "excluded": ["n1"]}
    decision = decide(Ending("node_failure", node="n2"), [first], Policy(nodes=2), STATES)
    assert decision.action == "none"
    assert decision.reason == ("not retried: excluding n1, n2 leaves 1 usable node(s) (n3) for a job that needs 2")


def test_a_down_node_does_not_count_as_usable():
    decision = decide(Ending("rank_crashed", node="n1"), [], Policy(nodes=2), {**STATES, "n3": "down*"})
    assert decision.action == "none"


@pytest.mark.parametrize("ending", ["bad_input", "code_error", "unknown", "completed"])
def test_bad_input_and_code_errors_are_never_retried(ending):
    assert decide(Ending(ending, node="n1"), [], Policy(), STATES).action == "none"


def test_requeues_are_counted_apart_from_retries():
    history = [{"attempt": 0, "action": "retry", "excluded": []}]
    assert decide(Ending("preempted"), history, Policy(max_requeues=1), STATES).action == "requeue"
    history.append({"attempt": 1, "action": "requeue", "excluded": []})
    decision = decide(Ending("time_limit"), history, Policy(max_requeues=1), STATES)
    assert decision.action == "none" and "used its 1 requeue(s)" in decision.reason


@pytest.mark.parametrize("code, advice", [
    (errno.EFBIG, "raise the file-size limit (ulimit -f), then resubmit with --resume"),
    (errno.EROFS, "make it writable or move --run-dir, then resubmit with --resume"),
    (None, "free space (or fix the path), then resubmit with --resume")])
def test_a_storage_ending_is_not_retried_advising_what_clears_the_errno_the_trainer_reported(tmp_path, code, advice):
    runfiles.record_rank_error(tmp_path, {"RANK": "1"}, "file too large writing checkpoint ...", "storage",
                               EXIT_STORAGE, errno=code)
    ending = classify(Evidence(attempt=0, step_status=EXIT_STORAGE, errors=runfiles.read_errors(tmp_path)))
    decision = decide(ending, [], Policy(), STATES)
    assert (ending.ending, decision.action) == ("storage", "none")
    assert decision.reason == f"a storage failure is not retried: {advice}"


# ---- records, accounting, the nudge ---------------------------------------------------------------

