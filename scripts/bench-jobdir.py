"""Measure the job directory at scale: the heartbeat writers' metadata operations and the readers' wall time.

    PYTHONPATH=. .venv/bin/python scripts/bench-jobdir.py [--nodes 4096] [--ranks-per-node 8] [--history 20]

(a) counts the namespace operations (create, append-open, rename, mkdir, unlink) the real heartbeat code
makes on the shared run directory and in node-local storage, and the reads (opens to read, stat, lstat,
listdir, scandir: each a metadata request on Lustre or GPFS) there: the watchdogs' looks for lost.json and
stacks/declared.json, the judges' reads of node files, in a small real run (2 nodes x 4 ranks of
train.heartbeat.Heartbeat, each with its thread and its train.watchdog.Watchdog, for a few periods), and
scales them to the large run: a watchdog file read by local rank 0 once per node, by another rank once per
rank;
(b) builds a simulated run directory of ``--nodes`` x ``--ranks-per-node`` ranks with the real node writer
(train.nodebeat.Publisher: each node's latest file and ``--history`` history lines) plus metrics.jsonl, and
times ``hpcdist top --once``, ``hpcdist status`` and ``hpcdist report`` on it (each a fresh process, as a
user runs them; the median of three), and the CPU a waiter (``submit --wait``: its progress line and its batch-host
watch, polled once a second) spends on it for ``--waiter-s`` seconds, the files' cache cleared before each read as
a live run's changing files would. Prints a markdown table (docs/scale.md keeps one).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hpc import beatfile, follow, job, monitor, ranks, registry, rescue
from train import heartbeat, nodebeat, watchdog

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = ("open", "replace", "rename", "mkdir", "unlink")
LOOKUPS = ("stat", "lstat", "listdir", "scandir")


class Counter:
    """Counts the namespace operations and the reads under each of two roots while installed (wraps os and io);
    the shared root's reads also by thread and by what they read (``heartbeat/`` node files or the rest)."""

    def __init__(self, shared: Path, local: Path) -> None:
        self.roots = {"shared": str(shared), "local": str(local)}
        self.beats = str(beatfile.folder(shared))
        self.counts = {"shared": 0, "local": 0, "shared_reads": 0, "local_reads": 0}
        self.shared_reads: dict[tuple[int, str], int] = {}   # (thread ident, "beats" or "watch") -> reads
        self.saved: dict[str, object] = {}

    def _where(self, path) -> str | None:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return next((k for k, root in self.roots.items() if text.startswith(root)), None)

    def _wrap(self, module, name: str, creates) -> None:
        real = getattr(module, name)
        self.saved[(module, name)] = real

        def counted(*args, **kw):
            path = args[0] if args else kw.get("path", kw.get("file", "."))
            where = self._where(path)
            if where and creates(args[1:], kw):
                self.counts[where] += 1
            elif where:
                self.counts[where + "_reads"] += 1
                if where == "shared":
                    key = (threading.get_ident(), "beats" if os.fsdecode(path).startswith(self.beats) else "watch")
                    self.shared_reads[key] = self.shared_reads.get(key, 0) + 1
            return real(*args, **kw)
        setattr(module, name, counted)

    def __enter__(self) -> Counter:
        writing = ("w", "a", "x", "+")
        self._wrap(io, "open", lambda a, k: any(c in (a[0] if a else k.get("mode", "r")) for c in writing))
        self._wrap(os, "open", lambda a, k: bool((a[0] if a else k.get("flags", 0)) & (os.O_CREAT | os.O_APPEND)))
        for name in NAMESPACE[1:]:
            self._wrap(os, name, lambda a, k: True)
        for name in LOOKUPS:
            self._wrap(os, name, lambda a, k: False)
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), real in self.saved.items():
            setattr(module, name, real)


def count_small_run(nodes: int, per_node: int, every_s: float, periods: int) -> dict[str, float]:
    """Namespace operations and reads per node per period in a real run of ``nodes`` x ``per_node`` heartbeats;
    ``watch_first``/``watch_other``: shared reads outside heartbeat/ per local rank 0 / per other rank,
    ``beats_reads``: shared reads of heartbeat/ per node."""
    with tempfile.TemporaryDirectory() as tmp:
        run, stage = Path(tmp) / "run", Path(tmp) / "shm"
        beats, first = [], set()
        with Counter(run, stage) as counter:
            for rank in range(nodes * per_node):
                env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_ID": "0",
                       "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
                       "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_JOB_NODELIST": f"n[1-{nodes}]",
                       "SLURM_JOB_ID": "1", "HPCDIST_HEARTBEAT_STAGE": str(stage)}
                beat = heartbeat.Heartbeat(run, every_s=every_s)
                beat.identify(ranks.resolve(env), env, hostname=f"n{rank // per_node}")
                beat.phase("train")
                dog = watchdog.Watchdog(beat, timeout_s=60, factor=10)
                beat.watch(dog)
                beats.append(beat)
                if rank % per_node == 0:
                    first |= {beat._thread.ident, dog._thread.ident}
            start, start_reads = dict(counter.counts), dict(counter.shared_reads)
            time.sleep(every_s * periods)
            steady = {k: counter.counts[k] - start[k] for k in start}
            reads = {k: v - start_reads.get(k, 0) for k, v in counter.shared_reads.items()}
            for beat in reversed(beats):
                beat.finish("done")
    per = {k: v / nodes / periods for k, v in steady.items()}
    per["beats_reads"] = sum(v for (_, what), v in reads.items() if what == "beats") / nodes / periods
    per["watch_first"] = sum(v for (t, what), v in reads.items() if what == "watch" and t in first) / nodes / periods
    per["watch_other"] = (sum(v for (t, what), v in reads.items() if what == "watch" and t not in first)
                          / (nodes * (per_node - 1)) / periods)
    return per


def read_rows(per: dict[str, float], nodes: int, per_node: int) -> list[tuple[str, str]]:
    """The counted reads scaled to ``nodes`` x ``per_node``, per second (a period is 2 s at scale)."""
    watch = (per["watch_first"] + per["watch_other"] * (per_node - 1)) * nodes / 2.0
    # At scale two judges read every node's file a beat and every other node's reader two of them (about 4
    # reads a node); in the small run every node judges, with its folder look-ups (6 a node): an upper bound.
    return [("watchdog reads of lost.json, stacks/ on the shared FS, per second (counted: local rank 0 x nodes "
             "+ each other rank x its ranks, / 2 s)", f"{watch:,.0f}"),
            ("watchdog reads of node files on the shared FS, per second (counted x nodes / 2 s, an upper bound)",
             f"{per['beats_reads'] * nodes / 2.0:,.0f}")]


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
              "marks": {m: t - 60 + i for i, m in enumerate(beatfile.MARKS)},
              "recent_compute_s": [0.15] * beatfile.RING,
              "step_at": t, "start_step": 0, "snapshot_step": 10 * line - 5 if rank % per_node == 0 and line else None}
    return {k: values[k] for k in beatfile.FIELDS}


def waiter_load(record: registry.Record, seconds: float) -> tuple[int, float]:
    """(heartbeat reads, CPU seconds) of a Follower and a rescue.Watcher polled as a waiter polls for ``seconds``."""
    reads, real = [], monitor.read_heartbeats

    def read(run_dir: Path) -> dict:
        reads.append(run_dir)
        monitor._SEEN.clear()  # a live run rewrites its node files every 2 s: each read parses them all
        return real(run_dir)

    follower, watcher = follow.Follower(record, io.StringIO(), tty=False), rescue.Watcher(record)
    monitor.read_heartbeats, cpu = read, time.process_time()
    try:  # hpc.job.follow, the loop every waiter polls in: a poll, then a second's sleep
        job.follow(lambda: (follower.poll(), watcher.lost_host()), lambda _: False, 1.0, seconds)
    finally:
        monitor.read_heartbeats = real
    return len(reads), time.process_time() - cpu


def timed(args: list[str], home: Path, runs: int = 3) -> tuple[float, int, int]:
    """The median wall time of ``runs`` fresh processes running ``hpcdist ARGS``, and the last one's status and
    lines printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HPCDIST_HOME": str(home), "MPLCONFIGDIR": str(home / "mpl")}
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
    return sorted(seconds)[runs // 2], done.returncode, len(done.stdout.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--history", type=int, default=20, help="history lines per node in the simulated directory")
    p.add_argument("--every-s", type=float, default=0.1, help="heartbeat period of the small counted run")
    p.add_argument("--waiter-s", type=float, default=60.0, help="seconds a waiter is polled for (0: not measured)")
    args = p.parse_args()
    per_node, nodes = args.ranks_per_node, args.nodes
    per = count_small_run(2, 4, args.every_s, periods=20)
    old = 3 * nodes * per_node / 2.0  # per rank per 2 s: temp-file create, rename, append-open of rank-R.jsonl
    print(f"namespace ops per node per period (counted, 2 nodes x 4 ranks, 20 periods): shared {per['shared']:.3f}, "
          f"node-local {per['local']:.2f}; reads (opens to read, stat, listdir): shared {per['shared_reads']:.2f} "
          f"(lost.json and stacks/ {per['watch_first']:.2f} by local rank 0, {per['watch_other']:.2f} by each other "
          f"rank; node files {per['beats_reads']:.2f}), node-local {per['local_reads']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        home, job_dir = Path(tmp) / "home", Path(tmp) / "job"
        run = job_dir / "run"
        started = time.perf_counter()
        build(run, nodes, per_node, args.history, time.time())
        built_s = time.perf_counter() - started
        os.sync()  # the build's 470 MiB written back first: a reader on a real file system comes long after
        record = registry.Record(job_id="999999", job_dir=str(job_dir), via="sbatch",
                                 submitted="2027-01-15T08:00:00+00:00", backend="ddp", launcher="srun", nodes=nodes,
                                 ntasks_per_node=per_node, world_size=nodes * per_node)
        registry.write_marker(record)
        size = sum(p.stat().st_size for p in beatfile.folder(run).iterdir())
        rows = [("heartbeat namespace ops/s on the shared FS, old (per rank file + history)", f"{old:,.0f}"),
                ("heartbeat namespace ops/s on the shared FS, node files (counted x nodes / 2 s)",
                 f"{per['shared'] * nodes / 2.0:,.2f}"),
                ("node-local hand-over ops/s (tmpfs, per node)", f"{per['local'] / 2.0:,.1f}"),
                *read_rows(per, nodes, per_node),
                ("files in run/heartbeat/ (old: 2 per rank)", f"{len(list(beatfile.folder(run).iterdir())):,} "
                 f"({2 * nodes * per_node:,})"),
                ("run/heartbeat/ bytes", f"{size / 2**20:,.0f} MiB"), ("build s", f"{built_s:.1f}")]
        for name, cli in (("top --once", ["top", str(job_dir), "--once"]), ("status", ["status", str(job_dir)]),
                          ("report", ["report", str(job_dir)])):
            seconds, status, lines = timed(cli, home)
            rows.append((f"hpcdist {name} s (exit {status}, {lines:,} lines printed)", f"{seconds:.2f}"))
        if args.waiter_s > 0:
            reads, cpu = waiter_load(record, args.waiter_s)
            rows.append((f"a waiter's CPU, share of a core ({reads} heartbeat reads in {args.waiter_s:.0f} s of "
                         "1 s polls)", f"{cpu / args.waiter_s:.0%}"))
    print(f"\n{nodes:,} nodes x {per_node} ranks, {args.history} history lines a node\n")
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
