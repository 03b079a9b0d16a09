"""End to end on the local 3-node Slurm: `hpcdist submit --wait` trains across nodes n1 and n2."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from slurm_fixtures import REPO, TINY_TRAIN, check_training, environ, hpcdist, job_id_of, requires_slurm

from hpc import jobs, logs, nodelist, ports, ranks, registry

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

# (via, backend, launcher, nodes): every launcher each backend runs under (hpc.spec.VALID_LAUNCHERS), and each
# submit path with every backend and every launcher: every pair of values meets in some job, 8 jobs, not the
# 12 of every triple (HPCDIST_SLURM_FULL=1 runs those). The reliability, drill and container tests submit
# more of the triples for their own ends.
PAIRS = [("ddp", "srun", 2), ("ddp", "torchrun", 2), ("deepspeed", "srun", 2), ("deepspeed", "torchrun", 2),
         ("deepspeed", "deepspeed", 2), ("dp", "srun", 1)]
VIAS = ("sbatch", "submitit")
PAIRWISE = [("sbatch", "dp", "srun", 1), ("sbatch", "ddp", "torchrun", 2), ("sbatch", "deepspeed", "srun", 2),
            ("sbatch", "deepspeed", "deepspeed", 2), ("submitit", "dp", "srun", 1), ("submitit", "ddp", "srun", 2),
            ("submitit", "deepspeed", "torchrun", 2), ("submitit", "deepspeed", "deepspeed", 2)]
CASES = [(via, *pair) for via in VIAS for pair in PAIRS] if os.environ.get("HPCDIST_SLURM_FULL") == "1" else PAIRWISE

HOLD = ("import socket, sys; s = socket.socket(); s.bind(('', int(sys.argv[1]))); s.listen(); "
        "print('held', flush=True); sys.stdin.read()")


@contextlib.contextmanager
def held_on_every_node(*held: int) -> Iterator[None]:
    """Another program listening on each port of ``held`` on each node (in the node's network namespace,
    scripts/slurm-local.sh), until the block ends."""
    spaces = [Path("/run/netns", f"n{i}") for i in (1, 2, 3)]
    enter = [["nsenter", f"--net={space}"] for space in spaces if space.exists()] or [[]]
    holders = [subprocess.Popen([*prefix, sys.executable, "-c", HOLD, str(port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for prefix in enter for port in held]
    try:
        assert all(h.stdout.readline() == "held\n" for h in holders), f"could not hold ports {held}"
        yield
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def submit_and_check(tmp_path, via: str, backend: str, launcher: str, nodes: int) -> None:
    """A two-node job starts with the port its id derives held on every node (a job's id is known once submitted:
    it waits on a held job until the port is taken) and trains on a port no job id derives."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    blocker = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "true"],
                             capture_output=True, text=True, check=True).stdout.strip()
    args = ["submit", "--via", via, "--nodes", str(nodes), "--backend", backend, "--launcher", launcher,
            "--time", "10", "--job-name", f"e2e-{via}-{backend}-{launcher}", "--job-dir", str(job_dir), "--wait",
            "--after", f"{blocker}:any"]
    if backend == "deepspeed":
        args += ["--zero-stage", "2", "--precision", "fp32"]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "hpc", *args, "--", *TINY_TRAIN], cwd=REPO, env=environ(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    job_id = job_id_of(first)
    with held_on_every_node(ranks.port_for_job(job_id)) if nodes > 1 else contextlib.nullcontext():
        subprocess.run(["scancel", blocker], check=True)
        out, err = proc.communicate(timeout=600)
    took = time.monotonic() - started
    print(f"TIMING via={via} backend={backend} launcher={launcher} nodes={nodes} submit->done {took:.1f}s")
    assert proc.returncode == 0, first + out + err
    assert f"{job_id}  COMPLETED  exit=0" in out

    # Where Slurm put the job, from accounting: the ranks must have run exactly there.
    state = jobs.slurm_state(job_id)
    hosts = nodelist.expand(state.nodelist)
    assert len(hosts) == nodes, state
    if nodes == 2:
        assert hosts == ["n1", "n2"], f"expected the idle cluster's first two nodes, got {hosts}"
    summary = check_training(job_dir, world_size=nodes, hosts=hosts, master=hosts[0] if nodes > 1 else None)
    if nodes > 1 and launcher == "srun":  # torchrun's and DeepSpeed's ranks get a port their agent picks
        assert {r["master_port"] for r in summary["ranks"]} <= set(ports.fallbacks(ports.EPHEMERAL)), summary["ranks"]
    if via == "submitit":
        assert list((job_dir / "submitit").glob(f"{job_id}_submission.sh"))
    assert [p.name for p in logs.log_files(registry.read_marker(job_dir))][:nodes] == [
        f"task-{i}.log" for i in range(nodes)]

    listed = hpcdist(["list"], home)
    assert job_id in listed.stdout and "COMPLETED" in listed.stdout
    status = hpcdist(["status", str(job_dir)], home)
    assert status.returncode == 0 and "COMPLETED" in status.stdout


def test_the_submit_paths_meet_every_backend_and_launcher():
    def pairs(i: int, j: int) -> set:
        return {(c[i], c[j]) for c in CASES}
    assert pairs(1, 2) == {(b, la) for b, la, _ in PAIRS}
    assert pairs(0, 1) == {(v, b) for v in VIAS for b, _, _ in PAIRS}
    assert pairs(0, 2) == {(v, la) for v in VIAS for _, la, _ in PAIRS}


@pytest.mark.parametrize("via,backend,launcher,nodes", CASES, ids=[f"{v}-{b}-{la}" for v, b, la, _ in CASES])
def test_a_job_trains_across_the_nodes_slurm_gave_it(tmp_path, via, backend, launcher, nodes):
    submit_and_check(tmp_path, via, backend, launcher, nodes)


def test_two_jobs_with_consecutive_ids_and_both_derived_ports_held_train_at_once_on_ports_of_their_own(tmp_path):
    # Stepping on from a held derived port (reverted in dcde424) took job N to N+2's port... and job N+1 to the same:
    # two jobs met in one rendezvous. A fallback is never a port a job id derives, so neither can take the other's.
    blocker = subprocess.run(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "true"],
                             capture_output=True, text=True, check=True).stdout.strip()
    home, runs = tmp_path / "home", []
    for name in ("first", "second"):
        args = ["submit", "--via", "sbatch", "--nodes", "2", "--backend", "ddp", "--time", "10", "--job-name",
                f"e2e-ports-{name}", "--job-dir", str(tmp_path / name), "--wait", "--after", f"{blocker}:any"]
        runs.append(subprocess.Popen([sys.executable, "-m", "hpc", *args, "--", *TINY_TRAIN], cwd=REPO,
                                     env=environ(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    job_ids = [job_id_of(run.stdout.readline()) for run in runs]
    # Submitted at once, either may come first, and another job (even an sbatch --test-only) may take an id between:
    # every derived port from the first id to the last is held, so a step from one lands on the other's.
    low, high = sorted(int(job_id) for job_id in job_ids)
    assert high - low < 5, job_ids
    together = False
    with held_on_every_node(*(ranks.port_for_job(str(job_id)) for job_id in range(low, high + 1))):
        subprocess.run(["scancel", blocker], check=True)
        deadline = time.monotonic() + 600
        while any(run.poll() is None for run in runs) and time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%T"], capture_output=True,
                                   text=True).stdout.split()
            together |= queue == ["RUNNING", "RUNNING"]
            time.sleep(0.2)
        ended = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], ended
    assert together, "the two jobs never ran at once"
    used = [{r["master_port"] for r in check_training(tmp_path / name, 2, ["n1", "n2"], "n1")["ranks"]}
            for name in ("first", "second")]
    assert used[0] != used[1] and used[0] | used[1] <= set(ports.fallbacks(ports.EPHEMERAL)), used


def test_a_failing_job_exits_non_zero_and_shows_the_failing_tasks_log(tmp_path):
    """A failure only the ranks can see (a relative --data-dir resolves on the nodes, so render cannot check
    it): --wait reports FAILED and leads with the failing rank's own error line, then that task's log."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    proc = hpcdist(["submit", "--nodes", "2", "--backend", "ddp", "--time", "5", "--job-dir", str(job_dir),
                    "--wait", "--", "--dataset", "cifar10", "--data-dir", "no-such-dir"], home, timeout=300)
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
    lead = next(line for line in proc.stderr.splitlines() if line.startswith("hpcdist: bad_input: rank "))
    assert "no-such-dir/cifar-10-batches-py" in lead, proc.stderr
    assert "(the failing task)" in proc.stderr
