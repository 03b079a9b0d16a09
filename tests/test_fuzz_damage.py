"""Damaged files under every reader: each command that reads a job directory, the registry, a sweep or a profile
answers 0 or 2 in one line, in bounded time, and writes nothing outside the job (or sweep) directory, whatever
one of those files became: torn, non-UTF-8, non-finite, mistyped, missing keys, a directory, a FIFO, a symlink
to a file outside, huge, deeply nested, an alias bomb, or names longer than the filesystem takes.

Runs the CLI in-process (click's test runner) with hypothesis; bounded to well under a minute in all.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import check_outcome, sandbox

from hpc import beatfile, jobfiles, vocab
from hpc.cli import main
from hpc.failures import record as records

JOB_ID = "4242"
# A reader may spend this much CPU on one damaged file (a runaway parse spends more), and one that blocks (a FIFO
# opened for reading) is stopped after HUNG_S of wall time: CPU time, not wall time, since these tests may share
# the CPUs with others at a lower priority (scripts/test.sh).
SECONDS = 10.0
HUNG_S = 120
NOW = time.time()
BEAT = {"rank": 0, "local_rank": 0, "node_rank": 0, "world_size": 1, "hostname": "n1", "pid": 1, "attempt": 0,
        "phase": "train", "step": 5, "total_steps": 10, "time": NOW, "step_time_s": 0.1, "compute_s": 0.08,
        "comm_s": 0.01, "images_per_s": 300.0, "loss": 2.1, "rss_bytes": 10**8, "peak_memory_bytes": 10**8,
        "marks": {"process_start": NOW - 9, "torch_imported": NOW - 8}, "step_at": NOW,
        "recent_compute_s": [0.08, 0.09]}
NODE = {"node": 0, "hostname": "n1", "attempt": 0, "time": NOW, "ranks": [BEAT]}  # contract 1's node document
RECORD = {"job_id": JOB_ID, "job_dir": "", "via": "sbatch", "submitted": "2026-12-05T01:00:00", "job_name": "j",
          "backend": "ddp", "launcher": "srun", "nodes": 1, "ntasks_per_node": 1, "world_size": 1}
ATTEMPT = {"attempt": 0, "job_id": JOB_ID, "started": "2026-12-05T01:00:01", "ended": "2026-12-05T01:00:09",
           "ending": "hung", "rank": 0, "node": "n1", "detail": "rank 0 on n1 made no progress", "exit_code": 76,
           "signal": None, "step": 5, "action": "retry", "excluded": ["n1"], "reason": "retry without n1",
           "seen_step": 5, "source": "batch"}
METRIC = {"step": 5, "epoch": 0, "batch": 5, "loss": 2.1, "images_per_s": 300.0, "time_s": 1.5}
SUMMARY = {"backend": "ddp", "world_size": 1, "precision": "fp32", "steps": 10, "final_loss": 1.9,
           "images_per_s": 300.0, "test_accuracy": 0.2, "time_to_first_step_s": 3.0,
           "ranks": [{"rank": 0, "hostname": "n1", "peak_memory_bytes": 10**8}]}
# The attempt `attempt end` classifies is 1 (SLURM_RESTART_COUNT); attempt 0 is already in attempts.jsonl.
HANG = {"rank": 0, "node": "n1", "since": NOW - 60, "step": 5, "phase": "train", "attempt": 1, "threshold_s": 60}
ERROR = {"rank": 0, "node": "n1", "attempt": 1, "time": NOW, "kind": "exception", "error": "ValueError: x",
         "exit_code": 1, "pid": 1}
PROFILE = {"modules": ["gcc"], "env": {"A": "1"}}

# Every file a reader takes, relative to the sandbox, with what it holds when whole.
FILES: dict[str, Any] = {
    "reg/jobs.jsonl": [RECORD], f"jobs/j/{vocab.SUBMITTED_JSON}": [RECORD], f"jobs/j/{vocab.ATTEMPTS}": [ATTEMPT],
    "jobs/j/run/heartbeat/node-0.json": NODE, "jobs/j/run/heartbeat/node-0.jsonl": [NODE],
    "jobs/j/run/metrics.jsonl": [METRIC, METRIC], "jobs/j/run/summary.json": SUMMARY,
    "jobs/j/run/hang.json": HANG, "jobs/j/run/errors/rank-0.json": ERROR,
    "jobs/j/run/timeline/attempt-0/batch": "batch_start 1764900000\nsetup_done 1764900001\n",
    "jobs/j/run/timeline/attempt-0/task-0": "task_start 1764900002\n",
    "jobs/j/logs/task-0.log": "step 5\n", f"jobs/j/logs/batch-{JOB_ID}.out": "hpcdist: attempt 0 started on n1\n",
    "sweep/sweep.yaml": None, "sweep/submitted.json": {"arrays": {"array-0": JOB_ID}, "via": "sbatch"},
    "clusters/site.yaml": PROFILE, "home/.config/hpcdist/config.yaml": {"default_cluster": "local"},
}
JOB = ["status", "list", "top --once", "timeline", "report", "logs", "logs --rank 0", "cancel", "attempt end"]
SWEEP = ["sweep status", "sweep status --json", "sweep report --json", "sweep report"]
PROFILES = ["clusters", "profile check"]
# Which commands read each file.
READERS = {name: PROFILES if name.startswith(("clusters", "home")) else SWEEP if name.startswith("sweep") else
           JOB + SWEEP[:1] if name.endswith("summary.json") else JOB for name in FILES}
# matplotlib's font cache, kept between examples and outside the sandbox (report draws charts).
MPLCONFIGDIR = tempfile.mkdtemp(prefix="hpcdist-mpl-")
STUBS = ("sacct", "scancel", "squeue", "scontrol", "sinfo", "sbatch")


def whole(base: Path) -> None:
    """A job directory, its registry line, a sweep over it and a profile, each as hpcdist or a person wrote it."""
    job_dir = base / "jobs" / "j"
    for name, value in FILES.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "sweep/sweep.yaml":
            value = {"base": {}, "axes": {"backend": ["ddp"]}, "resolved": [
                {"index": 0, "array": "array-0", "array_index": 0, "job_dir": str(job_dir),
                 "values": {"backend": "ddp"}, "backend": "ddp", "nodes": 1, "world_size": 1}]}
        path.write_text(encode(name, fill(value, job_dir)))
    (job_dir / ".hpcdist-job").write_text("hpcdist\n")
    (base / "outside").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for name in STUBS:
        (base / "bin" / name).write_text("#!/bin/sh\nexit 0\n")
        (base / "bin" / name).chmod(0o755)


def fill(value: Any, job_dir: Path) -> Any:
    if isinstance(value, list):
        return [fill(v, job_dir) for v in value]
    if isinstance(value, dict):
        return {k: str(job_dir) if k == "job_dir" else v for k, v in value.items()}
    return value


def encode(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if "/heartbeat/node-" in name:  # with each line's CRC, so that the damage drawn is what a reader parses
        return "".join(beatfile.encode(v).decode() for v in (value if isinstance(value, list) else [value]))
    if name.endswith(".yaml"):
        return yaml.safe_dump(value)
    if name.endswith(".jsonl"):
        return "".join(json.dumps(v) + "\n" for v in value)
    return json.dumps(value)


WRONG = ("2", "x", [1], {"a": 1}, True, None, -1, 10**12, 10**30, 1.5, "x" * 300)


def retyped(value: Any, data) -> Any:
    """The whole value with one field (of it, or of its first line) swapped for a value of another type."""
    target = value[0] if isinstance(value, list) and value else value
    if not isinstance(target, dict):
        return data.draw(st.sampled_from(WRONG))
    key = data.draw(st.sampled_from(sorted(target)))
    changed = {**target, key: data.draw(st.sampled_from(WRONG))}
    return [changed, *value[1:]] if isinstance(value, list) else changed


def without_keys(value: Any, data) -> Any:
    target = value[0] if isinstance(value, list) and value else value
    if not isinstance(target, dict):
        return {}
    keep = data.draw(st.lists(st.sampled_from(sorted(target)), unique=True, max_size=len(target) - 1))
    changed = {k: target[k] for k in keep}
    return [changed, *value[1:]] if isinstance(value, list) else changed


def lengthened(value: Any) -> Any:
    """The whole value with every string a path whose names are longer than a file name can be."""
    if isinstance(value, str):
        return "/" + "x" * 300 + "/" + "y" * 300
    if isinstance(value, list):
        return [lengthened(v) for v in value]
    if isinstance(value, dict):
        return {k: lengthened(v) for k, v in value.items()}
    return value


def replace_with(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir() and not path.is_symlink():
        return
    path.unlink()
    make(path)


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
DAMAGE: dict[str, Callable[[Path, Any, Any], None]] = {
    "torn": lambda p, v, d: p.write_bytes(p.read_bytes()[:d.draw(st.integers(1, max(len(p.read_bytes()) - 1, 1)))]),
    "non-UTF-8": lambda p, v, d: p.write_bytes(b"\xff\xfe" + p.read_bytes()[:20] + b"\xc3\x28"),
    "Infinity": lambda p, v, d: p.write_text(encode(p.name, v).replace("5", "Infinity", 1).replace("0.1", "NaN")),
    "1e400": lambda p, v, d: p.write_text(encode(p.name, v).replace("5", "1e400", 1)),
    "wrong types": lambda p, v, d: p.write_text(encode(p.name, retyped(v, d))),
    "missing keys": lambda p, v, d: p.write_text(encode(p.name, without_keys(v, d))),
    "a directory": lambda p, v, d: replace_with(p, lambda q: q.mkdir()),
    "a FIFO": lambda p, v, d: replace_with(p, os.mkfifo),
    "a symlink outside": lambda p, v, d: replace_with(p, lambda q: q.symlink_to(_outside(q))),
    "huge": lambda p, v, d: os.truncate(p, jobfiles.MAX_BYTES + 4096),
    "deeply nested": lambda p, v, d: p.write_text("[" * 100_000 + "]" * 100_000),
    "an alias bomb": lambda p, v, d: p.write_text(BOMB),
    "overlong names": lambda p, v, d: p.write_text(encode(p.name, lengthened(v))),
}


def _outside(path: Path) -> Path:
    """The sandbox's stand-in for /etc/passwd: a file outside every job directory, which must stay as it is."""
    for parent in path.parents:
        if (parent / "outside").exists():
            return parent / "outside"
    raise AssertionError("no sandbox")


def command_line(command: str, base: Path) -> list[str]:
    words = command.split()
    job_dir = str(base / "jobs" / "j")
    if words[0] in ("sweep",):
        return [*words[:2], str(base / "sweep"), *words[2:]]
    if words == ["attempt", "end"]:
        return ["attempt", "end", "--job-dir", job_dir, "--step-status", "76", "--ntasks", "1"]
    if words[0] in ("list", "clusters"):
        return words
    if words[0] == "profile":
        return [*words, str(base / "clusters" / "site.yaml")]
    return [words[0], JOB_ID, *words[1:]]


def run(args: list[str], base: Path):
    """``hpcdist ARGS`` in-process, Slurm's commands stubbed (they answer nothing); the CPU seconds it took."""
    env = {"HOME": str(base / "home"), "HPCDIST_HOME": str(base / "reg"), "HPCDIST_PARTITION_CHECK": "0",
           "HPCDIST_TEMPLATES": None, "HPCDIST_CLUSTER": None, "XDG_CONFIG_HOME": None,
           "HPCDIST_CLUSTERS": str(base / "clusters"), "PATH": f"{base / 'bin'}:/usr/bin:/bin",
           "SLURM_JOB_ID": JOB_ID, "SLURM_RESTART_COUNT": "1", "SLURM_ARRAY_JOB_ID": None, "MPLCONFIGDIR": MPLCONFIGDIR}
    started = time.process_time()
    # A reader that blocks (a FIFO opened for reading) would hang the suite: the alarm turns it into a failure.
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(HUNG_S)
    try:
        result = CliRunner().invoke(main, args, env=env, catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.process_time() - started


class Hung(Exception):
    """A command still running at the alarm."""


def _hung(signum: int, frame: Any) -> None:
    raise Hung(f"no answer within {HUNG_S} s")


def snapshot(root: Path, skip: Path) -> dict[str, Any]:
    """Every entry under ``root`` but ``skip``: a file's bytes, a link's target, a FIFO's mode (never opened)."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path == skip or skip in path.parents:
                continue
            info = path.lstat()
            out[str(path)] = (os.readlink(path) if stat.S_ISLNK(info.st_mode) else path.read_bytes()
                              if stat.S_ISREG(info.st_mode) else stat.S_IFMT(info.st_mode))
    return out


def check(command: str, base: Path) -> Any:
    """Run ``command`` against the sandbox's job, sweep or profile: 0 or one-line 2, no traceback, in time,
    nothing written outside the directory it owns."""
    args = command_line(command, base)
    allowed = base / ("sweep" if command.startswith("sweep") else "jobs/j")
    before = snapshot(base, allowed)
    result, took = run(args, base)
    # profile check's verdict on a profile it read (the stub Slurm has no partitions) is exit 1, by design.
    if not (command == "profile check" and result.exit_code == 1 and "does not fit" in result.output):
        check_outcome(result, args)
    assert "Traceback" not in result.output + result.stderr, (args, result.stderr[-2000:])
    assert took < SECONDS, f"{args!r} took {took:.1f} s of CPU"
    assert snapshot(base, allowed) == before, f"{args!r} changed files outside {allowed}"
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(name=st.sampled_from(sorted(FILES)), kind=st.sampled_from(sorted(DAMAGE)), data=st.data())
def test_every_reader_survives_every_damaged_file(name, kind, data) -> None:
    with sandbox() as base:
        whole(base)
        path = base / name
        DAMAGE[kind](path, fill(FILES[name], base / "jobs" / "j"), data)
        command = data.draw(st.sampled_from(READERS[name]))
        result = check(command, base)
        if command == "attempt end" and not name.endswith(vocab.ATTEMPTS):
            # Whatever else is damaged, the attempt is recorded and the batch shell told what to do.
            assert "could not classify" not in result.stderr, result.stderr
            assert [a["attempt"] for a in records.load(base / "jobs/j")] == [0, 1]


# ---- one regression case per class the issue names (#22) ------------------------------------------

def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def make(base: Path) -> None:
        path = base / name
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def _as(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda base: replace_with(base / name, make)


def _marker(**fields: Any) -> Callable[[Path], None]:
    line = json.dumps({**RECORD, "job_dir": "JOB", **fields}) + "\n"
    return lambda base: [(base / n).write_text(line.replace("JOB", str(base / "jobs/j")))
                         for n in ("reg/jobs.jsonl", f"jobs/j/{vocab.SUBMITTED_JSON}")]


HEARTBEAT = "jobs/j/run/heartbeat/node-0.json"


def _framed(body: bytes) -> bytes:
    """A node file line around ``body`` with a CRC that checks: damage a reader parses, not one it skips."""
    return body + b"\t%08x\n" % zlib.crc32(body)
STAMP = "jobs/j/run/timeline/attempt-0/batch"
REGRESSIONS = [
    *[(f"heartbeat {label}", _write(HEARTBEAT, content), command)
      for label, content in (("non-UTF-8", _framed(b'{"ranks": [{"rank": 0, "hostname": "\xff"}]}')),
                             ("Infinity", _framed(b'{"ranks": [{"rank": 0, "step": Infinity, "time": NaN}]}')))
      for command in ("status", "top --once", "timeline", "report")],
    ("stamp file with a bad byte", _write(STAMP, b"batch_start 17\xff\n"), "timeline"),
    ("stamp file a directory", _as(STAMP, lambda p: p.mkdir()), "report"),
    ("attempt folder a file", lambda b: (b / "jobs/j/run/timeline/attempt-2").write_text("x"), "timeline"),
    ("stamp file a symlink to a file outside", _as(STAMP, lambda p: p.symlink_to(_outside(p))), "timeline"),
    ("timeline folder a symlink outside", lambda b: (b / "jobs/j/run/timeline/attempt-1").symlink_to(b / "home"),
     "timeline"),
    ("attempts line without ending", _write(f"jobs/j/{vocab.ATTEMPTS}", '{"attempt": 0}\n'), "list"),
    ("attempts line without attempt", _write(f"jobs/j/{vocab.ATTEMPTS}", '{"ending": "hung"}\n'), "status"),
    ("bad last metrics line", _write("jobs/j/run/metrics.jsonl", json.dumps(METRIC) + '\n{"step": 6, "lo'),
     "top --once"),
    ('marker with "nodes": "2"', _marker(nodes="2"), "timeline"),
    ("marker with 10^12 tasks", _marker(nodes=10**6, ntasks_per_node=10**6, via="local"), "status"),
    ("registry not UTF-8", _write("reg/jobs.jsonl", b"\xff\xfe\n"), "list"),
    ("registry a directory", _as("reg/jobs.jsonl", lambda p: p.mkdir()), "cancel"),
    ("registry of wrong types", _write("reg/jobs.jsonl", '{"job_id": 4242, "job_dir": ["x"], "nodes": "1"}\n'),
     "list"),
    ("registry line of wrong types", lambda b: (b / "reg/jobs.jsonl").write_text(json.dumps(
        {**RECORD, "job_dir": str(b / "jobs/j"), "via": "local", "nodes": "2"}) + "\n"), "status"),
    ("sweep.yaml an alias bomb", _write("sweep/sweep.yaml", BOMB), "sweep status"),
    ("sweep.yaml without tasks", _write("sweep/sweep.yaml", "resolved: [1, {index: x}]\n"), "sweep report --json"),
    ("sweep.yaml nested deep", _write("sweep/sweep.yaml", "a: " + "[" * 5000 + "]" * 5000), "sweep status"),
    ("submitted.json of wrong types", _write("sweep/submitted.json", '{"arrays": {"array-0": [1]}}'),
     "sweep status --json"),
    ("profile nested deep", _write("clusters/site.yaml", "a: " + "[" * 5000 + "]" * 5000), "clusters"),
    ("config.yaml not UTF-8", _write("home/.config/hpcdist/config.yaml", b"default_cluster: \xff\n"), "clusters"),
    ("config.yaml nested", _write("home/.config/hpcdist/config.yaml", "default_cluster: {a: {b: 1}}\n"),
     "clusters"),
    ("hang.json with a string and 1e400", _write("jobs/j/run/hang.json", json.dumps(
        {**HANG, "rank": "0", "step": "x"}).replace(str(HANG["since"]), "1e400")), "attempt end"),
    ("rank error with 1e400", _write("jobs/j/run/errors/rank-0.json", json.dumps(ERROR).replace(
        '"attempt": 1', '"attempt": 1e400')), "attempt end"),
    ("task log a FIFO", _as("jobs/j/logs/task-0.log", os.mkfifo), "logs --rank 0"),
]


@pytest.mark.parametrize("what, damage, command", REGRESSIONS, ids=[r[0] + ": " + r[2] for r in REGRESSIONS])
def test_each_damage_the_issue_names_is_answered_in_one_line(what, damage, command) -> None:
    with sandbox() as base:
        whole(base)
        damage(base)
        result = check(command, base)
        assert "root:x" not in result.output, "a file outside the job directory was read out"
        if command == "attempt end":
            assert "could not classify" not in result.stderr and "action=retry" in result.stdout, result.output


@pytest.mark.parametrize("content", [BOMB, b"axes: \xff\n", "axes: " + "[" * 5000 + "]" * 5000, "/dev/zero", "dir"])
def test_a_damaged_sweep_file_is_refused_in_one_line(content) -> None:
    with sandbox() as base:
        path = base / "sweep.yaml"
        if content == "dir":
            path.mkdir()
        elif content == "/dev/zero":
            path = Path(content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        result, took = run(["sweep", "run", "--dry-run", "-o", "sw", "-f", str(path)], base)
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert took < SECONDS and not (base / "a/b/cwd/sw").exists()


def test_a_malformed_hang_is_still_recorded_and_retried() -> None:
    with sandbox() as base:
        whole(base)
        (base / "jobs/j/run/hang.json").write_text(json.dumps({**HANG, "rank": "0", "since": "x", "step": 1e300}))
        result = check("attempt end", base)
        assert "action=retry" in result.stdout
        assert records.load(base / "jobs/j")[-1]["ending"] == "hung"


def test_an_overlong_name_is_refused_before_the_filesystem() -> None:
    long = "x" * 300
    with sandbox() as base:
        whole(base)
        for args in (["status", long], ["render", "-q", "--cluster", long, "-o", "job"],
                     ["sweep", "run", "--dry-run", "-o", "sw", "--grid", f"cluster={long},local"]):
            result, _ = run(args, base)
            assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, (args, result.stderr)
            assert "longer than" in result.stderr
        result, _ = run(["clusters"], base)
        assert result.exit_code == 0


def test_a_thousand_profile_extends_chain_is_refused_quickly_naming_the_depth() -> None:
    with sandbox() as base:
        whole(base)
        for i in range(1000):
            (base / "clusters" / f"p{i}.yaml").write_text(f"extends: p{i + 1}\n")
        result, took = run(["profile", "check", "p0"], base)
        assert took < SECONDS
        assert result.exit_code == 2 and "extends more than" in result.stderr, result.stderr
