"""Specifications of train/snapshot.py: the node-local snapshot store a relaunch resumes from."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from hpc.checkpoints import MANIFEST, SNAPSHOT_EVERY_S, newest
from train import checkpoint, snapshot
from train.engines import TorchEngine
from train.model import ConvNet

pytestmark = pytest.mark.timed  # the background writer's stall, measured in seconds


def test_the_store_is_named_by_the_slurm_job_and_keyed_by_run_directory_and_host(tmp_path):
    env = {"SLURM_JOB_ID": "4711", snapshot.ROOT_ENV: str(tmp_path)}
    folder = snapshot.store_dir(tmp_path / "run", env, "n1")
    assert folder.parent == tmp_path and folder.name.startswith("hpcdist-snap-4711-n1-")
    assert snapshot.store_dir(tmp_path / "run", env, "n1") == folder
    assert snapshot.store_dir(tmp_path / "run", env, "n2") != folder
    assert snapshot.store_dir(tmp_path / "other", env, "n1") != folder
    assert snapshot.store_dir(tmp_path / "run", {**env, "SLURM_JOB_ID": "4712"}, "n1") != folder


def test_a_run_outside_slurm_names_its_store_local_and_a_job_id_that_is_not_a_number_has_none(tmp_path):
    folder = snapshot.store_dir(tmp_path / "run", {snapshot.ROOT_ENV: str(tmp_path)}, "n1")
    assert folder.name.startswith("hpcdist-snap-local-n1-")
    assert snapshot.store_dir(tmp_path, {"SLURM_JOB_ID": "../x", snapshot.ROOT_ENV: str(tmp_path)}, "n1") is None


def test_snapshots_are_taken_by_default_in_a_slurm_job_and_elsewhere_only_when_asked():
    in_job = {"SLURM_JOB_ID": "4711"}
    assert snapshot.every_s(None, in_job) == SNAPSHOT_EVERY_S
    assert snapshot.every_s(None, {}) == 0
    assert snapshot.every_s(0.5, {}) == 0.5
    assert snapshot.every_s(0, in_job) == 0


def test_snapshots_are_written_in_the_background_published_complete_and_the_newest_two_kept(tmp_path):
    written: list[int] = []
    store = snapshot.Store(tmp_path / "s", on_written=written.append)
    for step in (10, 20, 30):
        assert store.take(step, lambda step=step: {"step": step, "w": torch.full((4,), float(step))})
        store.close()  # waits for the write, so none is skipped here
    assert written == [10, 20, 30]
    assert sorted(p.name for p in store.folder.iterdir()) == ["step00000020", "step00000030"]
    newest = store.newest()
    assert snapshot.step_of(newest) == 30 and (newest / MANIFEST).is_file()
    assert torch.equal(snapshot.load(newest)["w"], torch.full((4,), 30.0))


def test_a_snapshot_due_while_the_last_is_still_being_written_is_skipped_not_waited_for(tmp_path, monkeypatch):
    release = threading.Event()
    real = snapshot.Store._write

    def slow(self, step, state):
        release.wait(10)
        real(self, step, state)

    monkeypatch.setattr(snapshot.Store, "_write", slow)
    store = snapshot.Store(tmp_path / "s")
    copied: list[int] = []
    assert store.take(1, lambda: copied.append(1) or {"step": 1})       # being written
    while store._pending.qsize():                                       # the writer has taken it
        time.sleep(0.01)
    assert store.take(2, lambda: copied.append(2) or {"step": 2})       # waits in the one slot
    assert not store.take(3, lambda: copied.append(3) or {"step": 3})   # skipped: training does not wait...
    assert copied == [1, 2], "...nor copy a state nobody would write"
    release.set()
    store.close()
    assert snapshot.step_of(store.newest()) == 2
    assert snapshot.stats(store)["snapshots"] == 2 and snapshot.stats(None) == {}
    assert snapshot.stats(store)["snapshots_skipped"] == 1, "summary.json says how many were skipped"


def test_the_stall_counted_is_the_copy_alone(tmp_path):
    store = snapshot.Store(tmp_path / "s")
    store.take(1, lambda: time.sleep(0.05) or {"step": 1})
    store.close()
    stats = snapshot.stats(store)
    assert stats["snapshots"] == 1 and 0.05 <= stats["snapshot_stall_s"] < 1.0


def test_a_damaged_newest_snapshot_is_passed_over(tmp_path):
    store = snapshot.Store(tmp_path / "s")
    for step in (1, 2):
        store.take(step, lambda step=step: {"step": step, "w": torch.zeros(1000)})
        store.close()
    (store.folder / "step00000002" / snapshot.STATE_FILE).write_bytes(b"torn")
    assert snapshot.step_of(store.newest()) == 1


def test_when_memory_runs_out_snapshots_stop_saying_why_and_training_is_not_disturbed(tmp_path):
    (tmp_path / "s").write_text("a file where the folder should be")
    said: list[str] = []
    store = snapshot.Store(tmp_path / "s", say=said.append)
    assert store.take(1, lambda: {"step": 1})
    store.close()
    assert store.error and said and "resumes use the disk checkpoints" in said[0]
    assert not store.take(2, lambda: {"step": 2})


def test_a_write_torch_fails_its_own_way_stops_the_snapshots_saying_why_leaving_no_half_and_the_end_waits_not(
        tmp_path, monkeypatch):
    # torch's writer reports a file size limit or a quota as a RuntimeError ("unexpected pos"), not an OSError.
    def cut_short(state, file, **_):
        file.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1423360 vs 1423252")
    monkeypatch.setattr(torch, "save", cut_short)
    said: list[str] = []
    store = snapshot.Store(tmp_path / "s", say=said.append)
    assert store.take(1, lambda: {"step": 1})
    store._thread.join(timeout=10)
    store.take(2, lambda: {"step": 2})
    closing = threading.Thread(target=store.close, daemon=True)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive(), "the run's end waits for a writer that is gone"
    assert said == [f"snapshots stopped: [enforce fail at inline_container.cc:672] . unexpected pos 1423360 vs "
                    f"1423252 writing a snapshot in {tmp_path / 's'}; resumes use the disk checkpoints"]
    assert list((tmp_path / "s").iterdir()) == [], "a half-written snapshot is left in node memory"


def test_clearing_removes_only_the_snapshots_and_the_folder_if_that_empties_it(tmp_path):
    store = snapshot.Store(tmp_path / "s")
    store.take(5, lambda: {"step": 5})
    store.close()
    (store.folder / ".tmp-step00000006").mkdir()
    (store.folder / "notes.txt").write_text("not ours")
    store.clear()
    assert [p.name for p in store.folder.iterdir()] == ["notes.txt"]
    (store.folder / "notes.txt").unlink()
    store.clear()
    assert not store.folder.exists()


def test_clearing_leaves_a_link_where_the_folder_should_be_alone(tmp_path):
    target = tmp_path / "elsewhere"
    (target / "step00000001").mkdir(parents=True)
    Path(tmp_path / "s").symlink_to(target)
    snapshot.Store(tmp_path / "s").clear()
    assert (target / "step00000001").is_dir()


def test_a_captured_state_is_a_copy_that_later_steps_do_not_change_and_restores_exactly():
    torch.manual_seed(0)
    engine = TorchEngine(ConvNet(), backend="ddp", device=torch.device("cpu"), precision="fp32", lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    engine.train_step(x, y)
    captured = engine.capture({"step": 1})
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.train_step(x, y)
    assert captured["step"] == 1 and "rng" in captured
    assert torch.equal(captured["model"]["conv1.weight"], weights["conv1.weight"])
    assert engine.restore(captured) == {"step": 1}
    assert all(torch.equal(v, weights[k]) for k, v in engine.module.state_dict().items())
    after_restore = engine.train_step(x, y)
    engine.restore(captured)
    assert torch.equal(engine.train_step(x, y), after_restore)


def test_a_folder_another_user_could_have_made_is_neither_written_nor_read_nor_cleared(tmp_path):
    # In shared tmpfs the name may be taken first: a link to this user's own checkpoints (whose older steps a
    # prune would delete), or a folder with a snapshot whose unpickling runs code.
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (checkpoints / f"step{step:08d}").mkdir(parents=True)
    (tmp_path / "s").symlink_to(checkpoints)
    said: list[str] = []
    store = snapshot.Store(tmp_path / "s", say=said.append)
    assert store.take(4, lambda: {"step": 4})
    store.close()
    assert "not a folder of this user's alone" in said[0]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step00000001", "step00000002", "step00000003"]
    writable = tmp_path / "open"
    good = snapshot.Store(writable)
    good.take(5, lambda: {"step": 5})
    good.close()
    assert snapshot.step_of(good.newest()) == 5
    writable.chmod(0o777)  # anyone may put a snapshot there
    assert good.newest() is None


def test_snapshots_are_persisted_to_the_checkpoints_in_the_background_and_load_as_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    engine = TorchEngine(ConvNet(), backend="ddp", device=torch.device("cpu"), precision="fp32", lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    checkpoints = tmp_path / "run" / "checkpoints"
    store = snapshot.Store(tmp_path / "s", persist=snapshot.Persist(checkpoints, every_s=1e-6))
    engine.train_step(x, y)
    store.take(1, lambda: engine.capture({"step": 1}))
    store.close()
    after = engine.train_step(x, y)
    persisted = newest(checkpoints)
    assert persisted.name == "step00000001" and (persisted / MANIFEST).is_file()
    assert not list(persisted.glob("rng*")), "one RNG state, in the state, stands for every rank"
    assert engine.read(persisted, rank=3) == {"step": 1}
    assert torch.equal(engine.train_step(x, y), after)


def test_a_step_the_loop_already_saved_is_not_persisted_again_and_after_the_first_none_before_its_interval(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoint.save(checkpoints, 20, rank=0, write=lambda staging, tag: (staging / tag / "own.pt").write_text("x"))
    store = snapshot.Store(tmp_path / "s", persist=snapshot.Persist(checkpoints, every_s=1e-6))
    store.take(20, lambda: {"step": 20})
    store.close()
    assert [p.name for p in checkpoints.iterdir()] == ["step00000020"]
    assert (checkpoints / "step00000020" / "own.pt").is_file()
    later = snapshot.Store(tmp_path / "s2", persist=snapshot.Persist(checkpoints, every_s=3600))
    later.take(30, lambda: {"step": 30})
    later.close()
    assert newest(checkpoints).name == "step00000030", "the first snapshot is persisted at once"
    later.take(40, lambda: {"step": 40})
    later.close()
    assert newest(checkpoints).name == "step00000030"


def test_when_persisting_fails_it_stops_saying_why_and_the_snapshots_go_on(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    said: list[str] = []
    store = snapshot.Store(tmp_path / "s", say=said.append,
                           persist=snapshot.Persist(tmp_path / "checkpoints", every_s=1e-6))
    store.take(1, lambda: {"step": 1})
    store.close()
    assert len(said) == 1 and "no longer persisted" in said[0] and "disk checkpoints go on" in said[0]
    assert store.take(2, lambda: {"step": 2})
    store.close()
    assert snapshot.step_of(store.newest()) == 2 and store.error is None
