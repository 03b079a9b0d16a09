"""Specifications of hpc/failures/record.py: attempts.jsonl written once per attempt, read defensively."""

from __future__ import annotations

import json

from hpc.failures import record as records
from hpc.failures.policy import Decision
from hpc.failures.rules import Ending


def test_an_attempt_is_recorded_once(tmp_path):
    line = records.record(Ending("completed"), Decision("none"), attempt=0, job_id="5", started="",
                           ended="", source="batch")
    assert records.append(tmp_path, line) is True
    assert records.append(tmp_path, {**line, "source": "sacct"}) is False
    assert [a["source"] for a in records.load(tmp_path)] == ["batch"]


def test_an_attempt_line_without_an_ending_or_with_a_mistyped_field_is_skipped() -> None:
    good = {"attempt": 0, "ending": "completed", "action": "none"}
    lines = [{"attempt": 1}, {"ending": "hung"}, {**good, "attempt": "2"}, {**good, "step": "x"},
             {**good, "attempt": True}, {**good, "attempt": -1}, good]
    assert records.parse_attempts("\n".join(json.dumps(x) for x in lines)) == [good]


def _line(attempt: int) -> dict:
    return records.record(Ending("rank_crashed", "rank 1 on n2: killed by SIGKILL", rank=1, node="n2", signal=9),
                          Decision("relaunch", ("n2",), "retry 1 of 2"), attempt=attempt, job_id="7", started="",
                          ended="", source="batch")


def test_a_line_torn_by_a_full_disk_does_not_swallow_the_next_attempts_line(tmp_path):
    """A write cut short (ENOSPC, a killed writer) leaves a line without its newline: the next attempt's line,
    appended to it, was damaged with it, so that attempt was recorded by no one and its retry counted by none."""
    (tmp_path / "attempts.jsonl").write_text(json.dumps(_line(0))[:70])
    assert records.append(tmp_path, _line(1)) is True
    assert [a["attempt"] for a in records.load(tmp_path)] == [1]


def test_bytes_that_are_not_utf8_in_one_line_hide_no_attempt(tmp_path):
    """One such byte made the whole file unreadable: every reader saw no attempt at all (the budgets started
    over, 'attempt number' went back to 0) and the batch shell's append raised, so each later attempt ended
    'could not classify it' with no retry. Now that text reads as a replacement character, as in any log."""
    bad = json.dumps({**_line(1), "detail": "cafe"}).encode().replace(b"cafe", b"caf\xe9")
    (tmp_path / "attempts.jsonl").write_bytes(json.dumps(_line(0)).encode() + b"\n" + bad + b"\n")
    assert records.append(tmp_path, _line(2)) is True
    assert [a["attempt"] for a in records.load(tmp_path)] == [0, 1, 2]
    assert records.load(tmp_path)[1]["detail"] == "caf\N{REPLACEMENT CHARACTER}"
