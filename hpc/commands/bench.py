"""``hpcdist bench``: run the trainer and the bare-PyTorch floor over a grid of configs, report images/s.

    hpcdist bench --out bench      # the default grid (about 10 min on 2 quiet cores)
    hpcdist bench --config floor:1 --config ddp:resident:1 --steps 100 --out bench
    hpcdist bench --grid deepspeed:zero2:bf16:2,ddp:resident:2:t2 --dry-run
    hpcdist bench --samples 50000 --grid floor,ddp,ddp:bf16:cl:b4096,floor-deepspeed:zero2,deepspeed:zero2   # GPU

Each config runs as its own process (torchrun for more than one rank), one after another, so they never
share the CPUs; bench.json, bench.md and bench.png land in --out.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import click

from hpc import bench as core
from hpc import benchreport, benchresults, checkpoints, fileio, jobdir, jobfiles, shown, task, vocab
from hpc.commands.options import Seconds, fail

# The folder that holds hpc/ and train/ in a checkout: children import train from it.
_ROOT = Path(__file__).resolve().parents[2]


def child_env(threads: int) -> dict[str, str]:
    # torchrun would otherwise force OMP_NUM_THREADS=1 on every rank; the floor and the trainer must both
    # see the thread count this row reports.
    return {**os.environ, "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def execute(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; (exit status or None on timeout, wall seconds)."""
    start = time.monotonic()
    with open(log, "w") as out:
        # Its own session, so a timeout can stop torchrun together with every rank it started.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            task.stop(proc, 15)  # torchrun and every rank it started
            rc = None
        except BaseException:
            # Outside the terminal's process group, the child never saw the Ctrl-C that stopped us.
            task.stop(proc, 15)
            raise
    return rc, time.monotonic() - start


def last_line(log: Path) -> str:
    lines = [line for line in jobfiles.tail_text(log, 65536).splitlines() if line.strip()]
    return shown.line(lines[-1].strip(), 200) if lines else "no output"


# What bench writes in --out. A folder holding anything else is a person's: bench never writes into it.
OUT_PATHS = ("bench.json", "bench.md", "bench.png", "runs/")


def foreign_out(out_dir: Path) -> str | None:
    """Why bench may not write into ``out_dir``, or None: it is absent, empty, or a folder bench made (its
    marker says so), where the files bench replaces (a config's old metrics, its report) are bench's own."""
    marker = jobdir.read_marker(out_dir)
    if marker is not None and marker[0] == "bench" and not out_dir.is_symlink():
        return None
    try:
        held = sorted(os.listdir(out_dir))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot use --out {shown.line(out_dir)}: {exc.strerror}"
    if held:
        return (f"--out {shown.line(out_dir)} holds files hpcdist bench did not write "
                f"({', '.join(shown.line(name, 80) for name in held[:3])}"
                f"{', ...' if len(held) > 3 else ''}); choose another --out or move them away")
    return None


def claim_out(out_dir: Path) -> None:
    """Make ``out_dir`` bench's: its marker (``foreign_out`` said it may be)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if jobdir.read_marker(out_dir) is None:
        fileio.atomic_write(out_dir / jobdir.MARKER, jobdir.marker_text("bench", OUT_PATHS))


def schedule(plan: list[tuple[core.Config, int]], repeat: int, order: str, seed: int) -> list[list[tuple[int, str]]]:
    """Each round's runs in the order they go: the config's index in ``plan`` and the run's name under runs/."""
    return [[(i, plan[i][0].slug if repeat == 1 else f"{plan[i][0].slug}-r{round_}")
             for i in core.round_order(len(plan), round_, order, seed)] for round_ in range(1, repeat + 1)]


def command(config: core.Config, threads: int, steps: int, warmup: int, samples: int, run_dir: Path) -> list[str]:
    """What a run executes, its folder resolved: the child runs inside it, where a relative path means another."""
    return core.argv(config, threads, steps, warmup, str(run_dir.resolve()), sys.executable, samples)


def run_one(config: core.Config, threads: int, steps: int, warmup: int, samples: int, out: Path,
            timeout_s: float, name: str) -> benchresults.Result:
    # A link at runs/ or runs/NAME would send the unlinks below into a folder bench never made: refused.
    run_dir = fileio.folder(out, "runs", name)
    for stale in ("metrics.jsonl", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    # The last bench's checkpoints, as the trainer names them (beside an earlier run's it refuses to start afresh);
    # anything else in the folder is not bench's to remove, and keeps the folder. Nothing through a link.
    saved = run_dir / vocab.CHECKPOINTS
    if not saved.is_symlink():
        for folder in checkpoints.held(saved):
            if Path(os.path.realpath(folder)) == Path(os.path.realpath(saved)) / folder.relative_to(saved):
                shutil.rmtree(folder)
        with contextlib.suppress(OSError):
            saved.rmdir()
    log = run_dir / "log.txt"
    cmd = command(config, threads, steps, warmup, samples, run_dir)
    rc, wall = execute(cmd, child_env(threads), log, timeout_s)
    if rc != 0:
        why = f"timed out after {timeout_s:.0f}s" if rc is None else f"exit {rc}"
        return benchresults.Result(config, threads, wall_s=wall, error=f"{why}: {last_line(log)} (see {log})")
    if config.backend in core.FLOORS:
        reports = jobfiles.json_lines(log.read_text(errors="replace"))
        if not reports:
            return benchresults.Result(config, threads, wall_s=wall, error=f"the floor printed no JSON (see {log})")
        return benchresults.result_from_floor(config, threads, reports[-1], wall)
    summary = jobfiles.json_object(run_dir / vocab.SUMMARY) or {}
    return benchresults.result_from_summary(config, threads, summary, warmup, steps, wall)


def draw(results: list[benchresults.Result], meta: dict, path: Path) -> None:
    """bench.png: one horizontal bar of images/s per config, coloured by backend (the floor in grey)."""
    plt = fileio.pyplot()
    bars = benchreport.chart_bars(results)
    colours = {"floor": "#7f7f7f", "dp": "#d62728", "ddp": "#1f77b4", "deepspeed": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(bars), 1) + 1.4))
    values = [b[1] for b in bars]
    ax.barh(range(len(bars)), values, color=[colours.get(b[2], "#9467bd") for b in bars])
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("images/s (global, after warm-up)")
    ax.set_title(f"hpcdist bench: {meta['device']}, {meta['cpus']} CPUs, {meta['steps']} steps after "
                 f"{meta['warmup']} warm-up", fontsize=10)
    ax.set_xlim(0, max(values, default=1) * 1.15)
    fig.tight_layout()
    fileio.save_png(fig, path, dpi=120)
    plt.close(fig)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def plan_or_exit(specs: tuple[str, ...], batch: int, samples: int, cpus: int) -> list[tuple[core.Config, int]]:
    """Each config of the grid with its threads per rank; a bad grid ends the command with exit status 2."""
    try:
        grid = core.parse_grid(specs or core.DEFAULT_GRID, batch)
    except core.BenchError as exc:
        fail("bench", exc)
    too_big = [c.name for c in grid if c.batch > samples]
    if too_big:
        fail("bench", ValueError(f"{', '.join(too_big)} need a global batch of at most --samples {samples}; "
                                 "pass a larger --samples"))
    return [(c, core.threads_for(c, os.environ, cpus)) for c in grid]


def run_rounds(plan: list[tuple[core.Config, int]], meta: dict, steps: int, warmup: int, samples: int, out_dir: Path,
               timeout_s: float) -> list[list[benchresults.Result]]:
    """Every config's runs, ``meta["repeat"]`` rounds of the whole grid, each round's order noted in ``meta``.

    Rounds over the whole grid rather than one config's repeats back to back: a slow spell on a shared
    machine then lands on every config alike instead of on one of them.
    """
    repeat = meta["repeat"]
    runs: list[list[benchresults.Result]] = [[] for _ in plan]
    for round_, sequence in enumerate(schedule(plan, repeat, meta["order"], meta["seed"]), start=1):
        meta["orders"].append([plan[i][0].name for i, _ in sequence])
        for i, name in sequence:
            config, threads = plan[i]
            label = f"[{i + 1}/{len(plan)}]" + (f" round {round_}/{repeat}" if repeat > 1 else "")
            click.echo(f"{label} {config.name} ({threads} threads/rank) ...", err=True, nl=False)
            result = run_one(config, threads, steps, warmup, samples, out_dir, timeout_s, name)
            rate = f"{result.images_per_s:.0f} images/s" if result.ok else f"FAILED: {result.error}"
            click.echo(f" {rate} in {result.wall_s:.0f}s", err=True)
            runs[i].append(result)
    return runs


@click.command()
@click.option("--config", "configs", multiple=True, metavar="SPEC",
              help=f"A config to run (repeatable): {core.SPEC_HELP}. Default: the built-in grid.")
@click.option("--grid", "grids", multiple=True, metavar="SPEC,SPEC...",
              help="Several configs at once, comma-separated; added to any --config.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Timed steps per config, after warm-up.")
@click.option("--warmup", type=click.IntRange(min=1), default=20, show_default=True,
              help="Steps run first and left out of images/s.")
@click.option("--batch", type=click.IntRange(min=1), default=core.DEFAULT_BATCH, show_default=True,
              help="Global batch over all ranks, unless a spec says bN.")
@click.option("--samples", type=click.IntRange(min=1), default=core.SYNTHETIC_SIZE, show_default=True,
              help="Synthetic training images each run holds (50000 is CIFAR-10's size; large batches need many).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench"),
              show_default=True, help="Folder for bench.json, bench.md, bench.png and runs/: new, or one bench made.")
@click.option("--timeout-s", type=Seconds(1), default=900, show_default=True,
              help="Stop a config that runs longer than this and report it failed.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs of each config, in rounds over the whole grid; each row is the median run.")
@click.option("--order", type=click.Choice(core.ORDERS), default="shuffle", show_default=True,
              help="Order of the configs in each round: a new seeded shuffle per round, forward/backward, or fixed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --order shuffle (recorded).")
@click.option("--dry-run", is_flag=True,
              help="Print each run's command and threads, in the order they run; run nothing.")
def bench(configs: tuple[str, ...], grids: tuple[str, ...], steps: int, warmup: int, batch: int, samples: int,
          out_dir: Path, timeout_s: float, repeat: int, order: str, seed: int, dry_run: bool) -> None:
    """Compare DP, DDP and DeepSpeed against a bare-PyTorch floor: images/s, first step, peak memory."""
    cpus = len(os.sched_getaffinity(0))
    plan = plan_or_exit(configs + grids, batch, samples, cpus)
    why = foreign_out(out_dir)
    if why:
        fail("bench", ValueError(why))
    if dry_run:
        for round_, sequence in enumerate(schedule(plan, repeat, order, seed), start=1):
            for i, name in sequence:
                config, threads = plan[i]
                cmd = command(config, threads, steps, warmup, samples, out_dir / "runs" / name)
                when = f"round {round_}/{repeat}  " if repeat > 1 else ""
                click.echo(f"{when}{config.name}  (OMP_NUM_THREADS={threads})  {' '.join(cmd)}")
        return

    claim_out(out_dir)
    # Children run inside their own run folders, so every path they are given must be absolute.
    out_dir = out_dir.resolve()
    meta = {"host": socket.gethostname(), "device": "unknown", "cpus": cpus, "steps": steps, "warmup": warmup,
            "batch": batch, "samples": samples, "repeat": repeat, "order": order, "seed": seed, "orders": [],
            "torch": version("torch"), "deepspeed": version("deepspeed"),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        runs = run_rounds(plan, meta, steps, warmup, samples, out_dir, timeout_s)
    except fileio.UnsafePath as exc:
        fail("bench", exc)
    results = [benchresults.median_of(r) for r in runs]
    # Which card (or "cpu") the runs trained on, as they reported it: this process never imports torch.
    meta["device"] = next((r.device for r in results if r.device), "unknown")

    fileio.atomic_write(out_dir / "bench.json", json.dumps(benchreport.to_json(results, meta), indent=2) + "\n")
    fileio.atomic_write(out_dir / "bench.md", benchreport.markdown_report(results, meta))
    draw(results, meta, out_dir / "bench.png")
    click.echo(benchreport.markdown_table(results))
    for line in benchreport.verdicts(results):
        click.echo(line)
    failed = [r.config.name for r in results if not r.ok]
    if failed:
        click.echo(f"hpcdist bench: {len(failed)} of {len(results)} configs failed ({', '.join(failed)}); "
                   f"see {out_dir / 'runs'}", err=True)
        sys.exit(1)
