"""hpc/slurm: one runner with one timeout policy, Slurm's grammar read once, and the state table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpc.slurm import commands, grammar, parse, runner, states


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


def test_a_refusal_names_what_slurm_said_in_one_line() -> None:
    fake = lambda argv: subprocess.CompletedProcess(argv, 1, "", "scancel: error: Invalid job id specified\n")  # noqa: E731
    with pytest.raises(runner.SlurmError, match="^scancel failed: Invalid job id specified$"):
        commands.scancel(["42"], runner=fake, strict=True)


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


def test_a_list_of_any_number_of_jobs_reaches_slurm_in_arguments_exec_accepts() -> None:
    """20,000 job ids made one `-j` argument of 180 KB, which exec refuses (E2BIG): list showed every job UNKNOWN."""
    jobs = [str(30_000_000 + i) for i in range(20_000)]
    lengths: list[int] = []

    def fake(argv):  # as exec: no single argument over the kernel's MAX_ARG_STRLEN
        lengths.append(max(len(a.encode()) for a in argv))
        if lengths[-1] > 128 * 1024:
            return subprocess.CompletedProcess(argv, 127, "", f"cannot run {argv[0]}: Argument list too long")
        asked = argv[argv.index("-j") + 1].split(",")
        return subprocess.CompletedProcess(argv, 0, "".join(f"{j}|PENDING\n" for j in asked), "")

    for text in (commands.sacct(jobs, ("JobID", "State"), runner=fake),
                 commands.squeue("%i|%T", jobs=jobs, runner=fake), commands.queued(jobs, "%i|%T", runner=fake)[0]):
        assert [row["JobID"] for row in parse.rows(text, ("JobID", "State"))] == jobs
    assert max(lengths) < 32 * 1024 and len(lengths) < 100


@pytest.mark.parametrize("job", ["0", "", "--me", "-1", "12,13", "12 13", "012", "12_", "12_4_5", "12+0", "١٢"])
def test_what_is_no_job_id_never_reaches_slurm(job: str) -> None:
    """scontrol show job 0 and sacct -j 0 answer with every job, scancel --me cancels every one of the user's."""
    ran: list[list[str]] = []

    def fake(argv):
        ran.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    assert not grammar.is_job_id(job)
    assert commands.show("job", job, runner=fake) is None
    assert commands.squeue("%i", jobs=[job], runner=fake) is None
    assert commands.queued(["42", job], "%i", runner=fake) == (None, False)
    assert commands.sacct([job], ("JobID",), runner=fake) is None
    assert commands.scancel([job], runner=fake) is False
    with pytest.raises(runner.SlurmError, match="is no Slurm job id"):
        commands.scancel(["42", job], runner=fake, strict=True)
    assert commands.start_now(job, runner=fake) is False
    assert ran == []


@pytest.mark.parametrize("job", ["1", "42", "123_4", "20011193"])
def test_jobs_and_array_tasks_are_job_ids(job: str) -> None:
    assert grammar.is_job_id(job)


def test_slurmd_port_is_scontrol_configs_else_slurms_default() -> None:
    config = "Configuration data as of 2026-12-06T20:00:00\nSlurmctldPort = 6817\nSlurmdPort              = 7000\n"
    assert commands.slurmd_port(lambda argv: subprocess.CompletedProcess(argv, 0, config, "")) == 7000
    assert commands.slurmd_port(lambda argv: subprocess.CompletedProcess(argv, 1, "", "down\n")) == commands.SLURMD_PORT
    odd = config.replace("7000", "\u00b2")  # str.isdigit() passes it, int() refuses it
    assert commands.slurmd_port(lambda argv: subprocess.CompletedProcess(argv, 0, odd, "")) == commands.SLURMD_PORT


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


def test_a_scontrol_record_keeps_values_with_blanks_and_equals_signs() -> None:
    line = "NodeName=n1 OS=Linux 6.1 #1 SMP  RealMemory=10 CfgTRES=cpu=2,mem=1M AllocTRES= Reason=bad DIMM [a@b]"
    f = parse.record(line)
    assert f["OS"] == "Linux 6.1 #1 SMP" and f["CfgTRES"] == "cpu=2,mem=1M" and f["AllocTRES"] == ""
    assert f["Reason"] == "bad DIMM [a@b]"
    assert parse.keyvalues("JobId=7 JobState=RUNNING\nJobId=8 JobState=PENDING\n") == {"JobId": "7",
                                                                                         "JobState": "RUNNING"}
    assert parse.keyvalues(None) == {} and [r["JobId"] for r in parse.records("JobId=7\n\nJobId=8\n")] == ["7", "8"]


def test_rows_read_sacct_and_squeue_by_field_name_and_job() -> None:
    text = "42|RUNNING|n1\n42_3|PENDING|\nshort\n43|COMPLETED|n2\n"
    assert parse.rows(text, ("JobID", "State", "NodeList"), job="42") == [
        {"JobID": "42", "State": "RUNNING", "NodeList": "n1"}]
    assert [r["JobID"] for r in parse.rows(text, ("JobID", "State", "NodeList"))] == ["42", "42_3", "43"]
    assert parse.node_states("n1|idle*\nn2|mixed+drain\n") == {"n1": "idle", "n2": "mixed+drain"}
    assert parse.node_state("MIXED+DRAIN") == "mixed" and parse.config("SlurmdPort = 6818\n") == {"SlurmdPort": "6818"}


@pytest.mark.parametrize("text,job_id", [("4242\n", "4242"), ("4242;cluster\n", "4242"),
                                         ("sbatch: warning: x\n77\n", "77"), ("sbatch: error: nope", None), ("", None),
                                         ("0\n", None), ("\u00b2\n", None)])
def test_the_job_id_sbatch_printed(text: str, job_id: str | None) -> None:
    assert parse.sbatch_job_id(text) == job_id


def test_sbatch_without_a_job_id_is_a_slurm_error() -> None:
    with pytest.raises(runner.SlurmError, match="printed no job id"):
        commands.sbatch(Path("x"), runner=lambda argv: subprocess.CompletedProcess(argv, 0, "queued\n", ""))


def test_sacct_rows_of_array_tasks_folded_while_pending_are_unfolded_into_a_row_per_task():
    text = "7_0|COMPLETED\n7_1|RUNNING\n7_[2-4%2]|PENDING\n8_[0,2]|CANCELLED by 0\n9_0|FAILED\n7|PENDING\n"
    assert parse.unfolded(text) == ("7_0|COMPLETED\n7_1|RUNNING\n7_2|PENDING\n7_3|PENDING\n7_4|PENDING\n"
                                    "8_0|CANCELLED by 0\n8_2|CANCELLED by 0\n9_0|FAILED\n7|PENDING\n")
    assert parse.array_tasks("7") == ("7", []) and parse.unfolded(None) == ""


SLURM_COMMANDS = {"sbatch", "scontrol", "squeue", "sacct", "sinfo", "scancel", "salloc", "sacctmgr", "sstat"}
ROOT = Path(__file__).resolve().parents[1]


def _spelled_commands(path: Path) -> list[str]:
    """The Slurm commands a module would run: a list or tuple that starts with one's name (an argv), or
    one's name handed to subprocess or shutil.which."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    # click.Choice(("sbatch", "submitit")) names a way to submit, not a command to run.
    choices = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "attr", getattr(node.func, "id", "")) == "Choice" for arg in node.args}
    found = []
    for node in ast.walk(tree):
        first = None
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and id(node) not in choices:
            first = node.elts[0]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("run", "Popen", "check_output", "call", "which"):
            first = node.args[0]
        if isinstance(first, ast.Constant) and first.value in SLURM_COMMANDS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {first.value}")
    return found


def test_no_module_outside_hpc_slurm_spells_a_slurm_command() -> None:
    modules = [p for folder in ("hpc", "train") for p in (ROOT / folder).rglob("*.py")
               if (ROOT / "hpc" / "slurm") not in p.parents]
    assert [line for p in sorted(modules) for line in _spelled_commands(p)] == []
    assert _spelled_commands(ROOT / "hpc" / "slurm" / "commands.py"), "the scan must see what it looks for"


def test_only_hpc_slurm_reads_slurms_column_output() -> None:
    import ast

    def splits_columns(path: Path) -> list[str]:
        return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "split"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "|"]

    modules = [p for folder in ("hpc", "train") for p in (ROOT / folder).rglob("*.py")
               if (ROOT / "hpc" / "slurm") not in p.parents]
    assert [hit for p in sorted(modules) for hit in splits_columns(p)] == []
    assert splits_columns(ROOT / "hpc" / "slurm" / "parse.py"), "the scan must see what it looks for"


SLURM_STATES = {"PENDING", "RUNNING", "COMPLETED", "COMPLETING", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                "PREEMPTED", "REQUEUED", "SUSPENDED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def test_no_module_outside_hpc_slurm_lists_job_states() -> None:
    """Which states are terminal, live or requeued is hpc/slurm/states.py's to say; a module may name a state,
    never keep its own group of them."""
    import ast

    def groups(path: Path) -> list[str]:
        return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.Set, ast.Tuple, ast.List))
                and len({e.value for e in node.elts if isinstance(e, ast.Constant)} & SLURM_STATES) >= 2]

    modules = [p for folder in ("hpc", "train") for p in (ROOT / folder).rglob("*.py")
               if (ROOT / "hpc" / "slurm") not in p.parents]
    assert [hit for p in sorted(modules) for hit in groups(p)] == []
    assert groups(ROOT / "hpc" / "slurm" / "states.py"), "the scan must see what it looks for"
