"""A job's logs: where each task's log is, which task failed first, and the report of a failed job."""

from __future__ import annotations

import contextlib
import glob
import re
import signal
from pathlib import Path
from typing import Mapping

from hpc import jobfiles, vocab
from hpc.registry import JobError, Record


def log_files(record: Record, rank: int | None = None) -> list[Path]:
    """The job's logs: every task's (in task order) and the batch script's, or the one holding ``rank``. JobError
    for a logs/ that is a symbolic link (own_folder)."""
    logs = own_folder(record, vocab.LOGS_DIR)
    if rank is not None:
        return [Path(record.job_dir) / vocab.task_log(task_of(record, rank))]

    def order(path: Path) -> tuple[int, int, str]:
        m = re.fullmatch(r"task-(\d+)\.log", path.name)
        return (0, int(m.group(1)), "") if m else (1, 0, path.name)

    return sorted((p for p in jobfiles.folder(logs) if p.is_file()), key=order)


def own_folder(record: Record, name: str) -> Path:
    """The job directory's folder ``name`` (logs/, run/); JobError where it is a symbolic link: anyone who can
    write the job directory could point it at any folder, whose files would be read (and shown) as the job's."""
    path = Path(record.job_dir) / name
    if path.is_symlink():
        raise JobError(f"{ascii(str(path))[1:-1]} is a symbolic link; hpcdist reads a job's files only inside its "
                       "directory: remove the link")
    return path


def task_of(record: Record, rank: int) -> int:
    """The Slurm task whose log holds ``rank``: itself under srun, its node's launcher otherwise."""
    if not 0 <= rank < max(record.world_size, 1):
        raise JobError(f"rank {rank} is outside world size {record.world_size}")
    per_task = max(record.world_size // max(record.ntasks, 1), 1)
    return rank // per_task


def failing_task(batch_log: str, exit_codes: Mapping[int, int]) -> int | None:
    """The task that failed first: srun's own first report in the batch log, else a local non-zero status.

    srun prints ``srun: error: n2: task 1: Exited with exit code 3`` (or ``...: Killed``: the OOM killer,
    kill -9) for the task that failed; the others follow it: those stopped by --kill-on-bad-exit
    ("Terminated"/"Killed") and a rank that noticed its dead peer (a broken collective).
    """
    from hpc.failures.evidence import task_ends

    ended = task_ends(batch_log)
    if ended:
        return ended[0].task
    stopped_by_others = (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    failed = [index for index in sorted(exit_codes) if exit_codes[index]]
    return next((i for i in failed if exit_codes[i] not in stopped_by_others), failed[0] if failed else None)


def ranks_label(record: Record, index: int) -> str:
    """``rank 1`` or ``ranks 2-3``: the ranks Slurm task ``index`` ran (one per node under a launcher)."""
    per_task = max(record.world_size // max(record.ntasks, 1), 1)
    first, last = index * per_task, (index + 1) * per_task - 1
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def failure_report(record: Record, lines: int = 40) -> str:
    """For a job that did not complete: the root cause first (the first failing rank's own error line, from
    attempts.jsonl), then which task failed first and where, its log's tail, and the batch log's tail."""
    from hpc.failures import record as records
    from hpc.failures.evidence import attempt_segment, task_ends

    try:
        own_folder(record, vocab.LOGS_DIR)
    except JobError as exc:
        return f"hpcdist: {exc}"
    batch = Path(record.job_dir) / vocab.batch_log(record.job_id)
    batch_text = tail(batch, 400)
    codes = {}
    # The statuses there are, not one look-up per task: a record may name a million tasks.
    for path in jobfiles.folder(record.submitit_dir, f"{glob.escape(record.job_id)}_*_exit", record.ntasks):
        index = jobfiles.count(path.name[len(record.job_id) + 1:-len("_exit")])
        with contextlib.suppress(OSError, ValueError):
            if index is not None and index < record.ntasks:
                codes[index] = int(jobfiles.read_text(path, 64))
    history = records.load(Path(record.job_dir))
    last = history[-1] if history else None
    cause = records.root_cause(history[-1:])
    # Every attempt appends to the batch log: srun's reports of an earlier, retried attempt are not this one's.
    own_text = attempt_segment(batch_text, last["attempt"]) if last else batch_text
    index = failing_task(own_text, codes)
    # The rank the classifier blamed (a hung rank, a rank's own error) beats the task srun saw end first.
    if last and isinstance(last.get("rank"), int) and 0 <= last["rank"] < max(record.world_size, 1):
        index = task_of(record, last["rank"])
    chosen = [Path(record.job_dir) / vocab.task_log(index)] if index is not None else [
        p for p in log_files(record) if p.name.startswith("task-")]
    parts = []
    if cause and last:
        parts.append(f"hpcdist: {last['ending']}: {cause}")
    if index is not None:
        # One line naming who failed and where: a killed rank writes nothing, so its log tail can't say.
        first = next(iter(task_ends(own_text)), None)
        where, how = (f" on {first.node}", f": {first.how}") if first and first.task == index else (
            (f" on {last['node']}", "") if last and last.get("node") else ("", f": exit status {codes.get(index)}"))
        parts.append(f"hpcdist: task {index} ({ranks_label(record, index)}){where} failed first{how}")
    for path in chosen:
        if path.exists():
            why = " (the failing task)" if index is not None else ""
            parts.append(f"==> {path}{why} <==\n{tail(path, lines)}")
    if batch_text:
        parts.append(f"==> {batch} <==\n" + "\n".join(batch_text.splitlines()[-10:]))
    return "\n".join(parts)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file (reads at most the final 256 KiB)."""
    data = jobfiles.tail_text(path, 262144)
    return "\n".join(data.splitlines()[-lines:])
