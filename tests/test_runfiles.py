"""Specifications of hpc/runfiles.py: the files a failing rank leaves, written safely and read defensively."""

from __future__ import annotations

import json
from pathlib import Path

from hpc import runfiles
from hpc.vocab import HANG


def test_only_this_attempts_lost_node_counts(tmp_path):
    (tmp_path / "lost.json").write_text('{"node": "n2", "ranks": [1], "since": 5.0, "declared_by": 0, "attempt": 0}')
    assert runfiles.read_lost(tmp_path, 0)["node"] == "n2"
    assert runfiles.read_lost(tmp_path, 1) is None
    (tmp_path / "lost.json").write_text('{"node": 7, "attempt": 0}')
    assert runfiles.read_lost(tmp_path, 0) is None


def test_a_rank_records_its_own_error(tmp_path):
    runfiles.record_rank_error(tmp_path, {"RANK": "3", "SLURMD_NODENAME": "n2", "SLURM_RESTART_COUNT": "1"},
                               "ValueError: x\n  more", "exception", 1)
    [err] = runfiles.read_errors(tmp_path)
    assert (err.rank, err.node, err.attempt, err.error) == (3, "n2", 1, "ValueError: x more")


def test_a_rank_error_keeps_what_it_can_and_needs_a_rank_and_an_error_line() -> None:
    err = runfiles.parse_rank_error('{"rank": 1, "error": "ValueError: x", "attempt": 1e400, "time": "now"}')
    assert (err.rank, err.error, err.attempt, err.time) == (1, "ValueError: x", 0, 0.0)
    assert runfiles.parse_rank_error('{"rank": "1", "error": "x"}') is None
    assert runfiles.parse_rank_error('{"rank": 1, "error": "x", "exit_code": Infinity}').exit_code is None


def test_a_hang_with_unreadable_fields_counts_them_as_absent(tmp_path: Path) -> None:
    (tmp_path / HANG).write_text(json.dumps({"rank": "0", "since": 1e300, "step": 4, "attempt": 2}))
    assert runfiles.read_hang(tmp_path, 2) == {"step": 4, "attempt": 2}
    assert runfiles.read_hang(tmp_path, 3) is None
    (tmp_path / HANG).write_text('{"attempt": 2, "step": 1e400}')
    assert runfiles.read_hang(tmp_path, 2).get("step") is None
    for since in (-5.0, 0.0, 2.0**33):  # times no clock stamps, as every reader of the job directory judges them
        (tmp_path / HANG).write_text(json.dumps({"since": since, "attempt": 2}))
        assert runfiles.read_hang(tmp_path, 2) == {"attempt": 2}


def test_a_hang_or_a_lost_node_whose_attempt_cannot_be_read_is_no_attempt_s(tmp_path: Path) -> None:
    """hang.json stays in the run directory after its attempt: read as every attempt's, attempt 1's hang made the
    attempt relaunched after it, which completed, be recorded hung and relaunched again from the start. The step's
    own status (76) still tells a hang whose file is damaged."""
    for attempt in ('"x"', "1e400", None):
        fields = {"rank": 1, "node": "n3", "since": 5.0, "declared_by": 0, "ranks": [1]}
        text = json.dumps(fields)[:-1] + ("" if attempt is None else f', "attempt": {attempt}') + "}"
        (tmp_path / HANG).write_text(text)
        (tmp_path / "lost.json").write_text(text)
        assert runfiles.read_hang(tmp_path, 2) is None and runfiles.read_lost(tmp_path, 2) is None


def test_one_declaration_wins_among_threads_of_one_process_declaring_at_once(tmp_path):
    import threading

    won, failed = [], []

    def declare(rank: int) -> None:
        try:
            won.append(runfiles.declare(tmp_path / "hang.json", {"declared_by": rank}))
        except OSError as exc:
            failed.append(exc)
    for _ in range(20):
        (tmp_path / "hang.json").unlink(missing_ok=True)
        threads = [threading.Thread(target=declare, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failed == [] and won.count(True) == 1
        won.clear()
    assert [p.name for p in tmp_path.iterdir()] == ["hang.json"]


def test_a_declaration_never_writes_through_a_link_planted_at_its_temporary_name(tmp_path):
    import os
    import threading

    secret = tmp_path / "secret"
    secret.write_text("keep\n")
    (tmp_path / f".{HANG}.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(secret)
    assert runfiles.declare(tmp_path / HANG, {"declared_by": 0})
    assert secret.read_text() == "keep\n" and json.loads((tmp_path / HANG).read_text()) == {"declared_by": 0}
