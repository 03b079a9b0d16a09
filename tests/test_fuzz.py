"""Hostile values in every option, job-file key and profile key: hpcdist answers 0 or 2, never a traceback,
touches nothing outside the job directory, and what it renders never runs a value as code.

Runs the CLI in-process (click's test runner) with hypothesis; bounded to about a minute in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc import profiles
from hpc.cli import main
from hpc.commands.options import OPTIONS
from hpc.spec import USER_FIELDS

REPO = Path(__file__).resolve().parent.parent
# Each would leave a file named PWNED in the working directory if any shell ran it.
PAYLOADS = ("$(touch PWNED)", "`touch PWNED`", ";touch PWNED", "\ntouch PWNED\n", "'$(touch PWNED)'",
            '"; touch PWNED; "', "\\$(touch PWNED)", "|touch PWNED", "&& touch PWNED #", "${IFS}$(touch${IFS}PWNED)")
NASTY = ("", " ", "\t", "\r", "\x00", "\x1b[31m", "'", '"', "\\", "\\\\", "#", "%", "%j", "*", "~", "..", "/",
         "-", "--", "-1", "0", "00", "1.5", "true", "null", "[1]", "{a: 1}", "\u0663", "\uff11\uff10", "\u00a0",
         "\u2028", "\ud800", "\udcff", "\U0001f600", "é", "x" * 300, "9" * 25, "USR1@99999999", "n[1-3]",
         "n[0-99999999]", "UNLIMITED", "1-0", "a b", "ddp", "deepspeed", "srun", "torchrun", "fp16", "local")

text = st.one_of(
    st.sampled_from(PAYLOADS + NASTY),
    st.builds(lambda a, b: a + b, st.sampled_from(NASTY + ("ok", "n1", "5")), st.sampled_from(PAYLOADS + NASTY)),
    st.text(max_size=12),
)
# What YAML can hold: every type a key might wrongly get.
yaml_value = st.one_of(
    text, st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.lists(st.one_of(text, st.integers()), max_size=3), st.dictionaries(text, text, max_size=2),
)
# Values each flag takes, so that a good share of requests render and their scripts get run.
VALID = {
    "--cluster": ["local"], "--nodes": ["1", "2"], "--gpus-per-node": ["0"], "--ntasks-per-node": ["1", "2"],
    "--cpus-per-task": ["1"], "--backend": ["ddp", "deepspeed", "dp"], "--launcher": ["srun", "torchrun", "deepspeed"],
    "--zero-stage": ["1", "3"], "--precision": ["auto", "bf16"], "--partition": ["debug"], "--account": ["acct"],
    "--time": ["30", "0", "UNLIMITED", "1-02:03:04"], "--job-name": list(PAYLOADS) + ["a'b\\c"],
    "--job-dir": ["job", "j $(touch PWNED)", "~/jobs/x"], "--nodelist": ["n[1-2]", "n1"],
    "--signal": ["USR1@90", "R:TERM@10", "10"], "--max-requeues": ["0", "5"], "--params": ["1M"],
    "--exclude": ["n3"], "--after": ["123", "afterany:5"],
}
# Every flag of render, as it is spelled on the command line.
FLAGS = [flags[0] for flags, _, _ in OPTIONS if not flags[0].startswith("--offload")]
TRAIN_FLAGS = ("--batch-size", "--epochs", "--max-steps", "--lr", "--data-dir", "--dataset", "--seed", "--backend",
               "--back", "--run-dir", "--local_rank", "--help", "--synthetic-size", "--timeout-s", "--zero-stage")
PROFILE_KEYS = tuple(k for k in profiles.KEYS if k not in ("setup", "templates", "extends"))


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory as cwd, with its own HOME and registry; the old cwd back afterwards."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="hpcdist-fuzz-") as root:
        base = Path(root)
        for sub in ("home", "a/b/cwd", "reg"):
            (base / sub).mkdir(parents=True)
        (base / "home" / "secret").write_text("keep\n")
        (base / "a" / "mine.txt").write_text("keep\n")
        stub_bin(base)
        os.chdir(base / "a" / "b" / "cwd")
        try:
            yield base
        finally:
            os.chdir(before)


def snapshot(root: Path, skip: Path) -> dict[str, Any]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        out[str(path)] = None if path.is_dir() else path.read_bytes()
    return out


def requested_job_dir(args: list[str], base: Path) -> Path:
    """Where the command was asked to write (the last -o wins, as click takes it)."""
    value = str(base / "a" / "b" / "cwd" / "job")
    for i, arg in enumerate(args[:-1]):
        if arg == "--job-dir" and "--" not in args[:i]:
            value = args[i + 1]
    with contextlib.suppress(ValueError):
        # Only ``~`` and ``~/...`` are the (sandboxed) home; ``~name`` is that user's home, or the name as it is.
        home = value == "~" or value.startswith("~/")
        return Path(os.path.abspath(value.replace("~", str(base / "home"), 1) if home else os.path.expanduser(value)))
    return base / "nowhere"


def invoke(args: list[str], base: Path):
    """``hpcdist ARGS`` in-process; the job's interpreter (this python, as hpcdist records it) is the stub."""
    env = {"HOME": str(base / "home"), "HPCDIST_HOME": str(base / "reg"), "HPCDIST_PARTITION_CHECK": "0",
           "HPCDIST_TEMPLATES": None, "HPCDIST_CLUSTER": None}
    with mock.patch.object(sys, "executable", str(base / "bin" / "python")):
        return CliRunner().invoke(main, args, env=env, catch_exceptions=True)


def run_job(job_dir: Path, base: Path) -> subprocess.CompletedProcess[str]:
    """Run job.sbatch as the batch shell would, Slurm's commands and the trainer replaced by stubs."""
    spec = yaml.safe_load((job_dir / "spec.yaml").read_text())
    tasks = spec["nodes"] * (1 if spec["launcher"] != "srun" else spec["procs_per_node"])
    env = {"PATH": f"{base / 'bin'}:/usr/bin:/bin", "HOME": str(base / "home"), "ARGV_LOG": str(base / "argv"),
           "SLURM_LOG": str(base / "slurm"), "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_NNODES": str(spec["nodes"]), "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NTASKS": str(tasks), "SLURM_TASKS_PER_NODE": f"{tasks // spec['nodes']}(x{spec['nodes']})"}
    # `module` is a shell function on a cluster; a stand-in that records its argument.
    return subprocess.run(["bash", "-c", 'module() { printf "%s\\n" "$2" >> "$HOME/modules"; }; export -f module; '
                           'exec bash "$0"', str(job_dir / "job.sbatch")],
                          cwd=base / "a" / "b" / "cwd", env=env, capture_output=True, text=True, timeout=300)


def check_outcome(result, args: list[str]) -> None:
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args!r} raised {result.exception!r}") from result.exception
    assert code in (0, 2), (args, code, result.output)
    if code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr)


def rendered_scripts(job_dir: Path) -> list[Path]:
    return [p for p in job_dir.iterdir() if p.suffix in (".sh", ".sbatch")]


@st.composite
def requests(draw) -> tuple[list[str], dict | None, dict | None]:
    """A command line (flags and trainer arguments), and maybe a job file and a profile, all hostile."""
    args: list[str] = []
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=5)):
        # Mostly a value the flag takes, so that many requests get as far as running their scripts.
        value = draw(st.sampled_from(VALID.get(flag) or ["x"])) if draw(st.integers(0, 3)) else draw(text)
        args += [flag, _inside(flag, value)]
    if draw(st.integers(0, 5)) == 0:
        args.append(draw(st.sampled_from(["--offload", "--no-offload"])))
    job = None
    if draw(st.integers(0, 3)) == 0:
        keys = st.one_of(st.sampled_from(USER_FIELDS + ("output_dir", "python", "backend_reason")), text,
                         st.integers())
        job = {k: _inside(k, v) for k, v in draw(st.dictionaries(keys, yaml_value, max_size=4)).items()}
    profile = None
    if draw(st.integers(0, 3)) == 0:
        keys = st.one_of(st.sampled_from(PROFILE_KEYS), text)
        profile = draw(st.dictionaries(keys, yaml_value, max_size=4))
        if draw(st.booleans()):
            profile["network"] = draw(st.dictionaries(st.sampled_from(profiles.NETWORK_KEYS), yaml_value,
                                                      max_size=3))
    train: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        flag = draw(st.sampled_from(TRAIN_FLAGS))
        good = st.sampled_from(PAYLOADS) if flag == "--data-dir" else st.sampled_from(["2", "8", "64"])
        train += [flag, draw(st.one_of(good, text))]
    if train:
        args += ["--", *train]
    return args, job, profile


def _inside(key: Any, value: Any) -> Any:
    """A job directory the fuzz chose, kept inside the sandbox: relative, except / itself (always refused)."""
    if key in ("--job-dir", "job_dir", "output_dir") and isinstance(value, str) and value != "/":
        return value.lstrip("/")
    return value


def with_files(args: list[str], job: dict | None, profile: dict | None, base: Path) -> list[str]:
    head, tail = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
    if job is not None:
        path = base / "job.yaml"
        path.write_text(yaml.safe_dump(job, allow_unicode=False))
        head = ["-c", str(path), *head]
    if profile is not None:
        path = base / "site.yaml"
        path.write_text(yaml.safe_dump(profile, allow_unicode=False))
        head = [*head, "--cluster", str(path)]
    return head + tail


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(request=requests(), command=st.sampled_from([["render", "-q"], ["submit", "--dry-run", "--executor", "local"],
                                                    ["render", "-q", "--force"]]))
def test_any_input_is_0_or_one_line_2_and_touches_nothing_else(request, command) -> None:
    args, job, profile = request
    with sandbox() as base:
        full = command + with_files(args, job, profile, base)
        # Without -o the default job dir depends on the clock; give one unless the fuzz chose its own.
        if "--job-dir" not in (full[:full.index("--")] if "--" in full else full):
            full = full[:len(command)] + ["--job-dir", "job"] + full[len(command):]
        target = requested_job_dir(full, base)
        before = snapshot(base, target)
        result = invoke(full, base)
        check_outcome(result, full)
        after = snapshot(base, target)
        # The job directory's missing parents are made for it; nothing else may appear, change or go.
        made = {p for p in set(after) - set(before) if Path(p) in target.parents and after[p] is None}
        assert {k: v for k, v in after.items() if k not in made} == before, f"{full!r} changed files outside {target}"
        if result.exit_code == 0:
            for script in rendered_scripts(target):
                proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
                assert proc.returncode == 0, (full, script.name, proc.stderr)
            run_job(target, base)
            assert not list(base.rglob("PWNED")), f"a value ran as code: {full!r}"


# ---- running what was rendered -------------------------------------------------------------------

STUB_PYTHON = """#!{real}
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "hpc"]:
    os.environ["PYTHONPATH"] = {repo!r}
    os.execv({real!r}, [{real!r}] + args)
with open(os.environ["ARGV_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
"""
STUB_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
SLURM_STEP_ID=0 exec "$@"
"""
STUB_SLURM = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"$SLURM_LOG\"\n"


def stub_bin(base: Path) -> Path:
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for name, body in (("python", STUB_PYTHON.format(real=sys.executable, repo=str(REPO))), ("srun", STUB_SRUN),
                       ("scontrol", STUB_SLURM), ("sbatch", STUB_SLURM), ("squeue", STUB_SLURM)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    return bin_dir


hostile_word = st.one_of(st.sampled_from(PAYLOADS), st.builds(lambda a, b: a + b, st.sampled_from(PAYLOADS),
                                                               st.sampled_from(("'", '"', "\\", "#", "%", "é"))))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(name=hostile_word, account=hostile_word, env_value=hostile_word, module=hostile_word, train=hostile_word,
       launcher=st.sampled_from([("ddp", "srun"), ("ddp", "torchrun"), ("deepspeed", "deepspeed")]))
def test_rendered_scripts_never_run_a_value(name, account, env_value, module, train, launcher) -> None:
    with sandbox() as base:
        bin_dir = base / "bin"
        site = base / f"site {name.replace('/', '_')}.yaml"
        site.write_text(yaml.safe_dump({"partition": "debug", "modules": [module], "env": {"HOSTILE": env_value},
                                        "python": str(bin_dir / "python")}))
        backend, launch = launcher
        # Partition and account cannot hold blanks for Slurm: a value with one is refused, not rendered.
        args = ["render", "-q", "-o", f"job {name.replace('/', '_')}"[:200], "--cluster", str(site), "-J", name,
                "-A", account.replace(" ", "").replace("\n", ""), "--nodes", "2", "--ntasks-per-node",
                "1" if launch != "srun" else "2", "--backend", backend, "--launcher", launch,
                "--", "--data-dir", train, "--batch-size", "8"]
        result = invoke(args, base)
        check_outcome(result, args)
        if result.exit_code != 0:
            return
        job_dir = Path(result.output.split("# job directory: ", 1)[1].rstrip("\n"))
        proc = run_job(job_dir, base)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not list(base.rglob("PWNED")), f"a value ran as code: {args!r}"
        argv = json.loads((base / "argv").read_text().splitlines()[0])
        assert argv[argv.index("--data-dir") + 1] == train
        assert (base / "home" / "modules").read_text() == module + "\n"
