"""hpcdist's writers never follow a link: atomic replaces, no-follow appends, folders made below a root."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hpc import fileio


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("keep\n")
    return path


def test_atomic_write_replaces_a_link_instead_of_writing_through_it(tmp_path: Path, secret: Path) -> None:
    (tmp_path / "out").symlink_to(secret)
    fileio.atomic_write(tmp_path / "out", "new\n")
    assert secret.read_text() == "keep\n"
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out").read_text() == "new\n"


def test_atomic_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("old\n")
    with pytest.raises(TypeError):
        fileio.atomic_write(tmp_path / "out", 42)  # type: ignore[arg-type]
    assert (tmp_path / "out").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_makes_scripts_executable(tmp_path: Path) -> None:
    fileio.atomic_write(tmp_path / "a.sh", "true\n", executable=True)
    assert os.access(tmp_path / "a.sh", os.X_OK)


def test_append_line_refuses_a_link(tmp_path: Path, secret: Path) -> None:
    (tmp_path / "log").symlink_to(secret)
    with pytest.raises(OSError):
        fileio.append_line(tmp_path / "log", "x")
    assert secret.read_text() == "keep\n"
    fileio.append_line(tmp_path / "real", "a")
    fileio.append_line(tmp_path / "real", "b\n")
    assert (tmp_path / "real").read_text() == "a\nb\n"


WRITERS = {"open_own": lambda path: fileio.open_own(path, append=False).close(),
           "append_line": lambda path: fileio.append_line(path, "x")}  # the trainer's metrics; the registry


def test_a_line_appended_after_a_torn_last_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    """A last line without its newline (a crash mid-write, a hand edit) swallowed the next line appended: the
    registry's reader skips the damaged line, so the job submitted next went missing from list, status and
    cancel."""
    registry = tmp_path / "jobs.jsonl"
    registry.write_text('{"job_id": "1"}\n{"job_id": "2", "job_d')
    fileio.append_line(registry, '{"job_id": "3"}')
    fileio.append_line(registry, '{"job_id": "4"}')
    assert registry.read_text().splitlines()[-3:] == ['{"job_id": "2", "job_d', '{"job_id": "3"}', '{"job_id": "4"}']


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("kind", ["pipe", "folder"])
def test_open_own_refuses_a_pipe_or_a_folder_in_one_line_and_never_waits_for_a_reader(tmp_path: Path, kind,
                                                                                       writer) -> None:
    path = tmp_path / "metrics"
    os.mkfifo(path) if kind == "pipe" else path.mkdir()
    said: list[str] = []

    def open_it() -> None:
        with pytest.raises(fileio.UnsafePath) as err:
            WRITERS[writer](path)
        said.append(str(err.value))

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=10)
    waited = opener.is_alive()
    if waited:  # a reader lets the writer's open return
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    assert not waited, f"open_own waited for someone to read the {kind}"
    [message] = said
    assert message.startswith(f"{path} is no regular file") and "\n" not in message, message


def test_open_own_writes_a_file_of_its_own(tmp_path: Path) -> None:
    for append, text in ((False, "a\n"), (True, "b\n")):
        with fileio.open_own(tmp_path / "metrics", append=append) as f:
            f.write(text)
    assert (tmp_path / "metrics").read_text() == "a\nb\n"


def test_folder_never_goes_through_a_link_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "report").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(fileio.UnsafePath, match="symbolic link"):
        fileio.folder(tmp_path / "job", "report")
    (tmp_path / "job" / "file").write_text("")
    with pytest.raises(fileio.UnsafePath, match="not a directory"):
        fileio.folder(tmp_path / "job", "file", "x")
    assert fileio.folder(tmp_path / "job", "a", "b") == tmp_path / "job" / "a" / "b"
    assert (tmp_path / "job" / "a" / "b").is_dir() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_private_folder_is_made_closed_to_others_and_a_link_or_an_open_folder_is_refused(tmp_path):
    made = fileio.private(tmp_path / "shm" / "mine")
    assert made == tmp_path / "shm" / "mine" and (made.stat().st_mode & 0o777) == 0o700
    assert fileio.private(made) == made and fileio.is_private(made)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert fileio.private(tmp_path / "link") is None and not fileio.is_private(tmp_path / "link")
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    assert fileio.private(tmp_path / "open") is None
    (tmp_path / "file").write_text("x")
    assert fileio.private(tmp_path / "file") is None
    assert not fileio.is_private(tmp_path / "missing") and not (tmp_path / "missing").exists()
