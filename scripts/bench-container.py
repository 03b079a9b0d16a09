"""What a container costs a job on the local cluster: task start to the trainer's first line, and images/s,
inside a Charliecloud image vs on the host, for the same 2-node job (runs alternate; medians printed).

    PYTHONPATH=. .venv/bin/python scripts/bench-container.py --image /var/tmp/hpcdist-image --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("--dataset", "synthetic", "--synthetic-size", "4096", "--batch-size", "64", "--max-steps", "200")


def hpcdist(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"hpcdist {' '.join(args[:1])} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def one(where: str, job_dir: Path, site: Path, image: str, backend: str) -> tuple[float, list[float]]:
    """(images/s, seconds from each task's start to its trainer's first line)."""
    container = ["--cluster", str(site), "--container", image] if where == "container" else []
    hpcdist("submit", "--nodes", "2", "--backend", backend, "--precision", "fp32", "--wait", "-o", str(job_dir),
            *container, "--", *TRAIN)
    summary = json.loads((job_dir / "run" / "summary.json").read_text())
    falls = json.loads(hpcdist("timeline", str(job_dir), "--json"))["waterfalls"]
    starts = [p["seconds"] for w in falls for p in w["phases"] if p["ends"] == "process_start"]
    return summary["images_per_s"], starts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True, help="a Charliecloud image (scripts/build-image.sh DIR)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", default="ddp")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-container-"))
    site = work / "site.yaml"
    interpreter = "/" + Path(os.path.realpath(REPO / ".venv" / "bin" / "python")).parts[1]
    site.write_text(f"extends: local\ncontainer:\n  runtime: charliecloud\n  mounts: [{interpreter}]\n")
    seen: dict[str, dict[str, list[float]]] = {w: {"rate": [], "start": []} for w in ("host", "container")}
    for i in range(args.repeat):
        for where in (("host", "container") if i % 2 == 0 else ("container", "host")):
            rate, starts = one(where, work / f"{where}-{i}", site, args.image, args.backend)
            seen[where]["rate"].append(rate)
            seen[where]["start"] += starts
            print(f"run {i} {where}: {rate:,.0f} images/s, task start -> trainer's first line "
                  f"{', '.join(f'{s:.3f}' for s in starts)} s", file=sys.stderr)
    print(f"| 2-node {args.backend}, {args.repeat} runs each, alternating | images/s (median) | task start -> "
          "trainer's first line (median of ranks) |")
    print("|---|---:|---:|")
    for where in ("host", "container"):
        print(f"| {where} | {statistics.median(seen[where]['rate']):,.0f} | "
              f"{statistics.median(seen[where]['start']):.3f} s |")


if __name__ == "__main__":
    main()
