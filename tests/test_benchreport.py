"""hpc.benchreport: the ratios between rows, the targets, and the Markdown and JSON reports."""

from __future__ import annotations

import json

import pytest

from hpc import bench, benchreport
from hpc.bench import Config
from hpc.benchresults import Result


def sample_results():
    return [
        Result(Config("floor"), 2, 1000.0, 3.0, (500 * 2**20,), 40.0),
        Result(Config("ddp"), 2, 960.0, 8.0, (600 * 2**20,), 50.0),
        Result(Config("floor", ranks=2), 1, 1100.0, 4.0, (400 * 2**20, 410 * 2**20), 40.0),
        Result(Config("ddp", ranks=2), 1, 990.0, 9.0, (500 * 2**20, 510 * 2**20), 60.0),
        Result(Config("ddp", ranks=2, threads=2), 2, 700.0, None, (), 70.0,
               missing=("time_to_first_step_s", "ranks[].peak_memory_bytes")),
        Result(Config("deepspeed", zero_stage=2), 2, wall_s=5.0, error="exit 1: boom | bang"),
    ]


def test_ratios_pair_each_row_with_its_floor_and_its_one_rank_run():
    results = sample_results()
    assert benchreport.vs_floor(results[1], results) == pytest.approx(0.96)
    assert benchreport.vs_floor(results[3], results) == pytest.approx(0.9)
    assert benchreport.vs_floor(results[4], results) is None  # no floor ran 2 ranks x 2 threads
    assert benchreport.vs_floor(results[0], results) is None
    assert benchreport.scaling(results[3], results) == pytest.approx(990 / 960)
    assert benchreport.scaling(results[4], results) == pytest.approx(700 / 960)
    assert benchreport.scaling(results[1], results) is None
    assert benchreport.scaling(results[5], results) is None


def test_markdown_table():
    lines = benchreport.markdown_table(sample_results()).splitlines()
    assert lines[0].startswith("| config | backend | ZeRO |") and lines[1].startswith("|---|---|---|")
    assert len(lines) == 2 + 6
    assert lines[2] == "| floor:1 | floor |  | fp32 |  | 256 | 1 | 2 | 1000 |  |  | 3.0 | 500 |"
    assert lines[3] == "| ddp:resident:1 | ddp |  | fp32 | resident | 256 | 1 | 2 | 960 | 0.96x |  | 8.0 | 600 |"
    assert "| 990 | 0.90x | 1.03x | 9.0 | 500 / 510 |" in lines[5]
    assert "| 700 |  | 0.73x | missing | missing |" in lines[6]
    assert "failed: exit 1: boom \\| bang" in lines[7]
    assert lines[7].endswith("failed: exit 1: boom \\| bang |  |  |  |  |")


def test_markdown_report_checks_the_targets_and_names_missing_fields():
    text = benchreport.markdown_report(sample_results(), {"cpus": 2, "steps": 200})
    assert text.startswith("# hpcdist bench\n\ncpus 2, steps 200\n\n| config |")
    assert "- ddp:resident:1 vs floor:1: 0.96x (meets the >= 0.95x target)" in text
    assert "- ddp:resident:2 vs 1 rank: 1.03x (meets the >= 0.9x target)" in text
    assert "- ddp:resident:2:t2 vs 1 rank: 0.73x (misses the >= 0.9x target, oversubscribed)" in text
    assert "- ddp:resident:2:t2: time_to_first_step_s, ranks[].peak_memory_bytes not reported" in text


def test_floor_target_is_checked_for_the_default_path_only():
    results = [Result(Config("floor"), 2, 1000.0), Result(Config("ddp", loader="classic"), 2, 600.0),
               Result(Config("ddp", precision="bf16", channels_last=True), 2, 1500.0)]
    assert benchreport.vs_floor(results[1], results) == pytest.approx(0.6)
    assert benchreport.vs_floor(results[2], results) == pytest.approx(1.5)
    assert benchreport.verdicts(results) == []


def test_deepspeed_rows_are_divided_by_the_bare_deepspeed_loop_with_the_same_stage_and_precision():
    ds = Config("deepspeed", zero_stage=2, precision="bf16")
    results = [Result(Config("floor"), 2, 1000.0),
               Result(Config("floor-deepspeed", zero_stage=2, precision="fp32"), 2, 900.0),
               Result(Config("floor-deepspeed", zero_stage=2, precision="bf16"), 2, 800.0),
               Result(ds, 2, 780.0),
               Result(Config("deepspeed", zero_stage=3), 2, 700.0)]
    assert benchreport.floor_of(results[3], results) is results[2]
    assert benchreport.vs_floor(results[3], results) == pytest.approx(780 / 800)
    # No bare ZeRO-3 loop ran, so the bare PyTorch loop is the yardstick, and no DeepSpeed target is claimed.
    assert benchreport.floor_of(results[4], results) is results[0]
    assert benchreport.verdicts(results) == [
        "deepspeed:zero2:bf16:1 vs floor-deepspeed:zero2:bf16:1: 0.97x (meets the >= 0.95x target)"]
    assert benchreport.floor_of(results[1], results) is None


def test_a_snap_row_is_checked_against_the_snapshot_stall_target_as_a_share_of_its_training_time():
    snap = Config("ddp", snapshot_every_s=1.0)
    # 100 steps of 256 images at 2,560 images/s: 10 s of training, 50 ms of it stalled by 20 copies.
    cheap = Result(snap, 2, 2560.0, snapshots=20, snapshot_stall_s=0.05, steps=100)
    assert cheap.snapshot_stall_share == pytest.approx(0.005)
    assert benchreport.verdicts([cheap]) == [
        "ddp:resident:1:snap1: snapshot copies stalled training 0.500% of its time (20 snapshots, 2.50 ms each; "
        "meets the <= 2% target)"]
    dear = Result(snap, 2, 2560.0, snapshots=20, snapshot_stall_s=0.5, steps=100)
    assert "stalled training 5.000%" in benchreport.verdicts([dear])[0] and "misses" in benchreport.verdicts([dear])[0]
    assert Result(Config("ddp"), 2, 2560.0).snapshot_stall_share is None


def test_json_report_round_trips_through_json():
    doc = json.loads(json.dumps(benchreport.to_json(sample_results(), {"cpus": 2})))
    assert doc["cpus"] == 2 and doc["targets"] == {"ddp_1_rank_vs_floor": 0.95, "deepspeed_vs_floor_deepspeed": 0.95,
                                                   "n_ranks_vs_1_rank": 0.9, "snapshot_stall_share": 0.02}
    rows = doc["results"]
    assert rows[1]["config"]["name"] == "ddp:resident:1" and rows[1]["vs_floor"] == pytest.approx(0.96)
    assert rows[3]["peak_memory_bytes"] == [500 * 2**20, 510 * 2**20]
    assert rows[5]["images_per_s"] is None and rows[5]["error"].startswith("exit 1")
    assert [b[0] for b in benchreport.chart_bars(sample_results())][-1] == "ddp:resident:2:t2"


def test_the_report_shows_each_samples_position_and_the_spread():
    config = bench.parse_config("ddp:1")
    result = Result(config, 2, 100.0, samples=(90.0, 100.0, 120.0))
    assert benchreport.spread(result.samples) == pytest.approx(0.3)
    assert benchreport.spread((5.0,)) is None
    lines = benchreport.spread_lines([result], [["floor:1", "ddp:resident:1"], ["ddp:resident:1", "floor:1"], []])
    assert lines == ["ddp:resident:1: 90 (#2), 100 (#1), 120; spread 30%"]
