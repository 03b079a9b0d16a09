"""Read and write the files a rank leaves in the run directory when it fails: errors/rank-R.json, hang.json,
lost.json (docs/CONTRACTS.md). Light enough for the trainer to import; nothing here imports torch.

    record_rank_error(run_dir, os.environ, "ValueError: ...", "exception", 1)   # the trainer's top-level except
    declare(run_dir / HANG, {...})      # the first rank to declare wins; False when another did first
    read_errors(run_dir); read_hang(run_dir, attempt); read_lost(run_dir, attempt)
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from errno import EDQUOT, EFBIG, ENOSPC, EROFS
from pathlib import Path
from typing import Any, Mapping

from hpc import fileio, jobfiles, ranks
from hpc.vocab import ERRORS, HANG, LOST

# What each field must be; a field of another type is damage and counts as absent.
RANK_ERROR_FIELDS = {"rank": int, "node": str, "attempt": int, "time": float, "kind": str, "error": str,
                     "exit_code": int | None, "errno": int | None}
HANG_FIELDS = {"rank": int | None, "node": str | None, "since": float, "step": int | None, "phase": str,
               "attempt": int}
LOST_FIELDS = {"node": str, "ranks": list, "since": float, "step": int | None, "declared_by": int, "attempt": int}
_SMALL = 1 << 20
# Failures of the storage itself, not of the training (retrying elsewhere would only fail the same way), and what
# clears each: a file-size limit is the process's own, which no free space or other folder lifts. The trainer's
# storage line and the job's decision (hpc/failures/policy.py) both advise from here.
STORAGE_ADVICE = {ENOSPC: "free space or move --run-dir",
                  EDQUOT: "free some of your quota (or have it raised) or move --run-dir",
                  EFBIG: "raise the file-size limit (ulimit -f)",
                  EROFS: "make it writable or move --run-dir"}


@dataclass(frozen=True)
class RankError:
    """One rank's own fatal error (RUN_DIR/errors/rank-R.json)."""

    rank: int
    node: str
    attempt: int
    time: float
    kind: str            # "bad_input", "storage" or "exception"
    error: str           # one line: "global batch 32 does not split ..." or "ValueError: ..."
    exit_code: int | None = None
    errno: int | None = None  # a storage error's (a STORAGE_ADVICE key)


def record_rank_error(run_dir: str | os.PathLike, environ: Mapping[str, str], error: str, kind: str,
                      exit_code: int | None = None, errno: int | None = None) -> None:
    """Leave this rank's fatal error in RUN_DIR/errors/rank-R.json, so the job's ending can lead with it.

    Called from the trainer's top-level except; must never raise itself.
    """
    try:
        rank = int(environ.get("RANK") or environ.get("SLURM_PROCID") or 0)
        folder = Path(run_dir) / ERRORS
        folder.mkdir(parents=True, exist_ok=True)
        data = {"rank": rank, "node": environ.get("SLURMD_NODENAME") or socket.gethostname(),
                "attempt": ranks.attempt_of(environ),
                "time": time.time(), "kind": kind, "error": " ".join(str(error).split())[:2000],
                "exit_code": exit_code, "errno": errno, "pid": os.getpid()}
        fileio.atomic_write(folder / f"rank-{rank}.json", json.dumps(data) + "\n")
    except Exception:  # noqa: BLE001 - reporting must not mask the error being reported
        pass


def declare(path: Path, record: Mapping[str, Any]) -> bool:
    """Write ``record`` to ``path`` (hang.json, lost.json) unless a rank declared first: a hard link of a whole
    temporary file, so a reader never sees half of it and two declarers never mix (nor two threads of one
    process: the ranks' watchdogs of a test)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(dict(record)) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def parse_rank_error(text: str) -> RankError | None:
    """A rank's error file; a field of the wrong type counts as absent, and without a rank or an error line
    there is nothing to report (None)."""
    try:
        data = jobfiles.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data = jobfiles.well_typed(data, RANK_ERROR_FIELDS)
    if not isinstance(data.get("rank"), int) or not isinstance(data.get("error"), str):
        return None
    return RankError(data["rank"], data.get("node", ""), data.get("attempt", 0), float(data.get("time", 0.0)),
                     data.get("kind", "exception"), data["error"], data.get("exit_code"), data.get("errno"))


def read_errors(run_dir: Path) -> tuple[RankError, ...]:
    found = (parse_rank_error(jobfiles.tail_text(p, 65536))
             for p in sorted(jobfiles.folder(Path(run_dir) / ERRORS, "rank-*.json")))
    return tuple(e for e in found if e is not None)


def read_hang(run_dir: Path, attempt: int) -> dict[str, Any] | None:
    """This attempt's hang.json (the watchdog's verdict), or None: one that does not say its attempt is none's, as
    it stays in the run directory after its attempt."""
    data = jobfiles.well_typed(jobfiles.json_object(Path(run_dir) / HANG, _SMALL) or {}, HANG_FIELDS)
    # A time the clock cannot show is as good as none.
    if jobfiles.unix_time(data.get("since")) is None:
        data.pop("since", None)
    return data if data.get("attempt") == attempt else None


def read_lost(run_dir: Path, attempt: int) -> dict[str, Any] | None:
    """This attempt's lost.json (a node whose ranks vanished and whose slurmd did not answer), or None."""
    data = jobfiles.well_typed(jobfiles.json_object(Path(run_dir) / LOST, _SMALL) or {}, LOST_FIELDS)
    return data if data.get("attempt") == attempt and data.get("node") else None
