"""Write a job's run report folder: the charts (each PNG with the data it drew), report.html and goodput.json.

    good = write(folder, record)     # folder/report.html, overview.png, loss.png + loss.json, ...

What the page says is hpc.report's (pure); this module reads the job through hpc.telemetry and hpc.goodput,
draws with matplotlib (imported only here, only when a report is drawn) and writes the files. The drawing runs
in a child process forked first, each chart sent to it as soon as its data is read, so that importing matplotlib
(half a second) and drawing overlap the reading of a large job's heartbeats (a second at 4,096 nodes).
"""

from __future__ import annotations

import base64
import errno
import io
import json
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hpc import fileio, jobfiles, jobs, progress, registry, report, telemetry, timeline, vocab
from hpc.goodput import goodput_of
from hpc.telemetry import attempts_of, run_dir, stragglers_of, waterfalls


def write(folder: Path, record: registry.Record) -> dict[str, Any]:
    """Fill ``folder`` with the job's report; returns its goodput. The caller makes ``folder`` (with
    fileio.folder, which refuses a link) so that a folder it cannot use fails before anything is read; a
    directory where a file of the report goes (no rename replaces one) fails here, before anything is written."""
    for name in ("report.html", "goodput.json", "overview.png", *(f"{c}.{e}" for c in CHARTS for e in ("png", "json"))):
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(folder / name))
    with Painter(folder) as painter, ThreadPoolExecutor(1) as asking:
        # Slurm is asked (sacct's attempt times, once for the waterfalls and the goodput; the job's state) while
        # the heartbeats are read: a tenth of a second each, spent waiting on another process.
        asked = asking.submit(lambda: (telemetry.sacct_attempts(record), jobs.state(record)))
        # Each chart goes to the painter as soon as its data is read: drawn while the rest is read.
        losses = report.loss_series(jobfiles.lines_of(run_dir(record) / vocab.METRICS))
        painter.chart("loss", losses)
        seen = telemetry.seen_of(record)
        painter.chart("rate", report.rate_series(seen.histories))
        slurm, state = asked.result()
        every = waterfalls(record, slurm, seen)
        # Goodput counts every rank; the charts and the page show at most timeline.worst's few.
        falls = timeline.worst(every)
        painter.chart("waterfall", falls)
        good = goodput_of(record, every, slurm, seen, losses)
        painter.chart("goodput", good)
        painter.finish(f"hpcdist job {record.job_id}: {record.backend}, {record.nodes} node(s), "
                       f"{record.world_size} rank(s)")
        stragglers = stragglers_of(record, seen)
        facts = [("job", f"{record.job_id} ({record.via})"), ("state", state.line()), ("job dir", record.job_dir),
                 ("geometry", f"{record.backend}, {record.launcher}, {record.nodes} node(s), "
                              f"{record.world_size} rank(s)")]
        for line in progress.summary(jobfiles.json_object(run_dir(record) / vocab.SUMMARY)):
            facts.append(tuple(line.split(": ", 1)))  # type: ignore[arg-type]
        drawn = painter.drawn()
    images = {name: base64.b64encode((folder / f"{name}.png").read_bytes()).decode() for name in drawn}
    page = report.html_report(f"hpcdist job {record.job_id}: {record.job_name or record.backend}", facts, images,
                              attempts_of(record), good, timeline.table(falls), stragglers)
    fileio.atomic_write(folder / "report.html", page)
    fileio.atomic_write(folder / "goodput.json", json.dumps(_nan_to_none(good), indent=1) + "\n")
    return good


# ---- the charts ----------------------------------------------------------------------------------

def _draw_loss(ax: Any, segments: list) -> None:
    for i, seg in enumerate(segments):
        ax.plot([s for s, _ in seg], [v for _, v in seg], marker=".", label=f"run segment {i}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over ranks)")
    ax.set_title("loss", fontsize=10)
    # Placed, never "best": matplotlib's search for the best place warns on a busy machine, and looks at every point.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_rate(ax: Any, series: dict) -> None:
    for rank, points in series.items():
        ax.plot([t for t, _ in points], [v for _, v in points], label=f"rank {rank}")
    ax.set_xlabel("seconds since the first heartbeat")
    ax.set_ylabel("images/s (this rank)")
    ax.set_title("images/s per rank", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_waterfall(ax: Any, falls: list[timeline.Waterfall]) -> None:
    import matplotlib.pyplot as plt

    colours = dict(zip(timeline.PHASES.values(), plt.get_cmap("tab10").colors))
    labels, named = [], set()
    for y, w in enumerate(falls):
        labels.append(f"attempt {w.attempt} rank {w.rank}")
        for p in w.phases:
            ax.barh(y, p.seconds, left=p.start - w.start, color=colours[p.name],
                    label=p.name if p.name not in named else "_")
            named.add(p.name)
    ax.set_yticks(range(len(falls)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the attempt's first stamp")
    ax.set_title("start-up waterfall", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_goodput(ax: Any, good: dict[str, Any]) -> None:
    left = 0.0
    for c in report.CATEGORIES:
        share = good["share"][c] * 100
        ax.barh(0, share, left=left, label=f"{c} {share:.0f}%")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of allocated node-time")
    ax.set_title(f"goodput ({good['redone_steps']} steps recomputed)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _nan_to_none(value: Any) -> Any:
    """``value`` with every number JSON cannot write (NaN, infinities: from a clock a heartbeat made up) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


class Painter:
    """A child process that imports matplotlib at once, then draws each chart ``chart`` sends as it comes, and
    on ``finish`` the overview; ``drawn`` waits for its answer (draw_chart's, by name). Leaving the ``with`` ends
    a child still waiting (the reading failed)."""

    def __init__(self, folder: Path) -> None:
        # Spawned, not forked: a fork copies every lock another thread of the caller held at that moment (a test
        # runner's, a logging handler's), and a child that takes one waits forever.
        spawn = multiprocessing.get_context("spawn")
        self._conn, theirs = spawn.Pipe()
        self._child = spawn.Process(target=_paint, args=(theirs, Path(folder)), name="hpcdist-report-charts",
                                    daemon=True)
        self._child.start()
        theirs.close()

    def __enter__(self) -> Painter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()
        if self._child.is_alive():
            self._child.kill()
        self._child.join()

    def chart(self, name: str, data: Any) -> None:
        self._conn.send((name, data))

    def finish(self, title: str) -> None:
        self._conn.send((None, title))

    def drawn(self) -> dict[str, dict[str, Any]]:
        try:
            answer = self._conn.recv()
        except EOFError:
            raise OSError(f"drawing the report's charts failed (child exit {self._child.exitcode})") from None
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _paint(conn: Any, folder: Path) -> None:
    plt = fileio.pyplot()  # the half second this process exists to spend early
    # numpy's overflow warnings from such values (below) tell a reader of the report nothing to act on.
    warnings.simplefilter("ignore", RuntimeWarning)

    drawn: dict[str, dict[str, Any]] = {}
    failed: BaseException | None = None
    try:
        while (message := conn.recv())[0] is not None:
            name, data = message
            try:
                if failed is None and (done := draw_chart(folder, name, data)) is not None:
                    drawn[name] = done
            except ValueError:
                # Values matplotlib cannot place (a rank's 1e308 beside another's -1e308: their span is past the
                # largest float): that chart is left out, as one with nothing to draw, and the rest still drawn.
                plt.close("all")
            except Exception as exc:  # noqa: BLE001 - any failure is the parent's to report
                failed = exc
        if failed is None and drawn:
            draw_overview(folder, message[1], {name: (folder / f"{name}.png").read_bytes() for name in drawn})
    except EOFError:
        return
    except Exception as exc:  # noqa: BLE001 - any failure is the parent's to report
        failed = exc
    conn.send(failed if failed is not None else drawn)


# name -> (whether the data has anything to draw, drawer, figure size from the data, what NAME.json keeps besides
# what the axes drew)
CHARTS: dict[str, tuple[Any, Any, Any, Any]] = {
    "loss": (bool, _draw_loss, lambda _: (8, 3.5), lambda segments: {"segments": segments}),
    "rate": (lambda series: any(series.values()), _draw_rate, lambda _: (8, 3.5),
             lambda series: {"series": {str(k): v for k, v in series.items()}}),
    "waterfall": (bool, _draw_waterfall, lambda falls: (10, 0.4 * len(falls) + 2.2),
                  lambda falls: {"waterfalls": [w.to_json() for w in falls]}),
    "goodput": (lambda good: good["allocated_node_s"] > 0, _draw_goodput, lambda _: (9, 2.2),
                lambda good: {"share": good["share"]}),
}


def draw_chart(folder: Path, name: str, data: Any) -> dict[str, Any] | None:
    """NAME.png (loss, rate, waterfall or goodput), with NAME.json beside it holding the series the figure
    actually drew (read back from its axes); None, and nothing written, when there is nothing to draw."""
    import matplotlib.pyplot as plt  # _paint, its one caller, chose the Agg backend first

    has_data, draw, size, extra = CHARTS[name]
    if not has_data(data):
        return None
    fig, ax = plt.subplots(figsize=size(data))
    draw(ax, data)
    lines = [{"label": ln.get_label(), "points": len(ln.get_xdata())} for ln in ax.get_lines()]
    bars = [{"label": c.get_label(), "bars": len(c.patches)} for c in ax.containers]
    drawn = {"lines": lines, "bars": bars, **extra(data)}
    fig.tight_layout()
    fileio.save_png(fig, folder / f"{name}.png", dpi=100)
    plt.close(fig)
    # NaN (the gap between attempts) is not JSON: written as null.
    fileio.atomic_write(folder / f"{name}.json", json.dumps(_nan_to_none(drawn), indent=1) + "\n")
    return drawn


def draw_overview(folder: Path, title: str, charts: dict[str, bytes]) -> None:
    """overview.png: the charts drawn (name -> their PNG) two by two in CHARTS order under the title, a blank for
    the rest. Pasted, not drawn again: at 4,096 nodes a second drawing cost half a second at the report's end."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    images = {name: Image.open(io.BytesIO(png)).convert("RGB") for name, png in charts.items()}
    size = {name: images[name].size if name in images else (0, 0) for name in CHARTS}
    widths = [max(size[n][0] for n in list(CHARTS)[column::2]) for column in (0, 1)]
    heights = [max(size[n][1] for n in list(CHARTS)[2 * row:2 * row + 2]) for row in (0, 1)]
    head = 48
    page = Image.new("RGB", (sum(widths), head + sum(heights)), "white")
    for place, name in enumerate(CHARTS):
        if name in images:
            column, row = place % 2, place // 2
            x = sum(widths[:column]) + (widths[column] - size[name][0]) // 2
            y = head + sum(heights[:row]) + (heights[row] - size[name][1]) // 2
            page.paste(images[name], (x, y))
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 24)
    ImageDraw.Draw(page).text((page.width // 2, head // 2), title, fill="black", font=font, anchor="mm")
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    fileio.atomic_write(folder / "overview.png", buffer.getvalue())
