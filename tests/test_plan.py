"""The memory planner: ZeRO-paper arithmetic, size parsing, recommendation rules and `hpcdist plan`."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hpc import plan
from hpc.cli import main

GB = 10**9


def rows(params, nodes, gpus, memory, precision="bf16", optimizer="adam"):
    return {e.name: e for e in plan.estimate(params, nodes, gpus, memory, precision, optimizer)}


# The ZeRO paper, Figure 1: 7.5B parameters, Nd = 64, mixed-precision Adam (K = 12).
@pytest.mark.parametrize("name,gigabytes", [("zero0", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)])
def test_zero_paper_figure_1(name, gigabytes):
    assert round(rows(7_500_000_000, 8, 8, None)[name].gpu_bytes / GB, 1) == gigabytes


def test_mixed_precision_adam_is_2_plus_2_plus_12_bytes_per_parameter_before_partitioning():
    zero0 = rows(1000, 1, 4, None)["zero0"]
    assert (zero0.params_bytes, zero0.grads_bytes, zero0.optimizer_bytes) == (2000, 2000, 12000)


def test_each_zero_stage_divides_one_more_state_by_the_data_parallel_degree():
    r = rows(64_000, 2, 8, None)  # Nd = 16
    assert (r["zero1"].params_bytes, r["zero1"].grads_bytes, r["zero1"].optimizer_bytes) == (128_000, 128_000, 48_000)
    assert (r["zero2"].params_bytes, r["zero2"].grads_bytes, r["zero2"].optimizer_bytes) == (128_000, 8_000, 48_000)
    assert (r["zero3"].params_bytes, r["zero3"].grads_bytes, r["zero3"].optimizer_bytes) == (8_000, 8_000, 48_000)


def test_fp32_adam_is_4_plus_4_plus_8_for_ddp_and_zero_0():
    r = rows(1000, 1, 2, None, precision="fp32")
    for name in ("dp", "ddp", "zero0"):
        assert (r[name].params_bytes, r[name].grads_bytes, r[name].optimizer_bytes) == (4000, 4000, 8000)


def test_fp32_zero_stages_also_keep_deepspeeds_fp32_master_partition():
    r = rows(1000, 1, 2, None, precision="fp32")
    assert r["zero1"].optimizer_bytes == (4 + 8) * 1000 // 2
    assert r["zero3"].gpu_bytes == (4 + 4 + 12) * 1000 // 2


def test_ddp_under_autocast_keeps_fp32_weights_whatever_the_compute_precision():
    r = rows(1000, 1, 2, None, precision="bf16")
    assert (r["ddp"].params_bytes, r["ddp"].grads_bytes, r["ddp"].optimizer_bytes) == (4000, 4000, 8000)
    assert r["ddp"].gpu_bytes == r["zero0"].gpu_bytes


def test_the_trainers_auto_precision_is_planned_as_fp32_the_larger():
    assert plan.estimate(1000, 1, 2, None, "auto") == plan.estimate(1000, 1, 2, None, "fp32")


def test_sgd_with_momentum_keeps_one_fp32_moment():
    assert rows(1000, 1, 2, None, precision="fp32", optimizer="sgd")["ddp"].optimizer_bytes == 4000
    assert rows(1000, 1, 2, None, precision="bf16", optimizer="sgd")["zero0"].optimizer_bytes == 8000


def test_offload_moves_the_optimizer_and_gradient_partitions_to_the_host():
    r = rows(8000, 1, 8, None)
    assert (r["zero2-offload"].gpu_bytes, r["zero2-offload"].cpu_bytes) == (16_000, (4 + 12) * 1000)
    assert (r["zero3-offload"].gpu_bytes, r["zero3-offload"].cpu_bytes) == (0, (2 + 4 + 12) * 1000)


def test_communication_volume_in_parameter_counts():
    r = rows(10**9, 1, 8, None)
    assert {n: r[n].comm_volume for n in ("ddp", "zero0", "zero1", "zero2", "zero3")} == \
        {"ddp": 2, "zero0": 2, "zero1": 2, "zero2": 2, "zero3": 3}
    assert r["dp"].comm_volume == 2 * 7  # GPU 0 feeds 7 replicas and gathers from them
    assert "GPU-0 hot spot" in r["dp"].note


def test_dataparallel_does_not_span_nodes():
    assert not rows(10**6, 2, 8, 80 * GB)["dp"].applicable
    assert rows(10**6, 2, 8, 80 * GB)["dp"].fits is False
    assert rows(10**6, 1, 8, 80 * GB)["dp"].fits is True


def test_model_states_may_fill_80_percent_of_gpu_memory():
    assert plan.MODEL_STATE_FRACTION == 0.80
    params = 5 * GB  # DDP: 16 bytes each = 80 GB of model states
    assert rows(params, 1, 1, 100 * GB)["ddp"].fits is True
    assert rows(params, 1, 1, 100 * GB - 2)["ddp"].fits is False


def test_fit_is_unknown_without_gpu_memory():
    assert {e.fits for e in plan.estimate(10**9, 1, 8, None, "bf16")} == {None}


def test_estimates_and_recommendations_are_frozen():
    row = plan.estimate(1000, 1, 1, None, "bf16")[0]
    with pytest.raises(AttributeError):
        row.params_bytes = 0
    with pytest.raises(AttributeError):
        plan.recommend(1000, 1, 1, None, "bf16").backend = "dp"


RULES = [
    # (why, params, nodes, gpus per node, GPU memory, backend, ZeRO stage, offload)
    ("1.3B fits DDP on one 8x80GB node", 1_300_000_000, 1, 8, 80 * GB, "ddp", None, False),
    ("7B: DDP's 112 GB does not fit, ZeRO-1's 38.5 GB does", 7 * GB, 1, 8, 80 * GB, "deepspeed", 1, False),
    ("13B: ZeRO-1 needs 71.5 GB, ZeRO-2 48.8 GB", 13 * GB, 1, 8, 80 * GB, "deepspeed", 2, False),
    ("20B: only partitioning parameters fits (40 GB)", 20 * GB, 1, 8, 80 * GB, "deepspeed", 3, False),
    ("70B on 4 nodes: ZeRO-3 needs 35 GB", 70 * GB, 4, 8, 80 * GB, "deepspeed", 3, False),
    ("10B on one 32 GB GPU: only the offloaded optimizer fits", 10 * GB, 1, 1, 32 * GB, "deepspeed", 2, True),
    ("70B on one node: nothing fits on the GPUs", 70 * GB, 1, 8, 80 * GB, "deepspeed", 3, True),
    ("memory unknown: least communication", 70 * GB, 1, 8, None, "ddp", None, False),
]


@pytest.mark.parametrize("why,params,nodes,gpus,memory,backend,stage,offload", RULES, ids=[r[0] for r in RULES])
def test_recommendation_rules(why, params, nodes, gpus, memory, backend, stage, offload):
    choice = plan.recommend(params, nodes, gpus, memory, "bf16")
    assert (choice.backend, choice.zero_stage, choice.offload) == (backend, stage, offload)
    assert choice.reason and "\n" not in choice.reason


@pytest.mark.parametrize("params", [10**6, 10**9, 7 * GB, 70 * GB])
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_dataparallel_is_never_recommended(params, gpus):
    assert plan.recommend(params, 1, gpus, 80 * GB, "fp32").backend != "dp"


def test_the_reason_gives_the_numbers_behind_the_choice():
    assert "112.0 GB" in plan.recommend(7 * GB, 1, 8, 80 * GB, "bf16").reason
    assert "38.5 GB" in plan.recommend(7 * GB, 1, 8, 80 * GB, "bf16").reason


@pytest.mark.parametrize("text,count", [("7B", 7 * 10**9), ("1.3B", 1_300_000_000), ("350M", 350_000_000),
                                        ("125k", 125_000), ("7e9", 7 * 10**9), ("315722", 315_722),
                                        (" 2b ", 2 * 10**9)])
def test_parse_count(text, count):
    assert plan.parse_count(text) == count


@pytest.mark.parametrize("text,size", [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("24G", 24 * 10**9),
                                       ("512MiB", 512 * 2**20), ("1.5TB", 1_500_000_000_000),
                                       ("85899345920", 80 * 2**30)])
def test_parse_bytes(text, size):
    assert plan.parse_bytes(text) == size


@pytest.mark.parametrize("parse,text", [(plan.parse_count, "7X"), (plan.parse_count, ""), (plan.parse_count, "0"),
                                        (plan.parse_count, "-5B"), (plan.parse_bytes, "80GX"),
                                        (plan.parse_bytes, "80Gi"), (plan.parse_bytes, "0GB"),
                                        (plan.parse_bytes, "80"), (plan.parse_bytes, "4096")])
def test_unreadable_sizes_are_plan_errors(parse, text):
    with pytest.raises(plan.PlanError):
        parse(text)


def test_convnet_parameters_come_from_its_layer_shapes():
    assert plan.model_params("convnet") == 896 + 18496 + 295040 + 1290 == 315_722


@pytest.mark.parametrize("args", [(0, 1, 1, None, "bf16"), (10, 0, 1, None, "bf16"), (10, 1, 0, None, "bf16"),
                                  (10, 1, 1, 0, "bf16"), (10, 1, 1, None, "int8")])
def test_impossible_geometry_is_a_plan_error(args):
    with pytest.raises(plan.PlanError):
        plan.estimate(*args)


def invoke(*args):
    return CliRunner().invoke(main, ["plan", *args])


def test_cli_prints_every_plan_the_rule_and_the_recommendation():
    result = invoke("--params", "7B", "--gpus-per-node", "8", "--nodes", "4", "--gpu-memory", "80GB")
    assert result.exit_code == 0, result.output
    for label in ("DP (nn.DataParallel)", "DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-2 + offload opt",
                  "ZeRO-3 + offload opt+params"):
        assert f"\n{label} " in result.output
    assert "model states <= 80% of GPU memory" in result.output
    assert "recommendation: deepspeed ZeRO-1" in result.output


def test_cli_json_has_one_entry_per_plan_and_the_recommendation():
    result = invoke("--model", "convnet", "--gpus-per-node", "2", "--gpu-memory", "24GiB", "--precision", "fp32",
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["params"] == 315_722 and out["data_parallel_degree"] == 2 and out["gpu_memory_bytes"] == 24 * 2**30
    assert [p["name"] for p in out["plans"]] == list(plan.PLANS)
    assert set(out["plans"][0]) >= {"name", "label", "backend", "zero_stage", "offload", "params_bytes",
                                    "grads_bytes", "optimizer_bytes", "gpu_bytes", "cpu_bytes", "comm_volume",
                                    "fits", "note"}
    assert out["recommendation"] == {"backend": "ddp", "zero_stage": None, "offload": False,
                                     "reason": out["recommendation"]["reason"]}


@pytest.mark.parametrize("args", [
    ("--params", "7X"),
    ("--params", "7B", "--gpu-memory", "eighty"),
    ("--params", "7B", "--nodes", "0"),
    ("--params", "7B", "--model", "convnet"),
    (),
    ("--model", "resnet"),
    ("--params", "7B", "--precision", "int4"),
])
def test_cli_bad_input_exits_2(args):
    result = invoke(*args)
    assert result.exit_code == 2


def test_cli_bad_input_is_one_line_naming_the_fix():
    result = invoke("--params", "7X")
    message = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in message and "7B" in message


def test_planner_imports_no_torch():
    code = "import sys, hpc.plan, hpc.commands.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
