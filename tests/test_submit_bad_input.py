"""Bad input to `hpcdist submit`: exit 2, one line on stderr naming the fix, and nothing left anywhere.

"Nothing" means: no job in Slurm's queue, no line in the private job registry, no job directory (nor a
half-written staging copy of one) on disk. Each row is one mistake a user makes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from slurm_fixtures import REPO, environ, hpcdist, requires_slurm

from hpc import spec as specs

SMALL_TRAIN = ("--max-steps", "2", "--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "64")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (id, how to build the arguments from tmp_path, a fragment of the one stderr line that names the fix).
# Every builder returns the arguments *after* `submit`; the job dir is tmp_path/"job" unless the row is
# about the job dir itself.
CASES = [
    ("unknown-backend", lambda t: ["--backend", "horovod"], "choose one of dp, ddp, deepspeed, auto"),
    ("unknown-launcher", lambda t: ["--launcher", "mpirun"], "choose one of srun, torchrun, deepspeed"),
    ("zero-nodes", lambda t: ["--nodes", "0"], "use --nodes 1 or more"),
    ("gpus-beyond-profile", lambda t: ["--cluster", "example-ib", "--gpus-per-node", "9"], "ask for at most 8"),
    ("dp-on-two-nodes", lambda t: ["--backend", "dp", "--nodes", "2"], "use --nodes 1 or --backend ddp"),
    ("zero-stage-5", lambda t: ["--backend", "deepspeed", "--zero-stage", "5"], "use 0, 1, 2 or 3"),
    ("malformed-job-yaml", lambda t: ["-c", write(t / "bad.yaml", "nodes: [2\nbackend: ddp\n")],
     "cannot read job file"),
    ("job-yaml-not-a-mapping", lambda t: ["-c", write(t / "list.yaml", "- nodes\n- 2\n")],
     "must be a YAML mapping"),
    ("unknown-job-key", lambda t: ["-c", write(t / "typo.yaml", "node: 2\n")], "valid keys:"),
    ("malformed-profile-yaml", lambda t: ["--cluster", write(t / "site.yaml", "partition: [debug\n")],
     "cannot read cluster profile"),
    ("profile-key-typo", lambda t: ["--cluster", write(t / "site.yaml", "partition: debug\ngpus_per_nod: 0\n")],
     "unknown key(s), the first 'gpus_per_nod'"),
    ("unknown-profile", lambda t: ["--cluster", "nosuchcluster"], "or pass a path to a YAML file"),
    # As root every directory is writable; a path through a regular file, or under /proc, is not.
    ("job-dir-under-a-file", lambda t: ["--job-dir", str(Path(write(t / "plain", "")) / "job")],
     "pick a writable --job-dir"),
    ("job-dir-under-proc", lambda t: ["--job-dir", "/proc/hpcdist-bad-input/job"], "pick a writable --job-dir"),
    ("nodelist-unparsed", lambda t: ["--nodes", "2", "--nodelist", "n[1-"], "--nodelist: unclosed '['"),
    ("nodelist-disagrees", lambda t: ["--nodes", "2", "--nodelist", "n[1-3]"], "make them agree"),
    ("job-name-newline", lambda t: ["--job-name", "two\nlines"], "remove it"),
    ("bad-time", lambda t: ["--time", "soon"], "use MM, HH:MM:SS or D-HH:MM:SS"),
    # The render side writes deepspeed.json itself; a user's own config would silently contradict it.
    ("own-deepspeed-config", lambda t: ["--backend", "deepspeed", "--", "--deepspeed-config", "x.json"],
     "use the matching hpcdist option instead"),
    ("cifar10-missing", lambda t: ["--", "--dataset", "cifar10", "--data-dir", "/nonexistent"],
     "add --download"),
    ("cifar10-without-data-dir", lambda t: ["--", "--dataset", "cifar10"], "needs --data-dir DIR"),
]


def our_queue(tmp_path: Path) -> list[str]:
    """Queued jobs whose batch log would land under tmp_path: only this test's, whoever else uses Slurm."""
    proc = subprocess.run(["squeue", "-h", "-O", "JobID:30,StdOut:1000"], capture_output=True, text=True,
                          timeout=300, check=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if str(tmp_path) in line]


@requires_slurm
@pytest.mark.slurm
@pytest.mark.parametrize("case_id,build,fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_leaves_nothing(tmp_path, case_id, build, fix):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    args = build(tmp_path)
    head, sep, tail = (args[:args.index("--")], ["--"], args[args.index("--") + 1:]) if "--" in args else (
        args, ["--"], list(SMALL_TRAIN))
    if "--job-dir" not in head:
        head = [*head, "--job-dir", str(job_dir)]
    before_files = sorted(p.name for p in tmp_path.iterdir())
    before_queue = our_queue(tmp_path)

    proc = hpcdist(["submit", *head, *sep, *tail], home, timeout=120)

    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcdist submit: "), proc.stderr
    assert fix in lines[0], lines[0]
    assert "Submitted job" not in proc.stdout
    # Nothing submitted: no job of ours in the queue, before or after (a submitted job's batch log would
    # lie under tmp_path; other people's jobs may come and go meanwhile, so only ours are compared).
    assert our_queue(tmp_path) == before_queue == []
    assert not (home / "jobs.jsonl").exists() or (home / "jobs.jsonl").read_text() == ""
    # No job directory, and no staging sibling (.job.XXXX) that a failed write could leave.
    assert not job_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == [
        n for n in before_files if n != "home"]


def test_the_cifar10_check_accepts_data_that_is_there_and_download(tmp_path):
    """The submit-time dataset check refuses only what the trainer would refuse."""
    spec = specs.JobSpec(job_dir="/j", train_args=("--dataset", "cifar10", "--data-dir", "/data"))
    there = {"/data/cifar-10-batches-py"}
    specs.check_dataset(spec, there.__contains__)
    # The batches may lie in the folder itself (train.data.cifar10_root reads them there too).
    specs.check_dataset(spec, {"/data/test_batch"}.__contains__)
    with pytest.raises(specs.SpecError, match="no CIFAR-10 under --data-dir /data"):
        specs.check_dataset(spec, set().__contains__)
    downloading = specs.JobSpec(job_dir="/j", train_args=("--dataset=cifar10", "--data-dir=/data", "--download"))
    specs.check_dataset(downloading, set().__contains__)
    # A relative folder is resolved in the job's working directory, which differs by submit path: not judged.
    specs.check_dataset(specs.JobSpec(job_dir="/j", train_args=("--dataset", "cifar10", "--data-dir", "data")),
                        set().__contains__)
    specs.check_dataset(specs.JobSpec(job_dir="/j", train_args=("--dataset", "synthetic")), set().__contains__)


def test_render_refuses_missing_cifar10_too_and_writes_nothing(tmp_path):
    """`hpcdist render` and `hpcdist submit` share one check, so a job directory is never written for it."""
    job_dir = tmp_path / "job"
    proc = hpcdist(["render", "--job-dir", str(job_dir), "--", "--dataset", "cifar10", "--data-dir",
                    str(tmp_path / "nodata")], tmp_path / "home")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no CIFAR-10 under --data-dir" in proc.stderr
    assert not job_dir.exists()


def test_the_trainer_refuses_a_malformed_deepspeed_config_in_one_line(tmp_path):
    """hpcdist renders deepspeed.json itself and refuses a user's (see own-deepspeed-config above); the
    trainer run by hand still takes --deepspeed-config, and broken JSON there is bad input: exit 2."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 64,,}')
    proc = subprocess.run([sys.executable, "-m", "train", "--backend", "deepspeed", "--run-dir", str(tmp_path / "run"),
                           "--deepspeed-config", str(bad), "--dataset", "synthetic"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=environ(tmp_path / "home"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not valid JSON" in lines[0] and "fix it or pass another" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
