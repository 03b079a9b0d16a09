"""Specifications of the job views (hpc.monitor, hpc.progress, hpc.timeline, hpc.report and their commands),
on fixture job directories written the way the trainer and the templates write them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from hpc import beatfile, follow, monitor, progress, registry, report, timeline
from train import nodebeat

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


def beat(rank: int, **over) -> dict:
    data = {"rank": rank, "local_rank": 0, "node_rank": rank, "world_size": 2, "hostname": f"n{rank + 1}",
            "pid": 1000 + rank, "attempt": 0, "phase": "train", "step": 50, "total_steps": 100, "time": T0,
            "step_time_s": 0.2, "compute_s": 0.15, "comm_s": 0.05, "images_per_s": 160.0, "loss": 1.5,
            "rss_bytes": 300 << 20, "peak_memory_bytes": 310 << 20,
            "marks": {"process_start": T0 - 30, "torch_imported": T0 - 27, "process_group_ready": T0 - 25,
                      "model_built": T0 - 24, "first_step_done": T0 - 20}}
    data.update(over)
    return data


def publish(run: Path, beats: list[dict], history: dict[int, list[dict]] | None = None) -> None:
    """Write the node files as each node's local rank 0 does (train/nodebeat.py): ``history`` (rank -> its
    beats, oldest first) one node document at a time, then ``beats`` as the newest."""
    history = history or {}
    nodes: dict[int, dict[int, dict]] = {}
    for b in beats:
        nodes.setdefault(b.get("node_rank", 0), {})[b["rank"]] = b
    for node, latest in nodes.items():
        writer = nodebeat.Publisher(run, node, history_every_s=0)
        rows = {r: history[r] for r in latest if r in history}
        for i in range(max(map(len, rows.values()), default=0)):
            now = {r: h[min(i, len(h) - 1)] for r, h in rows.items()}
            writer.publish("host", 0, max(b["time"] for b in now.values()), now)
        writer.publish("host", 0, max(b["time"] for b in latest.values()), latest)
        writer.close()


def write_job(tmp: Path, beats: list[dict], history: dict[int, list[dict]] | None = None, nodes: int = 2,
              world: int = 2) -> registry.Record:
    job_dir = tmp / "job"
    publish(job_dir / "run", beats, history)
    record = registry.Record(job_id="local-1", job_dir=str(job_dir), via="local", submitted="2027-01-15T08:00:00+00:00",
                         backend="ddp", launcher="srun", nodes=nodes, ntasks_per_node=world // nodes, world_size=world)
    registry.write_marker(record)
    return record


# ---- monitor ---------------------------------------------------------------------------------------

def node_file(tmp: Path, *ranks: str, cut: int | None = None) -> dict[int, monitor.Heartbeat]:
    """What read_heartbeats takes from a node file whose ranks are these JSON texts, checksummed as the trainer
    writes it (``cut``: only its first ``cut`` bytes, a torn write). A new run directory each time."""
    body = ('{"node": 0, "hostname": "n1", "attempt": 0, "time": 0, "ranks": [' + ",".join(ranks) + "]}").encode()
    run = Path(tempfile.mkdtemp(dir=tmp))
    beatfile.folder(run).mkdir()
    beatfile.node_path(run, 0).write_bytes((body + b"\t%08x\n" % zlib.crc32(body))[:cut])
    return monitor.read_heartbeats(run)


def test_a_torn_or_foreign_heartbeat_is_skipped_not_fatal(tmp_path: Path) -> None:
    assert node_file(tmp_path, json.dumps(beat(0)), cut=60) == {}
    assert node_file(tmp_path, '["not", "a", "heartbeat"]') == {}
    assert node_file(tmp_path, '{"phase": "train"}') == {}
    assert node_file(tmp_path, json.dumps(beat(1)))[1].node == "n2"


def test_a_rank_whose_heartbeat_stopped_is_stale_and_a_fresh_one_is_not() -> None:
    beats = {0: monitor.Heartbeat.from_mapping(beat(0, time=T0 + 29)),
             1: monitor.Heartbeat.from_mapping(beat(1, time=T0))}
    board = monitor.judge(beats, now=T0 + 30)
    assert [v.beat.rank for v in board.stale] == [1]
    assert "no heartbeat for 30s" in board.stale[0].stale_reason
    assert board.stale_after_s == monitor.STALE_MIN_S  # 5 x 0.2 s is below the floor


def test_a_rank_alive_but_not_stepping_is_stale_by_its_step_time() -> None:
    beats = {0: monitor.Heartbeat.from_mapping(beat(0, time=T0, step_at=T0 - 1, step_time_s=4.0)),
             1: monitor.Heartbeat.from_mapping(beat(1, time=T0, step_at=T0 - 25, step_time_s=4.0))}
    board = monitor.judge(beats, now=T0 + 1)
    assert board.stale_after_s == 20.0
    assert [(v.beat.rank, v.stale_reason) for v in board.stale] == [(1, "step 50 unchanged for 26s")]


def test_a_finished_rank_is_never_stale() -> None:
    beats = {0: monitor.Heartbeat.from_mapping(beat(0, phase="done", time=T0))}
    assert not monitor.judge(beats, now=T0 + 3600).stale


def test_a_watch_sees_steps_move_between_polls() -> None:
    watch = monitor.Watch()
    watch.see({0: monitor.Heartbeat.from_mapping(beat(0, time=T0, step=5))}, now=T0 + 1)
    watch.see({0: monitor.Heartbeat.from_mapping(beat(0, time=T0 + 2, step=5))}, now=T0 + 3)
    assert watch.progress_at[0] == T0
    watch.see({0: monitor.Heartbeat.from_mapping(beat(0, time=T0 + 4, step=6))}, now=T0 + 5)
    assert watch.progress_at[0] == T0 + 5
    assert watch.polled[0] == [0.15, 0.15, 0.15]


def test_exactly_the_slow_nodes_ranks_are_stragglers_leave_one_out() -> None:
    # Two nodes of two ranks; node n2 (ranks 2, 3) computes 2x slower. With a median over all four the
    # slow pair would sit at 1.33x; against the others it is 2x.
    samples = {0: [0.1] * 3, 1: [0.11] * 3, 2: [0.2] * 3, 3: [0.21] * 3}
    verdicts = monitor.straggler_ratios(samples)
    assert [r for r, (flag, _) in verdicts.items() if flag] == [2, 3]
    assert verdicts[0][1] < 1.0


def test_two_ranks_one_slow_flags_only_the_slow_one() -> None:
    verdicts = monitor.straggler_ratios({0: [0.1, 0.1, 0.1], 1: [0.3, 0.3, 0.3]})
    assert verdicts[1][0] and not verdicts[0][0]
    assert verdicts[1][1] == pytest.approx(3.0)


def test_a_straggler_must_be_sustained() -> None:
    # One slow sample among three is a hiccup, and fewer than SUSTAIN samples say nothing yet.
    assert not monitor.straggler_ratios({0: [0.1] * 3, 1: [0.1, 0.3, 0.1]})[1][0]
    assert not monitor.straggler_ratios({0: [0.1] * 3, 1: [0.3, 0.3]})[1][0]


def test_one_rank_is_never_a_straggler() -> None:
    assert monitor.straggler_ratios({0: [1.0] * 5}) == {0: (False, None)}


def test_the_ring_of_step_times_in_one_heartbeat_is_enough_for_top_once() -> None:
    beats = {0: monitor.Heartbeat.from_mapping(beat(0, recent_compute_s=[0.1] * 8)),
             1: monitor.Heartbeat.from_mapping(beat(1, recent_compute_s=[0.25] * 8))}
    board = monitor.judge(beats, now=T0 + 1)
    assert [(v.beat.rank, v.beat.node) for v in board.stragglers] == [(1, "n2")]
    assert board.to_json()["stragglers"] == [{"rank": 1, "node": "n2", "compute_ratio": 2.5}]


def test_run_stragglers_judge_the_whole_newest_attempt_from_histories() -> None:
    hist = {r: [monitor.Heartbeat.from_mapping(beat(r, time=T0 + i, compute_s=c))
                for i in range(6)] for r, c in ((0, 0.1), (1, 0.1), (2, 0.3))}
    hist[0].append(monitor.Heartbeat.from_mapping(beat(0, attempt=1, compute_s=0.1)))
    # Attempt 1 holds one rank only, so no one is compared and nobody is flagged.
    assert monitor.run_stragglers(hist) == []
    hist[0].pop()
    assert monitor.run_stragglers(hist) == [{"rank": 2, "node": "n3", "compute_ratio": 3.0}]


def test_the_table_groups_ranks_by_node_and_marks_flags() -> None:
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, node_rank=r // 2, hostname=f"n{r // 2 + 1}",
                                                    recent_compute_s=[0.1 if r < 2 else 0.3] * 4,
                                                    time=T0 if r != 1 else T0 - 60)) for r in range(4)}
    text = monitor.table(monitor.judge(beats, now=T0 + 1))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["NODE", "RANK", "PID", "PHASE"]
    assert lines[1].startswith("n1") and lines[2].startswith(" ") and lines[3].startswith("n2")
    assert "STALE" in lines[2] and "STRAGGLER" in lines[3] and "STRAGGLER" in lines[4]


def test_past_table_ranks_the_table_shows_the_flagged_and_the_slowest_and_counts_the_rest() -> None:
    many = monitor.TABLE_RANKS + 8
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, node_rank=r // 8, hostname=f"n{r // 8 + 1}",
                                                    step_time_s=0.5 if r == 5 else 0.2,
                                                    time=T0 - 60 if r == many - 1 else T0)) for r in range(many)}
    board = monitor.judge(beats, now=T0 + 1)
    ranks = [int(row[1]) for row in monitor.table_rows(board, monitor.TABLE_RANKS)]
    assert len(ranks) == monitor.TABLE_RANKS and {5, many - 1} <= set(ranks) and ranks == sorted(ranks)
    lines = monitor.table(board).splitlines()
    assert len(lines) == 1 + monitor.TABLE_RANKS + 1
    assert lines[-1] == "... 8 more ranks not shown (0 of them flagged): --all or --json shows every rank"
    assert len(monitor.table(board, most=None).splitlines()) == 1 + many


def test_flag_lines_name_the_first_ranks_and_count_the_rest_with_their_nodes() -> None:
    flagged = [(r, f"n{r // 8 + 1}", "no heartbeat for 70s") for r in range(24)]
    lines = monitor.flag_lines("stale", flagged, most=8)
    assert lines[:2] == ["stale: rank 0 on n1, no heartbeat for 70s", "stale: rank 1 on n1, no heartbeat for 70s"]
    assert lines[8:] == ["stale: 16 more ranks on 2 nodes n[2-3]"]
    assert monitor.flag_lines("straggler", flagged[:3], most=8) == [
        f"straggler: rank {r} on n1, no heartbeat for 70s" for r in range(3)]


def test_emulated_nodes_sharing_a_hostname_are_told_apart_by_node_rank() -> None:
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, hostname="vm")) for r in range(2)}
    rows = monitor.table_rows(monitor.judge(beats, now=T0))
    assert [r[0] for r in rows] == ["vm#0", "vm#1"]


# ---- progress -------------------------------------------------------------------------------------

def test_progress_takes_rank_0s_step_and_sums_the_ranks_rates() -> None:
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, step=50 - r)) for r in range(2)}
    p = progress.of(beats)
    assert (p.step, p.total_steps, p.images_per_s, p.eta_s) == (50, 100, 320.0, pytest.approx(10.0))
    assert progress.line(p) == "step 50/100 | loss 1.5000 | 320 images/s | ETA 10s"


def test_an_ended_run_s_progress_has_no_eta() -> None:
    stopped = progress.of({0: monitor.Heartbeat.from_mapping(beat(0, step=149, total_steps=256, phase="stopped"))})
    assert progress.line(stopped) == "step 149/256 | loss 1.5000 | 160 images/s | stopped"


def test_the_bar_fits_its_width_and_shows_the_fraction() -> None:
    p = progress.Progress(step=30, total_steps=120, loss=2.0, images_per_s=1830.4, step_time_s=0.5)
    text = progress.bar(p, width=100)
    assert len(text) <= 100 and text.startswith("[") and "30/120  25%" in text and "ETA 45s" in text
    assert "#" * 10 in text and len(progress.bar(p, width=30)) == 30


def test_an_eta_past_the_largest_float_is_unknown_not_a_crash() -> None:
    far = progress.of({0: monitor.Heartbeat.from_mapping(beat(0, step=1, total_steps=2**62, step_time_s=1e300))})
    assert progress.line(far) == f"step 1/{2**62} | loss 1.5000 | 160 images/s | ETA ?"
    assert "ETA ?" in progress.bar(far, width=200)


def test_progress_falls_back_to_metrics_without_heartbeats() -> None:
    p = progress.of({}, {"step": 40, "loss": 1.25, "images_per_s": 900.0})
    assert progress.line(p) == "step 40 | loss 1.2500 | 900 images/s"
    assert progress.of({}, None) is None


def test_a_pipe_gets_a_line_per_phase_change_and_at_most_one_per_interval() -> None:
    a = progress.Progress(step=1, phase="train")
    assert progress.changed(None, a, 0.0)
    assert not progress.changed(a, progress.Progress(step=2, phase="train"), 1.0)
    assert progress.changed(a, progress.Progress(step=2, phase="train"), 5.0)
    assert progress.changed(a, progress.Progress(step=1, phase="checkpoint"), 0.1)


def test_the_summary_names_rate_loss_accuracy_first_step_attempts_and_stragglers() -> None:
    lines = progress.summary({"images_per_s": 1800.0, "final_loss": 0.91, "test_accuracy": 0.62,
                              "time_to_first_step_s": 12.34, "steps": 200},
                             [{"attempt": 0, "ending": "preempted", "step": 80},
                              {"attempt": 1, "ending": "completed", "step": 200}],
                             [{"rank": 3, "node": "n2", "compute_ratio": 2.1}], waited_s=75)
    assert lines == ["summary: 1,800 images/s, final loss 0.9100, test accuracy 0.620, first step after 12.3s, "
                     "200 steps",
                     "attempts: 2 (0: preempted at step 80; 1: completed at step 200)",
                     "straggler: rank 3 on n2, compute 2.10x the other ranks' median",
                     "waited 1m15s"]


def test_the_follower_prints_plain_lines_to_a_pipe_and_the_summary_at_the_end(tmp_path: Path) -> None:
    record = write_job(tmp_path, [beat(0, step=10), beat(1, step=10)])
    out, clock = io.StringIO(), iter([0.0, 0.0, 1.0, 1.0, 9.0, 9.0])  # each poll: its start, its read's end
    follower = follow.Follower(record, out, tty=False, clock=lambda: next(clock))
    run = Path(record.job_dir) / "run"
    follower.poll()
    publish(run, [beat(0, step=11)])
    follower.poll()  # one second later: held back
    publish(run, [beat(0, step=40)])
    follower.poll()
    (Path(record.job_dir) / "run" / "summary.json").write_text(json.dumps({"final_loss": 0.5, "steps": 100}))
    follower.finish(3.0)
    assert out.getvalue().splitlines() == [
        "step 10/100 | loss 1.5000 | 320 images/s | ETA 18s",
        "step 40/100 | loss 1.5000 | 320 images/s | ETA 12s",
        "summary: final loss 0.5000, 100 steps", "attempts: 1", "waited 3s"]


def test_a_follower_spends_at_most_a_tenth_of_its_time_reading_heartbeats(tmp_path: Path, monkeypatch) -> None:
    record = write_job(tmp_path, [beat(0), beat(1)])
    reads, real = [], monitor.read_heartbeats
    monkeypatch.setattr(monitor, "read_heartbeats", lambda run: reads.append(run) or real(run))
    clock = iter([0.0, 2.0, 10.0, 19.9, 20.0, 20.1])  # the first read takes 2 s: the next one 20 s after it
    follower = follow.Follower(record, io.StringIO(), tty=False, clock=lambda: next(clock))
    for _ in range(4):
        follower.poll()
    assert len(reads) == 2 and follow.READ_SHARE == 0.1


def test_a_pace_reads_at_once_then_every_every_s_or_ten_times_the_last_reads_cost_later() -> None:
    clock = iter([0.0, 0.1, 1.0, 2.0, 5.0, 31.9, 32.0, 32.0])  # each look's start, then its read's end if it read
    pace = follow.Pace(every_s=2.0, clock=lambda: next(clock))
    read = [pace.read(lambda: "beats") for _ in range(5)]
    assert read == ["beats", None, "beats", None, "beats"]  # at 0 (fast: 2 s on), at 2 (3 s: 30 s on), at 32
    assert pace.read_at == 32.0


def test_on_a_terminal_the_follower_redraws_one_line(tmp_path: Path) -> None:
    record = write_job(tmp_path, [beat(0), beat(1)])
    out = io.StringIO()
    clock = iter([0.0, 0.0, 5.0, 5.0])
    follower = follow.Follower(record, out, tty=True, clock=lambda: next(clock))
    follower.poll()
    follower.poll()
    assert out.getvalue().count("\r") == 2 and "\n" not in out.getvalue() and "50/100" in out.getvalue()


# ---- timeline ------------------------------------------------------------------------------------

def test_phases_are_in_order_and_add_up_to_the_wall_time() -> None:
    stamps = {"submitted": 100.0, "started": 103.0, "batch_start": 103.4, "setup_done": 103.5,
              "task_start": 104.0, "process_start": 104.2, "torch_imported": 107.0, "process_group_ready": 108.0,
              "model_built": 108.1, "first_step_done": 109.0}
    w = timeline.waterfall(stamps, rank=1, node="n2")
    assert [p.ends for p in w.phases] == list(timeline.STAMPS[1:])
    assert w.wall_s == pytest.approx(9.0) and w.end == pytest.approx(109.0)
    assert w.slowest.name == "queued"


def test_a_stamp_earlier_than_the_one_before_counts_as_zero_and_the_sum_holds() -> None:
    # sacct keeps whole seconds, the shell keeps nanoseconds.
    w = timeline.waterfall({"submitted": 100.0, "started": 101.0, "batch_start": 100.7, "task_start": 102.0})
    assert [round(p.seconds, 3) for p in w.phases] == [1.0, 0.0, 1.0]
    assert w.phases[1].out_of_order and w.wall_s == pytest.approx(2.0)


def test_missing_stamps_are_skipped_not_invented() -> None:
    w = timeline.waterfall({"task_start": 10.0, "first_step_done": 15.0})
    assert [(p.name, p.seconds) for p in w.phases] == [("first step", 5.0)]
    assert timeline.waterfall({"task_start": 10.0}) is None


def test_shell_stamps_and_sacct_rows_parse() -> None:
    assert timeline.parse_stamps("batch_start 12.5\nsetup_done 13\njunk\nbatch_start 99\n") == {
        "batch_start": 12.5, "setup_done": 13.0}
    rows = timeline.parse_sacct_attempts("7|2027-01-15T08:00:05|2027-01-15T08:00:07|Unknown\n"
                                         "7|2027-01-15T08:00:00|2027-01-15T08:00:01|2027-01-15T08:00:04\n"
                                         "8|x|y|z\n", "7")
    assert [r["started"] - r["submitted"] for r in rows] == [1.0, 2.0]


def test_assemble_takes_each_ranks_task_stamps_and_marks_per_attempt() -> None:
    shell = {0: {"batch": {"batch_start": 5.0, "setup_done": 6.0}, "tasks": {0: {"task_start": 7.0}}},
             1: {"batch": {"batch_start": 50.0}, "tasks": {0: {"task_start": 51.0}}}}
    marks = {(0, 0): {"process_start": 8.0, "first_step_done": 20.0},
             (0, 1): {"process_start": 8.5, "first_step_done": 21.0},
             (1, 1): {"first_step_done": 60.0}}
    falls = timeline.assemble([(0, 0, "n1"), (0, 1, "n1"), (1, 1, "n1")], {0: 0, 1: 0}, shell, marks,
                              [{"submitted": 1.0, "started": 4.0}], submitted=0.5)
    # sacct's Submit wins over the registry's; attempt 1 has no accounting row, so it starts at its shell.
    assert [(w.attempt, w.rank, w.first, w.wall_s) for w in falls] == [(0, 0, "submitted", 19.0),
                                                                       (0, 1, "submitted", 20.0),
                                                                       (1, 1, "batch_start", 10.0)]
    worst = timeline.slowest([w for w in falls if w.attempt == 0])
    assert (worst.rank, worst.slowest.name, worst.slowest.seconds) == (1, "first step", 12.5)
    text = timeline.table(falls)
    assert "attempt 0" in text and "attempt 1" in text and "slowest: rank 1 on n1" in text


def test_an_attempt_takes_the_accounting_row_of_the_run_its_batch_shell_began_not_the_row_at_its_number() -> None:
    # Run 0 began attempt 0, relaunched inside the allocation as attempt 1 (no batch shell of its own); Slurm then
    # requeued the job, and run 1 began attempt 2.
    shell = {0: {"batch": {"batch_start": 5.0}, "tasks": {0: {"task_start": 7.0}}},
             1: {"batch": {}, "tasks": {0: {"task_start": 40.0}}},
             2: {"batch": {"batch_start": 100.0}, "tasks": {0: {"task_start": 101.0}}}}
    slurm = [{"submitted": 1.0, "started": 4.0, "ended": 60.0}, {"submitted": 61.0, "started": 99.0, "ended": None}]
    assert timeline.runs_by_attempt(slurm, shell) == {0: slurm[0], 2: slurm[1]}
    marks = {(a, 0): {"first_step_done": t} for a, t in ((0, 20.0), (1, 45.0), (2, 110.0))}
    falls = timeline.assemble([(0, 0, "n1"), (1, 0, "n1"), (2, 0, "n1")], {0: 0}, shell, marks, slurm, None)
    assert [(w.attempt, w.first) for w in falls] == [(0, "submitted"), (1, "task_start"), (2, "submitted")]
    # A job older than the batch stamps goes by index.
    assert timeline.runs_by_attempt(slurm, {}) == {0: slurm[0], 1: slurm[1]}


def test_stamp_and_history_names_count_in_ascii_digits_alone(tmp_path: Path) -> None:
    attempt = tmp_path / "timeline" / "attempt-0"
    for name in ("attempt-0", "attempt-\u00b2", "attempt--1", "attempt-1_0"):
        (tmp_path / "timeline" / name).mkdir(parents=True)
        (tmp_path / "timeline" / name / "task-0").write_text("task_start 7\n")
    for name in ("task-\u00b2", "task-1_0", "task--1"):
        (attempt / name).write_text("task_start 8\n")
    assert timeline.read_shell_stamps(tmp_path) == {0: {"batch": {}, "tasks": {0: {"task_start": 7.0}}}}
    beatfile.folder(tmp_path).mkdir()
    for name in ("node-0.jsonl", "node-\u00b2.jsonl", "node-1_0.jsonl"):
        (beatfile.folder(tmp_path) / name).write_text("")
    assert list(beatfile.history_files(tmp_path, nodes=(0, 2, 10))) == ["node-0.json"]


def test_an_attempt_below_zero_takes_no_accounting_row() -> None:
    marks = {(-1, 0): {"process_start": 8.0, "first_step_done": 20.0}}
    for slurm in ([], [{"submitted": 1.0, "started": 4.0}]):
        falls = timeline.assemble([(-1, 0, "n1")], {0: 0}, {}, marks, slurm, submitted=None)
        assert [(w.attempt, w.first, w.wall_s) for w in falls] == [(-1, "process_start", 12.0)]


# ---- report --------------------------------------------------------------------------------------

def hb(t: float, phase: str, step: int, attempt: int = 0) -> monitor.Heartbeat:
    return monitor.Heartbeat(rank=0, time=t, phase=phase, step=step, attempt=attempt)


def test_goodput_counts_steps_redone_after_a_resume_as_recomputation() -> None:
    # Attempt 0 trains steps 0-60 in 60 s (checkpoint at 40 takes 2 s) and is killed at step 60;
    # attempt 1 resumes from step 40 and redoes 20 steps before going on to 100.
    first = [hb(0, "setup", 0), hb(10, "train", 0), hb(40, "checkpoint", 40), hb(42, "train", 40), hb(70, "train", 60)]
    second = [hb(200, "setup", 40, 1), hb(210, "train", 40, 1), hb(270, "eval", 100, 1), hb(272, "done", 100, 1)]
    spans = report.spans([0, 1], starts={0: 0.0, 1: 198.0}, ends={0: 70.0, 1: 275.0},
                         endings={0: "preempted", 1: "completed"}, first_steps={0: 11.0, 1: 211.0},
                         lead_history={0: first, 1: second})
    assert [(s.resume_step, s.last_step, s.redone_steps) for s in spans] == [(0, 60, 0), (40, 100, 20)]
    good = report.goodput(spans, nodes=2)
    secs = spans[1].seconds()
    assert secs["recompute"] == pytest.approx(59.0 * 20 / 60)
    assert secs["startup"] == 13.0 and secs["eval"] == 2.0 and secs["idle"] == pytest.approx(3.0)
    assert spans[0].seconds()["checkpoint"] == 2.0
    assert sum(good["share"].values()) == pytest.approx(1.0)
    assert good["allocated_node_s"] == pytest.approx(2 * (70 + 77))
    assert good["redone_steps"] == 20


def test_metrics_catch_steps_a_killed_attempt_ran_after_its_last_heartbeat() -> None:
    first = [hb(0, "train", 0), hb(2, "train", 40)]
    second = [hb(10, "train", 40, 1), hb(20, "done", 100, 1)]
    segments = [[(5, 2.0), (45, 1.5)], [(50, 1.4), (100, 1.0)]]
    seen = report.steps_by_attempt(segments, [0, 1])
    assert seen == {0: 45, 1: 100}
    spans = report.spans([0, 1], {0: 0.0, 1: 9.0}, {0: 3.0, 1: 21.0}, {}, {0: 1.0, 1: 11.0},
                         {0: first, 1: second}, seen)
    assert [s.redone_steps for s in spans] == [0, 5]
    assert report.steps_by_attempt(segments, [1]) == {}


def test_a_resume_counts_from_the_step_its_heartbeats_say_it_started_not_the_first_one_published() -> None:
    """A node file is published at most every 2 s: an attempt's first training beat may already be steps in."""
    first = [hb(0, "train", 0), hb(2, "train", 62)]
    second = [replace(b, start_step=50) for b in (hb(10, "train", 81, 1), hb(20, "done", 200, 1))]
    spans = report.spans([0, 1], {0: 0.0, 1: 9.0}, {0: 3.0, 1: 21.0}, {}, {0: 1.0, 1: 11.0},
                         {0: first, 1: second})
    assert [(s.resume_step, s.redone_steps) for s in spans] == [(0, 0), (50, 12)]


def test_the_rate_series_breaks_between_attempts() -> None:
    beats = {0: [monitor.Heartbeat(rank=0, time=10.0 + i, phase="train", images_per_s=100.0 + i, attempt=i // 2)
                 for i in range(4)]}
    points = report.rate_series(beats)[0]
    assert [t for t, _ in points] == [0.0, 1.0, 2.0, 2.0, 3.0]
    assert points[2][1] != points[2][1] and [v for _, v in points if v == v] == [100.0, 101.0, 102.0, 103.0]


def test_loss_segments_split_where_the_step_goes_back() -> None:
    rows = [{"step": 1, "loss": 2.3}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.9},
            {"step": 21, "loss": 2.0}, {"step": 40, "loss": 1.7}, {"bad": True}]
    assert report.loss_series(rows) == [[(1, 2.3), (20, 2.0), (30, 1.9)], [(21, 2.0), (40, 1.7)]]


# ---- commands on a fixture job -----------------------------------------------------------------

def run_cli(args: list[str], home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "HPCDIST_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=cwd)


def test_status_of_an_ended_job_says_how_its_ranks_ended_not_that_they_are_stale(tmp_path: Path) -> None:
    import time as clock

    now = clock.time()
    record = write_job(tmp_path, [beat(0, phase="done", step=100, time=now), beat(1, step=78, time=now - 246)])
    ended = follow.status_lines(record, ended=True)
    assert not [line for line in ended if line.startswith("stale")]
    assert "ranks at the end: 1 done; rank 1 on n2 last at step 78 (train)" in ended
    running = follow.status_lines(record, ended=False)
    assert [line for line in running if line.startswith("stale: rank 1 on n2")]


def test_status_of_a_running_job_names_its_straggler_once_from_the_board_it_judged(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import time as clock

    now = clock.time()
    record = write_job(tmp_path, [beat(r, time=now, recent_compute_s=[0.4 if r == 2 else 0.1] * 4, node_rank=r,
                                       hostname=f"n{r + 1}") for r in range(4)], nodes=4, world=4)
    monkeypatch.setattr(monitor, "stragglers", lambda *a, **k: pytest.fail("the board was judged once already"))
    running = follow.status_lines(record, ended=False)
    assert [line for line in running if line.startswith("straggler")] == [
        "straggler: rank 2 on n3, compute 4.00x the other ranks' median"]


def test_the_ending_line_counts_final_phases_of_the_newest_attempt_only() -> None:
    beats = {0: monitor.Heartbeat.from_mapping(beat(0, phase="done", attempt=1)),
             1: monitor.Heartbeat.from_mapping(beat(1, phase="done", attempt=1)),
             2: monitor.Heartbeat.from_mapping(beat(2, phase="failed", attempt=0))}
    assert monitor.ending_line(beats) == "ranks at the end: 2 done"
    assert monitor.ending_line({}) is None


def test_top_once_json_lists_every_rank_with_its_verdicts(tmp_path: Path) -> None:
    import time as clock

    now = clock.time()
    record = write_job(tmp_path, [beat(0, time=now, recent_compute_s=[0.1] * 5),
                                  beat(1, time=now - 120, recent_compute_s=[0.1] * 5)])
    proc = run_cli(["top", record.job_dir, "--once", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert {"phase", "step", "step_time_s", "compute_s", "comm_s", "images_per_s", "heartbeat_age_s",
            "rss_bytes", "stale", "straggler", "node"} <= set(data["ranks"][0])
    assert [s["rank"] for s in data["stale"]] == [1] and data["stragglers"] == []


def test_top_once_shows_a_screen_of_a_large_job_and_all_of_it_with_all(tmp_path: Path) -> None:
    many = monitor.TABLE_RANKS + 2
    record = write_job(tmp_path, [beat(r, node_rank=r // 2, phase="done") for r in range(many)], nodes=many // 2,
                       world=many)
    short, every = (run_cli(["top", record.job_dir, "--once", *extra], tmp_path) for extra in ((), ("--all",)))
    assert short.returncode == every.returncode == 0, short.stderr + every.stderr
    assert "2 more ranks not shown" in short.stdout
    assert len(short.stdout.splitlines()) == 1 + 1 + monitor.TABLE_RANKS + 1
    assert "not shown" not in every.stdout and len(every.stdout.splitlines()) == 1 + 1 + many


def test_top_redraws_until_the_job_has_ended_and_shows_its_last_board(tmp_path: Path) -> None:
    record = write_job(tmp_path, [beat(0, phase="done"), beat(1, phase="done")])
    proc = run_cli(["top", record.job_dir, "--every", "0.2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("job local-1 ") == 1 and "done" in proc.stdout


def test_report_writes_the_page_and_charts_with_their_series(tmp_path: Path) -> None:
    hist = {r: [beat(r, time=T0 + i, step=i * 5, images_per_s=100.0 + r, phase="train" if i else "build")
                for i in range(8)] for r in range(2)}
    record = write_job(tmp_path, [hist[0][-1], hist[1][-1]], history=hist)
    run = Path(record.job_dir) / "run"
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 - s / 100}) + "\n"
                                               for s in (1, 10, 20, 15, 30)))
    (run / "timeline" / "attempt-0").mkdir(parents=True)
    (run / "timeline" / "attempt-0" / "task-0").write_text(f"task_start {T0 - 40}\n")
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = Path(record.job_dir) / "report"
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    loss = json.loads((folder / "loss.json").read_text())
    assert [ln["label"] for ln in loss["lines"]] == ["run segment 0", "run segment 1"]
    rate = json.loads((folder / "rate.json").read_text())
    assert [(ln["label"], ln["points"]) for ln in rate["lines"]] == [("rank 0", 7), ("rank 1", 7)]
    fall = json.loads((folder / "waterfall.json").read_text())
    assert [w["rank"] for w in fall["waterfalls"]] == [0, 1]
    assert all((folder / f"{n}.png").stat().st_size > 1000 for n in ("loss", "rate", "waterfall", "goodput"))


def test_a_heartbeat_field_that_is_not_a_finite_number_is_absent_and_a_rank_out_of_range_is_no_heartbeat(
        tmp_path: Path) -> None:
    assert node_file(tmp_path, '{"rank": 0, "step": 1e400, "loss": NaN, "time": Infinity}')[0].loss is None
    assert node_file(tmp_path, '{"rank": 0, "step": 1e400}')[0].step == 0
    assert node_file(tmp_path, '{"rank": Infinity}') == {}
    assert node_file(tmp_path, '{"rank": 1000000000000}') == {}
    assert node_file(tmp_path, '{"rank": -1}') == {}


@pytest.mark.parametrize("when", [0, -1e300, 1e300, 1e12, T0 + 3600])
def test_a_rank_whose_heartbeat_time_is_no_clocks_or_yet_to_come_has_an_unknown_age_never_nan_or_decades(
        tmp_path: Path, when: float) -> None:
    beats = node_file(tmp_path, json.dumps(beat(0, time=when, step_at=when)), json.dumps(beat(1, time=T0 - 1)))
    board = monitor.judge(beats, now=T0)
    odd, fine = board.ranks
    assert (odd.age_s, odd.progress_age_s, odd.stale) == (None, None, False) and fine.age_s == 1.0
    assert board.to_json()["ranks"][0]["heartbeat_age_s"] is None
    row = monitor.table_rows(board)[0]
    assert row[TABLE_AGE] == "?" and "UNKNOWN" in row[-1] and "nan" not in monitor.table(board)


TABLE_AGE = monitor.TABLE_COLUMNS.index("AGE_S")


def test_a_negative_duration_in_a_heartbeat_is_absent(tmp_path: Path) -> None:
    read = node_file(tmp_path, json.dumps(beat(0, step_time_s=-5, compute_s=-1.0, comm_s=-0.1, images_per_s=-3,
                                               recent_compute_s=[0.1, -2.0])))[0]
    assert (read.step_time_s, read.compute_s, read.comm_s, read.images_per_s) == (None, None, None, None)
    assert read.recent_compute_s == (0.1,)


@pytest.mark.parametrize("when", [1e308, 1e12])
def test_report_says_no_nan_share_whatever_time_a_heartbeat_in_the_history_claims(tmp_path: Path,
                                                                                   when: float) -> None:
    hist = {0: [beat(0, time=T0 + i, step=i * 5, phase="train") for i in range(3)] + [beat(0, time=when, step=20)]}
    record = write_job(tmp_path, [hist[0][-1]], history=hist)
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 0 and "nan%" not in proc.stdout and "productive 100%" in proc.stdout, proc.stdout


def test_a_stamp_that_is_not_a_finite_time_is_skipped() -> None:
    assert timeline.parse_stamps("batch_start inf\nsetup_done nan\ntask_start 12.5\n") == {"task_start": 12.5}


def test_a_stamp_no_clock_gives_is_skipped_so_no_phase_lasts_ten_to_the_300_seconds(tmp_path: Path) -> None:
    assert timeline.parse_stamps("batch_start 1e300\nsetup_done 0\ntask_start -5\nbatch_start 1e12\n"
                                 f"task_start {T0}\n") == {"task_start": T0}
    record = _finished_job(tmp_path)
    stamps = Path(record.job_dir) / "run" / "timeline" / "attempt-0"
    stamps.mkdir(parents=True)
    (stamps / "batch").write_text("batch_start 1e300\n")
    proc = run_cli(["timeline", record.job_dir], tmp_path)
    assert proc.returncode == 0 and max(map(len, proc.stdout.split())) < 40, proc.stdout


def _finished_job(tmp_path: Path) -> registry.Record:
    hist = {0: [beat(0, time=T0 + i, step=i * 5, phase="train") for i in range(4)]}
    record = write_job(tmp_path, [hist[0][-1]], history=hist)
    (Path(record.job_dir) / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return record


def test_report_never_writes_through_a_link_in_the_job_dir(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (Path(record.job_dir) / "report").symlink_to(elsewhere)
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "symbolic link" in proc.stderr
    assert list(elsewhere.iterdir()) == []
    (Path(record.job_dir) / "report").unlink()
    (Path(record.job_dir) / "report").mkdir()
    (Path(record.job_dir) / "report" / "report.html").symlink_to(elsewhere / "victim")
    (elsewhere / "victim").write_text("mine\n")
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "victim").read_text() == "mine\n"
    assert "<html" in (Path(record.job_dir) / "report" / "report.html").read_text()


def test_a_linked_run_dir_is_refused_by_every_reader_in_one_line_and_list_still_lists(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    run = Path(record.job_dir) / "run"
    theirs = tmp_path / "another-users-run"
    run.rename(theirs)
    run.symlink_to(theirs)
    registry.append(registry.registry_path({"HPCDIST_HOME": str(tmp_path)}), record)
    for args in (["top", "--once"], ["top", "--once", "--json"], ["timeline"], ["status"], ["report"]):
        proc = run_cli([args[0], record.job_dir, *args[1:]], tmp_path)
        # status shows first what it knows without run/: the job's state, from the registry and the job's own files
        known = f"local-1  FAILED  via=local  dir={record.job_dir}\n" if args == ["status"] else ""
        assert proc.returncode == 2 and proc.stdout == known, (args, proc.stdout)
        assert proc.stderr == (f"hpcdist {args[0]}: {run} is a symbolic link; hpcdist reads a job's files only "
                               "inside its directory: remove the link\n")
    assert sorted(p.name for p in Path(record.job_dir).iterdir()) == ["run", "submitted.json"]
    listed = run_cli(["list"], tmp_path)
    assert listed.returncode == 0 and "local-1" in listed.stdout, listed.stderr


def test_report_out_is_the_folder_named_and_never_one_beside_it(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(["report", record.job_dir, "--out", "."], tmp_path, cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert (here / "report.html").is_file() and not (tmp_path / "report.html").exists()
    target = tmp_path / "elsewhere" / "target"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    proc = run_cli(["report", record.job_dir, "--out", str(tmp_path / "link")], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "symbolic link" in proc.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == [target] and list(target.iterdir()) == []


def test_a_report_folder_that_cannot_be_made_is_named_with_what_to_give_instead(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    out = tmp_path / "nowhere" / "report"
    proc = run_cli(["report", record.job_dir, "--out", str(out)], tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"hpcdist report: cannot make the report folder {out}: No such file or directory; give an --out in a folder "
        "that exists and that you may write\n")


def test_a_chart_matplotlib_cannot_place_is_left_out_and_the_report_still_written(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    (Path(record.job_dir) / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1e308}\n'
                                                              '{"step": 2, "loss": -1e308}\n')
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    folder = Path(record.job_dir) / "report"
    assert "loss curve: no data" in (folder / "report.html").read_text() and not (folder / "loss.png").exists()
    assert (folder / "rate.png").is_file() and (folder / "overview.png").is_file()


@pytest.mark.parametrize("name", ["loss", "rate", "waterfall", "goodput"])
def test_every_chart_places_its_own_legend_so_a_busy_machine_never_warns_the_search_was_slow(
        tmp_path: Path, name: str, monkeypatch) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.legend

    from hpc import reportfiles
    ticks = iter(range(0, 10**6, 5))  # every reading five seconds after the last: a search for "best" looks slow
    monkeypatch.setattr(matplotlib.legend.time, "perf_counter", lambda: float(next(ticks)))
    fall = timeline.Waterfall(0, 0, "n1", (("submitted", T0), ("started", T0 + 2.0)))
    data = {"loss": [[(1, 2.0), (2, 1.5)]], "rate": {0: [(0.0, 10.0), (1.0, 11.0)]}, "waterfall": [fall],
            "goodput": {"allocated_node_s": 10.0, "redone_steps": 0, "share": dict.fromkeys(report.CATEGORIES, 0.25)}}
    assert reportfiles.draw_chart(tmp_path, name, data[name])["lines" if name in ("loss", "rate") else "bars"]


def test_goodput_json_is_json_whatever_times_a_heartbeat_claims(tmp_path: Path) -> None:
    # A clock (or a writer) that says 1e308: the shares come out NaN, which JSON has no word for.
    hist = {0: [beat(0, time=T0 + i, step=i * 5, phase="train") for i in range(3)] + [beat(0, time=1e308, step=20,
                                                                                          phase="train")]}
    record = write_job(tmp_path, [hist[0][-1]], history=hist)
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    good = json.loads((Path(record.job_dir) / "report" / "goodput.json").read_text(), parse_constant=refuse)
    assert isinstance(good, dict)


@pytest.mark.parametrize("name", ["report.html", "goodput.json", "loss.png"])
def test_a_folder_where_a_report_file_goes_is_named_in_one_line_before_anything_is_written(tmp_path: Path,
                                                                                        name: str) -> None:
    record = _finished_job(tmp_path)
    folder = Path(record.job_dir) / "report"
    (folder / name).mkdir(parents=True)
    proc = run_cli(["report", record.job_dir], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{name}: Is a directory" in proc.stderr
    assert [p.name for p in folder.iterdir()] == [name]


def test_a_marker_naming_another_directory_is_foreign(tmp_path: Path) -> None:
    record = _finished_job(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    marker = Path(record.job_dir) / "submitted.json"
    marker.write_text(marker.read_text().replace(record.job_dir, str(other)))
    proc = run_cli(["report", record.job_dir], tmp_path / "fresh-home")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "another job directory" in proc.stderr
    assert list(other.iterdir()) == []


def test_status_list_top_and_timeline_escape_what_a_rank_or_a_file_wrote(tmp_path: Path) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2Jgone\rfake"
    record = _finished_job(tmp_path)
    publish(Path(record.job_dir) / "run", [beat(0, time=T0 + 3, step=15, hostname=hostile)])
    (Path(record.job_dir) / "attempts.jsonl").write_text(json.dumps(
        {"attempt": 0, "ending": "rank_crashed", "detail": f"rank 0: {hostile}", "action": "none"}) + "\n")
    registry.append(registry.registry_path({"HPCDIST_HOME": str(tmp_path)}), record)
    for args in (["status", record.job_dir], ["list"], ["top", record.job_dir, "--once"],
                 ["timeline", record.job_dir]):
        proc = run_cli(args, tmp_path)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr, args
    assert "\\x1b]0;owned\\x07" in run_cli(["status", record.job_dir], tmp_path).stdout


def test_a_heartbeat_read_back_keeps_the_step_its_attempt_started_from() -> None:
    assert monitor.Heartbeat.from_mapping(beat(0, start_step=100)).start_step == 100
    assert monitor.Heartbeat.from_mapping(beat(0, start_step="x")).start_step is None


def test_every_field_of_the_one_heartbeat_schema_survives_a_read() -> None:
    from dataclasses import asdict, fields

    written = {f.name: (7 if "int" in str(f.type) else 0.5 if "float" in str(f.type) else f"x{f.name}")
               for f in fields(monitor.Heartbeat)}
    written.update(rank=3, marks={"process_start": T0}, recent_compute_s=[0.1, 0.2], hostname="n4", phase="train",
                   time=T0, step_at=T0 + 0.5)
    read = asdict(monitor.Heartbeat.from_mapping(written))
    assert read == {**written, "recent_compute_s": (0.1, 0.2)}


# ---- the fast paths of the readers at 4,096 nodes: the same answers as the plain computation -------------

def _plain_beat(data: dict) -> monitor.Heartbeat:
    """Heartbeat.from_mapping as it read before its fast path: every value through beatfile._number, a time
    through jobfiles.unix_time, a negative duration absent."""
    from hpc import beatfile, jobfiles

    ints = {k: None if (v := beatfile._number(data.get(k))) is None else int(v) for k in beatfile._INTS}
    floats = {k: beatfile._number(data.get(k)) for k in beatfile._FLOATS}
    floats.update({k: None for k in beatfile._DURATIONS if (floats[k] or 0) < 0})
    floats["time"], floats["step_at"] = jobfiles.unix_time(floats["time"]) or 0.0, jobfiles.unix_time(floats["step_at"])
    ints["attempt"], ints["step"] = ints["attempt"] or 0, ints["step"] or 0
    return monitor.Heartbeat(
        rank=data["rank"], hostname=str(data.get("hostname") or ""), phase=str(data.get("phase") or "unknown"),
        **ints, **floats, marks={k: float(v) for k, v in data["marks"].items()
                                 if k in beatfile.MARKS and jobfiles.unix_time(beatfile._number(v)) is not None},
        recent_compute_s=tuple(float(v) for v in data["recent_compute_s"] if (beatfile._number(v) or 0) >= 0
                               and beatfile._number(v) is not None))


def test_a_beat_read_on_the_fast_path_equals_one_read_value_by_value() -> None:
    import random

    odd = [None, True, False, "7", 3, -4, 2**63, -(2**63), 2**64, 0.5, -0.0, float("nan"), float("inf"), 1e308, [1],
           T0, int(T0), -0.5]
    rng = random.Random(5)
    for _ in range(500):
        data = beat(rng.randrange(4), **{k: rng.choice(odd) for k in ("node_rank", "pid", "attempt", "step",
                                                                       "start_step", "rss_bytes", "time", "loss",
                                                                       "compute_s", "step_at", "images_per_s")})
        data["recent_compute_s"] = [rng.choice(odd) for _ in range(rng.randrange(5))] + rng.choice([[], [1e308] * 2])
        data["marks"] = {m: rng.choice(odd) for m in ("process_start", "model_built", "elsewhere")}
        got = monitor.Heartbeat.from_mapping(data)
        assert repr(got) == repr(_plain_beat(data))  # repr: NaN is no NaN's equal, and a float no int
        assert all(type(v) is float for v in got.recent_compute_s)


def test_the_leave_one_out_median_is_the_median_of_the_other_ranks_for_every_rank() -> None:
    import random
    import statistics

    rng = random.Random(3)
    for n in (2, 3, 4, 5, 8, 9, 33):
        samples = {r: [rng.choice([0.1, 0.2, 0.3, rng.uniform(0.05, 0.5)]) for _ in range(3)] for r in range(n)}
        levels = {r: statistics.median(s) for r, s in samples.items()}
        for rank, (flagged, ratio) in monitor.straggler_ratios(samples).items():
            others = statistics.median([v for r, v in levels.items() if r != rank])
            assert ratio == levels[rank] / others
            assert flagged == all(v >= 1.3 * others for v in samples[rank])


def test_the_stragglers_alone_are_the_boards_stragglers() -> None:
    slow = {2: 0.4, 5: 0.5, 6: 0.45}
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, recent_compute_s=[slow.get(r, 0.1 + r / 1000)] * 4,
                                                    time=T0 - (60 if r == 5 else 0)))
             for r in range(8)}
    board = monitor.judge(beats, T0 + 1)
    assert [v.beat.rank for v in board.stragglers] == [2, 6]  # 5 is stale, not a straggler
    assert monitor.stragglers(beats, T0 + 1) == board.stragglers


def test_a_waterfalls_allocation_is_when_it_passed_the_first_stamp_after_the_queue() -> None:
    stamps = {"submitted": 100.0, "batch_start": 130.0, "process_start": 125.0, "first_step_done": 160.0}
    fall = timeline.waterfall(stamps)
    assert fall.allocated_at == fall.at("batch_start") == 130.0
    assert timeline.waterfall({"task_start": 50.0, "first_step_done": 60.0}).allocated_at == 50.0


def test_the_table_pads_every_column_to_its_widest_cell() -> None:
    beats = {r: monitor.Heartbeat.from_mapping(beat(r, pid=10 ** (r + 2), node_rank=0, hostname="n1"))
             for r in range(3)}
    lines = monitor.table(monitor.judge(beats, T0 + 1)).splitlines()
    assert [len(line.split("PID")[0]) for line in lines[:1]] == [len("NODE  RANK  ")]
    assert {line.index("train") for line in lines[1:]} == {lines[0].index("PHASE")}
    assert lines == [line.rstrip() for line in lines]


# ---- the report's charts, drawn in a child process ---------------------------------------------------

def test_the_charts_are_drawn_by_a_child_process_and_a_drawing_failure_reaches_the_caller(tmp_path):
    from hpc import reportfiles

    good = {"allocated_node_s": 0, "share": {}, "redone_steps": 0}
    with reportfiles.Painter(tmp_path) as painter:
        for name, data in (("loss", [[(1, 2.0), (2, 1.5)]]), ("rate", {}), ("waterfall", []), ("goodput", good)):
            painter.chart(name, data)  # each drawn as it comes; those with nothing to draw are left out
        painter.finish("job 1")
        assert set(painter.drawn()) == {"loss"}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "overview.png").exists()
    assert json.loads((tmp_path / "loss.json").read_text())["lines"][0]["points"] == 2
    assert not (tmp_path / "rate.png").exists()
    with reportfiles.Painter(tmp_path / "no-such-folder") as painter:
        painter.chart("loss", [[(1, 2.0)]])
        painter.chart("goodput", good)  # the failure is kept until the end, then reaches the caller
        painter.finish("job 1")
        with pytest.raises(OSError):
            painter.drawn()


def test_a_painter_left_waiting_when_the_reading_fails_is_ended_even_if_sigterm_only_sets_a_flag():
    import signal

    from hpc import reportfiles

    before = signal.signal(signal.SIGTERM, lambda *_: None)  # as the trainer's handler does; a fork inherits it
    try:
        with pytest.raises(RuntimeError), reportfiles.Painter(Path("/nonexistent")) as painter:
            raise RuntimeError("the job directory could not be read")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not painter._child.is_alive() and painter._child.exitcode is not None
