"""``hpcdist top``, ``timeline`` and ``report``, and the progress ``submit --wait`` shows: see a job run.

    hpcdist top 4242                 # per-node, per-rank board, refreshed; STALE and STRAGGLER marks
    hpcdist top 4242 --once --json   # one snapshot for scripts
    hpcdist timeline 4242            # start-up waterfall per rank and attempt
    hpcdist report 4242              # JOB_DIR/report/report.html with charts (PNGs and their data beside it)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import click

from hpc import fileio, jobfiles, jobs, monitor, progress, report, shown, timeline, vocab
from hpc.commands.options import Seconds, fail
from hpc.commands.submit import _lookup
from hpc.failures import record as records
from hpc.slurm import commands

TOP_EVERY_S = 2.0


# ---- reading a job's files (the side-effect edge; everything they return is plain values) --------

def run_dir(record: jobs.Record) -> Path:
    return Path(record.job_dir) / vocab.RUN_DIR


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return jobfiles.lines_of(path)


def read_json(path: Path) -> dict[str, Any] | None:
    return jobfiles.json_object(path)


def last_metric(path: Path) -> dict[str, Any] | None:
    """The newest line of metrics.jsonl, reading only its end; a damaged last line leaves the one before."""
    rows = jobfiles.json_lines(jobfiles.tail_text(path, 65536))
    return rows[-1] if rows else None


def attempts_of(record: jobs.Record) -> list[dict[str, Any]]:
    return records.load(Path(record.job_dir))


def sacct_attempts(record: jobs.Record) -> list[dict[str, float | None]]:
    if record.via == "local" or not commands.available(os.environ, "sacct"):
        return []
    text = commands.sacct([record.job_id], ("JobID", "Submit", "Start", "End"), duplicates=True)
    return timeline.parse_sacct_attempts(text, record.job_id) if text is not None else []


def board_of(record: jobs.Record, now: float | None = None, watch: monitor.Watch | None = None) -> monitor.Board:
    rdir = run_dir(record)
    beats = monitor.read_heartbeats(rdir)
    if watch is not None:
        watch.see(beats, now or time.time())
    return monitor.judge(beats, now or time.time(), histories=monitor.read_histories(rdir),
                         progress_at=watch.progress_at if watch else None, polled=watch.polled if watch else None)


def stragglers_of(record: jobs.Record) -> list[dict[str, Any]]:
    """The job's stragglers: while it trains, the live board's (its last few heartbeats); after, the whole
    newest attempt's from the ranks' heartbeat histories."""
    board = board_of(record)
    histories = monitor.read_histories(run_dir(record))
    if any(v.beat.phase == "train" for v in board.ranks) or not histories:
        return [monitor.straggler_json(v) for v in board.stragglers]
    return monitor.run_stragglers(histories)


def waterfalls(record: jobs.Record) -> list[timeline.Waterfall]:
    rdir = run_dir(record)
    beats = monitor.read_heartbeats(rdir)
    histories = monitor.read_histories(rdir)
    marks: dict[tuple[int, int], dict[str, float]] = {}
    world: list[tuple[int, int, str]] = []
    for beat in [b for hist in histories.values() for b in hist] + list(beats.values()):
        key = (beat.attempt, beat.rank)
        marks.setdefault(key, {}).update(beat.marks)
        world.append((beat.attempt, beat.rank, beat.node))
    shell = timeline.read_shell_stamps(rdir)
    if not world:
        # No heartbeat yet: each task's shell stamps stand for its ranks.
        world = [(a, jobs.task_of(record, t) if record.world_size == record.ntasks else t, f"task {t}")
                 for a, entry in shell.items() for t in entry["tasks"]]
    task_of = {rank: jobs.task_of(record, rank) for _, rank, _ in world if 0 <= rank < max(record.world_size, 1)}
    return timeline.assemble(world, task_of, shell, marks, sacct_attempts(record),
                             timeline.iso_time(record.submitted))


def _time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return timeline.iso_time(value) if isinstance(value, str) else None


# ---- the progress of submit --wait ---------------------------------------------------------------

class Follower:
    """Shows a waited-for job's progress: a bar redrawn in place on a terminal, plain lines in a pipe."""

    def __init__(self, record: jobs.Record, out: TextIO, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record, self.out, self.clock = record, out, clock
        self.tty = out.isatty() if tty is None else tty
        self.last: progress.Progress | None = None
        self.last_at = 0.0
        self.drawn = False
        self.watch = monitor.Watch()
        self.stragglers: list[dict[str, Any]] = []

    def poll(self, *_: Any) -> None:
        rdir = run_dir(self.record)
        now = time.time()
        beats = monitor.read_heartbeats(rdir)
        self.watch.see(beats, now)
        board = monitor.judge(beats, now, progress_at=self.watch.progress_at, polled=self.watch.polled)
        if any(v.beat.phase == "train" for v in board.ranks):
            self.stragglers = [monitor.straggler_json(v) for v in board.stragglers]
        current = progress.of(beats, None if beats else last_metric(rdir / vocab.METRICS))
        if current is None:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r" + progress.bar(current, width) + "\x1b[K")
            self.out.flush()
            self.drawn = True
        elif progress.changed(self.last, current, (tick := self.clock()) - self.last_at):
            self.out.write(progress.line(current) + "\n")
            self.out.flush()
            self.last_at = tick
        self.last = current

    def finish(self, waited_s: float) -> None:
        if self.drawn:
            self.out.write("\n")
        rdir = run_dir(self.record)
        histories = monitor.read_histories(rdir)
        found = monitor.run_stragglers(histories) if histories else self.stragglers
        for text in progress.summary(read_json(rdir / vocab.SUMMARY), attempts_of(self.record), found, waited_s):
            self.out.write(text + "\n")
        self.out.flush()


# ---- commands ------------------------------------------------------------------------------------

@click.command()
@click.argument("job")
@click.option("--once", is_flag=True, help="One snapshot, then exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the table (implies --once).")
@click.option("--every", type=Seconds(0.2), default=TOP_EVERY_S, show_default=True,
              help="Seconds between refreshes.")
def top(job: str, once: bool, as_json: bool, every: float) -> None:
    """Per-node, per-rank board: phase, step, step time, compute/comm split, images/s, heartbeat age, RSS.

    STALE: a rank whose step has not moved for 5x the median step time (at least 10 s), or whose
    heartbeat stopped. STRAGGLER: compute per step at least 1.3x the other ranks' median, sustained.
    """
    record = _lookup("top", job)
    watch = monitor.Watch()
    while True:
        state = jobs.state(record)
        board = board_of(record, watch=watch)
        if as_json:
            click.echo(json.dumps({"job_id": record.job_id, "state": state.state, "job_dir": record.job_dir,
                                   **board.to_json()}, indent=1))
            return
        text = f"job {record.job_id}  {state.state}  {record.job_dir}\n{monitor.table(board)}"
        notes = monitor.straggler_lines(board)
        if notes:
            text += "\n" + "\n".join(notes)
        text = shown.block(text)
        if once:
            click.echo(text)
            return
        if sys.stdout.isatty():
            click.echo("\x1b[H\x1b[2J" + text)
        else:
            click.echo(text + "\n")
        if state.done:
            return
        time.sleep(every)


@click.command("timeline")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Every waterfall as JSON.")
def timeline_cmd(job: str, as_json: bool) -> None:
    """Start-up waterfall per rank and attempt: submitted -> started -> batch shell -> setup.sh -> task ->
    interpreter -> torch imported -> process group -> model built -> first step; names the slowest."""
    record = _lookup("timeline", job)
    falls = waterfalls(record)
    if as_json:
        worst = timeline.slowest(falls)
        click.echo(json.dumps({"job_id": record.job_id, "waterfalls": [w.to_json() for w in falls],
                               "slowest": None if worst is None else {
                                   "attempt": worst.attempt, "rank": worst.rank, "node": worst.node,
                                   "wall_s": round(worst.wall_s, 3),
                                   "phase": worst.slowest.name if worst.slowest else None}}, indent=1))
        return
    click.echo(shown.block(timeline.table(falls)))


def goodput_of(record: jobs.Record, falls: list[timeline.Waterfall]) -> dict[str, Any]:
    rdir = run_dir(record)
    histories = monitor.read_histories(rdir)
    beats = monitor.read_heartbeats(rdir)
    attempts = attempts_of(record)
    seen = {b.attempt for hist in histories.values() for b in hist} | {b.attempt for b in beats.values()}
    seen |= {w.attempt for w in falls} | {a["attempt"] for a in attempts if isinstance(a.get("attempt"), int)}
    starts: dict[int, float] = {}
    for w in falls:
        starts[w.attempt] = min(starts.get(w.attempt, w.allocated_at), w.allocated_at)
    ends = {a["attempt"]: t for a in attempts if (t := _time(a.get("ended"))) is not None}
    for attempt, row in enumerate(sacct_attempts(record)):
        if row.get("ended") is not None:
            ends.setdefault(attempt, row["ended"])  # type: ignore[arg-type]
    for attempt in seen:
        last = [b.time for hist in histories.values() for b in hist if b.attempt == attempt]
        last += [b.time for b in beats.values() if b.attempt == attempt]
        if attempt not in ends and last:
            ends[attempt] = max(last)
    endings = {a["attempt"]: str(a.get("ending", "unknown")) for a in attempts if isinstance(a.get("attempt"), int)}
    first_steps: dict[int, float] = {}
    for w in falls:
        done = w.at("first_step_done")
        if done is not None:
            first_steps[w.attempt] = max(first_steps.get(w.attempt, 0.0), done)
    lead = {a: [b for b in histories.get(0, []) if b.attempt == a] for a in seen}
    trained = [a for a in sorted(seen) if any(b.phase == "train" for b in lead[a])]
    steps_seen = report.steps_by_attempt(report.loss_series(read_jsonl(rdir / vocab.METRICS)), trained)
    spans = report.spans(sorted(seen), starts, ends, endings, first_steps, lead, steps_seen)
    return report.goodput(spans, record.nodes)


def _draw_loss(ax: Any, segments: list) -> None:
    for i, seg in enumerate(segments):
        ax.plot([s for s, _ in seg], [v for _, v in seg], marker=".", label=f"run segment {i}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over ranks)")
    ax.set_title("loss", fontsize=10)
    ax.legend(fontsize=7)


def _draw_rate(ax: Any, series: dict) -> None:
    for rank, points in series.items():
        ax.plot([t for t, _ in points], [v for _, v in points], label=f"rank {rank}")
    ax.set_xlabel("seconds since the first heartbeat")
    ax.set_ylabel("images/s (this rank)")
    ax.set_title("images/s per rank", fontsize=10)
    ax.legend(fontsize=7)


def _draw_waterfall(ax: Any, falls: list[timeline.Waterfall]) -> None:
    import matplotlib.pyplot as plt

    colours = dict(zip(timeline.PHASES.values(), plt.get_cmap("tab10").colors))
    labels, named = [], set()
    for y, w in enumerate(falls):
        labels.append(f"attempt {w.attempt} rank {w.rank}")
        for p in w.phases:
            ax.barh(y, p.seconds, left=p.start - w.start, color=colours[p.name],
                    label=p.name if p.name not in named else "_")
            named.add(p.name)
    ax.set_yticks(range(len(falls)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the attempt's first stamp")
    ax.set_title("start-up waterfall", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_goodput(ax: Any, good: dict[str, Any]) -> None:
    left = 0.0
    for c in report.CATEGORIES:
        share = good["share"][c] * 100
        ax.barh(0, share, left=left, label=f"{c} {share:.0f}%")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of allocated node-time")
    ax.set_title(f"goodput ({good['redone_steps']} steps recomputed)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def draw_charts(folder: Path, record: jobs.Record, falls: list[timeline.Waterfall],
                good: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """loss.png, rate.png, waterfall.png and goodput.png, each with NAME.json beside it holding the series
    the figure actually drew (read back from its axes), and overview.png with all four. Returns name -> data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rdir = run_dir(record)
    segments = report.loss_series(read_jsonl(rdir / vocab.METRICS))
    series = report.rate_series(monitor.read_histories(rdir))
    charts = {
        "loss": (segments, _draw_loss, (8, 3.5), {"segments": segments}),
        "rate": (series if any(series.values()) else None, _draw_rate, (8, 3.5),
                 {"series": {str(k): v for k, v in series.items()}}),
        "waterfall": (falls, _draw_waterfall, (10, 0.4 * len(falls) + 2.2),
                      {"waterfalls": [w.to_json() for w in falls]}),
        "goodput": (good if good["allocated_node_s"] > 0 else None, _draw_goodput, (9, 2.2), {"share": good["share"]}),
    }
    drawn: dict[str, dict[str, Any]] = {}
    for name, (data, draw, size, extra) in charts.items():
        if not data:
            continue
        fig, ax = plt.subplots(figsize=size)
        draw(ax, data)
        lines = [{"label": ln.get_label(), "points": len(ln.get_xdata())} for ln in ax.get_lines()]
        bars = [{"label": c.get_label(), "bars": len(c.patches)} for c in ax.containers]
        drawn[name] = {"lines": lines, "bars": bars, **extra}
        fig.tight_layout()
        fileio.save_png(fig, folder / f"{name}.png", dpi=100)
        plt.close(fig)
        # NaN (the gap between attempts) is not JSON: written as null.
        fileio.atomic_write(folder / f"{name}.json", json.dumps(_nan_to_none(drawn[name]), indent=1) + "\n")
    if drawn:
        fig, axes = plt.subplots(2, 2, figsize=(15, 8.5))
        for ax, name in zip(axes.flat, charts):
            if name in drawn:
                charts[name][1](ax, charts[name][0])
            else:
                ax.set_axis_off()
        fig.suptitle(f"hpcdist job {record.job_id}: {record.backend}, {record.nodes} node(s), "
                     f"{record.world_size} rank(s)")
        fig.tight_layout()
        fileio.save_png(fig, folder / "overview.png", dpi=90)
        plt.close(fig)
    return drawn


def facts_of(record: jobs.Record, summary: dict[str, Any] | None, state: jobs.JobState) -> list[tuple[str, Any]]:
    facts = [("job", f"{record.job_id} ({record.via})"), ("state", state.line()), ("job dir", record.job_dir),
             ("geometry", f"{record.backend}, {record.launcher}, {record.nodes} node(s), {record.world_size} rank(s)")]
    for line in progress.summary(summary):
        facts.append(tuple(line.split(": ", 1)))  # type: ignore[arg-type]
    return facts


@click.command("report")
@click.argument("job")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and its charts [default: JOB_DIR/report].")
def report_cmd(job: str, out_dir: Path | None) -> None:
    """One HTML run report: loss curve, images/s per rank, waterfall, attempts, goodput, stragglers."""
    record = _lookup("report", job)
    try:
        folder = fileio.folder(out_dir.resolve().parent, out_dir.name) if out_dir else fileio.folder(
            Path(record.job_dir), "report")
    except OSError as exc:
        fail("report", exc)
    falls = waterfalls(record)
    good = goodput_of(record, falls)
    drawn = draw_charts(folder, record, falls, good)
    images = {name: base64.b64encode((folder / f"{name}.png").read_bytes()).decode() for name in drawn}
    summary = read_json(run_dir(record) / vocab.SUMMARY)
    page = report.html_report(f"hpcdist job {record.job_id}: {record.job_name or record.backend}",
                              facts_of(record, summary, jobs.state(record)), images, attempts_of(record), good,
                              timeline.table(falls), stragglers_of(record))
    fileio.atomic_write(folder / "report.html", page)
    fileio.atomic_write(folder / "goodput.json", json.dumps(good, indent=1) + "\n")
    shares = ", ".join(f"{c} {good['share'][c] * 100:.0f}%" for c in report.CATEGORIES)
    click.echo(f"report: {folder / 'report.html'}  (goodput: {shares}; {good['redone_steps']} steps recomputed)")


def status_lines(record: jobs.Record, ended: bool = False) -> list[str]:
    """What ``status`` adds for a job with heartbeats: rank 0's progress, and any straggler; while it runs
    any stale rank, once it ``ended`` how its ranks last reported (a heartbeat stops with its process)."""
    rdir = run_dir(record)
    beats = monitor.read_heartbeats(rdir)
    out = []
    current = progress.of(beats, None if beats else last_metric(rdir / vocab.METRICS))
    if current is not None:
        out.append("progress: " + progress.line(current))
    if ended:
        out += [line for line in [monitor.ending_line(beats)] if line]
    else:
        board = monitor.judge(beats, time.time(), histories=monitor.read_histories(rdir))
        out += [line for line in monitor.straggler_lines(board) if line.startswith("stale")]
    out += [f"straggler: rank {s['rank']} on {s['node']}, compute {s['compute_ratio']:.2f}x the other ranks' median"
            for s in stragglers_of(record)]
    return out


def list_cells(record: jobs.Record) -> tuple[str, str, str]:
    """(attempt, step/total, images/s) for ``hpcdist list``; "-" where the job has no heartbeat yet."""
    beats = monitor.read_heartbeats(run_dir(record))
    current = progress.of(beats) if beats else None
    if current is None:
        return "-", "-", "-"
    rate = f"{current.images_per_s:.0f}" if current.images_per_s is not None else "-"
    return str(current.attempt), progress.step_text(current).removeprefix("step "), rate

