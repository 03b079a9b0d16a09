"""Read and write JOB_DIR/attempts.jsonl: one line per attempt, how it ended and what was done next
(docs/CONTRACTS.md, contract 2).

    append(job_dir, record(ending, decision, attempt=0, job_id="42", started=..., ended=..., source="batch"))
    load(job_dir)          # every well-formed line, in attempt order
    summary_line(line)     # "attempt 0: rank_crashed: rank 1 on n2: killed by SIGKILL -> retry 1 of 2 ..."
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpc import jobfiles, shown
from hpc.failures.policy import Decision
from hpc.failures.rules import Ending
from hpc.vocab import ATTEMPTS

# What each field must be; a line with a field of another type is damage (skipped).
ATTEMPT_FIELDS = {"attempt": int, "job_id": str, "started": str, "ended": str, "ending": str, "rank": int | None,
                  "node": str | None, "detail": str | None, "exit_code": int | None, "signal": int | None,
                  "step": int | None, "action": str, "excluded": list, "reason": str | None,
                  "seen_step": int | None, "source": str, "context": dict, "nodes": int}
MAX_ATTEMPT = 1 << 20


def record(ending: Ending, decision: Decision, *, attempt: int, job_id: str, started: str, ended: str,
           source: str, seen_step: int | None = None, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One attempts.jsonl line (contract 2), plus ``reason`` (why the action), ``seen_step``, ``source`` and, from
    the batch shell, ``context``: what Slurm and the shell saw besides the job directory's files (evidence.CONTEXT)."""
    line = {"attempt": attempt, "job_id": job_id, "started": started, "ended": ended, "ending": ending.ending,
            "rank": ending.rank, "node": ending.node, "detail": ending.detail, "exit_code": ending.exit_code,
            "signal": ending.signal, "step": ending.step, "action": decision.action,
            "excluded": list(decision.excluded), "reason": decision.reason, "seen_step": seen_step,
            "source": source}
    if decision.nodes is not None:
        line["nodes"] = decision.nodes  # an elastic relaunch's
    return {**line, "context": dict(context)} if context is not None else line


def parse_attempts(text: str) -> list[dict[str, Any]]:
    """attempts.jsonl's lines; a torn line, or one without an attempt number and an ending or with a field of
    the wrong type, is skipped: every reader may then index what contract 2 promises."""
    return [a for a in jobfiles.json_lines(text)
            if jobfiles.well_typed(a, ATTEMPT_FIELDS) == a and isinstance(a.get("attempt"), int)
            and isinstance(a.get("ending"), str) and 0 <= a["attempt"] <= MAX_ATTEMPT]


def load(job_dir: Path) -> list[dict[str, Any]]:
    """The job's attempt lines in attempt order (a line added afterwards from accounting may come last); bytes that
    are not UTF-8 read as replacement characters, as the batch shell's append reads them: none hides a line."""
    text = jobfiles.tail_text(Path(job_dir) / ATTEMPTS, jobfiles.MAX_BYTES)
    return sorted(parse_attempts(text), key=lambda a: a["attempt"])


def append(job_dir: Path, line: Mapping[str, Any]) -> bool:
    """Add an attempt's line unless that attempt already has one (the batch shell and a later ``status`` may
    both try); False when it was there already. A lock makes check-and-append one step."""
    path = Path(job_dir) / ATTEMPTS
    # Never through a symbolic link, never blocking on a FIFO: what is there must be the file it reads.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise jobfiles.Damaged(f"{path} is not a regular file; move it away")
    with os.fdopen(fd, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().decode(errors="replace")
        if any(a["attempt"] == line["attempt"] for a in parse_attempts(text)):
            return False
        # A line cut short (a full disk, a killed writer) has no newline: this one must not join it.
        f.write((("\n" if text and not text.endswith("\n") else "") + json.dumps(dict(line)) + "\n").encode())
        f.flush()
    return True


def summary_line(a: Mapping[str, Any]) -> str:
    """``attempt 0: rank_crashed, rank 1 on n2: killed by SIGKILL -> retry without n2 from step 20``."""
    text = f"attempt {a['attempt']}: {a['ending']}"
    if a.get("detail"):
        text += f": {a['detail']}"
    if a.get("action") and a["action"] != "none":
        text += f" -> {a.get('reason') or a['action']}"
    elif a.get("reason") and a.get("ending") not in ("completed",):
        text += f" ({a['reason']})"
    return shown.line(text, limit=2000)


def root_cause(attempts: Sequence[Mapping[str, Any]]) -> str | None:
    """The first failing rank's own error line of the newest attempt that failed, or None."""
    for a in reversed(attempts):
        if a.get("ending") not in ("completed", "preempted", "cancelled") and a.get("detail"):
            return shown.line(a["detail"], limit=2000)
    return None
