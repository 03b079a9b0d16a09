"""Specifications of train/dssnapshot.py: DeepSpeed's partitioned snapshots, a part per node and a copy on the
next, made one checkpoint at a resume (the ring and the collective save run in tests/test_train_launch.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import checkpoints, dsconfig
from hpc.checkpoints import MANIFEST, name_for, newest
from train import checkpoint, dssnapshot, snapshot

pytestmark = pytest.mark.timed  # the persisting period, in seconds

REPO = Path(__file__).resolve().parents[1]


def part(folder: Path, node: int, nodes: int, step: int, files: dict[str, bytes], trained_with=None) -> Path:
    """A published part, as a node's local rank 0 leaves it."""
    def write(staging: Path, tag: str) -> None:
        for name, data in files.items():
            (staging / tag / name).write_bytes(data)
    return checkpoint.save(folder / checkpoints.PART.format(node, nodes), step, rank=0, write=write,
                           trained_with=trained_with)


def parts_of(folder: Path, *, local_rank: int = 0) -> dssnapshot.Parts:
    return dssnapshot.Parts(folder, node=0, nodes=2, leaders=[0, 1], local_rank=local_rank, group=None)


def test_a_part_travels_as_one_buffer_with_its_files_and_without_its_manifest(tmp_path):
    made = part(tmp_path, 0, 2, 10, {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"\x00" * 5, "rng-rank0.pt": b"r"})
    assert (made / MANIFEST).is_file()
    assert dssnapshot.unpack(dssnapshot.pack(made)) == {
        "rng-rank0.pt": b"r", "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"\x00" * 5}


def test_a_part_naming_a_file_outside_its_folder_is_refused():
    header = json.dumps([["../escape", 1]]).encode()
    with pytest.raises(ValueError, match="outside its folder"):
        dssnapshot.unpack(len(header).to_bytes(8, "little") + header + b"x")


def test_a_node_offers_only_the_steps_of_a_part_that_verify(tmp_path):
    part(tmp_path, 0, 2, 10, {"a.pt": b"1"})
    damaged = part(tmp_path, 0, 2, 20, {"a.pt": b"2"})
    (damaged / "a.pt").write_bytes(b"X")  # same size, other bytes: the checksum tells
    part(tmp_path, 1, 2, 10, {"b.pt": b"3"})
    assert parts_of(tmp_path).offer() == {"part-0-of-2": [10], "part-1-of-2": [10]}
    assert parts_of(tmp_path, local_rank=1).offer() == {}, "only the node's local rank 0 speaks for it"


def test_parts_of_steps_after_the_resumed_one_are_forgotten_and_clearing_removes_only_parts(tmp_path):
    for step in (10, 20):
        part(tmp_path, 0, 2, step, {"a.pt": b"1"})
    (tmp_path / "someone-elses").mkdir()
    parts = parts_of(tmp_path)
    parts.forget_after(10)
    assert [p.name for p in (tmp_path / "part-0-of-2").iterdir()] == [name_for(10)]
    parts.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["someone-elses"]


def test_a_resume_makes_the_newest_whole_snapshot_a_checkpoint_newer_than_the_disks(tmp_path):
    memory, root = tmp_path / "memory", tmp_path / "checkpoints"
    part(memory, 0, 2, 30, {"mp_rank_00_model_states.pt": b"model", "rng-rank0.pt": b"0"})
    part(memory, 1, 2, 30, {"rng-rank1.pt": b"1"})
    checkpoint.save(root, 20, rank=0, write=lambda staging, tag: (staging / tag / "old.pt").write_bytes(b"o"))
    made, source = dssnapshot.assemble(parts_of(memory), root, rank=0, world=1, found=newest(root))
    assert (made, source) == (root / name_for(30), "node memory") and newest(root) == made
    assert sorted(p.name for p in made.iterdir()) == [MANIFEST, "mp_rank_00_model_states.pt", "rng-rank0.pt",
                                                      "rng-rank1.pt"]
    # The disk's checkpoint is the newer one: it is what loads.
    assert dssnapshot.assemble(parts_of(memory), root, rank=0, world=1, found=made) == (made, "")


def test_a_snapshot_the_run_s_zero_stage_cannot_load_is_refused_before_anything_is_made_or_forgotten(tmp_path):
    memory, root = tmp_path / "memory", tmp_path / "checkpoints"
    zero_1 = {"zero_stage": 1, "precision": "fp32"}
    part(memory, 0, 2, 30, {"mp_rank_00_model_states.pt": b"model"}, zero_1)
    part(memory, 1, 2, 30, {"rng-rank1.pt": b"1"}, zero_1)
    part(memory, 0, 2, 40, {"mp_rank_00_model_states.pt": b"later"}, zero_1)  # part 1 of step 40 was lost
    checkpoint.save(root, 20, rank=0, write=lambda staging, tag: (staging / tag / "old.pt").write_bytes(b"o"),
                    trained_with=zero_1)
    held = sorted(p for p in tmp_path.rglob("*"))
    for found in (newest(root), None):  # the disk's checkpoint is older, or there is none
        with pytest.raises(dsconfig.ConfigError) as caught:
            dssnapshot.assemble(parts_of(memory), root, rank=0, world=1, found=found, config=zero(3))
        assert str(caught.value).startswith(f"snapshot part {memory / 'part-0-of-2' / name_for(30)} holds DeepSpeed "
                                            "ZeRO-1 fp32 state, and this run asks for ZeRO-3 fp32")
        assert sorted(p for p in tmp_path.rglob("*")) == held
    made, _ = dssnapshot.assemble(parts_of(memory), root, rank=0, world=1, found=newest(root), config=zero(2))
    assert checkpoints.recorded(made) == zero_1, "the parts' record, carried into the checkpoint made of them"
    with pytest.raises(dsconfig.ConfigError) as caught:
        dssnapshot.assemble(parts_of(memory), root, rank=0, world=1, found=made, config=zero(0))
    assert str(caught.value).startswith(f"{made} holds DeepSpeed ZeRO-1 fp32 state, and this run asks for ZeRO-0")


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def test_parts_the_nodes_persisted_complete_what_memory_lost_and_later_ones_are_forgotten(tmp_path):
    memory, root = tmp_path / "memory", tmp_path / "checkpoints"
    on_disk = root / checkpoints.PARTS
    part(memory, 0, 2, 30, {"mp_rank_00_model_states.pt": b"model"})  # node 1 and its memory are gone
    part(on_disk, 1, 2, 30, {"rng-rank1.pt": b"1"})
    part(on_disk, 1, 2, 40, {"rng-rank1.pt": b"2"})  # a step no node holds part 0 of: the run did not go on from it
    parts = dssnapshot.Parts(memory, node=0, nodes=2, leaders=[0, 1], local_rank=0, group=None,
                             persist=snapshot.Persist(root, 0.0))
    made, source = dssnapshot.assemble(parts, root, rank=0, world=1, found=None)
    assert made == root / name_for(30) and source == "the parts its nodes persisted"
    assert (made / "rng-rank1.pt").read_bytes() == b"1"
    assert checkpoints.held_in(on_disk) == {"part-1-of-2": [30]}
    parts.clear()  # node 0's local rank 0, at a fresh start or the run's end: the persisted parts too
    assert not on_disk.exists() and not memory.exists()
    # A file someone else put among the persisted parts is left, and its folder with it.
    part(on_disk, 0, 2, 50, {"a.pt": b"1"})
    (on_disk / "notes.txt").write_text("mine")
    parts.clear()
    assert sorted(p.name for p in on_disk.iterdir()) == ["notes.txt"]


def test_nothing_a_link_among_the_persisted_parts_leads_to_is_pruned_forgotten_or_cleared(tmp_path):
    # Pruning keeps a part's KEEP newest steps: through a link it would remove another run's step folders.
    memory, root, elsewhere = tmp_path / "memory", tmp_path / "checkpoints", tmp_path / "other-run"
    for step in (10, 20):
        part(elsewhere, 0, 2, step, {"a.pt": b"theirs"})
    (root / checkpoints.PARTS).mkdir(parents=True)
    (root / checkpoints.PARTS / "part-0-of-2").symlink_to(elsewhere / "part-0-of-2")
    said = []
    parts = dssnapshot.Parts(memory, node=0, nodes=2, leaders=[0, 1], local_rank=0, group=None,
                             persist=snapshot.Persist(root, 1.0), say=said.append)
    part(memory, 0, 2, 40, {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"adam"})
    parts._start_persist(40)
    parts._persisting.join()
    assert "is a symbolic link" in said[0] and parts.persist is None, said
    parts.forget_after(10)
    parts.clear()
    assert [p.name for p in checkpoints.complete(elsewhere / "part-0-of-2")] == [name_for(10), name_for(20)]
    assert (root / checkpoints.PARTS / "part-0-of-2").is_symlink()


def test_a_node_is_due_to_persist_its_first_part_at_once_then_one_every_persist_period_in_the_background(tmp_path):
    memory, root = tmp_path / "memory", tmp_path / "checkpoints"
    parts = dssnapshot.Parts(memory, node=1, nodes=2, leaders=[0, 1], local_rank=0, group=None,
                             persist=snapshot.Persist(root, 0.5))
    part(memory, 1, 2, 10, {"zero_pp_rank_1_mp_rank_00_optim_states.pt": b"adam"})
    assert parts._persist_due()
    parts._start_persist(10)
    parts._persisting.join()
    assert checkpoints.held_in(root / checkpoints.PARTS) == {"part-1-of-2": [10]}
    assert not parts._persist_due(), "due again before its period passed"
    time.sleep(0.5)
    assert parts._persist_due()
    part(memory, 1, 2, 20, {"zero_pp_rank_1_mp_rank_00_optim_states.pt": b"adam"})
    parts._start_persist(20)
    parts._persisting.join()
    assert checkpoints.held_in(root / checkpoints.PARTS) == {"part-1-of-2": [10, 20]}


def test_a_node_whose_last_part_is_still_being_persisted_is_not_due(tmp_path):
    import threading

    parts = dssnapshot.Parts(tmp_path, node=0, nodes=2, leaders=[0, 1], local_rank=0, group=None,
                             persist=snapshot.Persist(tmp_path / "checkpoints", 0.001))
    release = threading.Event()
    parts._persisting = threading.Thread(target=release.wait)
    parts._persisting.start()
    assert not parts._persist_due()
    release.set()
    parts._persisting.join()
    assert parts._persist_due()


def test_snapshots_are_spaced_so_that_training_waits_for_them_under_one_percent_of_the_time(tmp_path):
    parts = parts_of(tmp_path)
    parts.last_s = 0.004
    assert parts.spaced(5.0) == 5.0
    parts.last_s = 0.04  # a part written and sent in 40 ms: one every 4 s at most
    assert parts.spaced(1.0) == pytest.approx(4.0)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dssnapshot.Groups(dist.new_group(backend="gloo"), None)
    dist.destroy_process_group()


def test_training_waits_only_for_the_part_written_and_a_snapshot_due_while_one_is_handed_on_is_skipped(
        tmp_path, one_rank_group):
    import threading

    written = []
    parts = dssnapshot.Parts(tmp_path / "memory", node=0, nodes=1, leaders=[0], local_rank=0, group=one_rank_group,
                             on_written=written.append)
    (tmp_path / "memory").mkdir(mode=0o700)

    def write(staging: Path, tag: str) -> None:
        (staging / tag / "mp_rank_00_model_states.pt").write_bytes(b"w")
    held_up, handing = threading.Event(), parts._hand_on
    parts._hand_on = lambda *args: (held_up.wait(), handing(*args))
    parts.take(10, write)
    assert parts.taken == 1 and checkpoints.held_in(tmp_path / "memory") == {"part-0-of-1": [10]}
    assert written == [], "published before its hand-on ended"
    parts.take(20, write)  # the hand-on of step 10 still goes on: every rank skips this one
    assert (parts.taken, parts.skipped) == (1, 1) and checkpoints.held_in(tmp_path / "memory")["part-0-of-1"] == [10]
    held_up.set()
    parts._handing.join()
    assert written == [10]
    parts.take(30, write)
    parts.drop()
    assert written == [10, 30] and parts.taken == 2 and not parts.stopped


def test_a_part_that_could_not_be_handed_on_stops_the_snapshots_on_every_rank_at_the_next_vote(
        tmp_path, one_rank_group):
    said = []
    parts = dssnapshot.Parts(tmp_path / "memory", node=0, nodes=2, leaders=[0, 1], local_rank=0,
                             group=one_rank_group, say=said.append)
    (tmp_path / "memory").mkdir(mode=0o700)

    def broken(step: int) -> None:
        raise OSError(28, "No space left on device")
    parts._pass_on = broken
    parts.take(10, lambda staging, tag: (staging / tag / "a.pt").write_bytes(b"a"))
    parts._handing.join()
    parts.take(20, lambda staging, tag: (staging / tag / "a.pt").write_bytes(b"a"))
    assert parts.stopped and parts.taken == 1
    assert "could not be handed on: No space left on device" in said[0]


def test_a_ring_copy_that_filled_node_memory_is_named_in_words_without_the_run_directory_s_advice(
        tmp_path, one_rank_group):
    # The run directory is fine: "free space or move --run-dir" is a disk checkpoint's advice, not node memory's.
    said = []
    parts = dssnapshot.Parts(tmp_path / "memory", node=0, nodes=2, leaders=[0, 1], local_rank=0,
                             group=one_rank_group, say=said.append)
    (tmp_path / "memory").mkdir(mode=0o700)

    def full(step: int) -> None:
        raise checkpoint.storage_error(28, parts.part(1), name_for(step))
    parts._pass_on = full
    parts.take(10, lambda staging, tag: (staging / tag / "a.pt").write_bytes(b"a"))
    parts._handing.join()
    parts.take(20, lambda staging, tag: (staging / tag / "a.pt").write_bytes(b"a"))
    assert said == [f"snapshots stopped: a node has too little free memory in {tmp_path} for another, or its folder "
                    "is not this user's alone (its part could not be handed on: No space left on device); resumes "
                    "use the disk checkpoints"]


def test_a_part_torch_fails_to_write_in_its_own_words_stops_the_snapshots_leaving_no_half_written_part(
        tmp_path, one_rank_group):
    # torch's writer reports a file size limit or a quota as a RuntimeError ("unexpected pos"), not an OSError.
    said = []
    parts = dssnapshot.Parts(tmp_path / "memory", node=0, nodes=1, leaders=[0], local_rank=0, group=one_rank_group,
                             say=said.append)
    (tmp_path / "memory").mkdir(mode=0o700)

    def cut_short(staging: Path, tag: str) -> None:
        (staging / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 634496 vs 634408")
    parts.take(10, cut_short)
    assert parts.stopped and parts.taken == 0
    assert said == ["snapshots stopped: [enforce fail at inline_container.cc:672] . unexpected pos 634496 vs 634408 "
                    f"writing a snapshot in {tmp_path / 'memory'}; resumes use the disk checkpoints"]
    assert [p.name for p in (tmp_path / "memory").rglob("*")] == ["part-0-of-1"], "a half-written part is left"


TWO_NODES = """
import sys, time
from pathlib import Path
import torch.distributed as dist
from train import dssnapshot, snapshot

rank, tmp = int(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
if rank == 1:  # the slower disk: its copies take longer than the persisting period
    copy = dssnapshot.copy_part
    dssnapshot.copy_part = lambda held, into: (time.sleep(0.3), copy(held, into))
memory = tmp / f"node{rank}"
memory.mkdir(mode=0o700)
parts = dssnapshot.open_parts(memory, node=rank, local_rank=0, fresh=True, on_written=lambda step: None,
                              persist=snapshot.Persist(tmp / "checkpoints", 0.05))
for step in range(1, 41):
    parts.take(step, lambda staging, tag: (staging / tag / f"rank{rank}.pt").write_bytes(bytes(1000)))
    time.sleep(0.02)
parts._handing.join()
parts._persisting.join()
"""


def test_every_node_persists_the_same_steps_even_when_one_node_s_disk_is_slower(tmp_path):
    # Two nodes that each persisted when their own clock said so kept different steps, KEEP of each sharing none:
    # a new job after the batch host's death found no whole snapshot for long stretches of a run.
    (tmp_path / "run.py").write_text(TWO_NODES)
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(rank), str(tmp_path)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    held = checkpoints.held_in(tmp_path / "checkpoints" / checkpoints.PARTS)
    assert held["part-0-of-2"] == held["part-1-of-2"] and len(held["part-0-of-2"]) == checkpoints.KEEP, held
