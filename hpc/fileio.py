"""Write the files hpcdist owns without ever following a link: atomic replaces, no-follow appends, own folders.

    atomic_write(path, text)        # a temporary file beside ``path``, then renamed over it
    append_line(path, line)         # one O_APPEND write; a link at ``path`` is refused, not followed
    open_own(path, append=False)    # a file kept open for writing (the trainer's metrics); a link or pipe is refused
    folder(root, "report")          # root/report as a real directory below root, never through a link
    private(folder)                 # a folder in shared tmpfs that is this user's alone, or None
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, TextIO


class UnsafePath(OSError):
    """A path hpcdist was to write through is a link or not a directory; one line naming it."""


def folder(root: Path, *parts: str) -> Path:
    """``root/parts...`` created as needed, each part a real directory: a link or a file there is refused,
    so nothing below ``root`` can send a write elsewhere."""
    path = Path(root)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafePath(f"{path} is a symbolic link; hpcdist writes only inside the directory it was given: "
                             "remove the link")
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise UnsafePath(f"{path} exists and is not a directory; move it away") from None
    return path


def private(path: Path) -> Path | None:
    """``path`` made (0700) if missing, and returned if it is a real folder of this user's that nobody else may
    write; None otherwise. In shared tmpfs (/dev/shm) anyone can make a name first: a link to this user's own
    files, or a folder where another user reads what is written or puts what is read."""
    try:
        Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(path) if is_private(path) else None


def is_private(path: Path) -> bool:
    """Whether ``path`` is a real folder of this user's that nobody else may write (a reader's check: makes nothing)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def atomic_write(path: Path, data: str | bytes, *, executable: bool = False, durable: bool = False) -> None:
    """``path`` holds ``data`` whole or keeps what it held: written to a new file beside it, then renamed over
    it. A link at ``path`` is replaced, never written through; the temporary file is gone on failure.
    ``durable``: on disk before the rename (a checkpoint's manifest must not name bytes a crash can lose)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path: Path, line: str) -> None:
    """Add ``line`` (and a newline) in one write to an O_APPEND file, so concurrent writers' lines stay
    whole; what ``open_own`` refuses at ``path`` is refused. After a torn last line (a crash mid-write, a hand
    edit) the line starts one of its own: glued to the torn one, readers would skip it with it."""
    with open_own(path, append=True) as f:
        f.write(("" if _ends_a_line(path, os.fstat(f.fileno()).st_size) else "\n") + line.rstrip("\n") + "\n")


def _ends_a_line(path: Path, size: int) -> bool:
    """Whether a file of ``size`` bytes is empty or ends with a newline (open_own found it a regular file)."""
    if size == 0:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # writable but not readable: the line goes on as it always did
        return True
    try:
        return os.pread(fd, 1, size - 1) == b"\n"
    finally:
        os.close(fd)


def open_own(path: Path, *, append: bool) -> TextIO:
    """``path`` open for writing, emptied first unless ``append``; a link, a pipe, a device or a folder at ``path`` is
    refused (UnsafePath), never written through nor waited on."""
    # O_NONBLOCK: a pipe's open for writing would wait for a reader; a regular file ignores the flag.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_APPEND if append else os.O_TRUNC)
    foreign = f"{path} is no regular file; hpcdist writes only a file of its own there: remove it"
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; hpcdist writes only inside the directory it was given: "
                             "remove the link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a pipe nobody reads; a folder
            raise UnsafePath(foreign) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(foreign)
    return os.fdopen(fd, "a" if append else "w")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, never a display), imported when a chart is drawn: half
    a second that no other command pays."""
    import matplotlib

    matplotlib.use("Agg")
    # Labels are data (a sweep's values, a directory's name): a `$...$` in one is text, never TeX to parse or fail on.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG at ``path`` (see ``atomic_write``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())
