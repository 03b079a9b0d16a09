"""Specifications of hpc/checkpoints.py: which checkpoints and DeepSpeed snapshot parts are whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc import checkpoints


def test_the_newest_step_whose_every_deepspeed_part_some_node_holds_is_chosen():
    offers = [{"part-0-of-2": [10, 20], "part-1-of-2": [10, 20]},  # node 0: its own and node 1's copy
              {}]  # node 1's memory is gone (a spare holds nothing)
    assert checkpoints.newest_whole(offers) == (20, ["part-0-of-2", "part-1-of-2"])
    # Node 0 died before passing step 30 on: step 30 has no part 0 anywhere.
    offers = [{}, {"part-1-of-2": [20, 30], "part-0-of-2": [20]}]
    assert checkpoints.newest_whole(offers)[0] == 20
    assert checkpoints.newest_whole([{"part-0-of-2": [10]}, {}]) == (None, [])
    # An earlier layout (before an elastic relaunch) and the current one: the newest whole step wins.
    offers = [{"part-0-of-1": [40], "part-0-of-2": [30], "part-1-of-2": [30]}]
    assert checkpoints.newest_whole(offers) == (40, ["part-0-of-1"])


def publish(folder: Path, step: int) -> None:
    """A complete checkpoint of one file at ``step`` in ``folder``."""
    (folder / checkpoints.name_for(step)).mkdir(parents=True)
    (folder / checkpoints.name_for(step) / "x.pt").write_bytes(b"x")
    checkpoints.write_manifest(folder / checkpoints.name_for(step), step)


def test_a_resume_from_disk_starts_at_the_newer_of_the_checkpoint_and_the_parts_every_node_persisted(tmp_path):
    assert checkpoints.resumable_step(tmp_path) is None
    publish(tmp_path, 20)
    publish(tmp_path / checkpoints.PARTS / "part-0-of-2", 30)
    assert checkpoints.resumable_step(tmp_path) == 20, "part 1 of step 30 was never persisted"
    publish(tmp_path / checkpoints.PARTS / "part-1-of-2", 30)
    assert checkpoints.resumable_step(tmp_path) == 30
    (tmp_path / checkpoints.PARTS / "part-1-of-2" / "step00000030" / "x.pt").write_bytes(b"")  # truncated since
    assert checkpoints.resumable_step(tmp_path) == 20


@pytest.mark.parametrize("manifest", ['{"files": []}', '{"files": null}', '{"files": {"x.pt": 1}}',
                                      '{"files": {"x.pt": {}}}', '{"files": {"x.pt": {"size": "1", "sha256": 2}}}',
                                      '{"files": {"x.pt": {"size": true, "sha256": "0"}}}'])
def test_a_manifest_of_the_wrong_shape_makes_its_checkpoint_damaged_and_the_one_before_is_resumed(tmp_path,
                                                                                                 manifest):
    for step in (10, 20):
        publish(tmp_path, step)
    (tmp_path / "step00000020" / checkpoints.MANIFEST).write_text(manifest)
    assert checkpoints.damage(tmp_path / "step00000020") == (
        f"unreadable {checkpoints.MANIFEST} (its files are not names with a size and a SHA-256)")
    assert checkpoints.newest(tmp_path).name == "step00000010"
    assert checkpoints.resumable_step(tmp_path) == 10


@pytest.mark.parametrize("outside", ["../step00000010/x.pt", "{root}/step00000010/x.pt", "sub/../../step00000010/x.pt"])
def test_a_manifest_naming_a_file_outside_its_checkpoint_makes_it_damaged_and_the_one_before_is_resumed(tmp_path,
                                                                                                      outside):
    for step in (10, 20):
        publish(tmp_path, step)
    newer = tmp_path / "step00000020"
    # step 20's own file torn, its manifest vouching for step 10's intact one instead
    (newer / "x.pt").write_bytes(b"")
    listed = json.loads((tmp_path / "step00000010" / checkpoints.MANIFEST).read_text())["files"]["x.pt"]
    name = outside.format(root=tmp_path)
    (newer / checkpoints.MANIFEST).write_text(json.dumps({"step": 20, "files": {name: listed}}))
    assert checkpoints.damage(newer) == f"{checkpoints.MANIFEST} names {name}, outside its folder"
    assert checkpoints.newest(tmp_path).name == "step00000010"
    assert checkpoints.resumable_step(tmp_path) == 10


def test_a_step_saved_again_and_killed_between_its_two_renames_resumes_from_the_copy_it_moved_aside(tmp_path):
    for step in (10, 20):
        publish(tmp_path, step)
    # Saving step 20 again moves the published one to .old-step00000020, then renames the new one in: killed between.
    (tmp_path / "step00000020").rename(tmp_path / ".old-step00000020")
    assert checkpoints.resumable_step(tmp_path) == 20
    assert checkpoints.replaced(tmp_path) == [tmp_path / ".old-step00000020"]
    publish(tmp_path, 20)  # the save that was killed, finished: its copy is no longer the step's checkpoint
    assert checkpoints.replaced(tmp_path) == []


def test_a_step_that_does_not_verify_beside_the_complete_copy_its_second_save_moved_aside_resumes_from_the_copy(
        tmp_path):
    for step in (10, 20):
        publish(tmp_path, step)
    # Saving step 20 again: the published one moved aside, the new one renamed in, then killed before the copy's
    # removal, and the new one's file lost since.
    (tmp_path / "step00000020").rename(tmp_path / ".old-step00000020")
    publish(tmp_path, 20)
    (tmp_path / "step00000020" / "x.pt").write_bytes(b"")
    assert checkpoints.replaced(tmp_path) == [tmp_path / ".old-step00000020"]
    assert checkpoints.resumable_step(tmp_path) == 20
