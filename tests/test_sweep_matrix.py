"""Specifications of hpc.sweep_matrix: axes multiply (first slowest), excludes and DeepSpeed-only keys collapse
configurations, trainer axes become options, and every bad matrix is refused naming its axis."""

from __future__ import annotations

import re

import pytest

from hpc import sweep_matrix


def axes(*texts: str) -> sweep_matrix.Matrix:
    return sweep_matrix.Matrix(axes=tuple(sweep_matrix.parse_axis(t) for t in texts))


def test_axes_multiply_first_slowest_and_deepspeed_only_keys_collapse():
    matrix = axes("backend=ddp,deepspeed", "zero_stage=1,2,3", "precision=fp32,bf16")
    configs = sweep_matrix.configurations(matrix, "ddp")
    # ddp has no ZeRO stage: its three stages are one configuration per precision.
    assert [sweep_matrix.label(c) for c in configs] == [
        "backend=ddp precision=fp32", "backend=ddp precision=bf16",
        *(f"backend=deepspeed zero_stage={s} precision={p}" for s in (1, 2, 3) for p in ("fp32", "bf16"))]


def test_tasks_times_axes_less_excludes():
    matrix = sweep_matrix.Matrix(axes=(sweep_matrix.make_axis("train.lr", ["1e-3", "1e-2"]),),
                                 tasks=({"backend": "dp"}, {"backend": "ddp", "nodes": 2}),
                                 exclude=({"backend": "dp", "train.lr": "1e-2"},))
    assert [sweep_matrix.label(c) for c in sweep_matrix.configurations(matrix, "ddp")] == [
        "backend=dp train.lr=1e-3", "backend=ddp nodes=2 train.lr=1e-3", "backend=ddp nodes=2 train.lr=1e-2"]


def test_trainer_axes_append_their_option_and_boolean_ones_are_flags():
    configuration = {"train.lr": "1e-3", "train.augment": True, "train.compile": "false", "nodes": "2"}
    values = sweep_matrix.job_values({"train_args": ["--max-steps", "5"]}, configuration)
    assert values["train_args"] == ["--max-steps", "5", "--lr", "1e-3", "--augment"]
    assert values["nodes"] == "2"


def test_a_boolean_trainer_axis_set_false_turns_off_the_flag_the_base_gives():
    """`--grid train.augment=true,false -- --augment`: the false task trains without it, as its label says."""
    base = {"train_args": ["--augment", "--max-steps", "5"]}
    assert sweep_matrix.job_values(base, {"train.augment": "false"})["train_args"] == ["--max-steps", "5"]
    assert sweep_matrix.job_values(base, {"train.augment": False})["train_args"] == ["--max-steps", "5"]
    assert "--augment" in sweep_matrix.job_values(base, {"train.augment": "true"})["train_args"]


@pytest.mark.parametrize("key", ["offload", "elastic"])
def test_a_switch_swept_on_the_command_line_is_true_or_false(key):
    configs = sweep_matrix.configurations(axes("backend=deepspeed", f"{key}=true,false"), "ddp")
    assert [sweep_matrix.job_values({}, c)[key] for c in configs] == [True, False]
    with pytest.raises(ValueError, match=f"^{key} must be true or false, got 'yes'$"):
        sweep_matrix.job_values({}, {key: "yes"})


@pytest.mark.parametrize("make,message", [
    (lambda: sweep_matrix.parse_axis("foo=1,2"), "unknown axis 'foo'"),
    (lambda: sweep_matrix.parse_axis("backend="), "axis backend is empty"),
    (lambda: sweep_matrix.parse_axis("backend=ddp,,dp"), "axis backend has an empty value"),
    (lambda: sweep_matrix.parse_axis("backend=ddp,ddp"), "axis backend lists ddp twice"),
    (lambda: sweep_matrix.parse_axis("backend"), "write KEY=V1,V2"),
    (lambda: sweep_matrix.parse_axis("train.zero_stage=1,2"), "sweep the job key zero_stage instead"),
    (lambda: sweep_matrix.parse_axis("train.run-dir=a"), "hpcdist sets it for each task"),
    (lambda: sweep_matrix.parse_axis("train.=1"), "not a trainer option"),
    (lambda: sweep_matrix.configurations(axes("train.seed=" + ",".join(map(str, range(40))),
                                              "train.lr=" + ",".join(map(str, range(30)))), "ddp"),
     "the matrix has 1200 tasks"),
    (lambda: sweep_matrix.configurations(sweep_matrix.Matrix(axes("backend=ddp,dp").axes, exclude=({"nodes": 2},)),
                                         "ddp"), "exclude #1: nodes is not an axis"),
    (lambda: sweep_matrix.configurations(sweep_matrix.Matrix(axes("backend=ddp,dp").axes,
                                                             exclude=({"backend": "dpp"},)),
                                         "ddp"), "dpp is not a value of axis backend"),
    (lambda: sweep_matrix.configurations(sweep_matrix.Matrix(axes("backend=ddp").axes, exclude=({"backend": "ddp"},)),
                                         "ddp"), "leave no task"),
    (lambda: sweep_matrix.combine(axes("nodes=1"), axes("nodes=2")), "axis nodes is given twice"),
    (lambda: sweep_matrix.configurations(sweep_matrix.Matrix(axes("nodes=1").axes, tasks=({"nodes": 2},)), "ddp"),
     "task #1 sets nodes=2, which axis nodes also sets"),
    (lambda: sweep_matrix.parse_file({"base": []}, "s.yaml"), "base: must be a mapping of job keys"),
    (lambda: sweep_matrix.parse_file({"axes": []}, "s.yaml"), "axes: must map each key to a list of values"),
])
def test_bad_matrices_are_refused_naming_the_axis(make, message):
    with pytest.raises(sweep_matrix.SweepError, match=re.escape(message)):
        make()
