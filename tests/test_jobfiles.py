"""hpc.jobfiles and hpc.yamlfile's bounds: what a damaged file turns into, for every reader that uses them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc import jobfiles, yamlfile


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert jobfiles.read_bytes(tmp_path / "f") == b"abc"


def test_a_missing_file_is_file_not_found_not_damage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        jobfiles.read_bytes(tmp_path / "none")


@pytest.mark.parametrize("make, says", [
    (lambda p: p.symlink_to("/etc/passwd"), "symbolic link"),
    (lambda p: p.mkdir(), "a directory"),
    (os.mkfifo, "a pipe"),
])
def test_what_is_not_a_regular_file_is_damage_and_is_never_opened_for_its_content(tmp_path: Path, make, says) -> None:
    make(tmp_path / "f")
    with pytest.raises(jobfiles.Damaged, match=says):
        jobfiles.read_bytes(tmp_path / "f")


def test_a_device_is_damage() -> None:
    with pytest.raises(jobfiles.Damaged, match="device"):
        jobfiles.read_bytes(Path("/dev/zero"))


def test_a_file_over_the_bound_is_refused_before_it_is_read_and_its_tail_is_cut_to_the_bound(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    with pytest.raises(jobfiles.Damaged, match="over the 4"):
        jobfiles.read_bytes(tmp_path / "f", 4)
    assert jobfiles.read_bytes(tmp_path / "f", 4, tail=True) == b"6789"


def test_a_nul_byte_or_an_overlong_name_is_damage_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(jobfiles.Damaged, match="NUL"):
        jobfiles.read_bytes(Path(f"{tmp_path}/a\x00b"))
    with pytest.raises(jobfiles.Damaged, match="too long"):
        jobfiles.read_bytes(tmp_path / ("x" * 300))


def test_text_is_strict_utf8(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"ok \xff")
    with pytest.raises(jobfiles.Damaged, match="not UTF-8 text .byte 3"):
        jobfiles.read_text(tmp_path / "f")


def test_a_log_tail_replaces_bad_bytes_and_is_empty_for_what_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"a\xffb\nlast\n")
    assert jobfiles.tail_text(tmp_path / "log", 5) == "last\n"
    assert jobfiles.tail_text(tmp_path / "log", 100) == "a\ufffdb\nlast\n"
    os.mkfifo(tmp_path / "fifo")
    assert jobfiles.tail_text(tmp_path / "fifo", 100) == ""


@pytest.mark.parametrize("text", ["[" * 40 + "]" * 40, "[" * 100_000 + "]" * 100_000, '{"a": ', "\ud800"])
def test_json_nests_boundedly_and_whole(text: str) -> None:
    with pytest.raises(ValueError):
        jobfiles.loads(text)


def test_a_number_that_is_not_finite_or_beyond_64_bits_reads_as_absent() -> None:
    assert jobfiles.loads('{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e400, "e": 1.5}') == {
        "a": None, "b": None, "c": None, "d": None, "e": 1.5}
    assert jobfiles.loads(f"[{2**63}, {2**63 - 1}, {-(2**63)}]") == [None, 2**63 - 1, -(2**63)]


def test_json_as_hpcdist_writes_it_is_read_unchanged() -> None:
    assert jobfiles.loads('{"a": [1, 2.5, "x", null, true, {"b": -3e5}]}') == {
        "a": [1, 2.5, "x", None, True, {"b": -3e5}]}


def test_depth_counts_nesting_without_recursion() -> None:
    assert jobfiles.depth(1) == 0
    assert jobfiles.depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert jobfiles.depth(deep) > jobfiles.MAX_DEPTH


def test_a_json_file_is_an_object_or_none(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "torn.json").write_text('{"a": ')
    assert jobfiles.json_object(tmp_path / "ok.json") == {"a": 1}
    assert jobfiles.json_object(tmp_path / "list.json") is None
    assert jobfiles.json_object(tmp_path / "torn.json") is None
    assert jobfiles.json_object(tmp_path / "none.json") is None
    with pytest.raises(jobfiles.Damaged, match="torn.json is not a JSON file"):
        jobfiles.read_json(tmp_path / "torn.json")


def test_json_lines_keep_the_whole_objects_and_skip_the_rest() -> None:
    text = '{"a": 1}\n{"a": \n[1]\n\n{"a": 2}'
    assert jobfiles.json_lines(text) == [{"a": 1}, {"a": 2}]


def test_lines_of_a_file_over_the_bound_keep_its_newest_whole_lines(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(100)))
    rows = jobfiles.lines_of(tmp_path / "m.jsonl", 40)
    assert rows and rows[-1] == {"step": 99} and all(set(r) == {"step"} for r in rows)
    assert jobfiles.lines_of(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize("value, kind, fits", [
    (1, int, True), (True, int, False), (1.5, int, False), (1, float, True), (True, float, False),
    (None, int | None, True), ("2", int | None, False), ("x", str, True), ([1], list, True), ({}, list, False),
])
def test_is_a_takes_json_types_strictly(value, kind, fits) -> None:
    assert jobfiles.is_a(value, kind) is fits


def test_well_typed_drops_the_fields_of_the_wrong_type_and_keeps_unknown_ones() -> None:
    assert jobfiles.well_typed({"rank": "0", "step": 5, "new": [1]}, {"rank": int, "step": int}) == {
        "step": 5, "new": [1]}


@dataclass(frozen=True)
class _Line:
    name: str
    count: int = 1
    note: str | None = None


def test_typed_builds_a_value_or_names_the_field_that_does_not_fit() -> None:
    assert jobfiles.typed(_Line, {"name": "a", "count": 2, "extra": 1}) == _Line("a", 2)
    with pytest.raises(TypeError, match="count is str"):
        jobfiles.typed(_Line, {"name": "a", "count": "2"})


def test_folder_lists_a_real_folder_only_and_at_most_so_many(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / f"rank-{i}.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    (tmp_path / "file").write_text("")
    assert len(jobfiles.folder(tmp_path / "d", "rank-*.json")) == 5
    assert len(jobfiles.folder(tmp_path / "d", "rank-*.json", most=2)) == 2
    assert jobfiles.folder(tmp_path / "link") == [] and jobfiles.folder(tmp_path / "file") == []


def test_a_name_is_checked_per_component_in_bytes() -> None:
    assert not jobfiles.name_too_long("/a/" + "x" * 255)
    assert jobfiles.name_too_long("/a/" + "é" * 128)
    assert jobfiles.check_name("4242", "job id") == "4242"
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        jobfiles.check_name("x" * 256, "job id")


# ---- hpc.yamlfile's bounds ---------------------------------------------------------------------------

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("content, says", [
    (BOMB, "aliases expand to over"),
    ("a: " + "[" * 100 + "]" * 100, "nested deeper than 64"),
    ("a: " + "{b: " * 100 + "1" + "}" * 100, "nested deeper than 64"),
    (b"a: \xff\n", "not UTF-8"),
    ("a: 1\na: 2\n", "appears twice"),
])
def test_yaml_is_refused_in_one_line_before_objects_are_built(tmp_path: Path, content, says) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(yamlfile.YamlError, match=says) as caught:
        yamlfile.load(path, "sweep file")
    assert "\n" not in str(caught.value)


def test_yaml_over_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.touch()
    os.truncate(path, yamlfile.MAX_BYTES + 1)
    with pytest.raises(yamlfile.YamlError, match="over"):
        yamlfile.load(path, "job file")


def test_yaml_from_a_device_or_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(yamlfile.YamlError, match="device"):
        yamlfile.load(Path("/dev/zero"), "sweep file")
    with pytest.raises(yamlfile.YamlError, match="a directory"):
        yamlfile.load(tmp_path, "sweep file")


def test_yaml_a_person_links_to_is_followed_unless_hpcdist_wrote_it(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text("a: 1\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    assert yamlfile.load(tmp_path / "link.yaml", "cluster profile") == {"a": 1}
    with pytest.raises(yamlfile.YamlError, match="symbolic link"):
        yamlfile.load(tmp_path / "link.yaml", "sweep.yaml", follow=False)


def test_yaml_aliases_within_bounds_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("base: &b {x: 1}\nuse: {<<: *b, y: 2}\nlist: [*b, *b]\n")
    assert yamlfile.load(path, "job file") == {"base": {"x": 1}, "use": {"x": 1, "y": 2},
                                               "list": [{"x": 1}, {"x": 1}]}


def test_a_file_is_read_whole_or_its_tail_within_the_bound_at_any_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for size in (0, 1, 5000, 65535, 65536, 65537, 200_001):
        data = bytes(i % 251 for i in range(size))
        path.write_bytes(data)
        assert jobfiles.read_bytes(path) == data
        for limit in (1, 4096, 65536, 100_000):
            assert jobfiles.read_bytes(path, limit, tail=True) == data[-limit:]


def test_a_file_that_grew_after_it_was_measured_is_read_up_to_the_bound(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    real_fstat, calls = jobfiles.os.fstat, []

    def measured_before_it_grew(fd: int):
        st = real_fstat(fd)
        calls.append(fd)
        if len(calls) == 2:  # read_bytes measured it (open_regular did first): then it grows
            with open(path, "ab") as f:
                f.write(b"y" * 100_000)
        return st
    monkeypatch.setattr(jobfiles.os, "fstat", measured_before_it_grew)
    assert jobfiles.read_bytes(path, limit=70_000, tail=True) == b"x" * 10 + b"y" * 69_990


def test_values_kept_are_frozen_out_of_the_collectors_way_and_the_collector_is_left_as_found() -> None:
    import gc

    try:
        with jobfiles.kept():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
        gc.disable()
        with jobfiles.kept():
            pass
        assert not gc.isenabled()
        gc.enable()
        with jobfiles.kept(many=False):
            assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_garbage_frozen_by_an_earlier_block_is_collected_by_the_next(tmp_path: Path) -> None:
    import gc
    import weakref

    class Cycle:
        pass

    try:
        with jobfiles.kept():
            cycle = Cycle()
            cycle.me = cycle
            alive = weakref.ref(cycle)
        del cycle
        assert alive() is not None  # frozen: no pass looks at it
        with jobfiles.kept():
            pass
        assert alive() is None
    finally:
        gc.enable()
        gc.unfreeze()


@pytest.mark.parametrize("written, read", [("2:00:00", "2:00:00"), ("1:30", "1:30"), ("1:30.5", "1:30.5"),
                                           ("90", 90), ("1.5", 1.5), ("'1:30'", "1:30")])
def test_yaml_reads_an_unquoted_time_as_the_text_written_not_as_a_base_60_number(tmp_path: Path, written,
                                                                                  read) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(f"time: {written}\n")
    assert yamlfile.load(path, "cluster profile") == {"time": read}
