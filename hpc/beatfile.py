"""The heartbeat's one schema and its files (contract 1), shared by the trainer that writes them and every reader.

    RUN_DIR/heartbeat/node-N.json     node N's newest beats, rewritten in place by its local rank 0 every 2 s
    RUN_DIR/heartbeat/node-N.jsonl    node N's history: a line per phase change, else per HISTORY_EVERY_S
    RUN_DIR/heartbeat/node-N.jsonl.1  the history before it, once node-N.jsonl grew past HISTORY_BYTES

Each file holds node documents ``{"node", "hostname", "attempt", "time", "ranks": [beat, ...]}``, one a
line; ``time`` is when the node published, each beat's own ``time`` when its rank last handed it over, so
a node whose local rank 0 died stops publishing (its file stops changing: the node vanished), while one
hung rank on a live node shows as its own beat going stale inside a fresh file. The latest file is
rewritten in place through a descriptor held open (no create or rename on the shared file system), so
each line ends in a CRC-32 of its text and is padded with blanks to the file's length: a reader that
catches a rewrite half done sees a checksum that does not match, and reads again.

Light on purpose: the trainer imports it (never torch here).
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from hpc import jobfiles, vocab

MARKS = ("process_start", "torch_imported", "process_group_ready", "model_built", "first_step_done")
# The compute times per step a beat carries, the newest last: what the straggler test judges one snapshot by
# (hpc.monitor.SUSTAIN). Each is a float a reader at 4,096 x 8 parses: 16 of them were 0.2 s of every reader's 1.1.
RING = 3
HISTORY_EVERY_S = 30.0      # a history line at least this often while no phase changes
HISTORY_BYTES = 4 << 20     # node-N.jsonl is rotated to node-N.jsonl.1 past this: 8 MiB a node at most
NODE_BYTES = 16 << 20       # a node document far larger than any node's ranks write is damage


@dataclass(frozen=True)
class Heartbeat:
    """One rank's heartbeat (contract 1); fields a trainer did not write are None. Its field names are the
    schema: the trainer's beats carry exactly FIELDS."""

    rank: int
    hostname: str = ""
    node_rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    pid: int | None = None
    attempt: int = 0
    phase: str = "unknown"
    step: int = 0
    start_step: int | None = None   # where this attempt's training began (a resume's checkpoint step)
    total_steps: int | None = None
    time: float = 0.0               # 0.0: unknown (not written, or no clock's: jobfiles.unix_time)
    step_time_s: float | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    images_per_s: float | None = None
    loss: float | None = None
    rss_bytes: int | None = None
    peak_memory_bytes: int | None = None
    marks: Mapping[str, float] = field(default_factory=dict)
    recent_compute_s: tuple[float, ...] = ()
    step_at: float | None = None
    snapshot_step: int | None = None  # the newest snapshot in its node's memory (local rank 0's beat)

    @property
    def node(self) -> str:
        return self.hostname or (f"node {self.node_rank}" if self.node_rank is not None else "?")

    @property
    def node_label(self) -> str:
        """The node with its rank, ``vm#1``: emulated nodes of a local run share one hostname."""
        return f"{self.node}#{self.node_rank}" if self.node_rank is not None else self.node

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Heartbeat:
        """From a heartbeat's JSON object; ValueError if it has no integer rank."""
        rank = data.get("rank")
        if not (type(rank) is int or jobfiles.is_a(rank, int)) or not 0 <= rank < MAX_RANKS:
            raise ValueError(f"a heartbeat without a rank in range: {data!r:.80}")
        get = data.get
        # A reader at scale builds 32,768 of these: a plain int, a finite float (v - v is 0.0) is kept as it is.
        values = {k: v if type(v := get(k)) is int and _INT64[0] <= v < _INT64[1] else
                  None if (v := _number(v)) is None else int(v) for k in _INTS}
        values.update({k: v if type(v := get(k)) is float and v - v == 0.0 else _number(v) for k in _FLOATS})
        values.update(attempt=values["attempt"] or 0, step=values["step"] or 0,
                      time=jobfiles.unix_time(values["time"]) or 0.0, step_at=jobfiles.unix_time(values["step_at"]))
        values.update({k: None for k in _DURATIONS if (v := values[k]) is not None and v < 0})
        marks = get("marks") if type(get("marks")) is dict else {}
        ring = get("recent_compute_s") if type(get("recent_compute_s")) is list else ()
        return cls(
            rank=rank, hostname=str(get("hostname") or ""), phase=str(get("phase") or "unknown"), **values,
            marks={k: float(v) for k, v in marks.items() if k in MARKS and jobfiles.unix_time(_number(v)) is not None},
            recent_compute_s=tuple(v for v in _floats(ring) if v >= 0))


FIELDS = tuple(f.name for f in fields(Heartbeat))
MAX_RANKS = 1 << 20  # hpc.spec.MAX_WORLD_SIZE (the trainer must not import hpc.spec)


_INTS = ("node_rank", "local_rank", "world_size", "pid", "attempt", "step", "start_step", "total_steps", "rss_bytes",
         "peak_memory_bytes", "snapshot_step")
_FLOATS = ("time", "step_time_s", "compute_s", "comm_s", "images_per_s", "loss", "step_at")


_INT64 = (-(2**63), 2**63)
_DURATIONS = ("step_time_s", "compute_s", "comm_s", "images_per_s")  # below 0 no rank measured them: absent
CLOCK_SKEW_S = 10.0  # a beat's time past the reader's clock by more than this is yet to come


def age(now: float, then: float) -> float | None:
    """How long ago ``then`` (a beat's time) was at ``now``; None for a time unknown (0.0) or yet to come."""
    return max(now - then, 0.0) if 0 < then <= now + CLOCK_SKEW_S else None


def _floats(values: Any) -> tuple[float, ...]:
    """The finite numbers among ``values`` as floats (what _number keeps); a ring of floats as it is."""
    if all(type(v) is float for v in values) and math.isfinite(sum(values)):
        return tuple(values)
    return tuple(float(v) for v in values if _number(v) is not None)


def _number(value: Any) -> float | int | None:
    """The value if a finite number within 64 bits (what jobfiles.loads would keep), never a bool; else None."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    return value if kind is int and _INT64[0] <= value < _INT64[1] else None


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / vocab.HEARTBEAT


def node_path(run_dir: Path, node: int) -> Path:
    return folder(run_dir) / f"node-{node}.json"


def history_path(run_dir: Path, node: int) -> Path:
    return folder(run_dir) / f"node-{node}.jsonl"


def node_document(node: int, hostname: str, attempt: int, now: float, beats: list[Mapping[str, Any]]) -> dict:
    return {"node": node, "hostname": hostname, "attempt": attempt, "time": round(now, 3),
            "ranks": sorted(beats, key=lambda b: b.get("rank", 0))}


def encode(document: Mapping[str, Any]) -> bytes:
    """One line: the document's JSON, a tab, its CRC-32 in hex."""
    body = json.dumps(document, separators=(",", ":")).encode()
    return body + b"\t%08x\n" % zlib.crc32(body)


def decode(line: bytes | str) -> dict | None:
    """A node document from one line; None for a torn, foreign or unchecked line."""
    raw = line.encode() if isinstance(line, str) else line
    body, tab, crc = raw.strip().rpartition(b"\t")
    try:
        if not tab or int(crc, 16) != zlib.crc32(body):
            return None
        # Plain json (C speed: a reader at scale parses 32,768 beats); from_mapping drops what jobfiles.loads
        # would (numbers not finite or beyond 64 bits) and reads no deeper than a beat's own fields.
        value = json.loads(body.decode(), parse_constant=lambda name: None)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("ranks"), list) else None


def beats_of(document: Mapping[str, Any]) -> Iterator[dict]:
    """The rank beats of a node document, each a dict (what a foreign file holds instead is skipped)."""
    return (b for b in document.get("ranks", ()) if isinstance(b, dict))


def read_node(path: Path, tries: int = 3) -> dict | None:
    """A latest file's document; read again when it was caught mid-rewrite, None if it never checks."""
    for _ in range(tries):
        try:
            document = decode(jobfiles.read_bytes(path, NODE_BYTES))
        except (OSError, jobfiles.Damaged):
            return None
        if document is not None:
            return document
    return None


def read_latest(run_dir: Path) -> dict[str, dict]:
    """Every node's newest document, by file name (``node-3.json``)."""
    return {path.name: document for path in jobfiles.folder(folder(run_dir), "node-*.json")
            if (document := read_node(path)) is not None}


def history_files(run_dir: Path, nodes: Any = None) -> dict[str, list[Path]]:
    """node file name -> its history files, oldest first; ``nodes`` (node numbers) limits which."""
    return {path.stem + ".json": [p for p in (path.with_name(path.name + ".1"), path) if p.is_file()]
            for path in sorted(jobfiles.folder(folder(run_dir), "node-*.jsonl"), key=lambda p: p.name)  # one folder
            if nodes is None or jobfiles.count(path.name[len("node-"):-len(".jsonl")]) in nodes}


def read_history(paths: list[Path], limit: int = jobfiles.MAX_BYTES) -> list[dict]:
    """A node's history documents, oldest first: each file's last ``limit`` bytes; damaged lines skipped."""
    out = []
    for path in paths:
        with contextlib.suppress(OSError, jobfiles.Damaged):
            data = jobfiles.read_bytes(path, limit, tail=True)
            out += [d for d in map(decode, data.splitlines()) if d is not None]
    return out
