"""Specifications of hpc.sweep_results: each task's row from its state and run/summary.json, the table and the
chart (never written through a link)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_sweep import axes, plan

from hpc import sweep as sweeps
from hpc import sweep_results
from hpc.cli import main


def test_report_rows_table_and_chart(tmp_path):
    sweep = plan(tmp_path, axes("backend=dp,ddp"))
    sweeps.write(sweep)
    summary = {"precision": "bf16", "images_per_s": 812.4, "final_loss": 0.51234, "test_accuracy": 0.25,
               "time_to_first_step_s": 6.04,
               "ranks": [{"rank": 1, "peak_memory_bytes": 2 * 2**20, "hostname": "n3"},
                         {"rank": 0, "peak_memory_bytes": 3 * 2**20, "hostname": "n1"}]}
    (sweep.tasks[1].rendered.job_dir / "run" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "sweep" / sweeps.SUBMITTED_FILE).write_text(json.dumps({"arrays": {"array-0": "41"}}))
    rows = sweep_results.rows(*sweep_results.load(tmp_path / "sweep"), {"41_0": "FAILED", "41_1": "COMPLETED"})
    assert [(r.job_id, r.state, r.images_per_s, r.peak_memory_mib, r.hostnames) for r in rows] == [
        ("41_0", "FAILED", None, (), ()), ("41_1", "COMPLETED", 812.4, (3.0, 2.0), ("n1", "n3"))]
    markdown = sweep_results.table(rows, markdown=True)
    assert "| 1 | 41_1 | backend=ddp | COMPLETED | bf16 | 812 | 0.5123 | 0.250 | 3/2 | 6.0 |" in markdown
    sweep_results.chart(rows, tmp_path / "r.png", "t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chart_replaces_a_linked_report_png_and_never_writes_through_it(tmp_path):
    sweep = plan(tmp_path, axes("backend=dp,ddp"))
    sweeps.write(sweep)
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (tmp_path / "sweep" / "report.png").symlink_to(victim)
    result = CliRunner().invoke(main, ["sweep", "report", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "mine\n"
    assert (tmp_path / "sweep" / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("option", ["--png", "--markdown"])
def test_a_report_file_in_a_folder_that_is_not_there_is_refused_in_one_line(tmp_path, option):
    sweeps.write(plan(tmp_path, axes("backend=dp,ddp")))
    result = CliRunner().invoke(main, ["sweep", "report", str(tmp_path / "sweep"), option,
                                       str(tmp_path / "nowhere" / "report")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("markdown", [False, True])
def test_a_damaged_summarys_text_shows_as_one_escaped_line_per_task(tmp_path, markdown):
    """A summary.json holding a newline or a terminal escape must neither add a row nor reach the terminal raw."""
    sweep = plan(tmp_path, axes("backend=dp,ddp"))
    sweeps.write(sweep)
    (sweep.tasks[0].rendered.job_dir / "run" / "summary.json").write_text(
        json.dumps({"precision": "bf16\n| 9 | forged |\x1b[2J"}))
    rows = sweep_results.rows(*sweep_results.load(tmp_path / "sweep"), {})
    lines = sweep_results.table(rows, markdown=markdown).splitlines()
    assert len(lines) == len(rows) + 1 + markdown
    assert "\x1b" not in "".join(lines) and "bf16\\n" in lines[-2]


def test_the_chart_draws_a_label_holding_dollar_signs_as_written_not_as_tex(tmp_path):
    """A value such as a path with `$...$` once made matplotlib parse it as maths and the report end in a traceback."""
    sweeps.write(plan(tmp_path, axes("train.data-dir=/d/$\\foo$,/d/b")))
    result = CliRunner().invoke(main, ["sweep", "report", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sweep" / "report.png").read_bytes()[:4] == b"\x89PNG"
