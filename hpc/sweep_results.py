"""Read a submitted sweep back: each task's Slurm state and run summary as a Row, shown as a table or a chart.

    data, submitted = load(sweep_dir)                    # sweep.yaml, {array name: Slurm job id}
    states = {j: s.state for j, s in jobs.slurm_states(job_ids(data, submitted)).items()}
    print(table(rows(data, submitted, states), markdown=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpc import fileio, jobfiles, shown, vocab, yamlfile
from hpc.sweep import SUBMITTED_FILE, SWEEP_FILE
from hpc.sweep_matrix import SweepError, label

# What sweep status and report read of sweep.yaml's `resolved` entries and of each task's summary.json.
RESOLVED_FIELDS = {"index": int, "array": str, "array_index": int, "job_dir": str, "values": dict | None}
SUMMARY_FIELDS = {"precision": str | None, "images_per_s": float | None, "final_loss": float | None,
                  "test_accuracy": float | None, "time_to_first_step_s": float | None, "ranks": list | None}
RANK_FIELDS = {"rank": int, "peak_memory_bytes": float | None, "hostname": str}


@dataclass(frozen=True)
class Row:
    """One task as the report shows it."""

    index: int
    label: str
    array: str
    job_id: str           # JOBID_TASKID once submitted, else ""
    state: str
    precision: str | None   # what the trainer trained in (summary.json), which "auto" leaves to it
    images_per_s: float | None
    final_loss: float | None
    test_accuracy: float | None
    peak_memory_mib: tuple[float, ...]   # per rank, in rank order
    time_to_first_step_s: float | None
    hostnames: tuple[str, ...]
    job_dir: str


# ---- the sweep directory and each task's summary.json (reads files) ------------------------------

def load(sweep_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(sweep.yaml, {array name: Slurm job id}) of a written sweep; SweepError if it is none or is damaged."""
    try:
        data = yamlfile.load(sweep_dir / SWEEP_FILE, SWEEP_FILE, follow=False)
    except yamlfile.YamlError as exc:
        raise SweepError(f"{sweep_dir} is not a sweep directory ({exc}); pass the directory hpcdist sweep made") \
            from None
    resolved = data.get("resolved") if isinstance(data, dict) else None
    damage = ["has no list of tasks"] if not isinstance(resolved, list) else [
        f"task entry {i} is damaged" for i, task in enumerate(resolved) if not isinstance(task, dict)
        or not all(jobfiles.is_a(task.get(k), kind) for k, kind in RESOLVED_FIELDS.items())]
    if damage:
        raise SweepError(f"{sweep_dir / SWEEP_FILE} {damage[0]}; it is not as hpcdist sweep wrote it, so run the "
                         "sweep again into a new directory")
    arrays = (jobfiles.json_object(sweep_dir / SUBMITTED_FILE, 1 << 20) or {}).get("arrays")
    # A job id that is not Slurm's (digits) is damage: that array counts as not submitted.
    submitted = {k: v for k, v in arrays.items() if isinstance(v, str) and v.isdigit() and v.isascii()} \
        if isinstance(arrays, dict) else {}
    return data, submitted


def read_summary(job_dir: Path) -> dict[str, Any]:
    """A task's run/summary.json (none yet: no fields) with only its fields of the right type and its whole ranks."""
    data = jobfiles.well_typed(jobfiles.json_object(job_dir / vocab.RUN_DIR / vocab.SUMMARY) or {}, SUMMARY_FIELDS)
    ranks = data.get("ranks") or []
    data["ranks"] = [r for r in ranks if isinstance(r, dict) and jobfiles.well_typed(r, RANK_FIELDS) == r]
    return data


def task_job_id(task: Mapping[str, Any], submitted: Mapping[str, str]) -> str:
    """A task's Slurm job id, ``ARRAYID_INDEX``; "" when its array was not submitted (a dry run)."""
    array_job = submitted.get(task["array"])
    return f"{array_job}_{task['array_index']}" if array_job else ""


def job_ids(data: Mapping[str, Any], submitted: Mapping[str, str]) -> list[str]:
    """The job id of every submitted task."""
    return [j for task in data.get("resolved") or [] if (j := task_job_id(task, submitted))]


def rows(data: Mapping[str, Any], submitted: Mapping[str, str], states: Mapping[str, str]) -> list[Row]:
    """Every task's row: its Slurm state (``NOT_SUBMITTED`` for a dry run) and its run/summary.json."""
    out = []
    for task in data.get("resolved") or []:
        job_id = task_job_id(task, submitted)
        job_dir = Path(task["job_dir"])
        summary = read_summary(job_dir)
        ranks = sorted(summary["ranks"], key=lambda r: r.get("rank", 0))
        state = states.get(job_id, "UNKNOWN") if job_id else "NOT_SUBMITTED"
        out.append(Row(
            index=task["index"], label=label(task.get("values") or {}), array=task["array"], job_id=job_id,
            state=state, **{k: summary.get(k) for k in SUMMARY_FIELDS if k != "ranks"},
            peak_memory_mib=tuple(round((r.get("peak_memory_bytes") or 0) / 2**20, 1) for r in ranks),
            hostnames=tuple(r.get("hostname", "") for r in ranks), job_dir=str(job_dir)))
    return out


# ---- showing the rows: a table (pure) and a chart (writes a PNG) ---------------------------------

def table(report_rows: Sequence[Row], markdown: bool = False) -> str:
    """The comparison as aligned text, or as a markdown table."""
    header = ("task", "job", "configuration", "state", "precision", "images/s", "final loss", "test acc",
              "peak MiB per rank", "first step s")
    # summary.json is any rank's file: its text must neither add a row nor reach the terminal as escapes.
    body = [tuple(map(shown.line, (
        str(r.index), r.job_id or "-", r.label, r.state, r.precision or "-",
        shown.number(r.images_per_s, ".0f"), shown.number(r.final_loss, ".4f"),
        shown.number(r.test_accuracy, ".3f"), "/".join(f"{m:.0f}" for m in r.peak_memory_mib) or "-",
        shown.number(r.time_to_first_step_s, ".1f")))) for r in report_rows]
    if markdown:
        return "\n".join(shown.markdown((header, *body), right=range(5, len(header)))) + "\n"
    return "\n".join(shown.aligned((header, *body))) + "\n"


def chart(report_rows: Sequence[Row], path: Path, title: str) -> None:
    """A PNG of bar charts (images/s, peak memory, time to first step) per task; matplotlib loads only here."""
    plt = fileio.pyplot()
    labels = [f"{r.index}: {r.label}" for r in report_rows]
    panels = (("images/s", [r.images_per_s or 0 for r in report_rows]),
              ("peak MiB (largest rank)", [max(r.peak_memory_mib, default=0) for r in report_rows]),
              ("time to first step, s", [r.time_to_first_step_s or 0 for r in report_rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(labels) + 1.8), sharey=True)
    for ax, (name, values) in zip(axes, panels):
        ax.barh(range(len(values)), values, color="#4c72b0")
        ax.set_title(name)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}" if v >= 10 else f" {v:.1f}", va="center", fontsize=8)
        ax.margins(x=0.2)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fileio.save_png(fig, path, dpi=100)
    plt.close(fig)
