"""Cluster profiles: the shipped ones load, unknown keys are named, the network section exports NCCL's."""

from __future__ import annotations

import os
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from hpc import dsconfig, profiles
from hpc.commands import clusters


def test_shipped_profiles_load() -> None:
    assert {"local", "example-ib"} <= {p["name"] for p in clusters.report(os.environ)["profiles"]}
    local = profiles.load("local")
    assert (local.partition, local.gpus_per_node, local.max_nodes) == ("debug", 0, 3)
    assert local.environment()["NCCL_IB_DISABLE"] == "1"
    ib = profiles.load("example-ib")
    assert ib.gpu_memory == 80 * 10**9
    assert ib.gpus_per_node == 8 and ib.modules == ("cuda/12.1", "nccl/2.18")
    env = ib.environment()
    assert env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1,mlx5_2,mlx5_3" and env["NCCL_IB_GID_INDEX"] == "3"
    assert "NCCL_IB_DISABLE" not in env
    with pytest.raises(FrozenInstanceError):
        ib.partition = "other"  # type: ignore[misc]


def test_profile_from_path_and_relative_templates(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("gpus_per_node: 4\ntemplates: tpl\npython: /opt/py/bin/python\nsetup: module purge\n")
    site = profiles.load(str(path))
    assert site.templates == str(tmp_path / "tpl") and site.setup == ("module purge",)
    assert site.python == "/opt/py/bin/python" and site.name == str(path)


@pytest.mark.parametrize("data,message", [
    ({"partiton": "x"}, "1 unknown key(s), the first 'partiton'; valid keys: partition, account"),
    ({"network": {"NCCL_IB_HCAS": "x"}}, "network: 1 unknown key(s), the first 'NCCL_IB_HCAS'; valid keys: ib, "
                                         "NCCL_IB_HCA"),
    ({"network": {"ib": "no"}}, "network.ib must be true or false"),
    ({"gpus_per_node": -1}, "gpus_per_node must be a whole number from 0 to 2147483647"),
    ({"max_nodes": 0}, "max_nodes must be a whole number from 1 to 2147483647"),
    ({"env": {"1BAD": "x"}}, "not a shell variable name"),
    ({"env": ["A=1"]}, "env must be a mapping"),
    ({"modules": {"a": 1}}, "modules must be a list of strings"),
    ({"gpu_memory": "lots"}, "gpu_memory:"),
    ({"cpu_bf16": "yes"}, "cpu_bf16 must be true or false, got 'yes'"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_profiles(data: object, message: str) -> None:
    with pytest.raises(profiles.ProfileError) as info:
        profiles.parse("bad", data)  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(profiles.ProfileError, match="choose one of .*local"):
        profiles.load("nowhere")
    with pytest.raises(profiles.ProfileError, match="does not exist"):
        profiles.load("/nonexistent/site.yaml")


def test_cpu_bf16_says_what_precision_auto_knows_of_the_site_s_cpu_nodes() -> None:
    assert profiles.parse("a", {"cpu_bf16": True}).cpus() == dsconfig.Cpus(True, "cluster a's CPU nodes")
    assert profiles.parse("b", {"cpu_bf16": False}).cpus().bf16 is False
    assert profiles.parse("c", {}).cpus().bf16 is None


def test_a_profile_s_unquoted_time_limit_is_slurm_s_hours_minutes_seconds(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("time: 2:00:00\n")
    assert profiles.load(str(path)).time == "2:00:00"


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK"])
def test_a_profile_s_env_may_not_set_a_rank_variable_that_every_task_would_inherit(name: str) -> None:
    # setup.sh exports it to every srun task: RANK, WORLD_SIZE and LOCAL_RANK make each one rank 0 of a world of 1.
    with pytest.raises(profiles.ProfileError) as info:
        profiles.parse("bad", {"env": {name: "0"}})
    assert f"env.{name}" in str(info.value) and "remove it" in str(info.value) and "\n" not in str(info.value)


def test_a_profile_s_env_may_still_set_the_rendezvous_address_and_port() -> None:
    env = profiles.parse("ok", {"env": {"MASTER_ADDR": "ib-head", "MASTER_PORT": "31000"}}).environment()
    assert env == {"MASTER_ADDR": "ib-head", "MASTER_PORT": "31000"}
