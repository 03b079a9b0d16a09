"""Name a hung rank within bounded time (docs/CONTRACTS.md, contract 3): stacks of every rank, hang.json, exit 76.

Each rank runs ``Watchdog`` in a daemon thread beside its heartbeat. The local ranks 0 of the first JUDGES
nodes (or, while every one of those nodes is silent, every node's; while a local rank 0 is frozen, the other
ranks of its node) judge the node files in ``RUN_DIR/heartbeat/``, their own node's beats taken from the
node-local hand-over, fresher: so at any scale a few processes read every node's file. A rank in
train/checkpoint/eval whose progress (``step_at``: its last step or phase change) is older than
max(--hang-timeout-s, --hang-factor x the median step time) is stalled, and so is a rank in set-up whose
heartbeat itself stopped for --hang-timeout-s (a frozen process; a slow set-up still beats). A hung rank
stalls the others too (they wait for it in a collective), so the culprit is the stalled rank that is
furthest behind: lowest step; then a rank of a node whose file stopped (its local rank 0, the lowest
rank there, stopped publishing: the frozen one); then stalest heartbeat (a stopped process stops
beating), then oldest progress. Then, in bounded time:

1. the judge declares the hang once (``RUN_DIR/stacks/declared.json``, created exclusively);
2. every live rank writes its own threads' Python stacks to ``RUN_DIR/stacks/rank-R.txt``; when the
   culprit itself is frozen, the lowest live rank on its node takes its stack with ``py-spy dump``, or
   the file says why no stack could be taken;
3. the declaring rank writes ``RUN_DIR/hang.json`` ``{"rank","node","step","since","stacks","groups",...}``
   (``groups``: ranks with identical main-thread stacks, largest group first, so the odd one out is last);
4. the live ranks exit 76, so ``srun --kill-on-bad-exit`` (or torchrun's agent) ends the frozen one.

A node that dies takes its ranks with it, and the survivors would wait in a collective for the network's
timeout. So every judge also looks for a node of this attempt whose file stopped changing LOST_BEATS
heartbeats ago (its local rank 0, the node's one writer, is gone); if that node's slurmd does not answer
either (a frozen rank's node still does: that is a hang, above), it names the node in ``RUN_DIR/lost.json``
and every rank exits 77 within two heartbeats (one for its node's reader to see it, one for the relay). The
batch shell then ends the step, which Slurm would hold open for its dead node until SlurmdTimeout.

Only one rank per node reads the run directory's watchdog files (lost.json, stacks/declared.json), once a
beat: its local rank 0, or another while that one is frozen. Before it acts on one (leaves, or dumps its stack),
it hands it over in the node-local stage, where the node's other ranks look for it at their own next beat: the
shared file system sees one reader a node per beat, not one a rank, and a rank learns of a lost node or a
declaration at most two beats after it was written.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from hpc import beatfile, fileio, jobfiles, runfiles, vocab
from hpc.slurm.commands import SLURMD_PORT, slurmd_answers
from hpc.vocab import EXIT_HUNG, EXIT_NODE_LOST
from train import heartbeat, nodebeat

PY_SPY_TIMEOUT_S = 20.0
COLLECT_S = 30.0  # the most the declaring rank waits for the others' stack files
# Heartbeats a whole node may miss before its slurmd is asked whether the node is alive: a slow node is never
# declared lost (its slurmd answers), so the bar only has to outlast one late publish.
LOST_BEATS = 2
JUDGES = 2        # nodes whose local rank 0 judges while any of them publishes
LOST, DECLARED = vocab.LOST, "stacks/declared.json"  # the watchdog's files in the run directory


@dataclass(frozen=True)
class Verdict:
    rank: int
    node: str
    pid: int
    step: int
    since: float          # unix time of the hung rank's last progress
    threshold_s: float    # how long no progress counted as hung
    stale_beat: bool      # its heartbeat stopped too: the whole process is frozen, not just its main thread
    phase: str = "train"  # where it stopped: a set-up phase (setup, rendezvous, build) or train/checkpoint/eval


def judge(beats: dict[int, dict], now: float, *, timeout_s: float, factor: float, fresh_s: float) -> Verdict | None:
    """The hung rank, if any, from one snapshot of every rank's heartbeat (pure)."""
    times = [b["step_time_s"] for b in beats.values() if b.get("step_time_s")]
    limit = max(timeout_s, factor * statistics.median(times)) if times else timeout_s

    def stalled(b: dict) -> bool:
        if b.get("phase") in vocab.ACTIVE_PHASES:
            return now - (b.get("step_at") or b.get("time") or now) > limit
        # Set-up has no step time to judge by and may rightly take minutes (a DeepSpeed op compiling, a data
        # set loading), but its heartbeat thread beats throughout: a rank that stopped beating is frozen.
        return b.get("phase") in vocab.SETUP_PHASES and now - (b.get("time") or now) > timeout_s

    stalled = [b for b in beats.values() if stalled(b)]
    if not stalled:
        return None

    def behind(b: dict) -> tuple:
        # A node that stopped publishing republishes nothing fresh of any of its ranks: blame its lowest rank,
        # its local rank 0 (the writer that stopped), rather than whichever beat happened to be oldest.
        silent = now - (b.get("published") or b.get("time") or now) > fresh_s
        return (b.get("step") or 0, not silent, b["rank"] if silent else 0, b.get("time") or 0, b.get("step_at") or 0)

    culprit = min(stalled, key=behind)
    return Verdict(rank=culprit["rank"], node=culprit.get("hostname", "?"), pid=culprit.get("pid", 0),
                   step=culprit.get("step") or 0, since=culprit.get("step_at") or culprit.get("time"),
                   threshold_s=round(limit, 3), stale_beat=now - (culprit.get("time") or 0) > fresh_s,
                   phase=culprit.get("phase") or "train")


def vanished(beats: dict[int, dict], now: float, *, me: dict, lost_s: float) -> tuple[str, list[int], float] | None:
    """(node, its ranks, when it last published) for a node of this attempt, not this one, whose file stopped
    changing (or, without ``published``, whose every rank stopped beating) more than ``lost_s`` ago without
    ending (pure)."""
    nodes: dict[str, list[dict]] = {}
    for b in beats.values():
        if b.get("attempt", 0) == me.get("attempt", 0) and b.get("hostname") != me.get("hostname"):
            nodes.setdefault(str(b.get("hostname")), []).append(b)
    for node, mine in sorted(nodes.items()):
        if any(b.get("phase") in vocab.FINAL_PHASES for b in mine):
            continue
        newest = max(float(b.get("published") or b.get("time") or 0) for b in mine)
        if now - newest > lost_s:
            return node, sorted(int(b["rank"]) for b in mine), newest
    return None


def own_stacks() -> str:
    """Every thread of this process, main thread first, innermost call last (as tracebacks read)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    main = threading.main_thread().ident
    return "\n".join(f'Thread "{names.get(ident, ident)}":\n' + "".join(traceback.format_stack(frames[ident]))
                     for ident in sorted(frames, key=lambda i: (i != main, names.get(i, ""))))


def main_thread_stack(text: str) -> str:
    """The first thread's block of a stack file: what groups ranks (other threads differ in noise)."""
    return text.split("\nThread ")[0]


def py_spy_stack(pid: int) -> str:
    """The Python stack of another process on this node, read with py-spy without stopping it further."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return f"no stack: py-spy is not installed (pip install py-spy), so process {pid} could not be read"
    if not Path(f"/proc/{pid}").exists():
        return f"no stack: process {pid} is not visible from this rank's node"
    try:
        done = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=PY_SPY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no stack: py-spy dump --pid {pid} ran past {PY_SPY_TIMEOUT_S:.0f} s"
    if done.returncode != 0:
        return f"no stack: py-spy dump --pid {pid} failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return f"(taken by py-spy from another rank on this node)\n{done.stdout}"


def group(stacks: dict[int, str]) -> list[dict]:
    """Ranks with identical main-thread stacks, largest group first (the odd one out comes last)."""
    groups: dict[str, list[int]] = {}
    for rank, text in sorted(stacks.items()):
        groups.setdefault(main_thread_stack(text), []).append(rank)
    return [{"ranks": ranks, "stack": stack}
            for stack, ranks in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1]))]


class Watchdog:
    """The per-rank thread; ``exit`` is how the process ends itself (os._exit, since the main thread is stuck)."""

    def __init__(self, beat: heartbeat.Heartbeat, *, timeout_s: float, factor: float,
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.time) -> None:
        self.beat, self.timeout_s, self.factor, self.exit, self.now = beat, timeout_s, factor, exit, clock
        self.run_dir = beat.run_dir
        self.stacks_dir = self.run_dir / "stacks"
        # Judging reads every rank's heartbeat: a few times per timeout is enough, and spares a shared disk.
        self.judge_every_s = max(beat.every_s, min(timeout_s / 6, 10.0))
        self.fresh_s = max(3 * beat.every_s, 1.0)
        self.lost_s = max(LOST_BEATS * beat.every_s, 1.0)
        # The batch shell exports the cluster's SlurmdPort in HPCDIST_SLURMD_PORT.
        port = jobfiles.count(os.environ.get("HPCDIST_SLURMD_PORT", ""))
        self.slurmd_port = port if port and port < 65536 else SLURMD_PORT
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def me(self) -> dict:
        return self.beat.identity or {}

    def start(self) -> None:
        if self.timeout_s <= 0 or not self.beat.enabled or self.beat.identity is None:
            return
        self._thread = threading.Thread(target=self._watch, name="hpcdist-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        last_judged = 0.0
        while not self._stop.wait(self.beat.every_s):
            reader = self.reads_shared()
            judges = self.judges(reader)
            lost = self.lost(reader)
            if lost is None and judges:
                lost = self.look_for_lost_node()
            if lost is not None:
                self.relay(reader, LOST, lost)
                self.leave(lost)
                return
            declared = self.declared(reader)
            if declared is None and judges and self.now() - last_judged >= self.judge_every_s:
                last_judged = self.now()
                verdict = judge(self.read(), self.now(), timeout_s=self.timeout_s,
                                factor=self.factor, fresh_s=self.fresh_s)
                if verdict is not None:
                    declared = self.declare(verdict)
            if declared is not None:
                self.relay(reader, DECLARED, declared)
                self.respond(declared)
                return

    def read(self) -> dict[int, dict]:
        return heartbeat.read_all(self.run_dir, self.beat.stage)

    def reads_shared(self) -> bool:
        """Whether this rank reads the run directory's watchdog files (lost.json, declared.json) for its node:
        local rank 0, or another while its node's local rank 0 is frozen or gone (ranks of a node are numbered
        contiguously under srun's block distribution, torchrun and DeepSpeed). The others read what it handed
        over in the node's stage: at 4,096 x 8 ranks a look per rank each beat would be 32,768 opens a second
        on the shared file system."""
        local_rank = self.me.get("local_rank", 0)
        if local_rank == 0 or self.beat.stage is None:
            return True
        first = nodebeat.staged(self.beat.stage).get(self.me["rank"] - local_rank)
        return first is None or self.now() - (first.get("time") or 0) > self.fresh_s

    def judges(self, reader: bool | None = None) -> bool:
        """Local rank 0 of the first JUDGES nodes judges, every node's while all of those are silent; another
        rank only while its node's local rank 0 is frozen or gone. ``reader``: reads_shared(), when known."""
        if not (self.reads_shared() if reader is None else reader):
            return False
        if self.me.get("local_rank", 0) != 0 or self.me.get("node_rank", 0) < JUDGES:
            return True
        # Two small reads a beat, instead of every node's file on every node.
        published = [(beatfile.read_node(beatfile.node_path(self.run_dir, n)) or {}).get("time") for n in range(JUDGES)]
        return not any(isinstance(t, (int, float)) and self.now() - t <= self.lost_s for t in published)

    def shared(self, name: str, reader: bool | None = None) -> dict | None:
        """The run directory's watchdog file ``name`` as this rank may see it: the node's reader (``reads_shared``)
        reads the run directory, the node's other ranks only what the reader handed over in the stage."""
        if reader is None:
            reader = self.reads_shared()
        return jobfiles.json_object(self.run_dir / name if reader else self.beat.stage / Path(name).name)

    def relay(self, reader: bool, name: str, record: dict) -> None:
        """Hand ``record`` (read from the run directory's ``name``, or just written there) over to the node's
        other ranks before acting on it: they look only in the stage."""
        if reader and self.beat.stage is not None:
            try:
                fileio.atomic_write(self.beat.stage / Path(name).name, json.dumps(record))
            except OSError:
                pass  # they read the run directory themselves once this rank's beat stops

    def lost(self, reader: bool | None = None) -> dict | None:
        """This attempt's lost node, if a rank named one."""
        found = self.shared(LOST, reader)
        return found if found is not None and found.get("attempt") == self.me.get("attempt", 0) else None

    def look_for_lost_node(self) -> dict | None:
        seen = vanished(self.read(), self.now(), me=self.me, lost_s=self.lost_s)
        if seen is None or slurmd_answers(seen[0], self.slurmd_port):
            return None
        node, ranks, since = seen
        record = {"node": node, "ranks": ranks, "since": since, "step": self.beat.step,
                  "declared_by": self.me["rank"], "attempt": self.me.get("attempt", 0), "time": self.now()}
        if not runfiles.declare(self.run_dir / LOST, record):
            return self.lost() or record
        return record

    def leave(self, lost: dict) -> None:
        """End this rank: a node of the job is gone, and no collective with its ranks can finish."""
        print(f"hpcdist-train: node {lost['node']} lost (rank(s) {', '.join(map(str, lost['ranks'][:8]))} "
              f"silent since {time.strftime('%H:%M:%S', time.gmtime(lost['since']))} UTC, its slurmd does not "
              f"answer); rank {self.me['rank']} exits {EXIT_NODE_LOST}", file=sys.stderr, flush=True)
        self.beat.finish("failed")
        sys.stdout.flush()
        self.exit(EXIT_NODE_LOST)

    def declared(self, reader: bool | None = None) -> dict | None:
        """This launch's declaration, if any rank made one (an older one, from an earlier run, is ignored)."""
        found = self.shared(DECLARED, reader)
        started = self.beat.marks.get("process_start", 0)
        return found if found is not None and found.get("declared_at", 0) >= started - 1 else None

    def declare(self, verdict: Verdict) -> dict:
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        record = {**asdict(verdict), "declared_by": self.me["rank"], "declared_at": self.now()}
        path = self.run_dir / DECLARED
        if not runfiles.declare(path, record):
            theirs = self.declared()
            if theirs is not None:
                return theirs
            fileio.atomic_write(path, json.dumps(record) + "\n")  # a stale one from an earlier run of this run dir
        return record

    def respond(self, declared: dict) -> None:
        """Dump stacks, let the declaring rank write hang.json, then end this process with EXIT_HUNG."""
        rank = self.me["rank"]
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        mine = self.stacks_dir / f"rank-{rank}.txt"
        if not (self.fresh(self.run_dir / vocab.HANG) and self.fresh(mine)):  # a thawed rank keeps its py-spy stack
            fileio.atomic_write(mine, own_stacks())
        if declared["rank"] != rank and self._reads_for_culprit(declared):
            # A culprit whose own watchdog still runs writes its stack itself; a frozen one gets py-spy.
            theirs = self.stacks_dir / f"rank-{declared['rank']}.txt"
            deadline = time.monotonic() + (self.fresh_s if not declared["stale_beat"] else 0)
            while not self.fresh(theirs) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.fresh(theirs):
                fileio.atomic_write(theirs, py_spy_stack(declared["pid"]))
        if declared["declared_by"] == rank:
            self.write_report(declared)
        else:
            deadline = time.monotonic() + COLLECT_S + PY_SPY_TIMEOUT_S
            while not self.fresh(self.run_dir / vocab.HANG) and time.monotonic() < deadline:
                time.sleep(0.2)
        where = (f"in set-up ({declared['phase']})" if declared.get("phase") in vocab.SETUP_PHASES
                 else f"at step {declared['step']}")
        print(f"hpcdist-train: rank {declared['rank']} on {declared['node']} hung {where} "
              f"(no progress for {declared['threshold_s']:.0f} s or more); stacks in {self.stacks_dir}; "
              f"rank {rank} exits {EXIT_HUNG}", file=sys.stderr, flush=True)
        self.beat.finish("failed")
        sys.stdout.flush()
        self.exit(EXIT_HUNG)

    def fresh(self, path: Path) -> bool:
        """Whether ``path`` (a stack file, hang.json) was written for this declaration, not left by an earlier
        attempt's: no older than stacks/declared.json, both times from the run directory's file system."""
        try:
            return path.stat().st_mtime_ns >= (self.run_dir / DECLARED).stat().st_mtime_ns
        except OSError:
            return False

    def _reads_for_culprit(self, declared: dict) -> bool:
        """Whether this rank is the lowest live rank on the frozen rank's node (the one to run py-spy)."""
        if self.me.get("hostname") != declared["node"]:
            return False
        beats = self.read()
        now = self.now()
        live = [r for r, b in beats.items() if b.get("hostname") == declared["node"] and r != declared["rank"]
                and now - (b.get("time") or 0) <= self.fresh_s]
        return not live or min(live) == self.me["rank"]

    def write_report(self, declared: dict) -> None:
        beats = self.read()
        now = self.now()
        live = {r for r, b in beats.items() if now - (b.get("time") or 0) <= self.fresh_s}
        # A frozen culprit's stack comes only from a live rank on its node (py-spy reads local processes):
        # with none there, waiting for it would only delay the exit that lets the job be retried.
        readers = [r for r in live if beats[r].get("hostname") == declared["node"] and r != declared["rank"]]
        expected = live | ({declared["rank"]} if readers or not declared["stale_beat"] else set())
        deadline = time.monotonic() + COLLECT_S + PY_SPY_TIMEOUT_S
        while not all(self.fresh(self.stacks_dir / f"rank-{r}.txt") for r in expected) and time.monotonic() < deadline:
            time.sleep(0.2)
        stacks = {}
        for r in sorted(set(beats) | expected):
            path = self.stacks_dir / f"rank-{r}.txt"
            if self.fresh(path):
                stacks[r] = path.read_text()
            elif r == declared["rank"]:
                stacks[r] = (f"no stack: no live rank on {declared['node']} could read process {declared['pid']} "
                             "(py-spy reads only processes on its own node)")
                fileio.atomic_write(path, stacks[r])
            else:
                stacks[r] = "no stack: this rank wrote none in time (frozen or already gone)"
        report = {"rank": declared["rank"], "node": declared["node"], "step": declared["step"],
                  "phase": declared.get("phase", "train"),
                  "since": declared["since"], "pid": declared["pid"], "threshold_s": declared["threshold_s"],
                  "attempt": self.me.get("attempt", 0), "declared_by": declared["declared_by"],
                  "time": now, "stacks": {str(r): t for r, t in stacks.items()}, "groups": group(stacks)}
        fileio.atomic_write(self.run_dir / vocab.HANG, json.dumps(report, indent=2) + "\n")
