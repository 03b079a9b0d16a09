"""hpc.bench and hpcdist bench: grid specs, the command each config runs, each round's order, one real run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import bench
from hpc.bench import BenchError, Config

ROOT = Path(__file__).resolve().parents[1]


# --- grid specs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("floor:1", Config("floor")),
    ("floor", Config("floor")),
    ("ddp:resident:2", Config("ddp", ranks=2)),
    ("ddp:2:classic", Config("ddp", ranks=2, loader="classic")),
    ("dp:resident:1", Config("dp")),
    ("deepspeed:zero2:bf16:2", Config("deepspeed", ranks=2, zero_stage=2, precision="bf16")),
    ("deepspeed:1", Config("deepspeed", zero_stage=0)),
    ("DDP:Resident:2:T2", Config("ddp", ranks=2, threads=2)),
    ("ddp:b512:2", Config("ddp", ranks=2, batch=512)),
    ("ddp:bf16:cl:compile:b4096", Config("ddp", precision="bf16", batch=4096, channels_last=True, compile=True)),
    ("floor-deepspeed:zero2:bf16", Config("floor-deepspeed", zero_stage=2, precision="bf16")),
    ("floor-deepspeed", Config("floor-deepspeed", zero_stage=0)),
    ("deepspeed:zero2:auto:1", Config("deepspeed", zero_stage=2, precision="auto")),
])
def test_parse_config(spec, expected):
    assert bench.parse_config(spec) == expected


def test_run_batch_applies_unless_the_spec_sets_one():
    assert bench.parse_config("ddp:2", batch=128).batch == 128
    assert bench.parse_config("ddp:2:b64", batch=128).batch == 64


@pytest.mark.parametrize("spec", bench.DEFAULT_GRID + ("ddp:b512:2:t1", "deepspeed:zero3:fp16:classic:4",
                                                      "ddp:compile:bf16:cl:b4096", "floor-deepspeed:zero2:fp16:b32"))
def test_name_round_trips(spec):
    config = bench.parse_config(spec)
    assert bench.parse_config(config.name) == config
    assert ":" not in config.slug


@pytest.mark.parametrize("spec,message", [
    ("horovod:1", "unknown backend 'horovod'"),
    ("ddp:fast", "unknown token 'fast'"),
    ("ddp:1:2", "ranks given twice"),
    ("ddp:bf16:fp32", "precision given twice"),
    ("dp:2", "dp (nn.DataParallel) is one process"),
    ("ddp:zero2:1", "zeroN applies to deepspeed and floor-deepspeed only"),
    ("deepspeed:zero4:1", "ZeRO stage must be 0-3"),
    ("floor:bf16:1", "the floor trains in fp32; floor-deepspeed takes a precision"),
    ("floor-deepspeed:zero2:auto:1", "floor-deepspeed takes a named precision (fp32, bf16, fp16), not auto"),
    ("floor:classic:1", "a floor trains from tensors already on the device"),
    ("floor-deepspeed:classic:1", "a floor trains from tensors already on the device"),
    ("deepspeed:cl:1", "cl and compile apply to dp and ddp only"),
    ("floor:compile", "cl and compile apply to dp and ddp only"),
    ("ddp:cl:cl", "channels last given twice"),
    ("ddp:b255:2", "multiple of 2 ranks"),
    ("ddp:0", "ranks must be at least 1"),
    # Every rank is a process on this machine: past the local executor's limit it is a fork bomb.
    ("ddp:b2048:2048", "2048 ranks would start 2048 processes on this machine, over its limit of 1024"),
    ("ddp:99999999999999999999999", "over its limit of 1024"),
    ("ddp:1:t0", "threads per rank must be at least 1"),
    ("", "unknown backend ''"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(BenchError) as exc:
        bench.parse_config(spec)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_grid_splits_commas_and_refuses_duplicates():
    grid = bench.parse_grid(["floor:1, ddp:resident:1", "deepspeed:zero2:bf16:2"])
    assert [c.name for c in grid] == ["floor:1", "ddp:resident:1", "deepspeed:zero2:bf16:2"]
    with pytest.raises(BenchError, match="twice"):
        bench.parse_grid(["ddp:1", "ddp:resident:1"])
    with pytest.raises(BenchError, match="empty"):
        bench.parse_grid([" , "])


def test_default_grid_is_the_issue_comparison_at_batch_256():
    grid = bench.parse_grid(bench.DEFAULT_GRID)
    names = [c.name for c in grid]
    assert names[0] == "floor:1" and "floor:2" in names
    assert {"ddp:resident:1", "ddp:classic:1", "dp:resident:1", "ddp:resident:2", "ddp:resident:2:t2",
            "deepspeed:zero2:fp32:2"} <= set(names)
    assert all(c.batch == 256 for c in grid)


def test_threads_split_the_cpus_unless_given():
    assert bench.threads_for(Config("ddp"), {}, 2) == 2
    assert bench.threads_for(Config("ddp", ranks=2), {}, 2) == 1
    assert bench.threads_for(Config("ddp", ranks=2, threads=2), {}, 2) == 2
    assert bench.threads_for(Config("ddp", ranks=2), {"OMP_NUM_THREADS": "3"}, 2) == 3
    assert bench.threads_for(Config("ddp", ranks=4), {}, 2) == 1


def test_argv_launches_one_rank_plainly_and_more_under_torchrun():
    one = bench.argv(Config("floor"), 2, 100, 10, "/r", "py")
    assert one[:3] == ["py", "-m", "tools.floor"] and "--max-steps" in one
    assert one[one.index("--max-steps") + 1] == "110" and one[one.index("--threads") + 1] == "2"
    two = bench.argv(Config("deepspeed", ranks=2, zero_stage=2, precision="bf16"), 1, 100, 10, "/r", "py")
    assert two[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    tail = two[6:]
    assert tail[:3] == ["-m", "train", "--backend"]
    # Only the first and last step are logged, so no per-step loss read-back syncs the device.
    for flag, value in (("--zero-stage", "2"), ("--precision", "bf16"), ("--log-every", "110"),
                        ("--warmup-steps", "10"), ("--batch-size", "256"), ("--run-dir", "/r"),
                        ("--max-steps", "110"), ("--synthetic-size", str(bench.SYNTHETIC_SIZE))):
        assert tail[tail.index(flag) + 1] == value
    assert "--channels-last" not in tail and "--compile" not in tail


def test_argv_passes_speed_options_and_samples_to_the_trainer():
    cmd = bench.argv(bench.parse_config("ddp:bf16:cl:compile:b4096"), 16, 100, 10, "/r", "py", samples=50000)
    assert cmd[cmd.index("--synthetic-size") + 1] == "50000" and cmd[cmd.index("--batch-size") + 1] == "4096"
    assert "--channels-last" in cmd and "--compile" in cmd


def test_argv_runs_the_bare_deepspeed_loop_for_floor_deepspeed():
    cmd = bench.argv(bench.parse_config("floor-deepspeed:zero2:fp16:b32"), 2, 100, 10, "/r", "py", samples=512)
    assert cmd[:3] == ["py", "-m", "tools.floor"]
    for flag, value in (("--engine", "deepspeed"), ("--zero-stage", "2"), ("--precision", "fp16"),
                        ("--batch-size", "32"), ("--samples", "512"), ("--warmup", "10")):
        assert cmd[cmd.index(flag) + 1] == value
    plain = bench.argv(Config("floor"), 2, 100, 10, "/r", "py")
    assert "--engine" not in plain


# --- the command --------------------------------------------------------------------------------------

def hpcdist(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "hpc", *args], cwd=ROOT, capture_output=True, text=True,
                          **kwargs)


def test_bad_grid_is_one_line_and_exit_2():
    done = hpcdist("bench", "--config", "dp:2", "--dry-run")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "use ddp for 2 ranks" in done.stderr


def test_bench_stays_light():
    code = ("import sys; from click.testing import CliRunner; from hpc.cli import main; "
            "r = CliRunner().invoke(main, ['bench', '--dry-run']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['bench', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_bench_never_writes_into_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "results"
    (mine / "runs" / "floor-1").mkdir(parents=True)
    (mine / "runs" / "floor-1" / "metrics.jsonl").write_text("a person's metrics\n")
    for extra in ((), ("--dry-run",)):
        done = hpcdist("bench", "--config", "floor:1", "--out", str(mine), *extra)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "did not write (runs)" in done.stderr and "choose another --out" in done.stderr
    assert (mine / "runs" / "floor-1" / "metrics.jsonl").read_text() == "a person's metrics\n"
    assert sorted(p.name for p in mine.rglob("*")) == ["floor-1", "metrics.jsonl", "runs"]


def test_bench_writes_again_into_its_own_folder(tmp_path):
    from hpc import jobdir
    from hpc.commands import bench as command

    out = tmp_path / "bench"
    assert command.foreign_out(out) is None  # absent
    command.claim_out(out)
    (out / "runs").mkdir()
    (out / "bench.md").write_text("last run's report\n")
    assert jobdir.read_marker(out)[0] == "bench" and command.foreign_out(out) is None
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / jobdir.MARKER).write_text(jobdir.marker_text("sweep", ["sweep.yaml"]))
    assert "did not write" in command.foreign_out(tmp_path / "sweep")


def test_an_out_folder_held_by_files_with_odd_names_is_refused_in_one_line_naming_them_escaped(tmp_path):
    from hpc.commands import bench as command

    (tmp_path / "a\nb").touch()
    (tmp_path / "\x1b[31mred").touch()
    why = command.foreign_out(tmp_path)
    assert len(why.splitlines()) == 1 and why.endswith("choose another --out or move them away")
    assert "a\\nb" in why and "\\x1b[31mred" in why


def test_a_failed_runs_error_quotes_the_logs_last_line_escaped_reading_only_its_tail(tmp_path, monkeypatch):
    from hpc import jobfiles
    from hpc.commands import bench as command

    log = tmp_path / "run.log"
    log.write_bytes(b"x" * 10**6 + b"\nRuntimeError: \x1b[2Jgone\n\n")
    read = []
    monkeypatch.setattr(jobfiles, "read_bytes",
                        lambda path, limit, tail: read.append(limit) or Path(path).read_bytes()[-limit:])
    assert command.last_line(log) == "RuntimeError: \\x1b[2Jgone" and read == [65536]
    assert command.last_line(tmp_path / "absent.log") == "no output"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie, killed but not yet reaped by whoever adopted it, does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_timed_out_run_leaves_no_rank_behind_even_one_that_ignores_sigterm(tmp_path):
    from hpc.commands import bench as command

    pid_file = tmp_path / "rank.pid"
    rank = f"(trap '' TERM; echo $BASHPID > {pid_file}; exec sleep 60) & wait"
    rc, _ = command.execute(["bash", "-c", rank], dict(os.environ), tmp_path / "run.log", timeout_s=2)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = not _alive(pid)
    assert rc is None and gone


def test_a_link_at_runs_or_a_run_folder_is_refused_before_bench_removes_a_stale_file_through_it(tmp_path, monkeypatch):
    from hpc import fileio
    from hpc.commands import bench as command

    monkeypatch.setattr(command, "execute", lambda *a: pytest.fail("a run started"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("a person's metrics\n")
    out = tmp_path / "bench"
    command.claim_out(out)
    (out / "runs").symlink_to(tmp_path)
    config = bench.parse_config("floor:1", 32)
    with pytest.raises(fileio.UnsafePath, match="is a symbolic link"):
        command.run_one(config, 1, 8, 2, 64, out, 60, "mine")
    (out / "runs").unlink()
    (out / "runs").mkdir()
    (out / "runs" / "mine").symlink_to(mine)
    with pytest.raises(fileio.UnsafePath, match="is a symbolic link"):
        command.run_one(config, 1, 8, 2, 64, out, 60, "mine")
    assert (mine / "metrics.jsonl").read_text() == "a person's metrics\n"


def test_a_config_run_again_starts_in_a_run_folder_without_the_last_bench_s_checkpoints(tmp_path, monkeypatch):
    # The trainer refuses a fresh start beside an earlier run's checkpoints; these are bench's own.
    from hpc.commands import bench as command

    out = tmp_path / "bench"
    command.claim_out(out)
    (out / "runs" / "ddp-1" / "checkpoints" / "step00000010").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(command, "execute", lambda cmd, env, log, timeout_s: (
        seen.append(sorted(p.name for p in log.parent.iterdir())), log.write_text("failed\n"), (1, 0.0))[-1])
    command.run_one(bench.parse_config("ddp:1", 32), 1, 8, 2, 64, out, 60, "ddp-1")
    assert seen == [[]]


def test_a_rerun_removes_only_the_checkpoints_the_trainer_wrote_never_through_a_link(tmp_path, monkeypatch):
    from hpc.commands import bench as command

    out, elsewhere = tmp_path / "bench", tmp_path / "elsewhere"
    command.claim_out(out)
    saved = out / "runs" / "ddp-1" / "checkpoints"
    (saved / "step00000010").mkdir(parents=True)
    (saved / "notes.txt").write_text("mine\n")
    (elsewhere / "part-0-of-2" / "step00000012").mkdir(parents=True)
    (saved / ".parts").symlink_to(elsewhere)
    monkeypatch.setattr(command, "execute", lambda cmd, env, log, timeout_s: (log.write_text("failed\n"), (1, 0.0))[-1])
    command.run_one(bench.parse_config("ddp:1", 32), 1, 8, 2, 64, out, 60, "ddp-1")
    assert sorted(p.name for p in saved.iterdir()) == [".parts", "notes.txt"]
    assert (elsewhere / "part-0-of-2" / "step00000012").is_dir()


SMALL_GRID = ("floor:1", "ddp:resident:1")


@pytest.mark.slow
def test_small_real_run(tmp_path):
    args = ["bench", "--steps", "8", "--warmup", "2", "--out", str(tmp_path), "--timeout-s", "600",
            "--repeat", "2"]
    for spec in SMALL_GRID:
        args += ["--config", spec]
    done = hpcdist(*args, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["device"] == "cpu" and doc["samples"] == 4096
    rows = doc["results"]
    assert [r["config"]["name"] for r in rows] == list(SMALL_GRID)
    assert all(r["images_per_s"] > 0 and r["error"] is None for r in rows)
    assert all(len(r["samples"]) == 2 and r["images_per_s"] in r["samples"] for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {spec} |" in table for spec in SMALL_GRID)


def test_each_round_runs_the_grid_in_its_own_seeded_order():
    orders = [bench.round_order(6, r, "shuffle", seed=7) for r in range(1, 7)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    # Over as many rounds as configs, every config runs once in every position: first included.
    assert all(sorted(o[place] for o in orders) == list(range(6)) for place in range(6))
    assert orders[0] != list(range(6)) and orders[0] != bench.round_order(6, 1, "shuffle", seed=8)
    assert orders == [bench.round_order(6, r, "shuffle", seed=7) for r in range(1, 7)]  # and repeatable
    assert [bench.round_order(2, r, "shuffle", seed=12)[0] for r in (1, 2, 3, 4)] in ([0, 1, 0, 1], [1, 0, 1, 0])
    assert bench.round_order(4, 1, "alternate") == [0, 1, 2, 3]
    assert bench.round_order(4, 2, "alternate") == [3, 2, 1, 0]
    assert bench.round_order(3, 5, "fixed") == [0, 1, 2]
    done = hpcdist("bench", "--order", "random", "--dry-run")
    assert done.returncode == 2 and "'random' is not one of 'shuffle', 'alternate', 'fixed'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_dry_run_lists_the_commands_bench_runs_in_their_order_and_folders(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpc.cli import main
    from hpc.commands import bench as command

    ran = []

    def execute(cmd, env, log, timeout_s):
        ran.append(" ".join(cmd))
        log.write_text("not run\n")
        return 1, 0.0

    monkeypatch.setattr(command, "execute", execute)
    monkeypatch.setattr(command, "draw", lambda results, meta, path: None)
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--grid", "floor:1,ddp:2,dp:1", "--repeat", "2", "--out", "out"]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert not (tmp_path / "out").exists()
    CliRunner().invoke(main, args)
    assert [line.split("  ")[-1] for line in dry.stdout.splitlines()] == ran
    assert any(f"--run-dir {tmp_path.resolve()}/out/runs/ddp-resident-2-r2 " in cmd for cmd in ran)


def test_nohb_runs_the_trainer_without_its_heartbeat():
    config = bench.parse_config("ddp:1:nohb")
    assert config.name == "ddp:resident:1:nohb" and not config.heartbeat
    argv = bench.argv(config, 1, 10, 2, "run", "python")
    assert argv[argv.index("--heartbeat-s") + 1] == "0"
    with pytest.raises(bench.BenchError, match="nohb applies to the trainer"):
        bench.parse_config("floor:1:nohb")


def test_snap_runs_the_trainer_with_snapshots_in_node_memory_and_without_it_none_even_in_a_slurm_job():
    config = bench.parse_config("ddp:2:snap0.5")
    assert config.name == "ddp:resident:2:snap0.5" and config.snapshot_every_s == 0.5
    assert bench.parse_config(config.name) == config
    assert bench.argv(config, 1, 10, 2, "run", "python")[-2:] == ["--snapshot-every-s", "0.5"]
    assert bench.argv(bench.parse_config("ddp:2"), 1, 10, 2, "run", "python")[-2:] == ["--snapshot-every-s", "0"]
    assert bench.parse_config("deepspeed:2:snap5").snapshot_every_s == 5
    with pytest.raises(bench.BenchError, match="snapS applies to the trainer"):
        bench.parse_config("floor:1:snap5")
    with pytest.raises(bench.BenchError, match="positive number of seconds"):
        bench.parse_config("ddp:1:snap0")


@pytest.mark.parametrize("seconds", ["1234567", "1234568", "0.00001", "2.5", "10"])
def test_a_snap_interval_is_named_and_passed_to_the_trainer_exactly_as_given(seconds):
    config = bench.parse_config(f"ddp:2:snap{seconds}")
    assert config.name == f"ddp:resident:2:snap{seconds}" and bench.parse_config(config.name) == config
    assert bench.argv(config, 1, 10, 2, "run", "python")[-2:] == ["--snapshot-every-s", seconds]
