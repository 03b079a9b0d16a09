"""Specifications of hpc/failures/rules.py and evidence.py: every ending classified from real logs captured on
the cluster, each by its own rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc import runfiles
from hpc.drill import BATCH_CLASSIFIED, MATRIX, expect
from hpc.failures import evidence, rules
from hpc.failures.evidence import Evidence, attempt_segment, context, failed_nodes, last_error_line, with_context
from hpc.failures.policy import Policy, decide
from hpc.runfiles import RankError
from hpc.vocab import EXIT_HUNG

DATA = Path(__file__).resolve().parent / "data" / "failures"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "case.json").exists())


def evidence_of(folder: Path) -> Evidence:
    """A fixture captured from a real job (scripts/capture-failure.py) as the batch shell saw it: the context its
    attempt line kept, and the copied logs."""
    case = json.loads((folder / "case.json").read_text())
    found = (runfiles.parse_rank_error(p.read_text()) for p in sorted((folder / "errors").glob("*.json")))
    return with_context(case["attempt"], case["context"], batch_log=(folder / "batch.out").read_text(),
                        task_logs={int(p.stem.split("-")[1]): p.read_text() for p in folder.glob("task-*.log")},
                        errors=tuple(e for e in found if e is not None))


@pytest.mark.parametrize("name", CASES)
def test_each_real_ending_is_classified_with_its_rank_node_and_cause(name):
    case = json.loads((DATA / name / "case.json").read_text())
    ending = rules.classify(evidence_of(DATA / name))
    for key, value in case["expect"].items():
        assert getattr(ending, key) == value, (key, ending)


def test_an_evidences_context_gives_back_the_same_evidence_without_its_files():
    ev = Evidence(attempt=3, step_status=137, batch_log="srun: error: n2: task 1: Killed", job_state="RUNNING",
                  down_nodes=frozenset({"n2", "n1"}), launcher="deepspeed", time_left_s=12, seen_step=40)
    kept = json.loads(json.dumps(context(ev)))
    assert kept["down_nodes"] == ["n1", "n2"]
    assert with_context(3, kept, batch_log=ev.batch_log) == ev
    assert with_context(3, {**kept, "from_a_newer_hpcdist": 1}, batch_log=ev.batch_log) == ev


def test_every_cell_of_the_drill_matrix_is_kept_from_the_cluster_and_classified_again_here():
    """scripts/drill-matrix.py --capture keeps each backend x launcher x scenario's faulted attempt (but a dead
    batch host's, named by its waiter, not by the batch shell's classifier); the parametrized test above
    classifies each again as the drill expects, so a rule change that would break a cell fails here on every
    run, not only when the whole matrix is rerun."""
    cells = {f"drill-{combo.replace('/', '-')}-{scenario}": scenario for combo in MATRIX
             for scenario in BATCH_CLASSIFIED}
    assert [c for c in cells if c not in CASES] == []
    for cell, scenario in cells.items():
        case = json.loads((DATA / cell / "case.json").read_text())
        assert case["recorded"]["ending"] == case["expect"]["ending"] == expect(scenario, spare_nodes=1).ending


def test_the_fixtures_cover_every_ending_the_drill_injects():
    endings = {json.loads((DATA / n / "case.json").read_text())["expect"]["ending"] for n in CASES}
    assert {"preempted", "time_limit", "node_failure", "rank_crashed", "hung", "bad_input", "storage"} <= endings


def test_a_rank_killed_under_torchrun_is_named_from_the_agents_root_cause():
    log = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
           "============================================================\n"
           "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-01_09:10:00\n  host      : n2\n"
           "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n"
           "  traceback : Signal 9 (SIGKILL) received by PID 4242\n")
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n2: task 1: Exited with exit code 1\n",
                  task_logs={1: log}, ranks_per_task=2, launcher="torchrun")
    ending = rules.classify(ev)
    assert (ending.ending, ending.rank, ending.node, ending.signal) == ("rank_crashed", 3, "n2", 9)
    assert ending.detail == "rank 3 on n2: killed by SIGKILL"


FAKE_ROOT_CAUSE = ("Root Cause (first observed failure):\n[0]:\n  host      : n1\n  rank      : 0 (local_rank: 0)\n"
                   "  exitcode  : -9 (pid: 1)\n")
FAKE_DEEPSPEED = "[ERROR] [launch.py:259:sigkill_handler] ['python', '--local_rank=0'] exits with return code = -11\n"


@pytest.mark.parametrize("launcher,log", [("srun", FAKE_ROOT_CAUSE), ("srun", FAKE_DEEPSPEED),
                                          ("torchrun", FAKE_DEEPSPEED), ("deepspeed", FAKE_ROOT_CAUSE),
                                          ("deepspeed", FAKE_DEEPSPEED)])
def test_a_rank_imitating_a_launchers_report_is_not_believed(launcher, log):
    # The task exited 1 by itself: no launcher of this job reported a dead child, whatever the log says.
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n1: task 0: Exited with exit code 1\n",
                  task_logs={0: "Traceback (most recent call last):\n" + log}, launcher=launcher)
    assert rules.classify(ev).ending != "rank_crashed"


def test_torchruns_own_root_cause_comes_last_and_outweighs_a_rank_imitating_it():
    real = FAKE_ROOT_CAUSE.replace("-9 (pid: 1)", "1 (pid: 4242)")
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n1: task 0: Exited with exit code 1\n",
                  task_logs={0: FAKE_ROOT_CAUSE + "ChildFailedError:\n" + real}, launcher="torchrun")
    assert rules.classify(ev).ending != "rank_crashed"


def test_the_deepspeed_launchers_negative_status_is_the_signal():
    ev = Evidence(attempt=0, batch_log="srun: error: n1: task 0: Exited with exit code 247\n",
                  task_logs={0: "[ERROR] [launch.py:259:sigkill_handler] ['python'] exits with return code = -9\n"},
                  ranks_per_task=2, launcher="deepspeed")
    ending = rules.classify(ev)
    assert (ending.ending, ending.signal, ending.detail) == ("rank_crashed", 9, "ranks 0-1 on n1: killed by SIGKILL")


def test_the_deepspeed_launchers_child_is_named_by_its_local_rank_on_the_node():
    # Task 1 (the second node) runs ranks 2-3; its launcher reports the dead child by command line only.
    child = "['python', '-u', '-m', 'train', '--local_rank=1', '--backend', 'deepspeed']"
    ev = Evidence(attempt=0, batch_log="srun: error: n2: task 1: Exited with exit code 247\n",
                  task_logs={1: f"[ERROR] [launch.py:259:sigkill_handler] {child} exits with return code = -9\n"},
                  ranks_per_task=2, launcher="deepspeed")
    ending = rules.classify(ev)
    assert (ending.ending, ending.rank, ending.node, ending.signal) == ("rank_crashed", 3, "n2", 9)
    assert ending.detail == "rank 3 on n2: killed by SIGKILL"


def test_a_code_error_names_the_rank_that_raised_not_the_peers_that_lost_it():
    own = RankError(1, "n2", 0, 100.0, "exception", "ValueError: shapes (3,) and (4,) do not match", 1)
    peer = RankError(0, "n1", 0, 99.0, "exception", "RuntimeError: Connection closed by peer [10.0.0.2]:1234", 1)
    ending = rules.classify(Evidence(attempt=0, step_status=1, errors=(peer, own)))
    assert (ending.ending, ending.rank, ending.node) == ("code_error", 1, "n2")
    assert ending.detail == "rank 1 on n2: ValueError: shapes (3,) and (4,) do not match"


def test_a_rendezvous_port_another_program_holds_is_the_hosts_own_error_not_a_peers_symptom():
    """Captured on the cluster: the profile's MASTER_PORT held on n1, where torchrun's agent hosts the rendezvous.
    Its DistNetworkError read as a peer's lost connection, and the attempt ended unknown."""
    ending = rules.classify(evidence_of(DATA / "port-taken-torchrun"))
    assert (ending.ending, ending.rank, ending.node) == ("code_error", 0, "n1")
    assert "port: 23456" in ending.detail and "EADDRINUSE" in ending.detail
    assert evidence.is_symptom("torch.distributed.DistNetworkError: Connection reset by peer")
    assert not evidence.is_symptom("DistNetworkError: ... name: EADDRINUSE, message: address already in use")


def test_the_same_exception_on_every_rank_says_so():
    errors = tuple(RankError(r, f"n{r + 1}", 0, 100.0 + r, "exception", "KeyError: 'lr'", 1) for r in range(3))
    ending = rules.classify(Evidence(attempt=0, step_status=1, errors=errors))
    assert ending.detail == "rank 0 on n1: KeyError: 'lr' (the same on 3 ranks)"


def test_an_earlier_attempts_error_does_not_count():
    old = RankError(0, "n1", 0, 1.0, "exception", "ValueError: boom", 1)
    assert rules.classify(Evidence(attempt=1, step_status=0, errors=(old,))).ending == "completed"


def test_a_cancelled_job_is_not_requeued_even_after_its_ranks_checkpointed():
    ev = Evidence(attempt=0, step_status=143, preempted=True, job_state="CANCELLED",
                  batch_log="slurmstepd-n1: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-01T09:00:00 ***\n")
    ending = rules.classify(ev)
    assert ending.ending == "cancelled"
    assert decide(ending, [], Policy(), {}).action == "none"


def test_a_scancel_seen_only_in_the_batch_log_is_cancelled_not_preempted():
    """Captured on the local cluster: scancel of a running sbatch job while scontrol still says RUNNING; the
    ranks checkpointed on the SIGTERM. Requeueing it would make the job impossible to cancel."""
    log = ("hpcdist: attempt 0 started on n1 at 2026-12-01T10:02:48\n"
           "srun: Job step aborted: Waiting up to 7 seconds for job step to finish.\n"
           "slurmstepd-n1: error: *** JOB 31311010 ON n1 CANCELLED AT 2026-12-01T10:03:02 ***\n"
           "srun: error: n2: task 1: Exited with exit code 75\n"
           "srun: error: n1: task 0: Exited with exit code 75\n")
    ev = Evidence(attempt=0, step_status=75, preempted=True, job_state="RUNNING", batch_log=log)
    ending = rules.classify(ev)
    assert ending.ending == "cancelled"
    assert decide(ending, [], Policy(), {}).action == "none"


@pytest.mark.parametrize("how", ["Exited with exit code 130", "Interrupt"])
def test_ranks_a_person_interrupted_are_stopped_by_request_never_relaunched(how):
    """The trainer's own exit for a Ctrl-C or scancel --signal=INT (130, its heartbeat `stopped`), or a rank SIGINT
    killed outright: a stop someone asked for, which a relaunch would undo."""
    line = ("hpcdist-train: interrupted (SIGINT) at step 35, exit 130: rerun with --resume to go on from its "
            "checkpoint step00000032\n")
    ev = Evidence(attempt=0, step_status=130, job_state="RUNNING", batch_log=f"srun: error: n1: tasks 0-1: {how}\n",
                  task_logs={0: line, 1: line}, checkpoint_step=32)
    ending = rules.classify(ev)
    assert (ending.ending, ending.rank, ending.node, ending.step) == ("cancelled", 0, "n1", 32)
    assert ending.detail == "rank 0 on n1: interrupted (SIGINT), a stop asked for"
    assert decide(ending, [], Policy(max_retries=2, nodes=1), {}, allocation=["n1"]).action == "none"


def test_a_preemption_by_slurm_is_not_a_cancel():
    log = "slurmstepd-n1: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-01T10:03:02 DUE TO PREEMPTION ***\n"
    ev = Evidence(attempt=0, step_status=75, preempted=True, job_state="RUNNING", batch_log=log)
    assert rules.classify(ev).ending == "preempted"


@pytest.mark.parametrize("line,expected", [
    ("hpcdist-train: error: global batch 32 does not split over 3 ranks",
     "global batch 32 does not split over 3 ranks"),
    ("python -m train: error: unrecognized arguments: --nope (see --help)",
     "unrecognized arguments: --nope (see --help)"),
    ("[rank1]: ValueError: bad", "ValueError: bad"),
])
def test_last_error_line_finds_a_ranks_own_error(line, expected):
    log = (f"Epoch: 0 | Batch: 1/16 | Loss: 2.3\n{line}\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert last_error_line(log) == expected


def test_a_node_the_ranks_saw_vanish_is_a_node_failure_naming_it():
    lost = {"node": "n2", "ranks": [2, 3], "since": 1.0, "declared_by": 0, "attempt": 0}
    ending = rules.classify(Evidence(attempt=0, step_status=137, lost=lost, checkpoint_step=10))
    assert (ending.ending, ending.node, ending.rank, ending.step) == ("node_failure", "n2", 2, 10)
    assert ending.detail == "node n2 lost: rank(s) 2, 3 vanished and its slurmd does not answer"


def test_a_task_launch_that_failed_on_nodes_names_them_without_srun_s_colon():
    # CI, a requeued container job (Slurm's stale spool folder of the killed step): "n2:" was excluded, and srun
    # refused the relaunch ("Invalid node name specified").
    log = ("srun: error: Task launch for StepId=9444026.0 failed on node n2: File exists\n"
           "srun: error: Task launch for StepId=9444026.0 failed on node n1: File exists\n"
           "srun: error: Node failure on n3\n")
    assert failed_nodes(log) == ["n2", "n1", "n3"]


def test_attempt_segment_is_the_attempts_own_part_of_the_batch_log():
    log = ("hpcdist: attempt 0 started on n1 at T\nsrun: error: Node failure on n2\n"
           "hpcdist: attempt 1 started on n1 at T\nall good\n")
    assert "Node failure" in attempt_segment(log, 0) and "all good" not in attempt_segment(log, 0)
    assert attempt_segment(log, 1) == "hpcdist: attempt 1 started on n1 at T\nall good\n"


def test_a_rank_frozen_during_set_up_is_named_with_its_phase():
    hang = {"rank": 1, "node": "n2", "step": 0, "phase": "rendezvous", "since": None}
    ending = rules.classify(Evidence(attempt=0, step_status=EXIT_HUNG, hang=hang))
    assert (ending.ending, ending.rank, ending.node) == ("hung", 1, "n2")
    assert ending.detail == "rank 1 on n2 froze during set-up (rendezvous), before its first step"


# ---- the table of rules --------------------------------------------------------------------------

# Rules no captured real failure reaches yet, each with the smallest evidence it alone recognises.
CONSTRUCTED = {
    "cancelled": Evidence(attempt=0, step_status=143, job_state="CANCELLED by 1000"),
    "node_fail_unnamed": Evidence(attempt=0, step_status=1, job_state="NODE_FAIL"),
    "own_error": Evidence(attempt=0, step_status=1, errors=(RankError(1, "n2", 0, 5.0, "exception", "KeyError: 'x'"),)),
    "interrupted": Evidence(attempt=0, step_status=130),
    "out_of_memory": Evidence(attempt=0, step_status=137, job_state="OUT_OF_MEMORY"),
    "completed": Evidence(attempt=0, step_status=0, seen_step=30),
    "unknown": Evidence(attempt=0, step_status=3),
}


def test_every_rule_is_pinned_by_a_captured_failure_or_its_own_smallest_case():
    captured = {rules.explain(evidence_of(DATA / name))[0] for name in CASES}
    names = [rule.__name__ for rule in rules.RULES]
    assert set(names) == captured | set(CONSTRUCTED) and not captured & set(CONSTRUCTED)
    for name, ev in CONSTRUCTED.items():
        assert rules.explain(ev)[0] == name


def test_each_rule_gives_one_kind_of_ending_and_the_last_recognises_anything():
    assert rules.explain(Evidence(attempt=0))[0] == "unknown"
    for ev in CONSTRUCTED.values():
        assert rules.explain(ev)[1].ending in rules.ENDINGS
    assert [r.__name__ for r in rules.RULES][-1] == "unknown"


def test_what_slurm_did_to_the_job_outranks_what_the_ranks_said():
    crash = "srun: error: n2: task 1: Killed\n"
    assert rules.classify(Evidence(attempt=0, step_status=137, batch_log=crash)).ending == "rank_crashed"
    assert rules.classify(Evidence(attempt=0, step_status=137, batch_log=crash, job_state="CANCELLED")).ending \
        == "cancelled"
    lost = {"node": "n2", "ranks": [1]}
    assert rules.classify(Evidence(attempt=0, step_status=137, batch_log=crash, lost=lost)).ending == "node_failure"
