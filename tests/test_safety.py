"""hpcdist never removes what it did not write, never runs a value as code, and answers bad input with one
line and exit status 2 (issue 10's defects, one test or more each)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc import jobdir, profiles, registry, render, submit
from hpc.cli import main
from hpc.spec import JobSpec, SpecError, signal_name, time_seconds
from hpc.speccheck import check
from train import options

REPO = Path(__file__).resolve().parent.parent


def cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``hpcdist ARGS`` in-process: exit status, stdout, stderr."""
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_refusal(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ---- 1: --force replaces only a job directory hpcdist wrote ----------------------------------------

@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home holding a secret, as the working directory; HOME points at it."""
    home = tmp_path / "h"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id").write_text("key\n")
    (home / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    return home


@pytest.mark.parametrize("target", ["~", ".", "..", "", "/", "~/work", "../.."])
def test_force_never_replaces_home_cwd_root_or_a_parent(home: Path, target: str) -> None:
    before = tree(home)
    code, _, err = cli(["render", "-q", "-o", target, "--force"], env={"HOME": str(home)})
    assert_one_line_refusal(code, err)
    assert tree(home) == before


def test_a_sweep_never_replaces_the_cwd_even_holding_a_sweep_file(home: Path) -> None:
    (home / "work" / "sweep.yaml").write_text("x: 1\n")
    before = tree(home)
    code, _, err = cli(["sweep", "--dry-run", "-o", ".", "--force"])
    assert_one_line_refusal(code, err, "current directory")
    assert tree(home) == before


def test_force_refuses_a_job_dir_from_a_job_file_that_is_the_cwd(home: Path) -> None:
    (home / "work" / "job.yaml").write_text("job_dir: .\n")
    before = tree(home)
    code, _, err = cli(["render", "-q", "-c", "job.yaml", "--force"], env={"HOME": str(home)})
    assert_one_line_refusal(code, err, str(home / "work"))
    assert tree(home) == before


def test_force_refuses_a_regular_file_and_a_directory_hpcdist_did_not_write(home: Path) -> None:
    (home / "work" / "notes.txt").write_text("mine\n")
    (home / "work" / "data").mkdir()
    (home / "work" / "data" / "x.bin").write_bytes(b"\0\1")
    before = tree(home)
    for target in ("notes.txt", "data"):
        code, _, err = cli(["render", "-q", "-o", target, "--force"])
        assert_one_line_refusal(code, err, target)
    assert tree(home) == before


def test_force_replaces_a_job_dir_hpcdist_wrote_that_never_ran(home: Path) -> None:
    assert cli(["render", "-q", "-o", "job"])[0] == 0
    assert jobdir.is_job_dir(home / "work" / "job")
    code, _, err = cli(["render", "-q", "-o", "job"])
    assert_one_line_refusal(code, err, "already exists")
    assert cli(["render", "-q", "-o", "job", "--force", "-J", "second"])[0] == 0
    assert "--job-name=second" in (home / "work" / "job" / "job.sbatch").read_text()
    # Nothing is left beside it: no staging or old copies.
    assert sorted(p.name for p in (home / "work").iterdir()) == ["job"]


def test_a_job_dir_another_command_wrote_since_the_check_is_never_replaced(home: Path, monkeypatch) -> None:
    """Two `hpcdist submit`s started in the same second pick the same default runs/NAME-TIME: the second, which
    checked before the first had written it, once moved the first job's directory aside and deleted it, and both
    jobs then ran in one directory (one run/, one checkpoint folder)."""
    target = home / "work" / "runs" / "hpcdist-20261207-060045"
    jobdir.write_tree(target, {"job.sbatch": "first\n"})
    before = tree(home)
    monkeypatch.setattr(jobdir, "refuse_target", lambda *args: None)  # checked while there was nothing there
    with pytest.raises(render.RenderError, match="already exists"):
        jobdir.write_tree(target, {"job.sbatch": "second\n"})
    assert tree(home) == before


@pytest.mark.parametrize("made", ["submitted.json", "attempts.jsonl", "run/checkpoints/step00000010/model.pt",
                                  "run/metrics.jsonl", "run/summary.json", "logs/task-0.log", "run/old-result",
                                  "hostfile"])
def test_force_never_replaces_a_job_that_ran(home: Path, made: str) -> None:
    assert cli(["render", "-q", "-o", "job"])[0] == 0
    path = home / "work" / "job" / made
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("result\n")
    before = tree(home)
    code, _, err = cli(["render", "-q", "-o", "job", "--force"])
    assert_one_line_refusal(code, err, "never ran", made.split("/")[0])
    assert tree(home) == before


def test_sweep_force_never_replaces_a_job_dir_nor_render_force_a_sweep(home: Path) -> None:
    assert cli(["render", "-q", "-o", "job"])[0] == 0
    assert cli(["sweep", "run", "--dry-run", "-o", "sw", "--grid", "train.seed=1,2"])[0] == 0
    before = tree(home)
    code, _, err = cli(["sweep", "run", "--dry-run", "-o", "job", "--grid", "train.seed=1,2", "--force"])
    assert_one_line_refusal(code, err, "never replaces a job directory")
    code, _, err = cli(["render", "-q", "-o", "sw", "--force"])
    assert_one_line_refusal(code, err, "never replaces a sweep directory")
    assert tree(home) == before
    assert cli(["sweep", "run", "--dry-run", "-o", "sw", "--grid", "train.seed=3,4", "--force"])[0] == 0


@pytest.mark.parametrize("marker", [
    "This directory was written by hpcdist (render, submit or sweep); `--force` may replace it.\n",  # older
    '{"kind": "job", "paths": "everything"}\n',
    b"\xff\xfe",
])
def test_a_marker_that_does_not_list_what_was_written_is_never_replaced(home: Path, marker) -> None:
    assert cli(["render", "-q", "-o", "job"])[0] == 0
    path = home / "work" / "job" / jobdir.MARKER
    path.write_bytes(marker) if isinstance(marker, bytes) else path.write_text(marker)
    before = tree(home)
    code, _, err = cli(["render", "-q", "-o", "job", "--force"])
    assert_one_line_refusal(code, err, "readable")
    assert tree(home) == before


def test_a_symlinked_marker_does_not_make_a_job_dir(home: Path) -> None:
    (home / "work" / "fake").mkdir()
    (home / "work" / "fake" / "mine").write_text("keep")
    (home / "work" / "elsewhere").write_text("")
    (home / "work" / "fake" / jobdir.MARKER).symlink_to(home / "work" / "elsewhere")
    code, _, err = cli(["render", "-q", "-o", "fake", "--force"])
    assert_one_line_refusal(code, err, "fake")
    assert (home / "work" / "fake" / "mine").read_text() == "keep"


def test_discard_removes_only_a_marked_job_dir(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "f").write_text("keep")
    jobdir.discard(mine)
    assert (mine / "f").read_text() == "keep"
    spec = JobSpec(job_dir=str(tmp_path / "job"), python=sys.executable)
    written = render.write(render.render(spec, profiles.load("local")))
    jobdir.discard(written)
    assert not written.exists()


@pytest.mark.parametrize("argv", [["submit", "--via", "sbatch", "-o", "job"], ["submit", "-o", "job"],
                                  ["doctor", "--nodes", "2", "-o", "job"], ["drill", "--nodes", "2", "-o", "job"],
                                  ["sweep", "--grid", "backend=ddp", "-o", "job"]])
def test_a_failed_submission_removes_only_its_own_job_dir(tmp_path: Path, monkeypatch, argv: list[str]) -> None:
    """submit, doctor, drill and sweep whose sbatch refuses: one line, and the directory just written goes."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    sbatch = fake_bin / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: no' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("mine")
    code, _, err = cli(argv, env={"PATH": f"{fake_bin}:{os.environ['PATH']}", "HPCDIST_HOME": str(tmp_path / "reg")})
    assert code == 1 and "sbatch refused the job" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "keep"]


# ---- 2: every value reaching a template goes through one quoting layer -------------------------------

def test_a_profile_path_cannot_inject_into_setup_sh(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "site\ntouch PWNED\n#.yaml"
    hostile.write_text("partition: debug\n")
    code, _, err = cli(["render", "-q", "-o", "j", "--cluster", str(hostile)])
    assert code == 0, err
    subprocess.run(["bash", "-c", "source j/setup.sh"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / "PWNED").exists()
    assert "site\\ntouch PWNED\\n#.yaml" in (tmp_path / "j" / "setup.sh").read_text()


def test_a_template_that_forgets_to_quote_fails_the_render(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "setup.sh.j2").write_text("echo {{ spec.job_name }}\n")
    spec = JobSpec(job_dir=str(tmp_path / "job"), job_name="$(touch PWNED)", python=sys.executable)
    with pytest.raises(render.RenderError, match="unquoted"):
        render.render(spec, profiles.load("local"), search=(str(site), str(REPO / "templates")))
    # A plain word needs no quoting; the same template renders it.
    ok = render.render(replace(spec, job_name="plain-name_1.0"), profiles.load("local"),
                       search=(str(site), str(REPO / "templates")))
    assert ok.files["setup.sh"] == "echo plain-name_1.0\n"


# ---- 3, 14: geometry and settings that cannot work ---------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--gpus-per-node", "-1"], ["--gpus-per-node -1"]),
    (["--offload"], ["--offload", "deepspeed"]),
    (["--max-requeues", "99999999999999999999"], ["max_requeues"]),
    (["--max-requeues", "100000"], ["--max-requeues 100000"]),
    (["--nodes", "\u0663"], ["ASCII digits"]),
    (["--nodes", " 1"], ["ASCII digits"]),
])
def test_settings_that_cannot_work_are_refused(tmp_path: Path, args: list[str], words: list[str]) -> None:
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j"), *args])
    assert_one_line_refusal(code, err, *words)
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("text,words", [
    ("backend_reason: because\n", ["backend_reason is decided by hpcdist"]),
    ("python: /bin/evil\n", ["python is decided by hpcdist"]),
    ("job_dir: a\noutput_dir: b\n", ["both job_dir and output_dir"]),
    ("nodes: 1\nnodes: 2\n", ["'nodes' appears twice"]),
    ("1: 2\n", ["unknown key", "the first 1;"]),
    ("train_args: [true]\n", ["train_args must be a list of strings"]),
    ("nodes: [1]\n", ["nodes must be a whole number"]),
])
def test_job_file_mistakes_are_one_line(tmp_path: Path, text: str, words: list[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    code, _, err = cli(["render", "-q", "-c", str(job), "-o", str(tmp_path / "j")])
    assert_one_line_refusal(code, err, *words)


@pytest.mark.parametrize("network,words", [
    ({"NCCL_IB_GID_INDEX": -7}, ["NCCL_IB_GID_INDEX"]),
    ({"NCCL_IB_GID_INDEX": 300}, ["NCCL_IB_GID_INDEX"]),
    ({"NCCL_NET_GDR_LEVEL": "FAST"}, ["NCCL_NET_GDR_LEVEL"]),
    ({"NCCL_SOCKET_IFNAME": "ib0 eth0"}, ["NCCL_SOCKET_IFNAME"]),
])
def test_network_values_nccl_would_misread_are_refused(network: dict, words: list[str]) -> None:
    with pytest.raises(profiles.ProfileError) as info:
        profiles.parse("site", {"network": network})
    assert all(w in str(info.value) for w in words)


def test_duplicate_keys_in_a_profile_are_refused(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("partition: a\npartition: b\n")
    with pytest.raises(profiles.ProfileError, match="'partition' appears twice"):
        profiles.load(str(site))


# ---- 4, 16: the trainer's arguments, read by the trainer's own parser at render time -----------------

@pytest.mark.parametrize("args", [["--back", "ddp"], ["--run-d", "X"], ["--deepspeed-c", "evil.json"],
                                  ["--local-rank", "5"], ["--local_rank=5"], ["--precision=fp32"],
                                  ["--zero-stage", "1"], ["--help"]])
def test_reserved_or_abbreviated_trainer_options_are_refused_at_render(tmp_path: Path, args: list[str]) -> None:
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j"), "--", *args])
    assert_one_line_refusal(code, err, "trainer argument")
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("args", [["--back", "dp"], ["--run-d", "y"], ["--backend", "dp"], ["--local-rank", "1"]])
def test_the_trainer_itself_takes_no_abbreviation_and_no_second_reserved_option(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        options.parse(["--backend", "ddp", "--run-dir", "x", "--local_rank", "0", *args])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("flag,most", [("--seed", 2**63 - 1), ("--threads", 2**31 - 1), ("--timeout-s", 10**9)])
def test_trainer_numbers_past_what_torch_takes_are_refused_in_one_line(flag: str, most: int, capsys) -> None:
    assert options.parse(["--backend", "ddp", "--run-dir", "x", flag, str(most)])
    with pytest.raises(SystemExit) as info:
        options.parse(["--backend", "ddp", "--run-dir", "x", flag, str(most * 10)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{flag} must be at most {most}" in err, err


@pytest.mark.parametrize("backend", ["dp", "ddp"])
@pytest.mark.parametrize("args", [["--zero-stage", "3"], ["--deepspeed-config", "ds.json"]])
def test_deepspeed_only_trainer_options_are_refused_with_dp_and_ddp_not_ignored(backend, args, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        options.parse(["--backend", backend, "--run-dir", "x", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{args[0]} applies to --backend deepspeed" in err, err
    assert options.parse(["--backend", "deepspeed", "--run-dir", "x", *args])


def test_train_options_stays_torch_free() -> None:
    probe = "import sys, train.options, hpc.spec; print(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("args,words", [
    (["--", "--batch-size", "abc"], ["invalid int value: 'abc'"]),
    (["--", "--batch-size=0"], ["--batch-size must be at least 1"]),
    (["--", "--epochs", "-1"], ["--epochs must be at least 1"]),
    (["--", "--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (["--nodes", "3", "--ntasks-per-node", "2", "--backend", "deepspeed", "--launcher", "torchrun"],
     ["global batch 32 does not split evenly over 6 ranks"]),
    (["--nodes", "3", "--backend", "ddp"], ["global batch 256 does not split evenly over 3 ranks"]),
    (["--nodes", "2", "--backend", "deepspeed", "--", "--batch-size", "7"],
     ["global batch 7 does not split evenly over 2 ranks"]),
])
def test_what_every_rank_would_refuse_is_refused_at_render(tmp_path: Path, args: list[str], words) -> None:
    head = args[:args.index("--")] if "--" in args else args
    tail = args[args.index("--"):] if "--" in args else []
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j"), *head, *tail])
    assert_one_line_refusal(code, err, *words)


def test_the_deepspeed_geometry_from_the_issue_is_refused_by_submit_too(tmp_path: Path) -> None:
    code, _, err = cli(["submit", "--executor", "local", "--nodes", "3", "--ntasks-per-node", "2", "--backend",
                        "deepspeed", "--launcher", "torchrun", "-o", str(tmp_path / "j")],
                       env={"HPCDIST_HOME": str(tmp_path / "reg")})
    assert_one_line_refusal(code, err, "does not split evenly over 6 ranks")
    assert not (tmp_path / "j").exists() and not (tmp_path / "reg").exists()


# ---- 5, 8: the submitit path carries job.sbatch's exact values ---------------------------------------

def sbatch_directive_words(script: str) -> dict[str, str]:
    """#SBATCH options as Slurm's sbatch reads them (src/sbatch/opt.c, _get_argument): blanks split, ' and
    " quote, a backslash escapes the next character even inside quotes, an unquoted # ends the line."""
    out = {}
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        rest, word, quote, escape = line[len("#SBATCH"):].lstrip(), "", "", False
        for ch in rest:
            if escape:
                word, escape = word + ch, False
            elif ch == "\\":
                escape = True
            elif quote:
                if ch == quote:
                    quote = ""
                else:
                    word += ch
            elif ch in "'\"":
                quote = ch
            elif ch.isspace() or ch == "#":
                break
            else:
                word += ch
        assert not quote, f"sbatch would stop at an unmatched quote: {line}"
        key, _, value = word.partition("=")
        out[key] = value
    return out


def submitit_script(rendered: render.Rendered) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="true", folder=str(rendered.job_dir / "submitit"),
                               **submit.slurm_parameters(rendered))


@pytest.mark.parametrize("name", ["a\\", "a\\b", "it's", 'say "hi"', "x # y", "a'\\\"b $(x)"])
@pytest.mark.parametrize("time", ["30", "1:30", "1-0", "0", "UNLIMITED", "2-03:04:05"])
def test_both_submit_paths_carry_identical_values(tmp_path: Path, name: str, time: str) -> None:
    spec = JobSpec(job_dir=str(tmp_path / "job"), job_name=name, time=time, signal="R:SIGusr1@61",
                   python=sys.executable)
    rendered = render.render(spec, profiles.load("local"))
    ours, theirs = sbatch_directive_words(rendered.files["job.sbatch"]), sbatch_directive_words(
        submitit_script(rendered))
    for key in ("--job-name", "--time", "--partition", "--signal"):
        assert theirs[key] == ours[key], key
    assert ours["--job-name"] == name and ours["--time"] == time


@pytest.mark.parametrize("value,seconds", [("0", None), ("UNLIMITED", None), ("infinite", None), ("0:0", None),
                                           ("0:30", 30), ("1-0", 86400)])
def test_zero_and_unlimited_are_no_limit(value: str, seconds: int | None) -> None:
    assert time_seconds(value) == seconds


@pytest.mark.parametrize("value", [" 30", "30 ", "\u0661\u0660", "-1", "1:2:3:4", "", "30m", "99999999999"])
def test_times_slurm_refuses_are_refused(value: str) -> None:
    spec = JobSpec(job_dir="/tmp/j", time=value, python="python3")
    with pytest.raises(SpecError) as info:
        check(spec, profiles.load("local"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["FOO@120", "USR1@99999999", "USR1@65536", "0", "PIPE", "B:R:USR1", "@120", "SIG10",
                                   "USR1@\uff11", "USR1 ", "999"])
def test_signals_slurm_refuses_are_refused(value: str) -> None:
    with pytest.raises(SpecError, match="--signal"):
        check(JobSpec(job_dir="/tmp/j", signal=value, python="python3"), profiles.load("local"))


@pytest.mark.parametrize("value,name", [("USR1@65535", "USR1"), ("sigterm", "TERM"), ("R:10@5", "USR1"),
                                        ("15", "TERM")])
def test_signals_slurm_takes_are_taken(value: str, name: str) -> None:
    spec = check(JobSpec(job_dir="/tmp/j", signal=value, python="python3"), profiles.load("local"))
    assert signal_name(spec.signal) == name


# ---- 7: no traceback for any input ------------------------------------------------------------------

def test_unreadable_inputs_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"job_name: caf\xe9\n")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "-c", str(bad), "-o", str(tmp_path / "j")])),
                            "not UTF-8")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "--cluster", str(bad), "-o", str(tmp_path / "j")])),
                            "not UTF-8")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "--cluster", str(tmp_path), "-o",
                                            str(tmp_path / "j")])), "is a directory")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "-o", str(tmp_path / ("x" * 256))])), "too long")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "-J", "a\udcffb", "-o", str(tmp_path / "j")])),
                            "not valid UTF-8")
    assert_one_line_refusal(*_code_err(cli(["render", "-q", "-o", str(tmp_path / "j"), "--", "--seed",
                                            "\udcff"])), "not valid UTF-8")


def _code_err(result: tuple[int, str, str]) -> tuple[int, str]:
    return result[0], result[2]


@pytest.mark.parametrize("template,words", [
    ("{{ 1 // 0 }}", ["ZeroDivisionError"]),
    ('{% include "setup.sh.j2" %}', ["includes itself"]),
    (b"# caf\xe9\n", ["cannot read a template"]),
    ("{{ nope }}", ["'nope' is undefined"]),
])
def test_broken_site_templates_are_one_line(tmp_path: Path, template, words) -> None:
    site = tmp_path / "site"
    site.mkdir()
    path = site / "setup.sh.j2"
    path.write_bytes(template) if isinstance(template, bytes) else path.write_text(template)
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j")], env={"HPCDIST_TEMPLATES": str(site)})
    assert_one_line_refusal(code, err, *words)


def test_click_usage_errors_are_one_line() -> None:
    for args in (["render", "--nodes", "abc"], ["render", "--no-such-flag"], ["no-such-command"],
                 ["status"]):
        proc = subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert_one_line_refusal(proc.returncode, proc.stderr, "--help")


# ---- 9: --time 0 under the local runner -------------------------------------------------------------

def test_no_time_limit_gives_the_local_runner_no_limit(tmp_path: Path, monkeypatch) -> None:
    import submitit

    seen = {}
    monkeypatch.setattr(submitit.LocalExecutor, "update_parameters",
                        lambda self, **kw: seen.update(kw))
    monkeypatch.setattr(submitit.LocalExecutor, "submit", lambda self, *a, **kw: None)
    for time, minutes in (("0", submit.LOCAL_NO_LIMIT_MIN), ("UNLIMITED", submit.LOCAL_NO_LIMIT_MIN),
                          ("0:30", 1), ("90", 90)):
        spec = JobSpec(job_dir=str(tmp_path / "job"), time=time, python=sys.executable)
        submit.submit_local(render.render(spec, profiles.load("local")))
        assert seen["timeout_min"] == minutes, time


# ---- 11: a missing site template directory ----------------------------------------------------------

def test_a_missing_site_template_directory_is_an_error(tmp_path: Path) -> None:
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j")],
                       env={"HPCDIST_TEMPLATES": str(tmp_path / "nonexistent")})
    assert_one_line_refusal(code, err, "HPCDIST_TEMPLATES", "nonexistent")
    site = tmp_path / "site.yaml"
    site.write_text("templates: missing-dir\n")
    code, _, err = cli(["render", "-q", "--cluster", str(site), "-o", str(tmp_path / "j")])
    assert_one_line_refusal(code, err, "templates:", str(tmp_path / "missing-dir"))


# ---- 15: a failing `hpc env` stops the task ----------------------------------------------------------

@pytest.mark.parametrize("launcher,backend", [("torchrun", "ddp"), ("deepspeed", "deepspeed")])
def test_a_failing_hpc_env_stops_task_sh(tmp_path: Path, launcher: str, backend: str) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nif [ \"$1 $2 $3\" = '-m hpc env' ]; then echo 'no rank' >&2; exit 2; fi\n"
                    f"touch {tmp_path}/LAUNCHED\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    spec = JobSpec(job_dir=str(tmp_path / "job"), nodes=2, backend=backend, launcher=launcher, python=str(fake))
    render.write(render.render(spec, profiles.load("local")))
    proc = subprocess.run(["bash", str(tmp_path / "job" / "task.sh")], capture_output=True, text=True,
                          env={**os.environ, "SLURM_NODEID": "0", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1"})
    assert proc.returncode != 0 and "no rank" in proc.stderr
    assert not (tmp_path / "LAUNCHED").exists()


# ---- 17: status and list for a job whose directory was deleted --------------------------------------

def test_status_and_list_say_the_job_dir_is_gone(tmp_path: Path) -> None:
    record = registry.Record(job_id="999999", job_dir=str(tmp_path / "deleted"), via="local",
                         submitted="2026-01-01T00:00:00+00:00", job_name="gone")
    registry.append(tmp_path / "reg" / "jobs.jsonl", record)
    env = {"HPCDIST_HOME": str(tmp_path / "reg")}
    code, out, err = cli(["status", "999999"], env=env)
    assert code == 0 and "LEFT_QUEUE" in out and "FAILED" not in out, out
    assert "no longer exists" in err
    code, out, _ = cli(["list"], env=env)
    assert "(deleted)" in out and "LEFT_QUEUE" in out
    # Ended, how unknown: nothing that waits on it waits forever.
    top = subprocess.run([sys.executable, "-m", "hpc", "top", "999999"], env={**os.environ, **env}, timeout=60,
                         capture_output=True, text=True)
    assert top.returncode == 0, top.stdout + top.stderr
    assert json.loads((tmp_path / "reg" / "jobs.jsonl").read_text())["job_id"] == "999999"


# ---- issue 22: a dry run runs no code ---------------------------------------------------------------

# Each reaches Python from a template in an unsandboxed Jinja; each must fail the render and run nothing.
PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.system('touch OWNED') }}",
    "{{ lipsum.__globals__['os'].system('touch OWNED') }}",
    "{{ profile.environment() }}",
    "{{ spec.to_dict() | q }}",
    "{{ vocab.task_log(1) }}",
    "{% set x = spec.train_args.append('x') %}",
    "{{ (''.__class__.__mro__[1].__subclasses__() | length) }}",
]


def _site_with(tmp_path: Path, payload: str) -> tuple[Path, Path]:
    """A site directory (clusters/site.yaml naming templates/) whose setup.sh.j2 carries ``payload``."""
    site = tmp_path / "site"
    (site / "clusters").mkdir(parents=True)
    (site / "templates").mkdir()
    setup = (REPO / "templates" / "setup.sh.j2").read_text()
    (site / "templates" / "setup.sh.j2").write_text(payload + "\n" + setup)
    profile = site / "clusters" / "site.yaml"
    profile.write_text(f"partition: debug\nmax_nodes: 3\ntemplates: {site / 'templates'}\n")
    return site, profile


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("route", ["--cluster PATH", "job file cluster:", "HPCDIST_CLUSTERS", "HPCDIST_TEMPLATES"])
@pytest.mark.parametrize("command", ["render", "sweep"])
def test_a_templates_python_never_runs_during_a_dry_run(tmp_path: Path, monkeypatch, payload: str, route: str,
                                                        command: str) -> None:
    monkeypatch.chdir(tmp_path)
    site, profile = _site_with(tmp_path, payload)
    env: dict[str, str] = {}
    args = ["-o", str(tmp_path / "j")]
    if route == "--cluster PATH":
        args += ["--cluster", str(profile)]
    elif route == "job file cluster:":
        (tmp_path / "job.yaml").write_text(f"cluster: {profile}\n")
        args += ["-c", str(tmp_path / "job.yaml")]
    elif route == "HPCDIST_CLUSTERS":
        env["HPCDIST_CLUSTERS"] = str(site / "clusters")
        args += ["--cluster", "site"]
    else:
        env["HPCDIST_TEMPLATES"] = str(site / "templates")
    argv = ["render", "-q", *args] if command == "render" else ["sweep", "run", "--dry-run", "--grid",
                                                                 "zero_stage=1,2", "--backend", "deepspeed", *args]
    code, _, err = cli(argv, env=env)
    assert_one_line_refusal(code, err, "template")
    assert not (tmp_path / "OWNED").exists()
    assert not (tmp_path / "j").exists()


def test_the_sandbox_still_renders_macros_loops_and_filters(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    setup = (REPO / "templates" / "setup.sh.j2").read_text()
    extra = ('{% for m in ["a", "b"] %}# {{ loop.index }} {{ m }} {{ loop.cycle("x", "y") }}\n{% endfor %}'
             '{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}'
             '# sum {{ ns.n }} {{ vocab.RUN_DIR }} {{ spec.job_name | q }}\n')
    (site / "setup.sh.j2").write_text(extra + setup)
    code, _, err = cli(["render", "-q", "-o", str(tmp_path / "j")], env={"HPCDIST_TEMPLATES": str(site)})
    assert code == 0, err
    text = (tmp_path / "j" / "setup.sh").read_text()
    assert "# 1 a x\n# 2 b y\n# sum 3 run hpcdist\n" in text


# ---- issue 22: errors never echo a file's contents ---------------------------------------------------

PASSWD = "".join(f"user{i}: x:{1000 + i}:{1000 + i}:User {i}:/home/user{i}:/bin/bash\n" for i in range(30))


@pytest.mark.parametrize("how", ["--cluster FILE", "-c FILE", "sweep -f FILE", "extends: FILE", "profile check FILE"])
def test_an_unknown_key_error_names_the_count_and_the_first_never_the_file(tmp_path: Path, how: str) -> None:
    secret = tmp_path / "passwd.yaml"
    secret.write_text(PASSWD)
    out = ["-o", str(tmp_path / "j")]
    argv = {"--cluster FILE": ["render", "-q", "--cluster", str(secret), *out],
            "-c FILE": ["render", "-q", "-c", str(secret), *out],
            "sweep -f FILE": ["sweep", "run", "--dry-run", "-f", str(secret), *out],
            "extends: FILE": ["render", "-q", "--cluster", str(tmp_path / "site.yaml"), *out],
            "profile check FILE": ["profile", "check", str(secret)]}[how]
    (tmp_path / "site.yaml").write_text(f"extends: {secret}\n")
    code, _, err = cli(argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "30 unknown key(s), the first 'user0'" in err, err
    assert "user1" not in err and "user29" not in err and "/bin/bash" not in err


@pytest.mark.parametrize("argv", [["bench", "--timeout-s", "nan", "--dry-run"], ["top", "x", "--every", "nan"],
                                  ["drill", "--timeout", "nan"], ["bench", "--timeout-s", "inf", "--dry-run"],
                                  ["plan", "--params", "1e400", "--nodes", "1", "--gpus-per-node", "8",
                                   "--gpu-memory", "80GB"],
                                  ["plan", "--params", "7B", "--nodes", "1", "--gpus-per-node", "8",
                                   "--gpu-memory", "1e300GB"]])
def test_numbers_past_any_meaning_are_refused_in_one_line(argv: list[str]) -> None:
    code, _, err = cli(argv)
    assert_one_line_refusal(code, err)
