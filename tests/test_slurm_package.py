"""hpc/slurm: one runner with one timeout policy, Slurm's grammar read once, and the state table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpc.slurm import commands, grammar, runner, states


def test_a_missing_or_silent_command_is_a_failed_run_not_an_exception(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    proc = runner.run(["squeue", "-h"])
    assert proc.returncode == 127 and "cannot run squeue" in proc.stderr
    (tmp_path / "squeue").write_text("#!/bin/sh\nexec /bin/sleep 5\n")
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setattr(runner, "QUERY_TIMEOUT_S", 0.2)
    proc = runner.run(["squeue", "-h"])
    assert proc.returncode == 124 and "did not answer" in proc.stderr


@pytest.mark.parametrize("argv,timeout", [(["sbatch", "x"], runner.SUBMIT_TIMEOUT_S),
                                          (["sbatch", "--test-only", "x"], runner.QUERY_TIMEOUT_S),
                                          (["scancel", "1"], runner.CHANGE_TIMEOUT_S),
                                          (["scontrol", "requeuehold", "1"], runner.CHANGE_TIMEOUT_S),
                                          (["scontrol", "show", "job", "1"], runner.QUERY_TIMEOUT_S),
                                          (["sacct", "-j", "1"], runner.QUERY_TIMEOUT_S)])
def test_one_timeout_policy_by_what_the_command_does(argv: list[str], timeout: int) -> None:
    assert runner.timeout_of(argv) == timeout


def test_check_names_what_slurm_said_in_one_line() -> None:
    fake = lambda argv: subprocess.CompletedProcess(argv, 1, "", "scancel: error: Invalid job id specified\n")  # noqa: E731
    with pytest.raises(runner.SlurmError, match="^scancel failed: Invalid job id specified$"):
        runner.check(["scancel", "x"], fake)


def test_commands_return_slurms_text_or_none_and_take_a_fake_slurm() -> None:
    seen: list[list[str]] = []

    def fake(argv):
        seen.append(list(argv))
        return subprocess.CompletedProcess(argv, 0 if argv[0] != "sinfo" else 1, "42|RUNNING\n", "")

    assert commands.sacct(["42", "43"], ("JobID", "State"), duplicates=True, runner=fake) == "42|RUNNING\n"
    assert seen[-1] == ["sacct", "-D", "-X", "-n", "-P", "-j", "42,43", "-o", "JobID,State"]
    assert commands.show("config", runner=fake) is not None and seen[-1] == ["scontrol", "show", "config"]
    assert commands.show("job", "42", runner=fake) is not None and seen[-1] == ["scontrol", "show", "job", "42", "-o"]
    assert commands.scancel(["42"], signal="USR1", runner=fake) and seen[-1] == ["scancel", "--signal=USR1", "42"]
    with pytest.raises(runner.SlurmError, match="refused"):
        commands.sbatch(Path("job.sbatch"), runner=lambda argv: subprocess.CompletedProcess(argv, 1, "", "no\n"))


@pytest.mark.parametrize("text,seconds", [("00:05:00", 300), ("1-00:00:00", 86400), ("5:00", 300),
                                          ("2-03:04:05", 183845), ("UNLIMITED", None), ("NONE", None),
                                          ("Partition_Limit", None), ("junk", None), ("00:00:07.250", 7)])
def test_durations_as_scontrol_squeue_and_sacct_print_them(text: str, seconds: int | None) -> None:
    assert grammar.duration_s(text) == seconds
    if seconds is not None and "." not in text:
        assert grammar.duration_s(grammar.format_duration(seconds)) == seconds


def test_timestamps_and_exit_codes() -> None:
    os.environ.setdefault("TZ", "UTC")
    assert grammar.timestamp("Unknown") is None and grammar.timestamp("None") is None
    assert grammar.timestamp("2026-12-01T08:22:21") - grammar.timestamp("2026-12-01T08:22:20") == 1
    assert grammar.exit_code("0:9") == (0, 9) and grammar.exit_code("2:0") == (2, 0)
    assert grammar.exit_code("x") is None


def test_the_state_table_puts_every_state_in_one_place() -> None:
    assert not states.TERMINAL & states.LIVE
    assert states.REQUEUED <= states.LIVE and states.ON_NODES <= states.LIVE
    assert states.base("CANCELLED by 0") == "CANCELLED"
