"""hpc.benchresults: a benchmark row from the trainer's summary.json or the floor's report, and repeated runs."""

from __future__ import annotations

import pytest

from hpc import bench, benchreport, benchresults
from hpc.bench import Config
from hpc.benchresults import Result


def summary(**fields):
    full = {"images_per_s": 1234.5, "warmup_steps": 1, "steps": 3, "time_to_first_step_s": 4.2,
            "device": "NVIDIA H200",
            "ranks": [{"rank": 1, "peak_memory_bytes": 20}, {"rank": 0, "peak_memory_bytes": 10}]}
    full.update(fields)
    return {k: v for k, v in full.items() if v is not None}


def test_trainer_result_is_its_summary_rate_over_the_same_warmup():
    r = benchresults.result_from_summary(Config("ddp", ranks=2), 1, summary(), 1, 2, 9.0)
    assert r.ok and r.images_per_s == 1234.5 and r.device == "NVIDIA H200"
    assert r.time_to_first_step_s == 4.2 and r.peak_memory_bytes == (10, 20) and r.missing == ()


def test_an_auto_row_says_what_the_trainer_trained_in():
    auto = Config("deepspeed", zero_stage=2, precision="auto")
    rows = [benchresults.result_from_summary(auto, 2, summary(precision=trained), 1, 2, 9.0)
            for trained in ("fp32", "bf16")]
    assert [benchreport.table_rows([r])[0][3] for r in rows] == ["auto → fp32", "auto → bf16"]
    bf16 = Config("deepspeed", zero_stage=2, precision="bf16")
    named = benchresults.result_from_summary(bf16, 2, summary(), 1, 2, 9.0)
    assert benchreport.table_rows([named])[0][3] == "bf16"
    assert "deepspeed:zero2:auto:1" in bench.DEFAULT_GRID


def test_a_snap_run_reports_its_snapshots_and_their_stall_from_summary_json():
    snap = Config("ddp", snapshot_every_s=1.0)
    r = benchresults.result_from_summary(snap, 2, summary(snapshots=4, snapshot_stall_s=0.004), 1, 2, 9.0)
    assert (r.snapshots, r.snapshot_stall_s, r.steps, r.missing) == (4, 0.004, 3, ())
    silent = benchresults.result_from_summary(snap, 2, summary(), 1, 2, 9.0)
    assert silent.snapshots is None and silent.missing == ("snapshots",) and silent.snapshot_stall_share is None


def test_trainer_fields_it_did_not_report_are_named_missing_not_guessed():
    bare = benchresults.result_from_summary(Config("ddp"), 2, summary(time_to_first_step_s=None, ranks=[{"rank": 0}]),
                                            1, 2, 9.0)
    assert bare.ok and bare.time_to_first_step_s is None and bare.peak_memory_bytes == (None,)
    assert bare.missing == ("time_to_first_step_s", "ranks[].peak_memory_bytes")


@pytest.mark.parametrize("fields,warmup,steps,message", [
    ({"warmup_steps": 1}, 20, 2, "leaves out 1 warm-up steps, not 20"),
    ({"warmup_steps": None}, 1, 2, "leaves out None warm-up steps"),
    ({"steps": 3}, 1, 5, "the trainer stopped at step 3 of 6"),
    ({"images_per_s": None}, 1, 2, "no images_per_s (got None)"),
    ({"images_per_s": 0.0}, 1, 2, "no images_per_s (got 0.0)"),
])
def test_a_summary_that_gives_no_comparable_rate_is_a_failed_row(fields, warmup, steps, message):
    r = benchresults.result_from_summary(Config("ddp"), 2, summary(**fields), warmup, steps, 9.0)
    assert not r.ok and r.images_per_s is None and message in r.error


def test_floor_result_from_its_json_line():
    report = {"images_per_s": 1000.0, "time_to_first_step_s": 3.0, "device": "cpu",
              "ranks": [{"rank": 0, "peak_memory_bytes": 5}]}
    r = benchresults.result_from_floor(Config("floor"), 2, report, 30.0)
    assert r.ok and r.images_per_s == 1000.0 and r.peak_memory_bytes == (5,) and not r.missing
    assert r.device == "cpu"
    assert not benchresults.result_from_floor(Config("floor"), 2, {}, 30.0).ok


def test_repeated_runs_report_the_median_run_with_every_sample():
    runs = [Result(Config("ddp"), 2, rate, ttfs, (), 9.0) for rate, ttfs in ((900.0, 1.0), (1100.0, 2.0),
                                                                              (1000.0, 3.0))]
    row = benchresults.median_of(runs)
    assert (row.images_per_s, row.time_to_first_step_s) == (1000.0, 3.0)  # one real run, not a blend
    assert row.samples == (900.0, 1100.0, 1000.0)
    assert benchresults.median_of(runs[:2]).images_per_s == 900.0  # even count: the lower middle


def test_a_config_that_failed_in_any_round_is_reported_failed():
    runs = [Result(Config("ddp"), 2, 1000.0), Result(Config("ddp"), 2, error="exit 1: boom")]
    assert benchresults.median_of(runs).error == "exit 1: boom"
