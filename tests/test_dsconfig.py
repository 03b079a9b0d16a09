"""The precision and DeepSpeed config are decided once (hpc.dsconfig): what render writes is what DeepSpeed gets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import train.__main__ as trainer
from hpc import dsconfig, profiles, render, vocab
from hpc.spec import JobSpec, SpecError
from train import engines
from train.engines import DeepSpeedEngine
from train.options import parse

CPU_SITE = profiles.load("local")
GPU_SITE = profiles.parse("one-gpu", {"gpus_per_node": 1, "cpus_per_task": 1})
GRID = [(stage, precision) for stage in vocab.ZERO_STAGES for precision in vocab.PRECISIONS]


class Reached(Exception):
    """Raised where deepspeed.initialize would have been called, carrying its config."""


def rendered_config(tmp_path: Path, stage: int, precision: str, gpu: bool) -> Path:
    """As the local executor renders it: for this machine's CPU."""
    spec = JobSpec(job_dir=str(tmp_path / "job"), backend="deepspeed", zero_stage=stage, precision=precision,
                   gpus_per_node=1 if gpu else None, python=sys.executable)
    render.write(render.render(spec, GPU_SITE if gpu else CPU_SITE, cpus=dsconfig.this_cpu()))
    return tmp_path / "job" / vocab.DEEPSPEED_JSON


@pytest.fixture
def one_process(monkeypatch):
    """A world of one, with no process group and DeepSpeed stopped at its door."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(trainer, "init_process_group", lambda *a: "gloo")
    monkeypatch.setattr(trainer, "cpu_has_fp16", lambda: True)  # fp16 on this CPU is not what is tested here

    def stop(self, model, config):
        raise Reached(config)

    monkeypatch.setattr(DeepSpeedEngine, "__init__", stop)


@pytest.mark.parametrize("stage,precision", GRID)
def test_a_cpu_job_trains_with_exactly_the_rendered_deepspeed_json(tmp_path, one_process, stage, precision):
    path = rendered_config(tmp_path, stage, precision, gpu=False)
    with pytest.raises(Reached) as reached:
        trainer.main(["--backend", "deepspeed", "--run-dir", str(tmp_path / "run"), "--deepspeed-config",
                      str(path), "--threads", "1", "--synthetic-size", "64"])
    assert reached.value.args[0] == json.loads(path.read_text())
    if precision == "auto":
        assert dsconfig.precision_of(reached.value.args[0]) == ("bf16" if dsconfig.this_cpu().bf16 else "fp32")


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("stage,precision", GRID)
def test_the_trainer_resolves_what_render_resolves_with_or_without_a_job_dir(tmp_path, stage, precision, gpu):
    path = rendered_config(tmp_path, stage, precision, gpu)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    given = parse(["--backend", "deepspeed", "--run-dir", "r", "--deepspeed-config", str(path)])
    by_hand = parse(["--backend", "deepspeed", "--run-dir", "r", "--zero-stage", str(stage), "--precision", precision])
    expected = json.loads(path.read_text())
    for opts in (given, by_hand):
        chosen, config, batch = engines.precision_and_config(opts, device, world=1)
        assert config == expected and chosen == dsconfig.precision_of(expected)
        assert batch == expected["train_batch_size"]
    if precision == "auto":
        assert dsconfig.precision_of(expected) == ("fp16" if gpu else "bf16" if dsconfig.this_cpu().bf16 else "fp32")


def test_auto_is_fp32_for_dp_and_ddp_the_config_s_on_gpus_and_bf16_only_on_cpus_with_native_bf16() -> None:
    fp16 = {"fp16": {"enabled": True}}
    assert dsconfig.choose("auto", gpu=True) == dsconfig.Choice("fp32")
    assert dsconfig.choose("auto", gpu=True, config=fp16).precision == "fp16"
    native, emulated, unknown = dsconfig.Cpus(True), dsconfig.Cpus(False), dsconfig.Cpus(None, "cluster c's CPU nodes")
    assert dsconfig.choose("auto", gpu=False, config=fp16, cpus=native) == dsconfig.Choice("bf16",
                                                                                           "native bf16 on this CPU")
    assert dsconfig.choose("auto", gpu=False, config=fp16, cpus=emulated).precision == "fp32"
    assert "no native bf16 on this CPU" in dsconfig.choose("auto", gpu=False, config=fp16, cpus=emulated).reason
    not_known = dsconfig.choose("auto", gpu=False, config=fp16, cpus=unknown)
    assert not_known.precision == "fp32" and "cluster c's CPU nodes" in not_known.reason
    assert "cpu_bf16" in not_known.reason
    assert dsconfig.choose("fp16", gpu=False, config=fp16, cpus=emulated) == dsconfig.Choice("fp16")
    assert dsconfig.choose("bf16", gpu=False, config=fp16, cpus=emulated) == dsconfig.Choice("bf16")
    with pytest.raises(dsconfig.ConfigError, match="fp8"):
        dsconfig.choose("fp8", gpu=True)


X86_EMULATED = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize("cpuinfo,native", [(X86_EMULATED, False), (X86_AVX512_BF16, True), (X86_AMX, True),
                                            (ARM_BF16, True), (ARM_PLAIN, False), ("", False),
                                            (X86_AVX512_BF16 + X86_EMULATED.replace(": 0", ": 1"), False)],
                         ids=["avx512", "avx512_bf16", "amx", "arm-bf16", "arm", "empty", "one-core-without"])
def test_native_bf16_is_read_from_the_cpuinfo_flags_of_every_core(cpuinfo, native) -> None:
    assert dsconfig.native_bf16(cpuinfo) is native


def test_this_cpu_reads_the_given_cpuinfo_and_is_unknown_where_there_is_none(tmp_path) -> None:
    (tmp_path / "cpuinfo").write_text(X86_AMX)
    assert dsconfig.this_cpu(tmp_path / "cpuinfo") == dsconfig.Cpus(True, "this CPU")
    assert dsconfig.this_cpu(tmp_path / "absent") == dsconfig.Cpus(None, "this CPU")


def test_render_decides_auto_from_the_profile_s_cpu_bf16_or_the_cpus_it_is_given(tmp_path) -> None:
    spec = JobSpec(job_dir=str(tmp_path / "job"), backend="deepspeed", python=sys.executable)
    for key, trained in ((True, "bf16"), (False, "fp32"), (None, "fp32")):
        site = profiles.parse("cpus", {"cpu_bf16": key} if key is not None else {})
        rendered = render.render(spec, site)
        assert rendered.spec.precision == trained and "cluster cpus's CPU nodes" in rendered.precision_reason
        assert json.loads(rendered.files[vocab.DEEPSPEED_JSON])["bf16"]["enabled"] is (trained == "bf16")
    here = render.render(spec, profiles.parse("cpus", {"cpu_bf16": True}), cpus=dsconfig.Cpus(False))
    assert here.spec.precision == "fp32" and "no native bf16 on this CPU" in here.precision_reason
    named = render.render(JobSpec(job_dir=str(tmp_path / "job"), backend="deepspeed", precision="bf16",
                                  python=sys.executable), profiles.parse("cpus", {"cpu_bf16": False}))
    assert named.spec.precision == "bf16" and named.precision_reason is None


def test_overrides_reach_the_config_and_leave_the_base_alone() -> None:
    base = dsconfig.load(dsconfig.base_path())
    before = json.dumps(base)
    config = dsconfig.resolve(base, world_size=4, gpu=True, zero_stage=3, precision="bf16", offload=True,
                              global_batch=64, lr=0.01)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (64, 16)
    assert config["gradient_accumulation_steps"] == 1 and config["optimizer"]["params"]["lr"] == 0.01
    assert json.dumps(base) == before
    with pytest.raises(dsconfig.ConfigError, match="multiple of 3"):
        dsconfig.resolve(base, world_size=3, gpu=True)


def test_the_shipped_base_is_fp16_zero2_with_a_global_batch() -> None:
    base = dsconfig.load(dsconfig.base_path())
    assert dsconfig.precision_of(base) == "fp16" and base["zero_optimization"]["stage"] == vocab.DEFAULT_ZERO_STAGE
    assert base["train_batch_size"] % 8 == 0 and base["optimizer"]["type"] == "Adam"


def test_a_file_not_made_for_this_world_or_contradicted_by_a_flag_is_refused(tmp_path) -> None:
    config = dsconfig.resolve(dsconfig.load(dsconfig.base_path()), world_size=2, gpu=False, lr=0.01)
    dsconfig.check_resolved(config, tmp_path, 2, zero_stage=2, precision="auto", global_batch=32, lr=0.01)
    with pytest.raises(dsconfig.ConfigError, match="not resolved for 4 rank"):
        dsconfig.check_resolved(config, tmp_path, 4)
    with pytest.raises(dsconfig.ConfigError, match="--precision fp16 contradicts"):
        dsconfig.check_resolved(config, tmp_path, 2, precision="fp16")
    with pytest.raises(dsconfig.ConfigError, match="--batch-size 64 contradicts"):
        dsconfig.check_resolved(config, tmp_path, 2, global_batch=64)


def test_an_elastic_relaunch_regroups_the_file_for_the_ranks_left_keeping_the_global_batch(tmp_path) -> None:
    config = dsconfig.resolve(dsconfig.load(dsconfig.base_path()), world_size=4, gpu=False, global_batch=64)
    fewer = dsconfig.regroup(config, tmp_path, 2)
    dsconfig.check_resolved(fewer, tmp_path, 2, global_batch=64)
    assert (fewer["train_batch_size"], fewer["train_micro_batch_size_per_gpu"]) == (64, 32)
    assert config["train_micro_batch_size_per_gpu"] == 16, "the file's own config is left as it was"
    with pytest.raises(dsconfig.ConfigError, match="global batch 64 .* does not split over the 3 rank"):
        dsconfig.regroup(config, tmp_path, 3)


def test_a_resume_is_refused_where_deepspeed_cannot_load_the_stage_and_precision_the_checkpoint_records() -> None:
    def config(stage: int, precision: str) -> dict:
        return dsconfig.resolve(dsconfig.load(dsconfig.base_path()), world_size=1, gpu=True, zero_stage=stage,
                                precision=precision)
    written = dsconfig.trained_with(config(1, "bf16"))
    assert written == {"zero_stage": 1, "precision": "bf16"}
    for stage in (1, 2):  # ZeRO-1 and -2 keep the same partitions in the same files
        dsconfig.check_resume(written, config(stage, "bf16"), "step4")
    for stage, precision in ((3, "bf16"), (0, "bf16"), (1, "fp32"), (2, "fp16")):
        with pytest.raises(dsconfig.ConfigError) as caught:
            dsconfig.check_resume(written, config(stage, precision), "step4")
        assert str(caught.value).startswith(f"step4 holds DeepSpeed ZeRO-1 bf16 state, and this run asks for "
                                            f"ZeRO-{stage} {precision}, which cannot load it: resume with "
                                            "--zero-stage 1 --precision bf16")
    # Written before the record, or a record damaged since: nothing to hold the run to.
    for saved in (None, {}, {"zero_stage": True, "precision": "bf16"}, {"zero_stage": 1, "precision": "\x1b[2J"}):
        dsconfig.check_resume(saved, config(3, "fp32"), "step4")


def test_render_shows_the_precision_that_will_train() -> None:
    cpu = render.render(JobSpec(job_dir="/j", backend="deepspeed", python="py"), CPU_SITE, cpus=dsconfig.Cpus(True))
    assert json.loads(cpu.files[vocab.DEEPSPEED_JSON])["bf16"]["enabled"] and cpu.spec.precision == "bf16"
    assert "deepspeed backend ZeRO-2 in bf16" in cpu.files[vocab.JOB_SBATCH]
    gpu = render.render(JobSpec(job_dir="/j", backend="deepspeed", python="py"), GPU_SITE)
    assert gpu.spec.precision == "fp16" and "in fp16" in gpu.files[vocab.JOB_SBATCH]
    ddp = render.render(JobSpec(job_dir="/j", backend="ddp", python="py"), GPU_SITE)
    assert ddp.spec.precision == "fp32" and "--precision fp32" in ddp.files[vocab.TASK_SH]
    with pytest.raises(SpecError, match="--lr: invalid float value: 'fast'"):
        render.render(JobSpec(job_dir="/j", backend="deepspeed", python="py", train_args=("--lr", "fast")), CPU_SITE)


@pytest.mark.parametrize("make, says", [
    (lambda p: os.mkfifo(p), "a pipe"), (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.write_bytes(b'{"a": "\xff"}'), "not UTF-8"), (lambda p: p.write_text("[" * 100 + "]" * 100), "deep"),
])
def test_a_deepspeed_config_that_is_no_file_or_no_json_is_one_line(tmp_path, make, says) -> None:
    make(tmp_path / "ds.json")
    with pytest.raises(dsconfig.ConfigError, match=says) as caught:
        dsconfig.load(tmp_path / "ds.json")
    assert "\n" not in str(caught.value)
