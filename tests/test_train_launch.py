"""Two real CPU ranks train under srun-style env, torchrun and the DeepSpeed launcher, and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc import checkpoints
from train import checkpoint, snapshot
from train.watchdog import main_thread_stack

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TINY = ["--synthetic-size", "512", "--batch-size", "32", "--max-steps", "20", "--log-every", "1"]
STAGES, PRECISIONS = (0, 1, 2, 3), ("fp32", "bf16")
WAYS = ("srun", "torchrun", "deepspeed")
# Each launcher under every ZeRO stage, and every stage and every launcher in both precisions: every pair of
# values meets in some launch (12 launches, 7-16 s each on a quiet 2-core box). The launcher only sets the ranks'
# environment, which ZeRO and the precision never read. HPCDIST_DS_FULL=1 runs all 24 triples.
FULL = os.environ.get("HPCDIST_DS_FULL") == "1"
TRIPLES = [(way, stage, precision) for way in WAYS for stage in STAGES for precision in PRECISIONS
           if FULL or precision == PRECISIONS[(WAYS.index(way) + stage) % 2]]
DEEPSPEED_GRID = [pytest.param(*t, id="{}-zero{}-{}".format(*t)) for t in TRIPLES]


def test_the_deepspeed_grid_meets_every_pair_of_launcher_stage_and_precision():
    def pairs(i: int, j: int) -> set:
        return {(t[i], t[j]) for t in TRIPLES}
    assert pairs(0, 1) == {(w, s) for w in WAYS for s in STAGES}
    assert pairs(0, 2) == {(w, p) for w in WAYS for p in PRECISIONS}
    assert pairs(1, 2) == {(s, p) for s in STAGES for p in PRECISIONS}
    assert len(TRIPLES) == (24 if FULL else 12)


def read_summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def read_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def assert_trained_in_step(launched, codes, run_dir, **expected):
    assert codes == [0] * len(codes), launched.output()
    summary = read_summary(run_dir)
    for key, value in expected.items():
        assert summary[key] == value, (key, summary[key])
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    digests = {r["param_digest"] for r in summary["ranks"]}
    assert len(digests) == 1, f"ranks ended with different parameters: {summary['ranks']}"
    assert summary["final_loss"] < summary["first_loss"], summary
    print(f"{launched.way}: {launched.seconds:.1f}s for the launch, {summary['images_per_s']:.0f} images/s")


@pytest.mark.parametrize("way", ["srun", "torchrun", "deepspeed"])
def test_ddp_two_ranks_train_to_identical_parameters(launch, tmp_path, way):
    run_dir = tmp_path / "run"
    launched = launch(way, ["--backend", "ddp", *TINY, "--preflight"], run_dir)
    codes = launched.wait()
    assert_trained_in_step(launched, codes, run_dir, backend="ddp", precision="fp32")
    assert "preflight: all_reduce over 2 ranks summed to 2 (gloo)" in launched.output()


@pytest.mark.parametrize("way, stage, precision", DEEPSPEED_GRID)
def test_deepspeed_two_ranks_train_to_identical_parameters(launch, tmp_path, way, stage, precision):
    run_dir = tmp_path / "run"
    args = ["--backend", "deepspeed", "--zero-stage", str(stage), "--precision", precision, *TINY]
    launched = launch(way, args, run_dir)
    codes = launched.wait()
    assert_trained_in_step(launched, codes, run_dir, backend="deepspeed", zero_stage=stage, precision=precision)


def wait_for_steps(run_dir, launched, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert all(p.poll() is None for p in launched.procs), launched.output()
        assert time.monotonic() < deadline, f"no {steps} steps logged in {timeout}s\n{launched.output()}"
        time.sleep(0.02)


@pytest.mark.timed
def test_ddp_preempted_by_sigusr1_resumes_with_the_uninterrupted_losses(launch, tmp_path):
    args = ["--backend", "ddp", *TINY[:4], "--epochs", "10", "--max-steps", "60", "--log-every", "1"]
    reference = tmp_path / "reference"
    assert launch("srun", args, reference).wait() == [0, 0]

    interrupted = tmp_path / "interrupted"
    first = launch("srun", args, interrupted)
    wait_for_steps(interrupted, first, 3)
    first.signal(signal.SIGUSR1)
    assert first.wait() == [75, 75], first.output()
    assert "stopped by SIGUSR1" in first.output()
    stopped_at = max(read_losses(interrupted))
    assert stopped_at < 60, "the run finished before the signal arrived; nothing was preempted"
    assert (interrupted / "checkpoints" / f"step{stopped_at:08d}").is_dir()

    second = launch("srun", [*args, "--resume"], interrupted)
    assert second.wait() == [0, 0], second.output()
    assert f"at step {stopped_at}" in second.output()
    expected, got = read_losses(reference), read_losses(interrupted)
    assert sorted(got) == list(range(1, 61))
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert read_summary(interrupted)["ranks"][0]["param_digest"] == read_summary(reference)["ranks"][0]["param_digest"]


def kill_when(launched, reached, step: int, timeout: float = 240) -> None:
    """SIGKILL every rank once ``reached()`` (a step the run has saved somewhere) is at least ``step``."""
    deadline = time.monotonic() + timeout
    while reached() < step:
        assert all(p.poll() is None for p in launched.procs), launched.output()
        assert time.monotonic() < deadline, launched.output()
        time.sleep(0.02)
    for p in launched.procs:
        p.kill()
    launched.wait()


def assert_resumed_exactly(run_dir, reference, steps: int) -> None:
    expected, got = read_losses(reference), read_losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert read_summary(run_dir)["ranks"][0]["param_digest"] == read_summary(reference)["ranks"][0]["param_digest"]


# What the tests below resume to: snapshots taken and persisted often (the uninterrupted fixture checks a completed
# run leaves neither behind); how often changes no loss, so each interrupted run sets its own.
DDP_160 = ["--backend", "ddp", *TINY[:4], "--epochs", "100", "--max-steps", "160", "--log-every", "1",
           "--checkpoint-every-min", "0"]


def deepspeed_80(stage: int = 2) -> list[str]:
    return ["--backend", "deepspeed", "--zero-stage", str(stage), "--precision", "fp32", *TINY[:4], "--epochs", "100",
            "--max-steps", "80", "--log-every", "1", "--checkpoint-every-min", "0"]


OFTEN = ["--snapshot-every-s", "0.05", "--persist-every-s", "0.2"]


@pytest.mark.timed
def test_ddp_killed_mid_run_resumes_from_the_snapshot_in_node_memory_with_the_uninterrupted_losses(
        launch, tmp_path, monkeypatch, uninterrupted):
    shm = tmp_path / "shm"
    monkeypatch.setenv(snapshot.ROOT_ENV, str(shm))
    # Nothing on disk (no loop checkpoint, no snapshot persisted): the resume can only come from memory.
    args = [*DDP_160, "--snapshot-every-s", "0.05", "--persist-every-s", "0"]
    reference = uninterrupted([*DDP_160, *OFTEN])

    interrupted = tmp_path / "interrupted"
    first = launch("srun", args, interrupted)
    store = snapshot.Store(snapshot.store_dir(interrupted, {"SLURM_JOB_ID": str(first.job_id),
                                                            snapshot.ROOT_ENV: str(shm)}, socket.gethostname()))
    kill_when(first, lambda: snapshot.step_of(store.newest()) or 0, 20)
    held = store.newest()
    assert checkpoints.newest(interrupted / "checkpoints") is None, "a disk checkpoint was written before the kill"

    second = launch("srun", [*args, "--resume"], interrupted, job_id=first.job_id)
    assert second.wait() == [0, 0], second.output()
    said = f"resumed from {held} at step {snapshot.step_of(held)} (a snapshot in node memory)"
    assert said in second.output(tail=10**6)
    assert_resumed_exactly(interrupted, reference, 160)
    assert not store.folder.exists()


@pytest.mark.timed
def test_ddp_whose_nodes_all_died_resumes_as_a_new_job_from_the_snapshot_persisted_in_the_background(
        launch, tmp_path, monkeypatch, uninterrupted):
    # What a new job after the batch host's death finds: no node memory, no checkpoint of the loop's own, and the
    # snapshots rank 0's writer thread persisted to the run directory.
    shm = tmp_path / "shm"
    monkeypatch.setenv(snapshot.ROOT_ENV, str(shm))
    args = [*DDP_160, *OFTEN]
    reference = uninterrupted(args)
    interrupted = tmp_path / "interrupted"
    first = launch("srun", args, interrupted)
    kill_when(first, lambda: snapshot.step_of(checkpoints.newest(interrupted / "checkpoints")) or 0, 20)
    shutil.rmtree(shm)
    persisted = checkpoints.newest(interrupted / "checkpoints")
    assert not list(persisted.glob("rng-rank*")), "the loop wrote this one, not the snapshot writer"

    second = launch("srun", [*args, "--resume"], interrupted, job_id=first.job_id + 1)
    assert second.wait() == [0, 0], second.output()
    assert f"resumed from {persisted} at step {snapshot.step_of(persisted)}\n" in second.output(tail=10**6)
    assert_resumed_exactly(interrupted, reference, 160)


@pytest.mark.timed
@pytest.mark.parametrize("stage", STAGES if FULL else [2])
def test_deepspeed_whose_second_node_died_resumes_from_the_snapshot_parts_the_first_node_holds(
        launch, tmp_path, uninterrupted, stage):
    # Each node keeps its ranks' ZeRO partitions and a copy of the previous node's: node 1's memory gone, node 0
    # holds both parts, which the relaunch makes a checkpoint on disk and loads.
    memory = [tmp_path / "node0", tmp_path / "node1"]
    args = [*deepspeed_80(stage), "--snapshot-every-s", "0.05"]
    reference = uninterrupted([*deepspeed_80(stage), *OFTEN], two_nodes=True)

    interrupted = tmp_path / "interrupted"
    first = launch("srun", args, interrupted, node_memory=memory)
    folders = [snapshot.store_dir(interrupted, {"SLURM_JOB_ID": str(first.job_id), snapshot.ROOT_ENV: str(m)},
                                  socket.gethostname()) for m in memory]

    def held() -> int:  # the newest step of node 1's part that node 0 holds a copy of
        return snapshot.step_of(checkpoints.newest(folders[0] / checkpoints.PART.format(1, 2))) or 0
    kill_when(first, held, 20)
    step = held()
    assert checkpoints.newest(interrupted / "checkpoints") is None, "a disk checkpoint was written before the kill"
    shutil.rmtree(memory[1])

    second = launch("srun", [*args, "--resume"], interrupted, job_id=first.job_id, node_memory=memory)
    assert second.wait() == [0, 0], second.output()
    made = interrupted / "checkpoints" / checkpoints.name_for(step)
    assert f"resumed from {made} at step {step} (a snapshot in node memory)" in second.output(tail=10**6)
    expected, got = read_losses(reference), read_losses(interrupted)
    assert sorted(got) == list(range(1, 81))
    assert got == pytest.approx(expected, abs=1e-5, rel=0)


@pytest.mark.timed
def test_deepspeed_whose_nodes_all_died_resumes_as_a_new_job_from_the_parts_each_node_persisted(
        launch, tmp_path, uninterrupted):
    # What a new job after the batch host's death finds: no node memory, no checkpoint of the loop's own, and the
    # parts each node's local rank 0 persisted to the run directory in the background.
    memory = [tmp_path / "node0", tmp_path / "node1"]
    args = [*deepspeed_80(), *OFTEN]
    reference = uninterrupted(args, two_nodes=True)

    interrupted = tmp_path / "interrupted"
    first = launch("srun", args, interrupted, node_memory=memory)
    persisted = interrupted / "checkpoints" / checkpoints.PARTS

    def whole() -> int:  # the newest step both nodes persisted
        return checkpoints.newest_whole([checkpoints.held_in(persisted)])[0] or 0
    kill_when(first, whole, 20)
    step = whole()
    assert checkpoints.newest(interrupted / "checkpoints") is None, "a disk checkpoint was written before the kill"
    for folder in memory:
        shutil.rmtree(folder, ignore_errors=True)

    second = launch("srun", [*args, "--resume"], interrupted, job_id=first.job_id + 1, node_memory=memory)
    assert second.wait() == [0, 0], second.output()
    made = interrupted / "checkpoints" / checkpoints.name_for(step)
    said = f"resumed from {made} at step {step} (a snapshot in the parts its nodes persisted)"
    assert said in second.output(tail=10**6)
    expected, got = read_losses(reference), read_losses(interrupted)
    assert sorted(got) == list(range(1, 81))
    assert got == pytest.approx(expected, abs=1e-5, rel=0)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_deepspeed_whose_node_memory_is_full_stops_its_snapshots_on_every_rank_and_trains_on_unchanged(
        launch, tmp_path):
    # Node 1's memory has inodes for its folders but not for its rank's ZeRO file: the rank fails inside DeepSpeed's
    # collective save, alone, while node 0's rank writes its part; both must give up the snapshot together.
    memory = [tmp_path / "node0", tmp_path / "node1"]
    memory[1].mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,nr_inodes=5", "tmpfs", str(memory[1])], check=True)
    try:
        args = ["--backend", "deepspeed", "--zero-stage", "2", "--precision", "fp32", *TINY,
                "--checkpoint-every-min", "0", "--snapshot-every-s"]
        full = launch("srun", [*args, "0.001"], tmp_path / "full", node_memory=memory)
        reference = launch("srun", [*args, "0"], tmp_path / "reference")  # at once: the two fit in the time
        assert full.wait(timeout=120) == [0, 0], full.output()
        assert reference.wait(timeout=120) == [0, 0], reference.output()
        assert not any(memory[1].iterdir()), "a half-written part is left in node memory"
    finally:
        subprocess.run(["umount", str(memory[1])], check=False)
    said = [line for line in full.output(tail=10**6).splitlines() if "snapshots stopped" in line]
    assert len(said) == 2 and said[0] == said[1], said  # every rank, for the reason the failing rank gave
    assert said[0].startswith("warning: snapshots stopped: No space left on device writing a snapshot in "
                              f"{memory[1]}/hpcdist-snap-"), said
    assert said[0].endswith("; resumes use the disk checkpoints")
    assert read_summary(tmp_path / "full")["snapshots"] == 0
    assert read_losses(tmp_path / "full") == pytest.approx(read_losses(tmp_path / "reference"), abs=1e-6, rel=0)


@pytest.mark.timed
def test_deepspeed_stopped_at_step_10_resumes_with_the_uninterrupted_losses(launch, tmp_path):
    args = ["--backend", "deepspeed", "--zero-stage", "2", "--precision", "bf16", *TINY]
    reference = tmp_path / "reference"
    assert launch("srun", args, reference).wait() == [0, 0]

    interrupted = tmp_path / "interrupted"
    first = launch("srun", [*args, "--max-steps", "10"], interrupted)
    assert first.wait() == [0, 0], first.output()
    second = launch("srun", [*args, "--resume"], interrupted)
    assert second.wait() == [0, 0], second.output()
    assert "at step 10" in second.output()

    expected, got = read_losses(reference), read_losses(interrupted)
    assert sorted(got) == list(range(1, 21))
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert read_summary(interrupted)["ranks"][0]["param_digest"] == read_summary(reference)["ranks"][0]["param_digest"]


def one_rank_env() -> dict:
    """One process outside any launcher, on a port of its own (another run on the machine may hold torch's default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}


@pytest.mark.timed
def test_one_process_stopped_by_sigterm_checkpoints_exits_75_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = one_rank_env()
    command = [sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(run_dir), *TINY[:4],
               "--epochs", "1000", "--log-every", "1"]
    log = tmp_path / "first.log"
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(read_losses(run_dir)) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75, log.read_text()
    stopped_at = max(read_losses(run_dir))
    assert f"stopped by SIGTERM at step {stopped_at}" in log.read_text()
    assert checkpoint.newest(run_dir / "checkpoints").name == f"step{stopped_at:08d}"

    second = subprocess.run([*command, "--resume", "--max-steps", str(stopped_at + 2)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"at step {stopped_at}" in second.stdout
    assert read_summary(run_dir)["steps"] == stopped_at + 2


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_for_zero_1(refused: subprocess.CompletedProcess, stage: str, precision: str, written: str) -> None:
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stdout + refused.stderr
    assert f"holds DeepSpeed ZeRO-1 {written} state" in refused.stderr
    assert f"asks for ZeRO-{stage} {precision}" in refused.stderr
    assert f"--zero-stage 1 --precision {written}" in refused.stderr


class Planted:
    """What a planted file holds: unpickling it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_deepspeed_resumed_from_a_checkpoint_it_cannot_or_must_not_load_is_refused_touching_nothing(tmp_path):
    run_dir, env = tmp_path / "run", one_rank_env()

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "train", "--run-dir", str(run_dir), "--backend", "deepspeed",
                               *TINY[:4], *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    written = train("--zero-stage", "1", "--precision", "bf16", "--max-steps", "2")
    assert written.returncode == 0, written.stdout + written.stderr
    before = files_of(run_dir / "checkpoints")
    for stage, precision in (("3", "bf16"), ("0", "bf16"), ("1", "fp32")):
        refused = train("--zero-stage", stage, "--precision", precision, "--max-steps", "4", "--resume")
        assert_refused_for_zero_1(refused, stage, precision, "bf16")
        assert files_of(run_dir / "checkpoints") == before
    # DeepSpeed unpickles its files with weights_only=False: one naming code (manifest rewritten to match) is refused.
    folder = checkpoints.newest(run_dir / "checkpoints")
    optimizer, marker = next(folder.glob("*optim_states.pt")), tmp_path / "ran"
    torch.save({"optimizer_state_dict": Planted(marker)}, optimizer)
    checkpoints.write_manifest(folder, 2, checkpoints.recorded(folder))
    refused = train("--zero-stage", "1", "--precision", "bf16", "--max-steps", "4", "--resume")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stdout + refused.stderr
    assert f"{optimizer} holds more than tensors" in refused.stderr and not marker.exists()
    for name, data in before.items():
        (run_dir / "checkpoints" / name).write_bytes(data)
    # ZeRO-1 and -2 keep the same state in the same files: each resumes from the other's.
    resumed = train("--zero-stage", "2", "--precision", "bf16", "--max-steps", "4", "--resume")
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stdout + resumed.stderr


@pytest.mark.timed
def test_deepspeed_resumed_in_a_zero_stage_its_snapshot_in_node_memory_cannot_load_is_refused_touching_nothing(
        tmp_path):
    run_dir, memory = tmp_path / "run", tmp_path / "memory"
    env = {**one_rank_env(), snapshot.ROOT_ENV: str(memory)}
    # Nothing on disk (no loop checkpoint, no part persisted): the resume can only come from memory.
    command = [sys.executable, "-m", "train", "--run-dir", str(run_dir), "--backend", "deepspeed", *TINY[:4],
               "--epochs", "100", "--precision", "fp32", "--checkpoint-every-min", "0", "--snapshot-every-s", "0.05",
               "--persist-every-s", "0"]
    log = tmp_path / "first.log"
    first = subprocess.Popen([*command, "--zero-stage", "1"], env=env, cwd=REPO, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT)
    part = snapshot.store_dir(run_dir, env, socket.gethostname()) / checkpoints.PART.format(0, 1)
    deadline = time.monotonic() + 240
    while (snapshot.step_of(checkpoints.newest(part)) or 0) < 3:
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    first.kill()
    first.wait()
    assert checkpoints.held(run_dir / "checkpoints") == [], "a disk checkpoint was written before the kill"
    before = files_of(memory)
    refused = subprocess.run([*command, "--zero-stage", "3", "--resume"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert_refused_for_zero_1(refused, "3", "fp32", "fp32")
    assert str(part) in refused.stderr
    assert files_of(memory) == before and checkpoints.held(run_dir / "checkpoints") == []


@pytest.mark.timed
def test_ctrl_c_ends_a_run_in_one_line_with_exit_130_a_stopped_heartbeat_and_no_half_written_checkpoint(tmp_path):
    from train import heartbeat

    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # A checkpoint every step, so the interrupt most likely lands in a write.
    command = [sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(run_dir), *TINY[:4],
               "--epochs", "1000", "--log-every", "1", "--checkpoint-every", "1"]
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    # SIGINT as a terminal's Ctrl-C delivers it: a test run from a background job would hand it down ignored.
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=open(out, "w"), stderr=open(err, "w"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(read_losses(run_dir)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, err.read_text()
    [line] = err.read_text().splitlines()
    kept = checkpoint.newest(run_dir / "checkpoints")
    assert line.startswith("hpcdist-train: interrupted (SIGINT) at step ") and "Traceback" not in out.read_text()
    assert f"rerun with --resume to go on from its checkpoint {kept.name}" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [c.name for c in checkpoint.complete(
        run_dir / "checkpoints")] and checkpoints.damage(kept) is None
    assert heartbeat.read_all(run_dir)[0]["phase"] == "stopped"
    assert not (run_dir / "errors").exists() and not (run_dir / "preempted").exists()


@pytest.mark.timed
def test_ctrl_c_while_torch_is_still_importing_ends_the_trainer_in_one_line_with_exit_130(tmp_path):
    command = [sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(tmp_path / "run"), *TINY]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Mid-import: torch's C library is mapped, its Python modules still loading (the first seconds of a run).
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    [line] = err.splitlines()
    assert line.startswith("hpcdist-train: interrupted (SIGINT)") and "Traceback" not in out + err


def resumed_on_one_rank(launch, tmp_path, args: list[str], stop: int, total: int) -> tuple[str, Path, Path]:
    """An uninterrupted 2-rank run of ``total`` steps, and a 2-rank run to ``stop`` resumed on one rank to ``total``
    (what an elastic relaunch on the node left does): the one rank's output, the reference's and the run's
    directories."""
    reference, run_dir = tmp_path / "reference", tmp_path / "elastic"
    # No snapshots: under srun the first is persisted to checkpoints/ at once, at whatever step a loaded machine has
    # reached by then, and pruning would keep it over the checkpoint at ``stop``.
    saving = [*args, "--max-steps", str(total), "--checkpoint-every", str(stop), "--snapshot-every-s", "0"]
    assert launch("srun", saving, reference).wait() == [0, 0]
    # The 2-rank run to ``stop`` is the reference's first ``stop`` steps: its checkpoint there, its losses to there.
    shutil.copytree(reference, run_dir)
    for later in checkpoints.complete(run_dir / "checkpoints")[1:]:
        shutil.rmtree(later)
    (run_dir / "summary.json").unlink()
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in (run_dir / "metrics.jsonl").read_text()
                                                   .splitlines() if json.loads(line)["step"] <= stop))
    env = one_rank_env()
    one = subprocess.run([sys.executable, "-m", "train", "--run-dir", str(run_dir), *args, "--max-steps", str(total),
                          "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    assert sorted(read_losses(run_dir)) == list(range(1, total + 1))
    return one.stdout, reference, run_dir


def test_ddp_resumed_on_fewer_ranks_keeps_the_global_batch_and_the_losses_as_elastic_says(launch, tmp_path):
    args = ["--backend", "ddp", *TINY[:4], "--epochs", "100", "--log-every", "1", "--precision", "fp32"]
    out, reference, run_dir = resumed_on_one_rank(launch, tmp_path, args, 20, 40)
    assert "at step 20; elastic: 1 rank(s), was 2: the global batch 32 kept, 32 a rank" in out
    # The same samples each step; one rank's mean over 32 images against two ranks' means averaged: rounding.
    assert read_losses(run_dir) == pytest.approx(read_losses(reference), abs=1e-5, rel=0)


@pytest.mark.parametrize("stage", [1, 2, 3] if FULL else [2])
def test_deepspeed_resumed_on_fewer_ranks_regroups_its_zero_partitions_through_a_universal_checkpoint(
        launch, tmp_path, stage):
    args = ["--backend", "deepspeed", "--zero-stage", str(stage), "--precision", "fp32", *TINY[:4], "--epochs",
            "100", "--log-every", "1"]
    out, reference, run_dir = resumed_on_one_rank(launch, tmp_path, args, 20, 30)
    assert "at step 20; elastic: 1 rank(s), was 2: the global batch 32 kept, 32 a rank" in out
    assert not list((run_dir / "checkpoints").glob(".universal-*")), "the converted copy is removed once loaded"
    # Adam's moments came back with the partitions: without them the losses after the resume drift by ~1e-2.
    assert read_losses(run_dir) == pytest.approx(read_losses(reference), abs=1e-5, rel=0)


def test_a_heartbeat_stage_another_user_made_first_is_bad_input_not_a_shared_folder(tmp_path):
    from train import nodebeat

    run_dir, root = tmp_path / "run", tmp_path / "shm"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HPCDIST_HEARTBEAT_STAGE": str(root)}
    stage = nodebeat.stage_dir(run_dir, env, 0, 0)
    root.mkdir()
    (tmp_path / "theirs").mkdir()
    stage.symlink_to(tmp_path / "theirs")
    done = subprocess.run([sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(run_dir), *TINY],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the heartbeat's node-local folder {stage} is a link or another user's" in done.stderr
    assert not any((tmp_path / "theirs").iterdir())


# --- failures: a damaged checkpoint, a hung rank, stop signals at awkward moments ------------------------

def test_resume_falls_back_past_a_damaged_newest_checkpoint_with_the_uninterrupted_losses(launch, tmp_path):
    # No snapshots: on a loaded machine the first one can fall between steps 5 and 10, be persisted to checkpoints/
    # and, once step 10 is saved, have step 5 pruned (two are kept): the resume would rightly start there.
    args = ["--backend", "ddp", *TINY, "--snapshot-every-s", "0"]
    reference = tmp_path / "reference"
    assert launch("srun", args, reference).wait() == [0, 0]

    interrupted = tmp_path / "interrupted"
    first = launch("srun", [*args, "--max-steps", "10", "--checkpoint-every", "5"], interrupted)
    assert first.wait() == [0, 0], first.output()
    newest = interrupted / "checkpoints" / "step00000010"
    (newest / "trainer.pt").write_bytes((newest / "trainer.pt").read_bytes()[:1000])  # a torn write after publish

    second = launch("srun", [*args, "--resume"], interrupted)
    assert second.wait() == [0, 0], second.output()
    assert "step00000010 is damaged (trainer.pt has 1000 bytes" in second.output()
    assert "at step 5" in second.output()
    assert (interrupted / "checkpoints" / ".damaged-step00000010").is_dir()
    assert read_losses(interrupted) == pytest.approx(read_losses(reference), abs=1e-6, rel=0)


def wait_for_heartbeats(run_dir, launched, ranks: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    from train.heartbeat import read_all
    while len(read_all(run_dir)) < ranks:
        assert all(p.poll() is None for p in launched.procs), launched.output()
        assert time.monotonic() < deadline, f"no heartbeats from {ranks} ranks in {timeout}s\n{launched.output()}"
        time.sleep(0.02)


def freeze(frozen, live, launched, then=lambda: None) -> float:
    """SIGSTOP ``frozen``, run ``then``, wait until ``live`` exits 76 (the watchdog named the hang); the seconds that
    took from the SIGSTOP."""
    frozen.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        then()
        assert live.wait(timeout=120) == 76, launched.output()
        took = time.monotonic() - stopped_at
    finally:
        frozen.send_signal(signal.SIGCONT)
    frozen.wait(timeout=60)  # thawed, it finds the hang declared (or its peer gone) and ends too
    return took


@pytest.mark.timed
@pytest.mark.parametrize("frozen_rank", [1, 0])
def test_a_frozen_rank_is_named_with_every_ranks_stack_and_the_live_rank_exits_76(launch, tmp_path, frozen_rank):
    run_dir = tmp_path / "run"
    launched = launch("srun", ["--backend", "ddp", *TINY[:4], "--epochs", "1000", "--log-every", "1",
                               "--heartbeat-s", "0.5", "--hang-timeout-s", "3"], run_dir)
    wait_for_steps(run_dir, launched, 3)
    frozen, live = launched.procs[frozen_rank], launched.procs[1 - frozen_rank]
    took = freeze(frozen, live, launched)
    hang = json.loads((run_dir / "hang.json").read_text())
    # Rank 0 judges for the node; while it is the frozen one, rank 1 takes over.
    assert (hang["rank"], hang["pid"], hang["declared_by"]) == (frozen_rank, frozen.pid, 1 - frozen_rank)
    assert hang["node"] == os.uname().nodename and hang["threshold_s"] >= 3
    live_stack, frozen_stack = hang["stacks"][str(1 - frozen_rank)], hang["stacks"][str(frozen_rank)]
    # The live rank waits for the frozen one inside the training loop: in a step's all-reduce, the stop vote or
    # the loss mean, whichever the freeze caught it before.
    assert set(hang["stacks"]) == {"0", "1"} and ", in loop\n" in main_thread_stack(live_stack)
    # The frozen rank's stack comes from py-spy, run by the live rank beside it on this node (or says why not).
    assert ("train/__main__.py" in frozen_stack) if py_spy_installed() else frozen_stack.startswith("no stack:")
    assert sorted(g["ranks"] for g in hang["groups"]) == [[0], [1]]
    assert (run_dir / "stacks" / f"rank-{1 - frozen_rank}.txt").read_text() == live_stack
    assert f"rank {frozen_rank} on" in launched.output() and "hung at step" in launched.output()
    print(f"frozen rank named and the live rank out {took:.1f} s after SIGSTOP (threshold 3 s)")
    assert took < 30


def py_spy_installed() -> bool:
    return Path(sys.executable).with_name("py-spy").exists() or shutil.which("py-spy") is not None


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (DataLoader workers, a launcher's ranks), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def assert_stopped_with_a_complete_checkpoint(run_dir, output: str) -> int:
    found = checkpoint.newest(run_dir / "checkpoints")
    assert found is not None and checkpoints.damage(found) is None, output
    step = int(found.name[len("step"):])
    assert f"at step {step}: checkpoint" in output and (run_dir / "preempted").read_text().strip() == str(step)
    return step


@pytest.mark.timed
def test_a_stop_signal_during_set_up_ends_in_a_checkpoint_before_any_step(launch, tmp_path):
    run_dir = tmp_path / "run"
    launched = launch("srun", ["--backend", "ddp", *TINY], run_dir)
    wait_for_heartbeats(run_dir, launched, 2)  # torch imported, not yet trained: set-up or rendezvous
    launched.signal(signal.SIGTERM)
    assert launched.wait() == [75, 75], launched.output()
    assert assert_stopped_with_a_complete_checkpoint(run_dir, launched.output()) == 0
    assert "stopped by SIGTERM at step 0" in launched.output()


@pytest.mark.timed
def test_dataloader_workers_outlive_a_signal_sent_to_every_process_like_srun(launch, tmp_path):
    run_dir = tmp_path / "run"
    launched = launch("srun", ["--backend", "ddp", *TINY[:4], "--epochs", "1000", "--log-every", "1",
                               "--loader", "classic", "--num-workers", "2", "--checkpoint-every", "2"], run_dir)
    wait_for_steps(run_dir, launched, 3)
    workers = [w for p in launched.procs for w in descendants(p.pid)]
    assert len(workers) >= 4, "expected 2 DataLoader workers per rank"
    for pid in [p.pid for p in launched.procs] + workers:
        os.kill(pid, signal.SIGTERM)  # a time limit: torch's workers die of it unless told to ignore it
    assert launched.wait() == [75, 75], launched.output()
    assert_stopped_with_a_complete_checkpoint(run_dir, launched.output())
    assert "killed by signal" not in launched.output()


@pytest.mark.timed
@pytest.mark.parametrize("way", ["torchrun", "deepspeed"])
def test_sigterm_to_the_launcher_ends_in_a_complete_checkpoint(launch, tmp_path, way):
    run_dir = tmp_path / "run"
    launched = launch(way, ["--backend", "ddp", *TINY[:4], "--epochs", "1000", "--log-every", "1"], run_dir)
    wait_for_steps(run_dir, launched, 3)
    agent = launched.procs[0].pid
    if way == "deepspeed":  # srun starts deepspeed.launcher.launch per node, the runner's child here
        agent = next(p for p in descendants(agent) if b"deepspeed.launcher.launch" in
                     Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(agent, signal.SIGTERM)  # it forwards SIGTERM to the ranks and SIGKILLs them 30 s later
    launched.wait()
    step = assert_stopped_with_a_complete_checkpoint(run_dir, launched.output())
    assert f"stopped by SIGTERM at step {step}" in launched.output()


def phase_of(run_dir, rank: int) -> dict:
    """The rank's newest beat: its node file's, or fresher, the one it handed over on the node, where these
    tests put the hand-over (``staged_beside``): a node file shows a phase at most once per heartbeat period."""
    from train import heartbeat, nodebeat
    beats = heartbeat.read_all(run_dir)
    for stage in (run_dir.parent / "stage").glob("hpcdist-beats-*"):
        beats.update(nodebeat.staged(stage))
    return beats.get(rank, {})


def staged_beside(run_dir, monkeypatch) -> None:
    monkeypatch.setenv("HPCDIST_HEARTBEAT_STAGE", str(run_dir.parent / "stage"))


def signal_in_phase(launched, run_dir, phase: str, timeout: float = 240) -> dict:
    """SIGTERM to every rank while rank 0 is in ``phase``, for certain: the ranks are frozen the moment its
    heartbeat says so, the phase checked again while nothing can move, signalled, then thawed."""
    deadline = time.monotonic() + timeout
    while True:
        while phase_of(run_dir, 0).get("phase") != phase:
            assert all(p.poll() is None for p in launched.procs), launched.output()
            assert time.monotonic() < deadline, f"rank 0 never entered {phase} in {timeout}s\n{launched.output()}"
            time.sleep(0.001)
        launched.signal(signal.SIGSTOP)
        seen = phase_of(run_dir, 0)
        if seen.get("phase") == phase:
            launched.signal(signal.SIGTERM)  # pending until SIGCONT: it lands inside the phase
        launched.signal(signal.SIGCONT)
        if seen.get("phase") == phase:
            return seen


@pytest.mark.timed
def test_a_stop_signal_during_a_checkpoint_write_lets_it_finish_then_stops_with_a_complete_one(launch, tmp_path,
                                                                                               monkeypatch):
    run_dir = tmp_path / "run"
    staged_beside(run_dir, monkeypatch)
    # A checkpoint every step: most of the wall time is spent writing one.
    launched = launch("srun", ["--backend", "ddp", *TINY[:4], "--epochs", "1000", "--log-every", "1",
                               "--checkpoint-every", "1"], run_dir)
    wait_for_steps(run_dir, launched, 2)
    after = signal_in_phase(launched, run_dir, "checkpoint")
    assert launched.wait() == [75, 75], launched.output()
    step = assert_stopped_with_a_complete_checkpoint(run_dir, launched.output())
    # The write the signal came in finished too: every checkpoint kept is complete, none set aside as damaged.
    assert step >= after["step"]
    kept = list((run_dir / "checkpoints").glob("step*"))
    assert kept and all(checkpoints.damage(c) is None for c in kept)
    assert not list((run_dir / "checkpoints").glob(".damaged-*"))
    assert f"stopped by SIGTERM at step {step}" in launched.output()


@pytest.mark.timed
def test_a_stop_signal_during_the_final_evaluation_lets_the_run_finish(launch, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    staged_beside(run_dir, monkeypatch)
    launched = launch("srun", ["--backend", "ddp", "--synthetic-size", "16000", "--batch-size", "32",
                               "--max-steps", "5", "--log-every", "1"], run_dir)
    signal_in_phase(launched, run_dir, "eval")
    assert launched.wait() == [0, 0], launched.output()
    summary = read_summary(run_dir)
    assert summary["steps"] == 5 and 0 <= summary["test_accuracy"] <= 1
    newest = checkpoint.newest(run_dir / "checkpoints")
    assert newest.name == "step00000005" and checkpoints.damage(newest) is None


@pytest.mark.timed
def test_a_rank_frozen_during_set_up_is_named_in_seconds_not_after_the_collective_timeout(launch, tmp_path,
                                                                                          monkeypatch):
    run_dir = tmp_path / "run"
    staged_beside(run_dir, monkeypatch)
    launched = launch("srun", ["--backend", "ddp", *TINY, "--heartbeat-s", "0.5", "--hang-timeout-s", "3"], run_dir)
    live, frozen = launched.procs
    # Rank 0 held back (it hosts the rendezvous store), so rank 1 is certainly still in set-up when frozen.
    live.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while phase_of(run_dir, 1).get("phase") != "rendezvous":
        assert time.monotonic() < deadline and frozen.poll() is None, launched.output()
        time.sleep(0.01)
    # Before its first step: no step time to judge by, only its silence.
    took = freeze(frozen, live, launched, then=lambda: live.send_signal(signal.SIGCONT))
    hang = json.loads((run_dir / "hang.json").read_text())
    assert (hang["rank"], hang["pid"], hang["declared_by"]) == (1, frozen.pid, 0)
    assert (hang["phase"], hang["step"]) == ("rendezvous", 0)
    assert "rank 1 on" in launched.output() and "hung in set-up (rendezvous)" in launched.output()
    print(f"rank 1 frozen in {hang['phase']} named {took:.1f} s after SIGSTOP (threshold 3 s; --timeout-s 600)")
    assert took < 30


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_during_a_checkpoint_is_a_storage_ending_and_leaves_nothing_half_written(tmp_path):
    """Room for one ~3.8 MB checkpoint, not two: the second fails, the first stays complete, no .tmp- folder is
    left, the rank says which path and how many bytes, exits 74, and the attempt is `storage`, not retried."""
    from hpc import runfiles
    from hpc.failures import policy, rules
    from hpc.failures.evidence import Evidence

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        run_dir = small / "run"
        proc = subprocess.run([sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(run_dir),
                               "--max-steps", "10", "--checkpoint-every", "5", "--dataset", "synthetic",
                               "--synthetic-size", "256", "--batch-size", "32", "--threads", "1",
                               "--precision", "fp32"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 74, proc.stderr[-2000:]
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("hpcdist-train: error:")]
        assert f"no space left on device writing checkpoint step00000010 in {run_dir / 'checkpoints'}" in line
        assert "bytes free, about 3," in line and "(step00000005) is intact" in line, line
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["step00000005"]
        assert checkpoints.newest(run_dir / "checkpoints").name == "step00000005"
        [error] = runfiles.read_errors(run_dir)
        assert error.kind == "storage" and error.error == line.removeprefix("hpcdist-train: error: ")
        ending = rules.classify(Evidence(attempt=0, step_status=74, errors=(error,), checkpoint_step=5))
        assert (ending.ending, ending.step) == ("storage", 5)
        decision = policy.decide(ending, [], policy.Policy(max_retries=2, nodes=1), {}, allocation=["n1", "n2"])
        assert decision.action == "none" and "free space" in decision.reason
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_checkpoint_past_the_file_size_limit_is_a_storage_ending_and_leaves_nothing_half_written(tmp_path):
    """A quota or `ulimit -f` (disk not full) fails the first checkpoint's write with EFBIG, which torch's writer
    wraps in a RuntimeError: the rank still ends in the storage line, exit 74, with no .tmp- folder left."""
    import resource

    from hpc import runfiles

    run_dir = tmp_path / "run"
    limit = 1 << 20  # above every run file but the ~3.8 MB checkpoint
    proc = subprocess.run([sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(run_dir),
                           "--max-steps", "10", "--checkpoint-every", "5", "--dataset", "synthetic",
                           "--synthetic-size", "256", "--batch-size", "32", "--threads", "1", "--precision", "fp32"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("hpcdist-train: error:")]
    assert f"file too large writing checkpoint step00000005 in {run_dir / 'checkpoints'}" in line
    assert "bytes free; no earlier checkpoint is intact, so the size needed is unknown: raise the file" in line, line
    assert os.listdir(run_dir / "checkpoints") == []
    [error] = runfiles.read_errors(run_dir)
    assert (error.kind, error.exit_code) == ("storage", 74)


def test_a_deepspeed_checkpoint_one_rank_fails_to_write_ends_every_rank_in_its_storage_line_publishing_nothing(
        launch, tmp_path):
    """Rank 1 alone under a 1 MB file-size limit, which its ~1.9 MB ZeRO-3 shard (a file DeepSpeed writes itself)
    passes: no rank publishes the checkpoint, no staging folder is left, and both ranks exit 74 with the one line
    naming rank 1, as storage. ZeRO-3: after its files DeepSpeed gathers the parameters it keeps whole on every rank,
    which the failing rank must meet too (seen in CI: both ranks waited out the collective timeout in the vote)."""
    from hpc import runfiles

    run_dir = tmp_path / "run"
    launched = launch("srun", ["--backend", "deepspeed", "--zero-stage", "3", "--precision", "fp32", *TINY[:4],
                               "--max-steps", "5", "--checkpoint-every", "5", "--snapshot-every-s", "0",
                               "--timeout-s", "60"], run_dir, file_limit=(1, 1_000_000))
    assert launched.wait(timeout=240) == [74, 74], launched.output()
    lines = [[x for x in log.read_text().splitlines() if x.startswith("hpcdist-train: error:")]
             for log in launched.logs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, launched.output()
    assert f"file too large writing checkpoint step00000005 on rank 1 in {run_dir / 'checkpoints'}" in lines[0][0]
    assert os.listdir(run_dir / "checkpoints") == []
    errors = runfiles.read_errors(run_dir)
    assert [(e.kind, e.exit_code) for e in errors] == [("storage", 74)] * 2, errors


def zero2_checkpoint_of_one_rank(run_dir: Path) -> list[str]:
    """Train one rank of ZeRO-2 to its checkpoint at step 5 in ``run_dir``; the arguments a regrouping resume takes."""
    args = ["--backend", "deepspeed", "--zero-stage", "2", "--precision", "fp32", *TINY[:4], "--epochs", "100",
            "--checkpoint-every", "5", "--snapshot-every-s", "0"]
    one = subprocess.run([sys.executable, "-m", "train", "--run-dir", str(run_dir), *args, "--max-steps", "5"],
                         env=one_rank_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    return args


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_regrouping_resume_whose_universal_copy_finds_no_space_ends_every_rank_in_rank_0s_storage_line(
        launch, tmp_path):
    """A ZeRO-2 checkpoint of one rank resumed on two, with no room left for the universal copy rank 0 converts it
    to: rank 1, which waits for that copy, learns of the failure too, and both ranks exit 74 with rank 0's one line;
    the copy's folder is removed and the checkpoint stays."""
    from hpc import runfiles

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        run_dir = small / "run"
        args = zero2_checkpoint_of_one_rank(run_dir)
        with open(small / "filler", "wb") as filler:  # ~5 MB checkpoint kept, 300 kB left: the run's logs fit
            filler.write(bytes(shutil.disk_usage(small).free - 300_000))
        launched = launch("srun", [*args, "--max-steps", "10", "--resume"], run_dir)
        assert launched.wait(timeout=240) == [74, 74], launched.output()
        lines = [[x for x in log.read_text().splitlines() if x.startswith("hpcdist-train: error:")]
                 for log in launched.logs]
        assert lines[0] == lines[1] and len(lines[0]) == 1, launched.output()
        assert (f"no space left on device writing checkpoint step00000005's universal copy on rank 0 in "
                f"{run_dir / 'checkpoints'}") in lines[0][0]
        assert os.listdir(run_dir / "checkpoints") == ["step00000005"]
        assert [(e.kind, e.exit_code) for e in runfiles.read_errors(run_dir)] == [("storage", 74)] * 2
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_regrouping_resume_whose_universal_copy_passes_the_file_size_limit_ends_every_rank_in_rank_0s_storage_line(
        launch, tmp_path):
    """A ZeRO-2 checkpoint of one rank resumed on two, rank 0 under a 1 MB file-size limit its ~1.2 MB universal
    copy of fc1 passes (DeepSpeed's conversion writes with torch.save to a path, whose writer keeps no errno): both
    ranks exit 74 with rank 0's one line, as storage, the copy's folder is removed and the checkpoint stays."""
    from hpc import runfiles

    run_dir = tmp_path / "run"
    args = zero2_checkpoint_of_one_rank(run_dir)
    launched = launch("srun", [*args, "--max-steps", "10", "--resume"], run_dir, file_limit=(0, 1_000_000))
    assert launched.wait(timeout=240) == [74, 74], launched.output()
    lines = [[x for x in log.read_text().splitlines() if x.startswith("hpcdist-train: error:")]
             for log in launched.logs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, launched.output()
    assert (f"file too large writing checkpoint step00000005's universal copy on rank 0 in "
            f"{run_dir / 'checkpoints'}") in lines[0][0]
    assert os.listdir(run_dir / "checkpoints") == ["step00000005"]
    assert [(e.kind, e.exit_code) for e in runfiles.read_errors(run_dir)] == [("storage", 74)] * 2
