"""Partition facts parsed from scontrol's own output, and the pure checks of a job and of a profile against them."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pytest
import yaml
from click.testing import CliRunner

from hpc import jobs, partition, profiles
from hpc.cli import main
from hpc.commands.profile import draft
from hpc.slurm import grammar
from hpc.spec import JobSpec, SpecError
from hpc.speccheck import check

DATA = Path(__file__).parent / "data" / "slurm"


def cluster(name: str, partitions: str | None = None) -> partition.Cluster:
    read = lambda what: (DATA / f"{name}-{what}.txt").read_text()  # noqa: E731
    return partition.cluster_from(read(partitions or "partitions"), read("nodes"), read("config"))


LOCAL = cluster("local")
LIMITED = cluster("local", "partitions-with-limits")
GPU_SITE = cluster("gpu-site")


def test_local_cluster_as_captured_from_scontrol() -> None:
    assert (LOCAL.name, LOCAL.accounting) == ("local", True)
    (debug,) = LOCAL.partitions
    assert (debug.name, debug.nodes, debug.default, debug.max_time_s, debug.default_time_s, debug.max_nodes) == \
        ("debug", ("n1", "n2", "n3"), True, None, None, None)
    assert [(n.name, n.cpus, n.memory_mb, n.gpus) for n in LOCAL.nodes] == [(f"n{i}", 2, 21694, 0) for i in (1, 2, 3)]
    probe = partition.pick(LIMITED, "hpcdist-probe")
    assert (probe.max_time_s, probe.default_time_s, probe.max_nodes, probe.default) == (300, 120, 2, False)


def test_a_node_count_that_is_not_plain_digits_is_unknown_not_a_crash() -> None:
    nodes = partition.parse_nodes("NodeName=n1 CPUTot=\u00b2 RealMemory=\u0663 Gres=(null) State=IDLE\n")
    assert [(n.name, n.cpus, n.memory_mb) for n in nodes] == [("n1", 0, None)]


@pytest.mark.parametrize("gres,gpus", [
    ("(null)", 0), ("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:a40:1(S:0,2,4,6,8,10)", 1),
    ("gpu:a100:4(S:0),gpu:v100:2(S:1)", 6), ("gpu:v100:4(S:0-1),mps:400", 4), ("mps:100", 0),
])
def test_gpus_from_gres(gres: str, gpus: int) -> None:
    assert partition.gres_gpus(gres) == gpus


def test_gpu_site_nodes_and_partitions() -> None:
    gpus = {n.name: (n.gpus, n.cpus) for n in GPU_SITE.nodes}
    assert gpus == {"g001": (8, 64), "g002": (8, 64), "g003": (4, 32), "c001": (0, 128)}
    gpu = partition.pick(GPU_SITE, "gpu")
    assert (gpu.max_time_s, gpu.default_time_s, gpu.max_nodes) == (4 * 3600, 1800, 2)
    assert partition.pick(GPU_SITE, None).name == "cpu"
    assert partition.pick(GPU_SITE, "gpu-long").max_time_s == 7 * 86400
    assert GPU_SITE.accounting is False
    assert partition.tres_gpus("cpu=11,mem=240G,billing=11,gres/gpu=1") == 1


def test_times_as_scontrol_prints_them() -> None:
    assert [grammar.duration_s(t) for t in ("00:05:00", "1-00:00:00", "UNLIMITED", "NONE")] == [300, 86400, None,
                                                                                                   None]
    assert [grammar.format_duration(s) for s in (120, 3600, 90061)] == ["00:02:00", "01:00:00", "1-01:01:01"]


def resolved(**fields: object) -> JobSpec:
    # A global batch that every world size here divides: check() refuses one the trainer would.
    fields.setdefault("train_args", ("--batch-size", "60"))
    return check(JobSpec(job_dir="/tmp/j", **fields), profiles.load("local"))  # type: ignore[arg-type]


@pytest.mark.parametrize("fields,message", [
    ({"time": "10"}, "--time 10 exceeds partition 'hpcdist-probe''s MaxTime 00:05:00"),
    ({"nodes": 3, "time": "5"}, "--nodes 3 exceeds partition 'hpcdist-probe''s MaxNodes 2"),
    ({"nodes": 2, "nodelist": "n[3-4]", "time": "5"}, "--nodelist names n4, not in partition 'hpcdist-probe'"),
    ({"ntasks_per_node": 3, "time": "5"}, "3 task(s) x 1 CPU(s) per node exceed the 2 CPUs"),
    ({"nodes": 1, "exclude": "n9", "time": "5"}, "--exclude names n9, not in partition 'hpcdist-probe'"),
    ({"nodes": 1, "exclude": "n[3-4]", "time": "5"}, "--exclude names n4, not in partition 'hpcdist-probe'"),
    ({"nodes": 1, "exclude": "n[1-3]", "time": "5"}, "--exclude n[1-3] leaves 0 of partition 'hpcdist-probe''s "
                                                     "nodes for a job that needs 1"),
    ({"nodes": 2, "exclude": "n[2-3]", "time": "5"}, "leaves 1 of partition 'hpcdist-probe''s nodes for a job "
                                                     "that needs 2"),
])
def test_a_job_over_a_partition_limit_is_refused_naming_it(fields: dict, message: str) -> None:
    part = partition.pick(LIMITED, "hpcdist-probe")
    with pytest.raises(SpecError) as info:
        partition.check(resolved(partition="hpcdist-probe", **fields), part, LIMITED.nodes_of(part))
    assert message in str(info.value)


@pytest.mark.parametrize("time", ["UNLIMITED", "0", "infinite"])
def test_no_time_limit_exceeds_every_max_time_for_a_job_and_for_a_profile(time: str) -> None:
    part = partition.pick(LIMITED, "hpcdist-probe")
    with pytest.raises(SpecError, match=f"--time {time} exceeds partition 'hpcdist-probe''s MaxTime 00:05:00"):
        partition.check(resolved(partition="hpcdist-probe", time=time), part, LIMITED.nodes_of(part))
    site = replace(profiles.load("local"), partition="hpcdist-probe", time=time, max_nodes=2)
    assert partition.problems(site, LIMITED) == [f"time {time} exceeds partition 'hpcdist-probe''s MaxTime 00:05:00"]
    partition.check(resolved(partition="debug", time=time), partition.pick(LIMITED, "debug"), LIMITED.nodes)


def test_a_job_within_the_limits_passes() -> None:
    part = partition.pick(LIMITED, "hpcdist-probe")
    partition.check(resolved(nodes=2, time="00:05:00", nodelist="n[1-2]", ntasks_per_node=2), part,
                    LIMITED.nodes_of(part))


def test_more_nodes_or_gpus_than_the_partition_has() -> None:
    site = replace(profiles.load("example-ib"), max_nodes=None, cpus_per_task=8)
    gpu = partition.pick(GPU_SITE, "gpu")
    spec = check(JobSpec(job_dir="/tmp/j", nodes=2, gpus_per_node=8), site)
    partition.check(spec, gpu, GPU_SITE.nodes_of(gpu))
    spec3 = check(JobSpec(job_dir="/tmp/j", nodes=3, gpus_per_node=8, partition="gpu-long",
                          train_args=("--batch-size", "240")), site)
    long = partition.pick(GPU_SITE, "gpu-long")
    with pytest.raises(SpecError, match="--nodes 3: partition 'gpu-long' has only 2 node"):
        partition.check(spec3, long, GPU_SITE.nodes_of(long))
    more = replace(spec, nodes=2, gpus_per_node=8, partition="gpu")
    only_small = [n for n in GPU_SITE.nodes_of(gpu) if n.name != "g002"]
    with pytest.raises(SpecError, match="--gpus-per-node 8: 1 of partition 'gpu''s nodes have that many GPUs"):
        partition.check(more, gpu, only_small)


def test_an_unknown_partition_names_the_real_ones() -> None:
    with pytest.raises(SpecError, match="partition 'gpuu' does not exist on Slurm cluster 'bigsite'; pass "
                                        "--partition with one of cpu, gpu, gpu-long"):
        partition.pick(GPU_SITE, "gpuu")


def test_default_time_comes_from_the_partition_only_when_nobody_gave_one() -> None:
    part = partition.pick(LIMITED, "hpcdist-probe")
    local = profiles.load("local")
    bare = JobSpec(job_dir="/tmp/j")
    assert partition.with_default_time(bare, local, part).time == "00:02:00"
    assert partition.with_default_time(replace(bare, time="3"), local, part).time == "3"
    assert partition.with_default_time(bare, replace(local, time="4"), part).time is None  # the profile's wins later
    timed = replace(local, time="4")
    assert check(partition.with_default_time(bare, timed, part), timed).time == "4"
    assert check(bare, local).time == "01:00:00"  # nothing else says: the old default
    assert partition.with_default_time(bare, local, partition.pick(LOCAL, "debug")).time is None


def test_profile_problems_against_the_live_facts() -> None:
    assert partition.problems(profiles.load("local"), LOCAL) == []
    ib = profiles.load("example-ib")
    found = partition.problems(ib, LOCAL)
    assert found[0] == "slurm_cluster is 'example' but this Slurm cluster is 'local'"
    assert found[1].startswith("partition 'gpu' does not exist; set partition: to one of debug")
    site = replace(ib, slurm_cluster="bigsite", max_nodes=64, time="05:00:00", gpus_per_node=8, cpus_per_task=12)
    assert partition.problems(site, GPU_SITE) == [
        "time 05:00:00 exceeds partition 'gpu''s MaxTime 04:00:00",
        "max_nodes 64 but partition 'gpu' has 3 node(s)",
        "max_nodes 64 exceeds partition 'gpu''s MaxNodes 2",
        "cpus_per_task 12 x 8 rank(s) per node exceed the 64 CPUs of partition 'gpu''s nodes",
    ]
    assert partition.problems(replace(site, gpus_per_node=16, cpus_per_task=1, time=None, max_nodes=2), GPU_SITE) \
        == ["gpus_per_node 16 but partition 'gpu''s nodes have at most 8 GPU(s) in Gres"]


def test_a_partition_without_nodes_fits_no_profile() -> None:
    empty = replace(LOCAL, partitions=(replace(LOCAL.partitions[0], nodes=(), nodes_expr="(null)"),))
    for prof in (profiles.load("local"), replace(profiles.load("local"), max_nodes=None)):
        assert partition.problems(prof, empty) == [
            "partition 'debug' has no nodes, so no job of this profile can start there; set partition: to one that has"]


def test_a_profile_for_another_slurm_cluster_is_not_checked_here() -> None:
    assert not partition.applies(profiles.load("example-ib"), LOCAL)
    assert partition.applies(profiles.load("local"), LOCAL)
    assert partition.applies(replace(profiles.load("local"), slurm_cluster=None), GPU_SITE)


def fake_runner(outputs: dict[str, tuple[int, str]]):
    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        key = " ".join(argv[:3])
        if key not in outputs:
            return subprocess.CompletedProcess(list(argv), 124, "", "scontrol did not answer")
        code, out = outputs[key]
        return subprocess.CompletedProcess(list(argv), code, out, "")
    return run


def test_query_gives_up_quietly_when_slurm_does_not_answer(tmp_path: Path) -> None:
    (tmp_path / "scontrol").write_text("#!/bin/sh\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {"PATH": str(tmp_path)}
    texts = {f"scontrol show {w}": (0, (DATA / f"local-{f}.txt").read_text())
             for w, f in (("partition", "partitions"), ("node", "nodes"), ("config", "config"))}
    assert partition.query(env, fake_runner(texts)) == LOCAL
    assert partition.query(env, fake_runner({**texts, "scontrol show node": (1, "")})) is None
    assert partition.query(env, fake_runner({k: v for k, v in texts.items() if "config" not in k})) is None
    assert partition.query({**env, "HPCDIST_PARTITION_CHECK": "0"}, fake_runner(texts)) is None
    assert partition.query({"PATH": str(tmp_path / "empty")}, fake_runner(texts)) is None


def test_a_drafted_profile_is_a_valid_profile_that_fits() -> None:
    text = draft(LOCAL, None, "2026-12-01")
    data = yaml.safe_load(text)
    assert data["partition"] == "debug" and data["slurm_cluster"] == "local" and data["max_nodes"] == 3
    prof = profiles.parse("drafted", data)
    assert prof.gpus_per_node == 0 and prof.network.ib is False
    assert partition.problems(prof, LOCAL) == []
    assert "# account:" in text and "accounting is on" in text and "could not know" in text


def test_a_partition_slurm_reports_no_nodes_of_drafts_a_profile_that_loads() -> None:
    # A partition defined before its nodes (Nodes=(null)), or node records scontrol did not print.
    empty = partition.cluster_from("PartitionName=debug Nodes=(null) Default=YES State=UP\n", "",
                                   "ClusterName = odd\n")
    text = draft(empty, None, "2026-12-07")
    assert profiles.parse("drafted", yaml.safe_load(text)).max_nodes is None
    assert "# max_nodes:" in text and "no nodes" in text


@pytest.mark.parametrize("here", [True, False])
def test_a_drafted_cpu_profile_takes_cpu_bf16_from_the_machine_that_drafts_it(here: bool) -> None:
    text = draft(LOCAL, None, "2026-12-01", cpu_bf16_here=here)
    assert profiles.parse("drafted", yaml.safe_load(text)).cpu_bf16 is here
    assert "Slurm does not tell the nodes'" in text


def test_a_drafted_cpu_profile_leaves_cpu_bf16_unset_where_this_machine_cannot_tell() -> None:
    text = draft(LOCAL, None, "2026-12-01", cpu_bf16_here=None)
    assert "# cpu_bf16: false" in text and profiles.parse("drafted", yaml.safe_load(text)).cpu_bf16 is None


def test_a_drafted_gpu_profile_takes_the_fewest_gpus_and_shares_cpus_among_them() -> None:
    text = draft(GPU_SITE, "gpu", "2026-12-01")
    data = yaml.safe_load(text)
    assert (data["gpus_per_node"], data["cpus_per_task"], data["max_nodes"]) == (4, 8, 2)
    assert data["network"] == {"ib": True} and "NCCL_IB_HCA" in text and "gpu_memory" in text
    assert "DefaultTime 00:30:00; MaxTime 04:00:00" in text and "accounting is off" in text
    assert "Other partitions: cpu (1 nodes), gpu-long (2 nodes)" in text
    assert partition.problems(profiles.parse("drafted", data), GPU_SITE) == []
    with pytest.raises(SpecError, match="does not exist"):
        draft(GPU_SITE, "nope", "2026-12-01")


def test_profile_init_never_overwrites_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "query", lambda environ: LOCAL)
    out = tmp_path / "site.yaml"
    out.write_text(draft(LOCAL, None, "2026-01-01"))
    refused = CliRunner().invoke(main, ["profile", "init", "-o", str(out)])
    assert refused.exit_code == 2 and "exists; pass --force" in refused.output and "2026-01-01" in out.read_text()
    forced = CliRunner().invoke(main, ["profile", "init", "-o", str(out), "--force"])
    assert forced.exit_code == 0 and yaml.safe_load(out.read_text())["partition"] == "debug"
    assert "2026-01-01" not in out.read_text()


def test_profile_init_force_replaces_only_a_draft_never_a_file_it_did_not_write_nor_a_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "query", lambda environ: LOCAL)
    mine = tmp_path / "notes.yaml"
    mine.write_text("mine\n")
    theirs = tmp_path / "managed.yaml"
    theirs.write_text(draft(LOCAL, None, "2026-01-01"))
    link = tmp_path / "site.yaml"
    link.symlink_to(theirs)
    for out in (mine, link):
        forced = CliRunner().invoke(main, ["profile", "init", "-o", str(out), "--force"])
        assert forced.exit_code == 2 and len(forced.stderr.splitlines()) == 1, forced.output
        assert "not a draft of profile init" in forced.stderr
    assert mine.read_text() == "mine\n" and link.is_symlink() and "2026-01-01" in theirs.read_text()


def test_profile_check_exits_1_listing_the_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "query", lambda environ: LOCAL)
    bad = CliRunner().invoke(main, ["profile", "check", "example-ib"])
    assert bad.exit_code == 1 and "  - slurm_cluster is 'example'" in bad.output
    good = CliRunner().invoke(main, ["profile", "check", "local"])
    assert good.exit_code == 0 and "fits Slurm cluster local: partition 'debug', 3 node(s)" in good.output
    monkeypatch.setattr(partition, "query", lambda environ: None)
    gone = CliRunner().invoke(main, ["profile", "check", "local"])
    assert gone.exit_code == 2 and "Slurm does not answer here" in gone.output


def test_profile_check_names_an_srun_plugin_runtime_the_cluster_does_not_load(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc.commands import profile as profile_command

    monkeypatch.setattr(partition, "query", lambda environ: LOCAL)
    site = tmp_path / "site.yaml"
    site.write_text("extends: local\ncontainer: {runtime: pyxis}\n")
    monkeypatch.setattr(profile_command, "runtimes_here", lambda cluster: ["charliecloud", "oci"])
    bad = CliRunner().invoke(main, ["profile", "check", str(site)])
    assert bad.exit_code == 1 and "  - container.runtime pyxis: Slurm here does not load it" in bad.output
    assert "(found: charliecloud, oci)" in bad.output
    monkeypatch.setattr(profile_command, "runtimes_here", lambda cluster: ["pyxis"])
    assert CliRunner().invoke(main, ["profile", "check", str(site)]).exit_code == 0


def test_profile_check_refuses_a_profile_whose_templates_directory_is_missing(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Every render with it would refuse: the check is the admin's chance to hear it first.
    monkeypatch.setattr(partition, "query", lambda environ: LOCAL)
    site = tmp_path / "site.yaml"
    site.write_text("extends: local\ntemplates: site-templates\n")
    bad = CliRunner().invoke(main, ["profile", "check", str(site)])
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1, bad.output
    assert str(tmp_path / "site-templates") in bad.stderr and "is not a directory" in bad.stderr
    (tmp_path / "site-templates").mkdir()
    assert CliRunner().invoke(main, ["profile", "check", str(site)]).exit_code == 0


def test_a_dry_run_for_the_local_executor_shows_the_local_run_unbound_by_the_partition(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition, "query", lambda environ: LIMITED)
    monkeypatch.setattr(jobs, "slurm_available", lambda environ: True)
    local = ["submit", "--executor", "local", "--dry-run", "-p", "hpcdist-probe"]
    over = CliRunner().invoke(main, [*local, "--time", "10", "-o", str(tmp_path / "over")])
    assert over.exit_code == 0, over.output
    assert "#SBATCH --time=10\n" in over.stdout
    untimed = CliRunner().invoke(main, [*local, "-o", str(tmp_path / "untimed")])
    assert untimed.exit_code == 0 and "#SBATCH --time=01:00:00\n" in untimed.stdout, untimed.output
    slurm = CliRunner().invoke(main, ["submit", "--dry-run", "-p", "hpcdist-probe", "--time", "10",
                                      "-o", str(tmp_path / "slurm")])
    assert slurm.exit_code == 2 and "MaxTime 00:05:00" in slurm.stderr
