"""Specifications of hpc/drill_faults.py's parts that need no cluster: finding a job's ranks in /proc, filling a
job's file system, and what a storage fault must not leave. The faults themselves run for real in
tests/test_drill.py."""

from __future__ import annotations

import errno
import os
import shutil
from types import SimpleNamespace

import pytest

from hpc import drill_faults
from hpc.checkpoints import MANIFEST, write_manifest


def test_a_rank_is_found_in_proc_by_its_job_and_rank(tmp_path):
    def proc(pid: int, argv: list[str], env: dict[str, str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
        (tmp_path / str(pid) / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()))

    proc(10, ["python", "-m", "torch.distributed.run", "-m", "train"], {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n2"})
    proc(11, ["python", "-u", "-m", "train", "--local_rank=1"], {"SLURM_JOB_ID": "7", "RANK": "3",
                                                                 "SLURMD_NODENAME": "n2"})
    proc(12, ["python", "-m", "train"], {"SLURM_JOB_ID": "8", "SLURM_PROCID": "1"})
    (tmp_path / "self").mkdir()
    found = sorted(drill_faults.job_processes("7", tmp_path), key=lambda p: p.pid)
    assert [(p.pid, p.rank, p.node) for p in found] == [(10, None, "n2"), (11, 3, "n2")]


def checkpoint(job_dir, step: int, size: int):
    folder = job_dir / "run" / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer.pt").write_bytes(os.urandom(size))
    write_manifest(folder, step)
    return folder


def test_the_disk_is_filled_beside_the_job_to_half_a_checkpoint_and_emptied_again(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    newest = checkpoint(job_dir, 10, 4000)
    # The free space is fixed here: other tests writing on this file system meanwhile moved a real measure by 8 KiB.
    free = 10**9
    monkeypatch.setattr(drill_faults.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    sizes: list[int] = []
    monkeypatch.setattr(drill_faults.os, "posix_fallocate", lambda fd, offset, size: sizes.append(size))
    assert drill_faults.fill_disk(job_dir) == sizes[0]
    # Room left: half of the newest checkpoint, its manifest included.
    manifest = (newest / MANIFEST).stat().st_size
    assert sizes[0] == free - (4000 + manifest) // 2
    assert (tmp_path / drill_faults.FILLER).is_file() and not list(job_dir.glob("*filler*"))
    drill_faults.empty_disk(job_dir)
    assert not (tmp_path / drill_faults.FILLER).exists()
    # A file of that name the drill did not make is neither taken over nor removed.
    (tmp_path / drill_faults.FILLER).write_text("someone's")
    with pytest.raises(FileExistsError):
        drill_faults.fill_disk(job_dir)
    drill_faults.empty_disk(job_dir)
    assert (tmp_path / drill_faults.FILLER).read_text() == "someone's"


def test_free_space_the_job_took_meanwhile_is_measured_again_not_a_crash(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    checkpoint(job_dir, 10, 4000)
    asked: list[int] = []

    def fallocate(fd, offset, size):
        asked.append(size)
        if len(asked) == 1:  # the job wrote a checkpoint between the measure and the filling
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(drill_faults.os, "posix_fallocate", fallocate)
    assert drill_faults.fill_disk(job_dir) == asked[1] and len(asked) == 2
    drill_faults.empty_disk(job_dir)


def test_a_storage_fault_must_leave_every_kept_checkpoint_whole_and_nothing_half_written(tmp_path):
    job_dir = tmp_path / "job"
    assert drill_faults.storage_left(job_dir) == [f"no checkpoint was kept in {job_dir}/run/checkpoints"]
    checkpoint(job_dir, 5, 100)
    assert drill_faults.storage_left(job_dir) == []
    (job_dir / "run" / "checkpoints" / ".tmp-step00000010").mkdir()
    damaged = checkpoint(job_dir, 10, 100)
    (damaged / "trainer.pt").write_bytes(b"torn")
    problems = drill_faults.storage_left(job_dir)
    assert problems[0].endswith(".tmp-step00000010 was left half-written")
    assert problems[1].startswith(f"kept checkpoint {damaged} is damaged") and len(problems) == 2


def test_the_disk_is_filled_with_the_job_stopped_between_two_saves(tmp_path, monkeypatch):
    # A save in flight when the disk filled would finish and prune an older checkpoint: room for every later save.
    from hpc import registry
    from hpc.job import Job

    job = Job(registry.Record(job_id="7", job_dir=str(tmp_path), via="sbatch", submitted=""))
    root = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        checkpoint(tmp_path, step, 16)
    (root / ".tmp-step00000015").mkdir()
    stop, cont = drill_faults.signal.SIGSTOP, drill_faults.signal.SIGCONT
    sent, filled_after = [], []

    def signal_process(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if sig == cont and (root / ".tmp-step00000015").exists():
            # Let go mid-save, the job finishes it (and prunes step 5) before the next look.
            os.rename(root / ".tmp-step00000015", root / "step00000015")
            shutil.rmtree(root / "step00000005")
    monkeypatch.setattr(drill_faults, "job_processes", lambda job_id: [drill_faults.Proc(41, 0, "n1")])
    monkeypatch.setattr(drill_faults, "signal_process", signal_process)
    monkeypatch.setattr(drill_faults.time, "sleep", lambda s: None)
    assert drill_faults.between_saves(job, lambda: filled_after.append(list(sent)) or 123) == 123
    # Stopped mid-save, let go, stopped again once it was done: the filling came while every process stood still.
    assert filled_after == [[(41, stop), (41, cont), (41, stop)]] and sent[-1] == (41, cont)

    (root / ".tmp-step00000020").mkdir()
    monkeypatch.setattr(drill_faults, "signal_process", lambda pid, sig: None)
    with pytest.raises(RuntimeError, match="in the middle of a checkpoint at each of 3 looks"):
        drill_faults.between_saves(job, lambda: 0, tries=3)


def test_a_node_control_that_cannot_revive_the_node_is_an_error_naming_it_not_silence(tmp_path):
    # A node left dead holds up every later job that needs it: the drill must say so, not go on.
    control = tmp_path / "control.sh"
    control.write_text('[ "$1" = revive ] && { echo "slurmd for $2 did not start" >&2; exit 1; }\n')
    with pytest.raises(RuntimeError, match=r"revive n1 failed, the node may still be dead: slurmd for n1 did not "
                                           r"start"):
        drill_faults.revive("n1", f"bash {control}")
    control.write_text("exit 0\n")
    drill_faults.revive("n1", f"bash {control}")


def test_a_node_control_that_does_not_finish_or_says_several_lines_is_an_error_in_one_line(tmp_path, monkeypatch):
    # A revive that outlasts its wait would otherwise end the drill in a traceback, skipping its clean-up.
    control = tmp_path / "control.sh"
    control.write_text("sleep 5\n")
    monkeypatch.setattr(drill_faults, "NODE_CONTROL_S", 0.5)
    with pytest.raises(RuntimeError, match=r"^bash \S+ revive n1 did not finish in 0.5 s, the node may still be "
                                           r"dead$"):
        drill_faults.revive("n1", f"bash {control}")
    control.write_text('echo "Cannot find device veth-n1" >&2; echo "ERROR: slurmd for n1 did not start" >&2; exit 1\n')
    with pytest.raises(RuntimeError) as failed:
        drill_faults.revive("n1", f"bash {control}")
    assert str(failed.value).endswith("still be dead: Cannot find device veth-n1 ERROR: slurmd for n1 did not start")
