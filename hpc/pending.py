"""Why a job is pending, in plain words with what to do, and how many jobs are ahead of it (from squeue).

    explain("Resources", "4242", ahead={"gpu": ("4240", "77_3")})   # pure: the sentence
    describe(["4242"])                      # asks squeue: {"4242": "pending: waiting for resources ..."}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from hpc.slurm import commands, parse
from hpc.slurm.runner import Runner
from hpc.slurm.runner import run as slurm_run

SQUEUE_FORMAT = "%i|%T|%r|%P|%Q|%S"
SQUEUE_FIELDS = ("JobID", "State", "Reason", "Partition", "Priority", "StartTime")

# Slurm's reason code -> (what it means, what the user can do); {job} is the job id.
REASONS: Mapping[str, tuple[str, str]] = {
    "Resources": ("waiting for resources: the nodes, CPUs or GPUs it asks for are busy with other jobs",
                  "it starts when they free up; fewer --nodes or a shorter --time may let backfill start it sooner"),
    "Priority": ("waiting behind jobs of higher priority in its partition",
                 "it starts after them; nothing to fix"),
    "None": ("just queued: the scheduler has not looked at it yet", "wait a few seconds"),
    "NodeDown": ("a node it needs is down", "drop --nodelist or ask your admin (sinfo -R)"),
    "Dependency": ("waiting for the jobs it depends on to finish", "it starts when they do"),
    "DependencyNeverSatisfied": ("it will never start: a job it depends on ended in a way the dependency excludes",
                                 "cancel it (hpcdist cancel {job}) and resubmit"),
    "BeginTime": ("not allowed to start before its begin time (a requeued job waits about 2 minutes)",
                  "wait, or start it now: scontrol update JobId={job} StartTime=now"),
    "JobHeldUser": ("held by its owner", "release it: scontrol release {job}"),
    "JobHeldAdmin": ("held by an administrator", "ask your admin why; only they can release it"),
    "PartitionTimeLimit": ("it will never start: its --time exceeds the partition's MaxTime",
                           "cancel it (hpcdist cancel {job}) and resubmit with a shorter --time or another "
                           "--partition"),
    "PartitionNodeLimit": ("it will never start: its node count is outside the partition's MinNodes/MaxNodes",
                           "cancel it and resubmit with fewer --nodes or another --partition"),
    "PartitionDown": ("its partition is down", "wait for the admin to bring it up, or use another --partition"),
    "PartitionInactive": ("its partition is inactive", "use another --partition"),
    "Reservation": ("waiting for its reservation to start", "wait for the reservation's start time"),
    "Licenses": ("waiting for licenses it asked for", "wait until other jobs release them"),
    "BadConstraints": ("it can never run: no node satisfies its constraints",
                       "cancel it and resubmit with fewer constraints"),
    "InvalidAccount": ("its account is invalid", "cancel it and resubmit with a valid --account"),
    "InvalidQOS": ("its QOS is invalid", "cancel it and resubmit with a valid QOS"),
    "JobArrayTaskLimit": ("the array's limit of tasks running at once is reached", "it starts as other tasks end"),
    "launch failed requeued held": ("held after a failed launch", "release it: scontrol release {job}"),
}
# Families of limits: QOSMaxCpuPerUserLimit, AssocGrpGRES, QOSMaxWallDurationPerJobLimit, ...
PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("QOSMaxWallDuration", "it will never start: its --time exceeds the QOS's MaximumWallTime",
     "cancel it and resubmit with a shorter --time"),
    ("AssocMaxWallDuration", "it will never start: its --time exceeds your association's MaxWall",
     "cancel it and resubmit with a shorter --time"),
    ("QOSMax", "held by a per-user or per-job limit of its QOS ({reason})",
     "it starts when your other jobs end; or ask for less (sacctmgr show qos shows the limits)"),
    ("QOSGrp", "held by a group limit of its QOS ({reason})", "it starts when jobs under that QOS end"),
    ("AssocMax", "held by a limit on your account's association ({reason})",
     "it starts when your other jobs end; or ask for less (sacctmgr show assoc)"),
    ("AssocGrp", "held by a group limit of your account ({reason})", "it starts when your account's jobs end"),
    ("ReqNodeNotAvail", "a node it needs is unavailable (down, drained or reserved)",
     "drop --nodelist, or ask your admin when the node returns (sinfo -R)"),
    ("Nodes_required_for_job", "a node it needs is down, drained or reserved",
     "drop --nodelist, or ask your admin (sinfo -R)"),
)


@dataclass(frozen=True)
class Queued:
    """One row of ``squeue -o '%i|%T|%r|%P|%Q|%S'``."""

    job_id: str
    state: str
    reason: str
    partition: str
    priority: int
    start: str


def explain(reason: str, job_id: str, ahead: Mapping[str, Sequence[str]] | None = None,
            start: str | None = None) -> str:
    """One sentence: why the job pends, what to do, and where Slurm can tell, how many jobs are ahead (``ahead``: in
    each of its partitions, their ids, an array's pending tasks each)."""
    reason = reason.strip().strip("()")
    code = reason.split(",")[0].strip()
    meaning, action = REASONS.get(code) or next((p[1:] for p in PREFIXES if code.startswith(p[0])),
                                                (f"Slurm's reason: {reason}", "see `man squeue`, JOB REASON CODES"))
    if "UnavailableNodes:" in reason:
        meaning += f" ({reason.split('UnavailableNodes:', 1)[1].strip()})"
    text = f"pending: {meaning.format(reason=code, job=job_id)}; {action.format(reason=code, job=job_id)}"
    if ahead is not None and code in ("Resources", "Priority", "None"):
        text += "".join(f"; {_jobs_ahead(ids, job_id, 'its partition' if len(ahead) == 1 else f'partition {p}')}"
                        for p, ids in ahead.items())
    if start and start not in ("N/A", "Unknown", "(null)"):
        text += f"; Slurm expects it to start by {start}"
    return text


def parse_squeue(text: str) -> dict[str, Queued]:
    out = {}
    for row in parse.rows(text, SQUEUE_FIELDS):
        if row["JobID"]:
            # squeue prints priorities of up to 10 digits; str.isdigit() alone also passes "²", which int() refuses.
            priority = int(row["Priority"]) if row["Priority"].isascii() and row["Priority"].isdigit() else 0
            out[row["JobID"]] = Queued(row["JobID"], row["State"], row["Reason"], row["Partition"], priority,
                                       row["StartTime"])
    return out


def _jobs_ahead(ids: Sequence[str], job_id: str, where: str) -> str:
    """``3 job(s) ahead of it in WHERE, one of them an array of 500 pending task(s)``: squeue --array gives an array's
    pending tasks a row each, as squeue does a heterogeneous job's components; a user counts either as one job, and
    an array task's own array as no other job."""
    mine = _job(job_id) if "_" in job_id else None
    own = sum(_job(i) == mine for i in ids)
    ids = [i for i in ids if _job(i) != mine]
    arrays = {_job(i) for i in ids if "_" in i}
    text = f"{len({_job(i) for i in ids})} job(s) ahead of it in {where}"
    tasks = sum("_" in i for i in ids)
    if len(arrays) == 1:
        text += f", one of them an array of {tasks} pending task(s)"
    elif arrays:
        text += f", {len(arrays)} of them arrays of {tasks} pending task(s) in all"
    return text + (f"; {own} earlier task(s) of its own array before it" if own else "")


def _job(job_id: str) -> str:
    """The job an id of squeue's names: an array task's (900_3) or a heterogeneous job's component's (30+1) own."""
    return job_id.replace("+", "_").partition("_")[0]


def _submitted(job_id: str) -> tuple[int, int] | None:
    """(job, task) numbers, the order of submission: an array's tasks (900_3) and a heterogeneous job's components
    (30+1) come with their job's id."""
    job, _, task = job_id.replace("+", "_").partition("_")
    numbers = job + (task or "0")
    return (int(job), int(task or 0)) if job.isdigit() and (task or "0").isdigit() and numbers.isascii() else None


def ahead_of(job: Queued, queue: Mapping[str, Queued]) -> dict[str, tuple[str, ...]]:
    """For each partition the job pends in (Slurm starts it in whichever lets it first), the ids of the pending jobs
    (an array's: its tasks') there that Slurm will consider first: higher priority, or equal and submitted earlier.
    A heterogeneous job's components start together: none is ahead of another."""
    mine = _submitted(job.job_id)

    def first(other: Queued) -> bool:
        if other.priority != job.priority:
            return other.priority > job.priority
        theirs = _submitted(other.job_id)
        return mine is not None and theirs is not None and theirs < mine

    return {p: tuple(o.job_id for o in queue.values() if o.job_id.partition("+")[0] != job.job_id.partition("+")[0]
                     and o.state == "PENDING" and p in o.partition.split(",") and first(o))
            for p in job.partition.split(",")}


def describe(job_ids: Sequence[str], runner: Runner = slurm_run) -> dict[str, str]:
    """The explanation of each of these jobs that is pending (others are left out); {} where squeue fails."""
    if not job_ids:
        return {}
    mine = commands.squeue(SQUEUE_FORMAT, jobs=job_ids, runner=runner)
    if mine is None:
        return {}
    jobs = {k: v for k, v in parse_squeue(mine).items() if v.state == "PENDING"}
    partitions = sorted({p for j in jobs.values() for p in j.partition.split(",")})
    everyone = commands.squeue(SQUEUE_FORMAT, states="PD", partitions=partitions, runner=runner) if partitions else None
    queue = parse_squeue(everyone) if everyone is not None else {}
    return {j.job_id: explain(j.reason, j.job_id, ahead_of(j, queue) if queue else None, j.start)
            for j in jobs.values()}
