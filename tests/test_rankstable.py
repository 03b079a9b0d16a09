"""hpc.rankstable: ranks.txt, what each rank of a job will see."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_render import SITE, builtin, golden_spec

from hpc import profiles, render
from hpc.rankstable import ranks_table


def _rows(table: str) -> list[list[str]]:
    """The table's rows under its '#' header lines and column names."""
    return [line.split() for line in table.splitlines() if not line.startswith("#")][1:]


def test_ranks_table_with_nodelist() -> None:
    spec = replace(golden_spec("ddp", "srun"), nodelist="n[1-2]")
    table = ranks_table(render.render(spec, SITE, search=builtin()).spec, {})
    rows = _rows(table)
    assert [r[:4] for r in rows] == [["0", "0", "0", "n1"], ["1", "1", "0", "n1"], ["2", "0", "1", "n2"],
                                     ["3", "1", "1", "n2"]]
    assert {r[4] for r in rows} == {"n1"} and {r[5] for r in rows} == {"12000+JOBID%20000"}
    assert "# 4 rank(s) = 2 node(s) x 2; rank = node_rank * 2 + local_rank." in table.splitlines()


def test_ranks_table_placeholders_show_the_port_rule() -> None:
    files = render.render(golden_spec("deepspeed", "deepspeed"), SITE, search=builtin()).files
    lines = files["ranks.txt"].splitlines()
    assert len(_rows(files["ranks.txt"])) == 4 and "# Every rank is listed." in lines
    assert "<node1>" in lines[-1] and "12000+JOBID%20000" in lines[-1]
    assert ("# master_port: 12000+JOBID%20000, the same for every rank; where another program holds it on the batch "
            "host as the allocation starts, a free port no job id derives (above 31999, outside the kernel's "
            "ephemeral range; hpc/ports.py).") in lines


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_ranks_table_beyond_its_size_lists_each_nodes_first_and_last_rank(launcher: str) -> None:
    spec = replace(golden_spec("ddp", launcher), nodes=3, gpus_per_node=4, nodelist="gpu[07-09]",
                   train_args=("--batch-size", "96"))
    table = ranks_table(render.render(spec, SITE, search=builtin()).spec, {}, full_up_to=8)
    assert [r[:4] for r in _rows(table)] == [
        ["0", "0", "0", "gpu07"], ["3", "3", "0", "gpu07"], ["4", "0", "1", "gpu08"], ["7", "3", "1", "gpu08"],
        ["8", "0", "2", "gpu09"], ["11", "3", "2", "gpu09"]]
    assert any("only the first and last rank of each node are listed" in line for line in table.splitlines())


def test_ranks_table_of_one_rank_per_node_lists_it_once() -> None:
    spec = replace(golden_spec("ddp", "srun"), nodes=3, gpus_per_node=1, train_args=("--batch-size", "96"))
    table = ranks_table(render.render(spec, SITE, search=builtin()).spec, {}, full_up_to=2)
    assert [r[0] for r in _rows(table)] == ["0", "1", "2"]


def test_a_local_jobs_table_shows_the_port_its_runner_asks_the_os_for_not_the_derived_one() -> None:
    table = render.render(golden_spec("ddp", "srun"), SITE, search=builtin(), local=True).files["ranks.txt"]
    assert {r[5] for r in _rows(table)} == {"free-at-submit"}
    assert any("the same for every rank" in line for line in table.splitlines() if line.startswith("#"))


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
@pytest.mark.parametrize("local", [False, True])
def test_a_master_addr_and_port_the_profiles_env_gives_the_tasks_are_the_ones_the_table_shows(
        launcher: str, local: bool) -> None:
    site = profiles.parse("pinned", {"gpus_per_node": 4, "env": {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}})
    spec = replace(golden_spec("deepspeed" if launcher == "deepspeed" else "ddp", launcher), nodelist="n[1-2]")
    table = render.render(spec, site, search=builtin(), local=local).files["ranks.txt"]
    assert {(r[4], r[5]) for r in _rows(table)} == {("10.1.2.3", "23456")}
    assert "free-at-submit" not in table


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
@pytest.mark.parametrize("nodelist", [None, "n[1-2]"])
def test_a_local_jobs_table_shows_the_loopback_nodes_its_runner_emulates(launcher: str, nodelist: str | None) -> None:
    spec = replace(golden_spec("deepspeed" if launcher == "deepspeed" else "ddp", launcher), nodelist=nodelist)
    table = render.render(spec, SITE, search=builtin(), local=True).files["ranks.txt"]
    assert [(r[2], r[3], r[4]) for r in _rows(table)] == [
        ("0", "127.0.0.1", "127.0.0.1"), ("0", "127.0.0.1", "127.0.0.1"),
        ("1", "127.0.0.2", "127.0.0.1"), ("1", "127.0.0.2", "127.0.0.1")]


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("local", [False, True])
def test_a_torchrun_tables_master_is_the_one_torchruns_rendezvous_hands_its_ranks_not_its_endpoint(
        nodes: int, local: bool) -> None:
    site = profiles.parse("pinned", {"gpus_per_node": 4, "env": {"MASTER_PORT": "23456"}})
    spec = replace(golden_spec("ddp", "torchrun"), nodes=nodes)
    table = render.render(spec, site, search=builtin(), local=local).files["ranks.txt"]
    assert {(r[4], r[5]) for r in _rows(table)} == {("torchrun-picks", "torchrun-picks")}
    assert any("agent it ranked first" in line for line in table.splitlines() if line.startswith("#"))
