"""``hpcdist --help`` and ``hpcdist render`` stay light: they never import torch or deepspeed, and are fast."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from hpc.cli import main
try:
    main(sys.argv[1:], prog_name="hpcdist")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "numpy", "submitit"))
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("args", [
    ["--help"],
    ["render", "--help"],
    ["render", "-q", "--nodes", "2", "--backend", "deepspeed", "--launcher", "deepspeed", "--nodelist", "n[1-2]"],
    ["render", "-q", "--launcher", "torchrun", "--nodes", "2"],
    ["hostfile", "--nodelist", "n[1-2]"],
])
def test_no_heavy_imports(tmp_path: Path, args: list[str]) -> None:
    if args == ["--help"]:
        from hpc.cli import COMMANDS

        missing = [m for m in COMMANDS.values() if importlib.util.find_spec(m.split(":")[0]) is None]
        if missing:
            # --help lists (so imports) every registered command; some are still being written.
            pytest.skip(f"registered command modules not written yet: {', '.join(missing)}")
    if args[0] == "render" and "--help" not in args:
        args = [*args, "--job-dir", str(tmp_path / "job")]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env(),
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr


def cpu_seconds(command: list[str], cwd: Path) -> float:
    """CPU time (user + system) of the best of three runs: unlike wall time it barely moves with load."""
    best = float("inf")
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, check=True, capture_output=True, env=env(), cwd=cwd, timeout=300)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


def test_render_is_fast(tmp_path: Path) -> None:
    took = cpu_seconds([sys.executable, "-m", "hpc", "render", "-q", "--nodes", "2", "--backend", "deepspeed",
                        "--force", "--job-dir", str(tmp_path / "job")], tmp_path)
    # The budget is 0.3 s; the margin keeps a machine shared with other test runs from failing it.
    assert took < 0.4, f"hpcdist render used {took:.3f} s of CPU"

