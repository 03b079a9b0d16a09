"""``hpcdist top``, ``timeline`` and ``report``: see a job run.

    hpcdist top 4242                 # per-node, per-rank board, refreshed; STALE and STRAGGLER marks
    hpcdist top 4242 --once --json   # one snapshot for scripts
    hpcdist timeline 4242            # start-up waterfall per rank and attempt
    hpcdist report 4242              # JOB_DIR/report/report.html with charts (PNGs and their data beside it)

Commands only: the job's files are read by hpc.telemetry, its goodput measured by hpc.goodput, its report
folder written by hpc.reportfiles; what ``submit --wait``, ``status`` and ``list`` show is hpc.follow's.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from hpc import fileio, jobs, monitor, registry, report, reportfiles, shown, telemetry, timeline
from hpc.commands.options import Seconds, fail, lookup
from hpc.job import follow

TOP_EVERY_S = 2.0


@click.command()
@click.argument("job")
@click.option("--once", is_flag=True, help="One snapshot, then exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the table (implies --once).")
@click.option("--all", "every_rank", is_flag=True,
              help=f"Every rank; without it past {monitor.TABLE_RANKS} ranks the flagged and the slowest.")
@click.option("--every", type=Seconds(0.2), default=TOP_EVERY_S, show_default=True,
              help="Seconds between refreshes.")
def top(job: str, once: bool, as_json: bool, every_rank: bool, every: float) -> None:
    """Per-node, per-rank board: phase, step, step time, compute/comm split, images/s, heartbeat age, RSS.

    STALE: a rank whose step has not moved for 5x the median step time (at least 10 s), or whose
    heartbeat stopped. STRAGGLER: compute per step at least 1.3x the other ranks' median, sustained.
    """
    record = lookup("top", job)
    watch = monitor.Watch()

    def look() -> tuple[jobs.JobState, monitor.Board]:
        with ThreadPoolExecutor(1) as asking:  # squeue answers while the node files are read
            asked = asking.submit(jobs.state, record)
            try:  # at each refresh: run/ may have become a link since
                board = telemetry.board_of(record, watch=watch)
            except registry.JobError as exc:
                fail("top", exc)
            return asked.result(), board

    if as_json:
        state, board = look()
        click.echo(json.dumps({"job_id": record.job_id, "state": state.state, "job_dir": record.job_dir,
                               **board.to_json()}, indent=1))
        return

    def draw() -> jobs.JobState:
        state, board = look()
        table = monitor.table(board, most=None if every_rank else monitor.TABLE_RANKS)
        text = shown.block("\n".join([f"job {record.job_id}  {state.state}  {record.job_dir}", table,
                                      *monitor.straggler_lines(board)]))
        if once or not sys.stdout.isatty():
            click.echo(text if once else text + "\n")
        else:
            click.echo("\x1b[H\x1b[2J" + text)
        return state
    follow(draw, lambda state: once or state.done, every)


@click.command("timeline")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Every waterfall as JSON.")
def timeline_cmd(job: str, as_json: bool) -> None:
    """Start-up waterfall per rank and attempt: submitted -> started -> batch shell -> setup.sh -> task ->
    interpreter -> torch imported -> process group -> model built -> first step; names the slowest."""
    record = lookup("timeline", job)
    try:
        falls = telemetry.waterfalls(record)
    except registry.JobError as exc:
        fail("timeline", exc)
    if as_json:
        worst = timeline.slowest(falls)
        click.echo(json.dumps({"job_id": record.job_id, "waterfalls": [w.to_json() for w in falls],
                               "slowest": None if worst is None else {
                                   "attempt": worst.attempt, "rank": worst.rank, "node": worst.node,
                                   "wall_s": round(worst.wall_s, 3),
                                   "phase": worst.slowest.name}}, indent=1))
        return
    click.echo(shown.block(timeline.table(falls)))


@click.command("report")
@click.argument("job")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and its charts [default: JOB_DIR/report].")
def report_cmd(job: str, out_dir: Path | None) -> None:
    """One HTML run report: loss curve, images/s per rank, waterfall, attempts, goodput, stragglers."""
    record = lookup("report", job)
    # Not resolved: that would follow a link given as --out (and make a folder of its name beside the target);
    # nor split as typed, where "." names no folder and its parent is the one above.
    out = Path(os.path.abspath(out_dir)) if out_dir else Path(record.job_dir) / "report"
    try:
        telemetry.run_dir(record)  # before the folder is made: a refused report leaves nothing behind
        folder = fileio.folder(out.parent, out.name)
    except (fileio.UnsafePath, registry.JobError) as exc:
        fail("report", exc)
    except OSError as exc:
        fail("report", OSError(f"cannot make the report folder {out}: {exc.strerror or exc}; give an --out in a "
                               "folder that exists and that you may write"))
    try:
        good = reportfiles.write(folder, record)
    except registry.JobError as exc:  # run/ became a link while the report was made
        fail("report", exc)
    except OSError as exc:  # a folder or a link where a file of the report goes, no space, ...
        fail("report", OSError(f"cannot write {exc.filename2 or exc.filename or folder}: {exc.strerror or exc}; "
                               "move it away, or give another --out"))
    shares = ", ".join(f"{c} {good['share'][c] * 100:.0f}%" for c in report.CATEGORIES)
    click.echo(f"report: {folder / 'report.html'}  (goodput: {shares}; {good['redone_steps']} steps recomputed)")
