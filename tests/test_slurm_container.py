"""Containers on the real local cluster: a 2-node DDP and a 2-node DeepSpeed job inside a Charliecloud image and
through Slurm's own srun --container (an OCI bundle run by runc), both built by scripts/build-image.sh, train
exactly as on the host, the ranks really run in the image, and a preemption and a killed rank recover inside."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from slurm_fixtures import REPO, TINY_TRAIN, hpcdist, requires_slurm

from train import heartbeat

pytestmark = [pytest.mark.slurm, requires_slurm,
              pytest.mark.skipif(shutil.which("ch-run") is None and not os.environ.get("CI"),
                                 reason="charliecloud is not installed (scripts/setup.sh --slurm installs it)")]


RUNTIMES = ["charliecloud", "oci"]


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return request.param


def build_image(path: Path, *options: str) -> Path:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), str(path), *options],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Charliecloud image from Debian's packages, debootstrapped once for both runtimes."""
    return build_image(tmp_path_factory.mktemp("image") / "charliecloud")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, runtime: str, debian: Path) -> Path:
    """The Charliecloud image, or an OCI bundle around it (its files linked); its /etc/hpcdist-image exists in no
    host."""
    path = debian if runtime == "charliecloud" else build_image(tmp_path_factory.mktemp("image") / "oci", "--oci",
                                                                "--from", str(debian))
    rootfs = path / "rootfs" if runtime == "oci" else path
    assert (rootfs / "etc" / "hpcdist-image").is_file() and not Path("/etc/hpcdist-image").exists()
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, runtime: str) -> Path:
    """The local cluster with this runtime (the venv's base interpreter, under /root, is bound where it lies)."""
    path = tmp_path_factory.mktemp("site") / f"{runtime}.yaml"
    path.write_text(f"extends: local\ncontainer:\n  runtime: {runtime}\n")
    return path


def losses(job_dir: Path) -> list[tuple[int, float]]:
    rows = (job_dir / "run" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, rows)]


def watch_roots(job_dir: Path, seen: set[str], stop: threading.Event) -> None:
    """While the job runs: for each rank's process (its heartbeat names the pid; the nodes share this PID
    namespace), whether its root holds the image's marker file."""
    while not stop.is_set():
        for beat in heartbeat.read_all(job_dir / "run").values():
            try:
                root = f"/proc/{beat['pid']}/root/etc"
            except (OSError, ValueError, KeyError):
                continue
            marked = os.path.exists(f"{root}/hpcdist-image")
            if marked or os.path.exists(f"{root}/hostname"):  # else the rank has ended: nothing to see
                seen.add(f"rank-{beat['rank']}:{marked}")
        time.sleep(0.2)


FULL = os.environ.get("HPCDIST_SLURM_FULL") == "1"
# Each runtime with one backend and each backend in one runtime; HPCDIST_SLURM_FULL=1 runs all four.
DIAGONAL = {"charliecloud": "ddp", "oci": "deepspeed"}
# The recovery under the runtime whose signals pass through Slurm's own container support (slurmstepd and runc);
# ch-run execs the trainer in the task's own process, so a signal reaches it as on the host. HPCDIST_SLURM_FULL=1
# runs it under both.
RECOVERS_IN = ("oci",)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_two_node_job_in_an_image_trains_as_on_the_host(tmp_path: Path, image: Path, site: Path, runtime: str,
                                                          backend: str) -> None:
    if DIAGONAL[runtime] != backend and not FULL:
        pytest.skip(f"{runtime} x {backend} is off the diagonal CI runs (HPCDIST_SLURM_FULL=1 runs it)")
    train = ("--", *TINY_TRAIN, "--log-every", "5")
    common = ["submit", "--nodes", "2", "--backend", backend, "--precision", "fp32", "--time", "10", "--wait"]
    seen: set[str] = set()
    stop = threading.Event()
    inside = tmp_path / "inside"
    watcher = threading.Thread(target=watch_roots, args=(inside, seen, stop), daemon=True)
    watcher.start()
    proc = hpcdist([*common, "--cluster", str(site), "--container", str(image), "-o", str(inside), *train],
                   tmp_path / "home")
    stop.set()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scripts = (inside / "task.sh").read_text() + (inside / "submitit").joinpath(
        f"{proc.stdout.split()[2]}_submission.sh").read_text()
    assert "ch-run -b /tmp" in scripts or f"--container={image}" in scripts
    # Every rank seen ran with the image as its root, and no rank ran outside it.
    assert seen and all(s.endswith(":True") for s in seen), seen
    outside = tmp_path / "outside"
    proc = hpcdist([*common, "-o", str(outside), *train], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert losses(inside) == losses(outside) and len(losses(inside)) >= 6


def test_a_preemption_and_a_killed_rank_recover_from_inside_the_container(tmp_path: Path, image: Path, site: Path,
                                                                          runtime: str) -> None:
    if runtime not in RECOVERS_IN and not FULL:
        pytest.skip(f"CI drills the recovery under {', '.join(RECOVERS_IN)} (HPCDIST_SLURM_FULL=1 runs {runtime} too)")
    proc = hpcdist(["drill", "--nodes", "2", "--scenarios", "preempt,rank_kill", "--json", "--cluster", str(site),
                    "--container", str(image), "-o", str(tmp_path / "drill")], tmp_path / "home", timeout=900)
    results = {r["scenario"]: r for r in json.loads(proc.stdout)}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (results["preempt"]["ending"], results["preempt"]["action"]) == ("preempted", "requeue")
    assert (results["rank_kill"]["ending"], results["rank_kill"]["action"]) == ("rank_crashed", "relaunch")
    assert all(r["ok"] for r in results.values()), results
    rendered = (tmp_path / "drill" / "rank_kill" / "task.sh").read_text() + (
        tmp_path / "drill" / "rank_kill" / "step.sh").read_text()
    assert "ch-run -b /tmp" in rendered or f"--container={image}" in rendered


def test_doctor_checks_the_image_starts_on_every_node_and_imports_torch(tmp_path: Path, image: Path,
                                                                        site: Path) -> None:
    proc = hpcdist(["doctor", "--nodes", "2", "--cluster", str(site), "--container", str(image), "-o",
                    str(tmp_path / "doctor")], tmp_path / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Whichever two nodes Slurm gave the check (the one before may still be leaving one).
    found = re.search(r"^ok    all-reduce across 2 ranks on 2 node\(s\) \((n\d), (n\d)\)", proc.stdout, re.M)
    assert found and found.group(1) != found.group(2), proc.stdout
    reports = sorted((tmp_path / "doctor" / "run" / "preflight").glob("rank-*.json"))
    assert [json.loads(p.read_text())["host"] for p in reports] == [found.group(1), found.group(2)]
    submitted = next((tmp_path / "doctor" / "submitit").glob("*_submission.sh")).read_text()
    assert "ch-run -b /tmp" in (tmp_path / "doctor" / "task.sh").read_text() or f"--container={image}" in submitted


def test_hpcdist_env_explain_inside_the_image_shows_each_tasks_rank(image: Path, runtime: str) -> None:
    python = str(REPO / ".venv" / "bin" / "python")
    if runtime == "oci":
        inside = [f"--container={image}", python]
    else:
        binds = dict.fromkeys(("/tmp", "/" + REPO.parts[1], "/" + Path(os.path.realpath(python)).parts[1]))
        inside = ["ch-run", *(x for b in binds for x in ("-b", b)), str(image), "--", python]
    proc = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", *inside, "-m", "hpc", "env", "--explain"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "USER": os.environ.get("USER", "root")})
    assert proc.returncode == 0, proc.stderr
    ranks = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert ranks == ["0", "1"] and proc.stdout.count("<- SLURM_PROCID") == 2, proc.stdout
    assert proc.stdout.count("master_addr       n1") == 2
