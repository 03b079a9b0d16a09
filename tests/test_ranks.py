"""Rank resolution: tables of environments -> rank, world size, local rank, MASTER_ADDR/PORT."""

import pytest

from hpc import ranks

SRUN_TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2(x2)",
             "SLURM_JOB_NODELIST": "gpu-[001-003,010],cpu[1-2]", "SLURM_JOB_ID": "4242"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}

CASES = [
    # (name, environment, rank, world_size, local_rank, local_world_size, node_rank, master_addr, master_port, source)
    ("nothing set", {}, 0, 1, 0, 1, 0, "127.0.0.1", 29500, "single"),
    ("srun task, hard nodelist", SRUN_TASK, 3, 4, 1, 2, 1, "gpu-001", 12000 + 4242, "slurm"),
    ("srun task, existing MASTER_* wins", {**SRUN_TASK, "MASTER_ADDR": "ib-host", "MASTER_PORT": "31000"},
     3, 4, 1, 2, 1, "ib-host", 31000, "slurm"),
    ("torchrun inside a Slurm task wins over SLURM_*", {**SRUN_TASK, **TORCHRUN}, 5, 8, 1, 4, 1, "node7", 29400,
     "torchrun"),
    ("batch step is not a task", {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"},
     0, 1, 0, 1, 0, "127.0.0.1", 29500, "single"),
    ("uneven tasks per node", {**SRUN_TASK, "SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_NODEID": "2",
                               "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2),1"},
     4, 5, 0, 1, 2, "gpu-001", 12000 + 4242, "slurm"),
    ("job id wraps into the port span", {**SRUN_TASK, "SLURM_JOB_ID": "23946901"},
     3, 4, 1, 2, 1, "gpu-001", 12000 + 23946901 % 20000, "slurm"),
    ("array job id with underscore", {**SRUN_TASK, "SLURM_JOB_ID": "77_3"}, 3, 4, 1, 2, 1, "gpu-001",
     12000 + 773, "slurm"),
    ("submitit local task", {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                             "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
                             "SUBMITIT_LOCAL_JOB_ID": "991"}, 1, 2, 1, 2, 0, "127.0.0.1", 12991, "submitit-local"),
    ("zero-padded single node", {**SRUN_TASK, "SLURM_JOB_NODELIST": "node[0007]", "SLURM_PROCID": "0",
                                 "SLURM_NODEID": "0", "SLURM_LOCALID": "0"},
     0, 4, 0, 2, 0, "node0007", 12000 + 4242, "slurm"),
]


@pytest.mark.parametrize("name,environ,rank,world,local,local_world,node,addr,port,source", CASES,
                         ids=[c[0] for c in CASES])
def test_resolve(name, environ, rank, world, local, local_world, node, addr, port, source):
    dist = ranks.resolve(environ)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size, dist.node_rank) == \
        (rank, world, local, local_world, node)
    assert (dist.master_addr, dist.master_port, dist.source) == (addr, port, source)


def test_origin_names_the_variable_each_value_came_from():
    dist = ranks.resolve(SRUN_TASK)
    assert dist.origin["rank"] == "SLURM_PROCID"
    assert dist.origin["master_addr"] == "first host of SLURM_JOB_NODELIST"
    assert dist.origin["master_port"] == "derived from SLURM_JOB_ID"


def test_derived_ports_stay_below_the_ephemeral_range():
    ports = {ranks.port_for_job(str(j)) for j in range(0, 200000, 7)}
    assert min(ports) >= 1024 and max(ports) < 32768


@pytest.mark.parametrize("environ,message", [
    ({**SRUN_TASK, "SLURM_PROCID": "4"}, "outside world size"),
    ({**SRUN_TASK, "SLURM_PROCID": "x"}, "not an integer"),
    ({**SRUN_TASK, "SLURM_JOB_NODELIST": "gpu-[3-1]"}, "runs backwards"),
    ({**SRUN_TASK, "SLURM_TASKS_PER_NODE": "two"}, "does not parse"),
    ({**TORCHRUN, "RANK": "9"}, "outside world size"),
])
def test_inconsistent_environments_are_errors(environ, message):
    with pytest.raises(ranks.RankError, match=message):
        ranks.resolve(environ)


@pytest.mark.parametrize("environ,cpus,expected", [
    ({}, 2, 2),                                                      # one process owns the machine
    ({"OMP_NUM_THREADS": "3"}, 2, 3),                                # explicit wins
    ({**SRUN_TASK, "SLURM_CPUS_PER_TASK": "1"}, 2, 1),               # srun task owns its CPUs
    ({**SRUN_TASK}, 2, 1),                                           # 2 local tasks share 2 cores
    ({**TORCHRUN, "SLURM_CPUS_PER_TASK": "8"}, 16, 2),               # torchrun: 4 ranks split one task
])
def test_threads_per_rank_never_oversubscribe(environ, cpus, expected):
    dist = ranks.resolve(environ)
    assert ranks.threads_per_rank(environ, cpus, dist) == expected
