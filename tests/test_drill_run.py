"""Specifications of hpc/drill_run.py's parts that need no cluster: finding a job's ranks in /proc. The rest
runs the drill for real (tests/test_drill.py)."""

from __future__ import annotations

from hpc import drill_run


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
    found = sorted(drill_run.job_processes("7", tmp_path), key=lambda p: p.pid)
    assert [(p.pid, p.rank, p.node) for p in found] == [(10, None, "n2"), (11, 3, "n2")]
