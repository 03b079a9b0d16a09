"""hpcdist renders from a wheel installed in a fresh venv, away from the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                              ".hypothesis", ".pytest_cache", ".whl", ".gl")


@pytest.mark.timeout(600)
def test_render_from_wheel(tmp_path: Path) -> None:
    # Building from a copy keeps build/ and *.egg-info out of a checkout others are working in.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("hpcdist-*.whl")
    # Every module, template and config of the checkout ships: one left out of setup.cfg breaks only what uses it.
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for d in ("hpc", "train") for p in (REPO / d).rglob("*.py")}
    data = {"hpc/" + p.relative_to(REPO).as_posix() for d in ("templates", "configs")
            for p in (REPO / d).rglob("*") if p.is_file() and p.suffix != ".pyc"}
    assert (modules | data) - shipped == set()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # The fresh venv borrows click/jinja2/yaml from this one rather than downloading them again.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([str(py), "-c", "import hpc, hpc.paths; print(hpc.__file__); "
                            "print(hpc.paths.templates_dir())"], cwd=cwd, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert all(p.startswith(site) for p in where), where
    proc = subprocess.run([str(venv / "bin" / "hpcdist"), "render", "--nodes", "2", "--backend", "deepspeed",
                           "--launcher", "deepspeed", "--cluster", "example-ib", "--job-dir", "job", "--",
                           "--epochs", "1"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=8" in proc.stdout
    job = cwd / "job"
    assert {"job.sbatch", "setup.sh", "task.sh", "spec.yaml", "ranks.txt", "deepspeed.json"} <= {
        p.name for p in job.iterdir()}
    # Installed, hpc is importable on its own: no checkout on the tasks' PYTHONPATH.
    assert "PYTHONPATH" not in (job / "setup.sh").read_text()
    assert str(py) in (job / "task.sh").read_text() or str(venv) in (job / "task.sh").read_text()
    # The installed trainer trains, and an attempt's end is classified, from the wheel alone.
    trained = subprocess.run([str(venv / "bin" / "hpcdist-train"), "--backend", "ddp", "--run-dir", "run",
                              "--synthetic-size", "64", "--batch-size", "32", "--max-steps", "2"],
                             cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0 and (cwd / "run" / "summary.json").is_file(), trained.stderr[-2000:]
    ended = subprocess.run([str(venv / "bin" / "hpcdist"), "attempt", "end", "--job-dir", "job", "--step-status", "0"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert ended.returncode == 0 and "action=none" in ended.stdout, ended.stderr[-2000:]
