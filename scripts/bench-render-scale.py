"""Print how render and env scale with the job's size: a markdown table, median of a few runs per size.

    PYTHONPATH=. python scripts/bench-render-scale.py [--repeat 3] [--nodes 1,4,16,64,256,1024,4096]

For each N (8 GPUs per node, a temporary profile allowing 5,000 nodes, naming a Slurm cluster of its own):
  render s     whole process: `python -m hpc render -q --nodes N --gpus-per-node 8 --cluster PROFILE
               -- --batch-size 32*8*N`,
               wall-clock and, in brackets, CPU seconds (user + system: what a shared machine cannot inflate)
  render() ms  CPU ms of hpc.render.render alone, in this process (checks, templates, ranks.txt; no start-up,
               no writing)
  ranks.txt    lines in the rendered ranks.txt
  env s        whole process: `python -m hpc env --shell` in the environment of the job's last rank (wall, CPU)
  resolve ms   CPU ms of hpc.ranks.resolve alone on that environment, nodelist caches cleared
The task environment names every other node (gpu[00001,00003,...]), so its SLURM_JOB_NODELIST is as long
as a compressed nodelist of N hosts gets; the step's nodelist is the same list.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpc import nodelist, profiles, ranks, render  # noqa: E402
from hpc.spec import JobSpec  # noqa: E402

GPUS = 8


def task_environ(nodes: int) -> dict[str, str]:
    """What srun gives the last rank of an N-node, 8-rank-per-node job."""
    expr = nodelist.compress(f"gpu{2 * i + 1:05d}" for i in range(nodes))
    world = nodes * GPUS
    return {
        "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(world - 1),
        "SLURM_LOCALID": str(GPUS - 1), "SLURM_NODEID": str(nodes - 1), "SLURM_NTASKS": str(world),
        "SLURM_STEP_NUM_TASKS": str(world), "SLURM_TASKS_PER_NODE": f"{GPUS}(x{nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"{GPUS}(x{nodes})", "SLURM_JOB_NODELIST": expr,
        "SLURM_STEP_NODELIST": expr, "SLURM_NODELIST": expr,
    }


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and what it waited for) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_timed(command: list[str], env: dict[str, str], repeat: int) -> tuple[float, float]:
    runs = [timed(command, env) for _ in range(repeat)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def resolve_ms(environ: dict[str, str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        nodelist.parse.cache_clear()
        started = time.process_time()
        ranks.resolve(environ)
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def batch(nodes: int) -> tuple[str, ...]:
    """A global batch every rank gets a share of (the trainer's default 256 does not split over 512 ranks)."""
    return ("--batch-size", str(32 * nodes * GPUS))


def render_ms(profile: Path, nodes: int, repeat: int) -> float:
    site = profiles.load(str(profile))
    spec = JobSpec(job_dir="/tmp/bench-render-scale", cluster=str(profile), nodes=nodes, gpus_per_node=GPUS,
                   train_args=batch(nodes))
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        render.render(spec, site)
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", default="1,4,16,64,256,1024,4096")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    base["PYTHONPATH"] = str(REPO)
    python = [sys.executable, "-m", "hpc"]
    load = os.getloadavg()[0]
    print(f"load average before: {load:.1f} on {os.cpu_count()} CPUs; median of {args.repeat} runs\n")
    print("| nodes | ranks | render s | render() CPU ms | ranks.txt lines | env s | resolve CPU ms "
          "| SLURM_JOB_NODELIST chars |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "big.yaml"
        # A site of its own: where a local Slurm answers, its partitions do not limit this one.
        profile.write_text(f"partition: debug\ngpus_per_node: {GPUS}\nmax_nodes: 5000\nslurm_cluster: bench-site\n")
        for nodes in (int(n) for n in args.nodes.split(",")):
            job_dir = Path(tmp) / f"job-{nodes}"
            render = [*python, "render", "-q", "--force", "--cluster", str(profile), "--nodes", str(nodes),
                      "--gpus-per-node", str(GPUS), "-o", str(job_dir), "--", *batch(nodes)]
            render_s, render_cpu = median_timed(render, base, args.repeat)
            lines = len((job_dir / "ranks.txt").read_text().splitlines())
            environ = task_environ(nodes)
            env_s, env_cpu = median_timed([*python, "env", "--shell"], {**base, **environ}, args.repeat)
            print(f"| {nodes} | {nodes * GPUS} | {render_s:.2f} ({render_cpu:.2f}) | "
                  f"{render_ms(profile, nodes, args.repeat):.0f} | {lines} | {env_s:.2f} ({env_cpu:.2f}) | "
                  f"{resolve_ms(environ, args.repeat):.2f} | {len(environ['SLURM_JOB_NODELIST'])} |", flush=True)

if __name__ == "__main__":
    main()
