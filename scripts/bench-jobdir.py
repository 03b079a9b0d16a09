"""Measure the job directory at scale: the heartbeat writers' metadata operations and the readers' wall time.

    PYTHONPATH=. .venv/bin/python scripts/bench-jobdir.py [--nodes 4096] [--ranks-per-node 8] [--history 20]

(a) counts the namespace operations (create, append-open, rename, mkdir, unlink) the real heartbeat code
makes on the shared run directory and in node-local storage, and the opens to read (the watchdogs' looks for
lost.json and declared.json, the judges' reads of node files), in a small real run (2 nodes x 4 ranks of
train.heartbeat.Heartbeat, each with its thread and its train.watchdog.Watchdog, for a few periods), and
scales them to the large run;
(b) builds a simulated run directory of ``--nodes`` x ``--ranks-per-node`` ranks with the real node writer
(train.nodebeat.Publisher: each node's latest file and ``--history`` history lines) plus metrics.jsonl, and
times ``hpcdist top --once``, ``hpcdist status`` and ``hpcdist report`` on it (each a fresh process, as a
user runs them). Prints a markdown table (docs/scale.md keeps one).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc import beatfile, ranks, registry
from train import heartbeat, nodebeat, watchdog

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = ("open", "replace", "rename", "mkdir", "unlink")


class Counter:
    """Counts the namespace operations under each of two roots while installed (wraps os and io)."""

    def __init__(self, shared: Path, local: Path) -> None:
        self.roots = {"shared": str(shared), "local": str(local)}
        self.counts = {"shared": 0, "local": 0, "shared_reads": 0, "local_reads": 0}
        self.saved: dict[str, object] = {}

    def _where(self, path) -> str | None:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return next((k for k, root in self.roots.items() if text.startswith(root)), None)

    def _wrap(self, module, name: str, creates) -> None:
        real = getattr(module, name)
        self.saved[(module, name)] = real

        def counted(path, *args, **kw):
            where = self._where(path)
            if where and creates(args, kw):
                self.counts[where] += 1
            elif where and name == "open":
                self.counts[where + "_reads"] += 1
            return real(path, *args, **kw)
        setattr(module, name, counted)

    def __enter__(self) -> Counter:
        writing = ("w", "a", "x", "+")
        self._wrap(io, "open", lambda a, k: any(c in (a[0] if a else k.get("mode", "r")) for c in writing))
        self._wrap(os, "open", lambda a, k: bool((a[0] if a else k.get("flags", 0)) & (os.O_CREAT | os.O_APPEND)))
        for name in NAMESPACE[1:]:
            self._wrap(os, name, lambda a, k: True)
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), real in self.saved.items():
            setattr(module, name, real)


def count_small_run(nodes: int, per_node: int, every_s: float, periods: int) -> dict[str, float]:
    """Namespace operations per node per period in a real run of ``nodes`` x ``per_node`` heartbeats."""
    with tempfile.TemporaryDirectory() as tmp:
        run, stage = Path(tmp) / "run", Path(tmp) / "shm"
        beats = []
        with Counter(run, stage) as counter:
            for rank in range(nodes * per_node):
                env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_ID": "0",
                       "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
                       "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_JOB_NODELIST": f"n[1-{nodes}]",
                       "SLURM_JOB_ID": "1", "HPCDIST_HEARTBEAT_STAGE": str(stage)}
                beat = heartbeat.Heartbeat(run, every_s=every_s)
                beat.identify(ranks.resolve(env), env, hostname=f"n{rank // per_node}")
                beat.phase("train")
                beat.watch(watchdog.Watchdog(beat, timeout_s=60, factor=10))
                beats.append(beat)
            start = dict(counter.counts)
            time.sleep(every_s * periods)
            steady = {k: counter.counts[k] - start[k] for k in start}
            for beat in reversed(beats):
                beat.finish("done")
    return {k: v / nodes / periods for k, v in steady.items()}


def build(run: Path, nodes: int, per_node: int, history: int, now: float) -> None:
    """A run directory as 4,096 nodes' local ranks 0 leave it mid-training (fdatasync off: a tmpfs bench)."""
    real_sync, os.fdatasync = os.fdatasync, lambda fd: None
    try:
        for node in range(nodes):
            writer = nodebeat.Publisher(run, node, history_every_s=0)
            for line in range(history + 1):
                t = now - 2.0 * (history - line)
                beats = {r: simulated_beat(r, node, per_node, nodes, t, line) for r in
                         range(node * per_node, (node + 1) * per_node)}
                writer.publish(f"gpu{node:05d}", 0, t, beats)
            writer.close()
    finally:
        os.fdatasync = real_sync
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 2001, 40):
            f.write(json.dumps({"step": step, "epoch": 0, "batch": step, "loss": 2.3 - step / 2000,
                                "images_per_s": 5e5, "time_s": step * 0.2}) + "\n")


def simulated_beat(rank: int, node: int, per_node: int, nodes: int, t: float, line: int) -> dict:
    # A real snapshot's fields, in the schema's order, with what a training rank reports.
    values = {"rank": rank, "local_rank": rank % per_node, "node_rank": node, "world_size": nodes * per_node,
              "hostname": f"gpu{node:05d}", "pid": 10000 + rank, "attempt": 0,
              "phase": "build" if line == 0 else "train", "step": 10 * line, "total_steps": 100000, "time": t,
              "step_time_s": 0.2, "compute_s": 0.15, "comm_s": 0.05, "images_per_s": 640.0, "loss": 1.5,
              "rss_bytes": 3 << 30, "peak_memory_bytes": 60 << 30,
              "marks": {m: t - 60 + i for i, m in enumerate(beatfile.MARKS)}, "recent_compute_s": [0.15] * 16,
              "step_at": t, "start_step": 0}
    return {k: values[k] for k in beatfile.FIELDS}


def timed(args: list[str], home: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HPCDIST_HOME": str(home), "MPLCONFIGDIR": str(home / "mpl")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--history", type=int, default=20, help="history lines per node in the simulated directory")
    p.add_argument("--every-s", type=float, default=0.1, help="heartbeat period of the small counted run")
    args = p.parse_args()
    per_node, nodes = args.ranks_per_node, args.nodes
    per = count_small_run(2, 4, args.every_s, periods=20)
    old = 3 * nodes * per_node / 2.0  # per rank per 2 s: temp-file create, rename, append-open of rank-R.jsonl
    print(f"namespace ops per node per period (counted, 2 nodes x 4 ranks, 20 periods): shared {per['shared']:.3f}, "
          f"node-local {per['local']:.2f}; opens to read: shared {per['shared_reads']:.2f}, "
          f"node-local {per['local_reads']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        home, job_dir = Path(tmp) / "home", Path(tmp) / "job"
        run = job_dir / "run"
        started = time.perf_counter()
        build(run, nodes, per_node, args.history, time.time())
        built_s = time.perf_counter() - started
        record = registry.Record(job_id="999999", job_dir=str(job_dir), via="sbatch",
                                 submitted="2027-01-15T08:00:00+00:00", backend="ddp", launcher="srun", nodes=nodes,
                                 ntasks_per_node=per_node, world_size=nodes * per_node)
        registry.write_marker(record)
        size = sum(p.stat().st_size for p in beatfile.folder(run).iterdir())
        rows = [("heartbeat namespace ops/s on the shared FS, old (per rank file + history)", f"{old:,.0f}"),
                ("heartbeat namespace ops/s on the shared FS, node files (counted x nodes / 2 s)",
                 f"{per['shared'] * nodes / 2.0:,.2f}"),
                ("node-local hand-over ops/s (tmpfs, per node)", f"{per['local'] / 2.0:,.1f}"),
                ("heartbeat + watchdog opens to read on the shared FS, per second (counted x nodes / 2 s)",
                 f"{per['shared_reads'] * nodes / 2.0:,.0f}"),
                ("files in run/heartbeat/ (old: 2 per rank)", f"{len(list(beatfile.folder(run).iterdir())):,} "
                 f"({2 * nodes * per_node:,})"),
                ("run/heartbeat/ bytes", f"{size / 2**20:,.0f} MiB"), ("build s", f"{built_s:.1f}")]
        for name, cli in (("top --once", ["top", str(job_dir), "--once"]), ("status", ["status", str(job_dir)]),
                          ("report", ["report", str(job_dir)])):
            seconds, status = timed(cli, home)
            rows.append((f"hpcdist {name} s (exit {status})", f"{seconds:.2f}"))
    print(f"\n{nodes:,} nodes x {per_node} ranks, {args.history} history lines a node\n")
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
