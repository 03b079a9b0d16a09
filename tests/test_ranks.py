"""Rank resolution: tables of environments -> rank, world size, local rank, MASTER_ADDR/PORT."""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from slurm_fixtures import REPO, requires_slurm

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
                                 "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "4"},
     0, 4, 0, 4, 0, "node0007", 12000 + 4242, "slurm"),
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
    assert dist.origin["world_size"] == "SLURM_NTASKS"
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
    ({**SRUN_TASK, "SLURM_PROCID": "\u0663"}, "not an integer"),            # an Arabic-Indic 3
    ({**SRUN_TASK, "MASTER_PORT": "70000"}, "not a TCP port"),
    ({**SRUN_TASK, "MASTER_PORT": "-1"}, "not a TCP port"),
    ({**SRUN_TASK, "MASTER_PORT": "0"}, "not a TCP port"),
    ({**SRUN_TASK, "MASTER_PORT": "29500.0"}, "not an integer"),
    ({**SRUN_TASK, "SLURM_STEP_NODELIST": "n[1-3]-ib"}, "SLURM_STEP_NODELIST: .*text after"),
])
def test_inconsistent_environments_are_errors(environ, message):
    with pytest.raises(ranks.RankError, match=message):
        ranks.resolve(environ)


ONE_NODE = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
            "SLURM_JOB_ID": "7"}


@pytest.mark.parametrize("environ,message", [
    ({**TORCHRUN, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"},
     "local rank 0 (LOCAL_RANK='0') is outside local world size 0 (LOCAL_WORLD_SIZE='0') (torchrun)"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "16"},
     "local world size 16 (LOCAL_WORLD_SIZE='16') is over world size 8 (WORLD_SIZE='8') (torchrun)"),
    ({**TORCHRUN, "LOCAL_RANK": "4"},
     "local rank 4 (LOCAL_RANK='4') is outside local world size 4 (LOCAL_WORLD_SIZE='4') (torchrun)"),
    ({**TORCHRUN, "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "2"},
     "node rank 2 (GROUP_RANK='2') is outside 2 node(s) (GROUP_WORLD_SIZE='2') (torchrun)"),
    ({**TORCHRUN, "GROUP_RANK": "-1"}, "node rank -1 (GROUP_RANK='-1') is negative (torchrun)"),
    ({**SRUN_TASK, "SLURM_TASKS_PER_NODE": "2(x3),1"},
     "7 task(s) (SLURM_TASKS_PER_NODE='2(x3),1') is not world size 4 (SLURM_NTASKS='4') (slurm)"),
    ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1,2"},
     "3 task(s) (SLURM_STEP_TASKS_PER_NODE='1,2') is not world size 4 (SLURM_STEP_NUM_TASKS='4') (slurm)"),
    ({**SRUN_TASK, "SLURM_NNODES": "3"},
     "2 node(s) (SLURM_TASKS_PER_NODE='2(x2)') is not 3 node(s) (SLURM_NNODES='3') (slurm)"),
    ({**SRUN_TASK, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-3]"},
     "2 node(s) (SLURM_TASKS_PER_NODE='2(x2)') is not 3 node(s) (SLURM_STEP_NODELIST='n[1-3]') (slurm)"),
    ({**SRUN_TASK, "SLURM_JOB_NODELIST": "n1"},
     "2 node(s) (SLURM_TASKS_PER_NODE='2(x2)') is over the allocation's 1 node(s) (SLURM_JOB_NODELIST='n1') (slurm)"),
    ({**ONE_NODE, "SLURM_NODEID": "1", "SLURM_NNODES": "1"},
     "node rank 1 (SLURM_NODEID='1') is outside 1 node(s) (SLURM_NNODES='1') (slurm)"),
    ({**ONE_NODE, "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "n1"},
     "node rank 1 (SLURM_NODEID='1') is outside 1 node(s) (SLURM_STEP_NODELIST='n1') (slurm)"),
    ({"SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_NODEID": "-1"},
     "node rank -1 (SUBMITIT_LOCAL_NODEID='-1') is negative (submitit-local)"),
])
def test_variables_that_disagree_on_the_geometry_are_refused_in_one_line_naming_them(environ, message):
    with pytest.raises(ranks.RankError) as refused:
        ranks.resolve(environ)
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("fix or unset the stale one")


def test_a_step_on_part_of_the_allocation_may_have_fewer_nodes_than_the_allocations_nodelist():
    # SRUN_TASK's step runs on 2 of the 6 nodes SLURM_JOB_NODELIST names, as srun -N2 in a 6-node job does.
    assert ranks.resolve({**SRUN_TASK, "SLURM_NNODES": "2"}).node_rank == 1


HUGE = "9" * 5000  # more digits than Python's int() reads (4,300)


@pytest.mark.parametrize("name", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "MASTER_PORT"])
def test_a_number_of_thousands_of_digits_is_an_inconsistent_environment(name):
    with pytest.raises(ranks.RankError, match=f"^{name}='9{{59}}\\.\\.\\. has 5000 digits"):
        ranks.resolve({**SRUN_TASK, name: HUGE})


@pytest.mark.parametrize("tasks_per_node", [HUGE, f"2(x{HUGE})", f"{HUGE}(x2)"])
def test_tasks_per_node_of_thousands_of_digits_does_not_parse(tasks_per_node):
    with pytest.raises(ranks.RankError, match="does not parse"):
        ranks.resolve({**SRUN_TASK, "SLURM_TASKS_PER_NODE": tasks_per_node})


def test_leading_zeros_do_not_count_as_digits():
    assert ranks.resolve({**SRUN_TASK, "SLURM_PROCID": "0" * 5000 + "3"}).rank == 3
    assert ranks.tasks_on_node("0" * 5000 + "2(x2)", 1) == 2


def test_a_job_id_of_thousands_of_digits_derives_the_port_its_number_would():
    assert ranks.resolve({**SRUN_TASK, "SLURM_JOB_ID": HUGE}).master_port == 12000 + int("9" * 9) % 20000
    assert ranks.port_for_job("12345678901234567890") == 12000 + 12345678901234567890 % 20000


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


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000])  # a superscript two passes str.isdigit(), not int()
def test_a_thread_or_cpu_count_that_is_no_count_is_as_good_as_unset(value):
    dist = ranks.resolve(SRUN_TASK)
    assert ranks.threads_per_rank({**SRUN_TASK, "OMP_NUM_THREADS": value}, 4, dist) == 2
    assert ranks.threads_per_rank({"SLURM_CPUS_PER_TASK": value}, 4, ranks.resolve({})) == 4


def test_master_port_wins_then_the_port_the_local_runner_chose_then_the_one_derived_from_the_job_id():
    local = {**SRUN_TASK, "HPCDIST_MASTER_PORT": "40123"}
    assert ranks.resolve(local).master_port == 40123
    assert ranks.resolve(local).origin["master_port"] == "HPCDIST_MASTER_PORT"
    assert ranks.resolve({**local, "MASTER_PORT": "23456"}).master_port == 23456  # the profile's env, say
    assert ranks.resolve(SRUN_TASK).origin["master_port"] == "derived from SLURM_JOB_ID"
    with pytest.raises(ranks.RankError, match="HPCDIST_MASTER_PORT=70000 is not a TCP port"):
        ranks.resolve({**SRUN_TASK, "HPCDIST_MASTER_PORT": "70000"})


def test_the_highest_port_is_a_port():
    assert ranks.resolve({**SRUN_TASK, "MASTER_PORT": "65535"}).master_port == 65535


def test_blank_separated_nodelists_resolve_as_slurm_and_lightning_read_them():
    assert ranks.resolve({**SRUN_TASK, "SLURM_JOB_NODELIST": "node7 node3,node9"}).master_addr == "node7"


def test_tasks_per_node_repeats_are_counted_not_built():
    started = time.process_time()  # CPU time: the CPUs may be shared (scripts/test.sh)
    assert ranks.tasks_on_node("8(x100000000),2", 100000000) == 2
    assert time.process_time() - started < 0.5  # the guard against a 10**8-element list, not a speed goal
    with pytest.raises(ranks.RankError, match="outside"):
        ranks.tasks_on_node("8(x2)", 2)


# Steps that differ from their allocation, captured on the local 3-node cluster by
# scripts/capture-slurm-steps.sh: a step on nodes 2-3 of n[1-3] (srun -N2 -r1), the same under srun -E,
# 5 tasks over 3 nodes, and 3 tasks on n1 and n3.
STEPS = json.loads((Path(__file__).parent / "data" / "slurm_steps.json").read_text())


@pytest.mark.parametrize("step", sorted(STEPS))
def test_real_steps_resolve_to_the_step_not_the_allocation(step):
    tasks = STEPS[step]
    per_node = Counter(t["SLURMD_NODENAME"] for t in tasks)
    rank0_host = next(t["SLURMD_NODENAME"] for t in tasks if t["SLURM_PROCID"] == "0")
    resolved = [ranks.resolve(t) for t in tasks]
    # The truth is where each task really ran: rank 0's node, the step's task count, the tasks beside it.
    for task, dist in zip(tasks, resolved):
        assert dist.source == "slurm"
        assert dist.rank == int(task["SLURM_PROCID"])
        assert dist.world_size == len(tasks)
        assert dist.master_addr == rank0_host
        assert dist.local_world_size == per_node[task["SLURMD_NODENAME"]]
    assert sorted(d.rank for d in resolved) == list(range(len(tasks)))
    # Each node has one node rank, the nodes are 0..n-1, and a node's local ranks are 0..k-1.
    node_ranks = {t["SLURMD_NODENAME"]: set() for t in tasks}
    local_ranks = {t["SLURMD_NODENAME"]: [] for t in tasks}
    for task, dist in zip(tasks, resolved):
        node_ranks[task["SLURMD_NODENAME"]].add(dist.node_rank)
        local_ranks[task["SLURMD_NODENAME"]].append(dist.local_rank)
    assert sorted(n for ns in node_ranks.values() for n in ns) == list(range(len(per_node)))
    assert all(sorted(lrs) == list(range(per_node[h])) for h, lrs in local_ranks.items())


def test_the_captured_steps_are_the_cases_that_matter():
    """The fixture holds what makes job-level values wrong; a recapture that lost it would prove nothing."""
    partial = STEPS["partial"][0]
    assert partial["SLURM_JOB_NODELIST"] == "n[1-3]" and partial["SLURM_STEP_NODELIST"] == "n[2-3]"
    preserved = STEPS["preserve-env"][0]
    assert preserved["SLURM_NTASKS"] == "6" and preserved["SLURM_STEP_NUM_TASKS"] == "2"
    assert preserved["SLURM_TASKS_PER_NODE"] == "2(x3)" and preserved["SLURM_STEP_TASKS_PER_NODE"] == "1(x2)"
    dist = ranks.resolve(preserved)
    assert dist.origin["master_addr"] == "first host of SLURM_STEP_NODELIST"
    assert dist.origin["world_size"] == "SLURM_STEP_NUM_TASKS"
    assert dist.origin["local_world_size"] == "SLURM_STEP_TASKS_PER_NODE"


@pytest.mark.slurm
@requires_slurm
def test_a_step_on_part_of_the_allocation_points_at_its_own_first_host(tmp_path):
    """Live: in a 3-node allocation a 2-node step starting at the second node rendezvouses there."""
    probe = ('echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_JOB_NODELIST $(PYTHONPATH=' + str(REPO) + ' '
             + sys.executable + ' -m hpc env --shell | tr "\\n" " ")"')
    proc = subprocess.run(["salloc", "-N3", "-n3", "-p", "debug", "-t", "2", "srun", "-N2", "-n2", "-r1",
                           "bash", "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split() for line in proc.stdout.splitlines() if line[:1].isdigit())
    assert [line[0] for line in lines] == ["0", "1"], proc.stdout
    rank0_host, job_nodelist = lines[0][1], lines[0][2]
    job_first = subprocess.run(["scontrol", "show", "hostnames", job_nodelist], capture_output=True,
                               text=True).stdout.split()[0]
    assert rank0_host != job_first  # -r1: the step does not start on the allocation's first node
    for line in lines:
        assert f"MASTER_ADDR={rank0_host}" in line, line


def test_the_attempt_is_the_batch_shells_number_else_slurms_restart_count():
    assert ranks.attempt_of({"HPCDIST_ATTEMPT": "3", "SLURM_RESTART_COUNT": "1"}) == 3
    assert ranks.attempt_of({"SLURM_RESTART_COUNT": "1"}) == 1
    assert ranks.attempt_of({"HPCDIST_ATTEMPT": "x", "SLURM_RESTART_COUNT": "2"}) == 2
    assert ranks.attempt_of({}) == 0 and ranks.attempt_of({"SLURM_RESTART_COUNT": "1" * 12}) == 0


@pytest.mark.parametrize(("environ", "hosts"), [
    ({**SRUN_TASK, "SLURMD_NODENAME": "gpu-001"}, True),
    ({**SRUN_TASK, "SLURMD_NODENAME": "gpu-002"}, False),
    ({**SRUN_TASK, "SLURMD_NODENAME": "gpu-001", "MASTER_ADDR": "ib-host"}, None),  # given: only torch can tell
    (SRUN_TASK, None),
    ({}, None),
])
def test_the_step_s_first_node_alone_hosts_torchruns_rendezvous_and_a_given_master_addr_is_left_to_torch(
        environ, hosts):
    # Left to guess, the host that finds MASTER_PORT taken joins the port's holder as a client and waits.
    assert ranks.hosts_rendezvous(ranks.resolve(environ), environ) is hosts


def test_env_shell_sets_torchruns_rdzv_conf_beside_master_addr_and_port():
    def shell(environ):
        return subprocess.run([sys.executable, "-m", "hpc", "env", "--shell"], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **environ}, cwd=REPO, check=True).stdout.splitlines()
    assert shell({**SRUN_TASK, "SLURMD_NODENAME": "gpu-003"}) == [
        "export MASTER_ADDR=gpu-001", f"export MASTER_PORT={12000 + 4242}", "rdzv_conf=is_host=0"]
    assert shell({**SRUN_TASK, "SLURMD_NODENAME": "gpu-001"})[-1] == "rdzv_conf=is_host=1"
    assert shell({**SRUN_TASK, "MASTER_ADDR": "ib-host"})[-1] == "rdzv_conf="


@pytest.mark.parametrize("addr", ["", "head node; rm -rf x", "a\nb", "$(hostname)"])
def test_a_master_addr_that_is_no_host_name_or_address_is_refused_in_one_line(addr):
    with pytest.raises(ranks.RankError) as refused:
        ranks.resolve({**TORCHRUN, "MASTER_ADDR": addr})
    assert "MASTER_ADDR=" in str(refused.value) and "unset it" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("addr", ["node7", "ib-head.cluster.local", "10.0.0.1", "::1", "fe80::1%ib0", "gpu_01"])
def test_a_master_addr_that_is_a_host_name_or_address_is_taken_as_given(addr):
    assert ranks.resolve({**TORCHRUN, "MASTER_ADDR": addr}).master_addr == addr


@pytest.mark.parametrize("nodelist", ["gpu-[3-1]", "n[1-2", ""])
def test_a_nodelist_slurm_would_not_write_is_refused_naming_its_variable_and_the_fix(nodelist):
    with pytest.raises(ranks.RankError) as refused:
        ranks.resolve({**SRUN_TASK, "SLURM_JOB_NODELIST": nodelist})
    assert str(refused.value).startswith("SLURM_JOB_NODELIST: ") and str(refused.value).endswith("; fix or unset it")
