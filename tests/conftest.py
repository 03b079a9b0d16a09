"""Fixtures for the trainer's tests: ``python -m train`` as 2 CPU ranks, started as srun, torchrun or deepspeed do."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import settings

from hpc import checkpoints

REPO = Path(__file__).resolve().parents[1]

# The fuzz tests draw new hostile inputs on every run here; CI (.ci/run sets CI=1) draws the same ones every
# time, so that a merge is judged on the code, while a new finding surfaces on a developer's run with the
# blob that replays it (@reproduce_failure). No deadline in CI: scripts/test.sh runs the untimed tests at the
# lowest CPU priority beside the cluster's, where one example may wait seconds for a CPU.
settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", print_blob=True, derandomize=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
# Variables a surrounding launcher may have set; each test launch describes its geometry from scratch.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "OMP_NUM_THREADS")


def pytest_collection_modifyitems(config, items) -> None:
    # Slurm keeps the job of a node killed for real COMPLETING there for 20-40 s after the node is revived, and
    # the next test waits that out for its nodes: the tests that kill one run last (in their own order).
    items.sort(key=lambda item: item.get_closest_marker("kills_node") is not None)


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """A trainer run in this process exports its rendezvous (MASTER_PORT, RANK, ...) into os.environ, as a real
    one does for torch: left there, it would make a later test's trainer rendezvous on a stale port and hang."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def _unanswering_nodes() -> list[str]:
    """'NODE why' for each node whose slurmd is dead or that Slurm holds down or drained, or has not heard from."""
    script = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "status"], capture_output=True,
                            text=True, check=False).stdout
    dead = {f"{Path(line.split()[0]).stem.removeprefix('slurmd-')} slurmd dead" for line in script.splitlines()
            if "/slurmd-" in line and line.endswith("DEAD")}
    shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=False).stdout
    # sinfo's short states: down, drain, drng (draining), fail, failg (failing); '*' marks one not heard from.
    return sorted(dead | {line for line in shown.splitlines() if line.endswith("*")
                          or line.partition(" ")[2].startswith(("down", "drain", "drng", "fail"))})


@pytest.fixture(autouse=True)
def _every_node_answers_after_a_node_was_killed(request):
    """A test that kills a node must leave it answering Slurm: a dead one holds up every later test that needs
    three nodes, which then fail far from the cause. It is revived here, and the test that left it fails."""
    yield
    if request.node.get_closest_marker("kills_node") is None or shutil.which("sinfo") is None:
        return
    deadline = time.monotonic() + 60  # Slurm may still be clearing the dead node's job after its revival
    while (left := _unanswering_nodes()) and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        for node in {line.split()[0] for line in left}:
            subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "revive", node], check=False,
                           capture_output=True)
        pytest.fail(f"the test left node(s) not answering Slurm: {', '.join(left)} (revived now)")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Launch:
    """Two CPU ranks of the trainer, one thread each; logs land beside the run directory."""

    WAYS = ("srun", "torchrun", "deepspeed")

    def __init__(self, way: str, args: list[str], run_dir: Path, job_id: int | None = None,
                 node_memory: list[Path] | None = None, file_limit: tuple[int, int] | None = None) -> None:
        self.way, self.run_dir, self.job_id = way, run_dir, job_id
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARIABLES}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        trainer = ["-m", "train", "--run-dir", str(run_dir), *args]
        self.logs = [run_dir.with_name(f"{run_dir.name}.{way}.{i}.log") for i in range(2 if way == "srun" else 1)]
        if way == "srun":
            # A job id given again is a relaunch in the same allocation, as the batch shell's.
            job_id = self.job_id = job_id or next(j for j in iter(lambda: random.randrange(10**6), None)
                                                  if _port_is_free(12000 + j % 20000))
            envs = [{**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                     "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2",
                     "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id)} for r in range(2)]
            if node_memory:
                # Two nodes of one rank each, each with memory of its own for snapshots (a folder here).
                for r, (rank_env, memory) in enumerate(zip(envs, node_memory)):
                    rank_env.update(SLURM_LOCALID="0", SLURM_NODEID=str(r), SLURM_TASKS_PER_NODE="1(x2)",
                                    SLURM_JOB_NODELIST="localhost,localhost", HPCDIST_SNAPSHOT_DIR=str(memory))
            commands = [[sys.executable, *trainer]] * 2
        elif way == "torchrun":
            envs = [env]
            commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         *trainer]]
        elif way == "deepspeed":
            port = next(p for p in iter(lambda: random.randrange(20000, 32000), None) if _port_is_free(p))
            envs = [env]
            commands = [[sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                         "--master_port", str(port), "--module", *trainer[1:]]]
        else:
            raise ValueError(f"unknown launch way {way!r}; use one of {self.WAYS}")
        self.started = time.monotonic()
        # file_limit (srun's rank, bytes): that rank alone writes no file past the size, as under a quota.
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit[1], file_limit[1]))

        self.procs = [subprocess.Popen(cmd, env=e, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                       preexec_fn=limit if file_limit and file_limit[0] == r else None)
                      for r, (cmd, e, log) in enumerate(zip(commands, envs, self.logs))]

    def signal(self, signum: int = signal.SIGUSR1) -> None:
        for p in self.procs:
            p.send_signal(signum)

    def wait(self, timeout: float = 300) -> list[int]:
        try:
            codes = [p.wait(timeout=max(timeout - (time.monotonic() - self.started), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
            pytest.fail(f"{self.way} launch ran past {timeout}s:\n{self.output()}")
        self.seconds = time.monotonic() - self.started
        return codes

    def output(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-tail:]}" for log in self.logs)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, worker_id):
    """``uninterrupted(args, two_nodes=False)``: the run directory of one srun-style run of ``args`` to its end,
    its snapshots in folders of its own (one per node). Made once per test session, shared by the workers: the
    tests that resume a run to the losses of the same uninterrupted one compare against one run, not one each.
    Checked on the way that a completed run leaves no snapshot in node memory and no persisted part behind."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # xdist: every worker's basetemp shares a parent
    made: dict[tuple, Path] = {}

    def run(args: list[str], two_nodes: bool = False) -> Path:
        key = (tuple(args), two_nodes)
        if key in made:
            return made[key]
        folder = shared / f"uninterrupted-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}"
        folder.mkdir(exist_ok=True)
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            run_dir, memory = folder / "run", [folder / "node0", folder / "node1"]
            if not (run_dir / "summary.json").exists():
                with mock.patch.dict(os.environ, {"HPCDIST_SNAPSHOT_DIR": str(memory[0])}):
                    launched = Launch("srun", args, run_dir, node_memory=memory if two_nodes else None)
                assert launched.wait() == [0, 0], launched.output()
                assert not any(m.exists() and any(m.iterdir()) for m in memory), "a completed run left snapshots"
                assert not (run_dir / "checkpoints" / checkpoints.PARTS).exists(), "a completed run left its parts"
        made[key] = run_dir
        return run_dir

    return run


@pytest.fixture
def launch():
    """``launch(way, args, run_dir)`` starts two ranks; ``.wait()`` returns their exit statuses. srun's on two
    nodes when given ``node_memory``, a snapshot folder per node."""
    started: list[Launch] = []

    def start(way: str, args: list[str], run_dir: Path, job_id: int | None = None,
              node_memory: list[Path] | None = None, file_limit: tuple[int, int] | None = None) -> Launch:
        started.append(Launch(way, args, run_dir, job_id, node_memory, file_limit))
        return started[-1]

    yield start
    for launched in started:
        for p in launched.procs:
            if p.poll() is None:
                p.kill()
        if launched.job_id is not None:
            # What a site's epilog does at the end of a job: a killed run's snapshots and heartbeat hand-over
            # folders stay in memory otherwise.
            for pattern in (f"hpcdist-snap-{launched.job_id}-*", f"hpcdist-beats-{launched.job_id}-*"):
                for folder in Path("/dev/shm").glob(pattern):
                    shutil.rmtree(folder, ignore_errors=True)
