"""Read a file that a job, a sweep or hpcdist wrote, whatever damage it took: bounded, unfollowed, non-blocking."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import json
import math
import os
import stat
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

# Job-directory files are small (a heartbeat is ~1 KB, attempts.jsonl a line per attempt); more is damage.
MAX_BYTES = 16 * 2**20
# Deeper than any file hpcdist writes (summary.json is 3 levels): a bound far below Python's recursion limit.
MAX_DEPTH = 32
# A single path component: Linux's NAME_MAX, in bytes.
MAX_NAME_BYTES = 255


class Damaged(ValueError):
    """A file that is there but cannot be read as what it should be; the message is one line naming it and
    what is wrong, for the caller to add what to do."""


def open_regular(path: Path, follow: bool = False) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; FileNotFoundError when it is not there, Damaged
    for a directory, a FIFO, a device or, unless ``follow`` (a file a person keeps), a symbolic link."""
    try:
        # O_NOFOLLOW: a job directory's file pointing at /etc is damage, not an invitation; O_NONBLOCK: a FIFO
        # put where a file belongs must not hang the reader (regular files ignore the flag).
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        fd = os.open(path, flags)
    except ValueError:  # a NUL byte in the name: no file can be called that
        raise Damaged(f"{str(path)!r} cannot be a file name (it holds a NUL byte)") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        if exc.errno == errno.ELOOP:
            raise Damaged(f"{path} is a symbolic link, not a file") from None
        raise Damaged(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a device or socket"
        raise Damaged(f"{path} is {kind}, not a file")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int = MAX_BYTES, tail: bool = False, follow: bool = False) -> bytes:
    """The file's bytes, or its last ``limit`` bytes with ``tail``; FileNotFoundError when it is not there,
    Damaged for what open_regular refuses or (without ``tail``) a file over ``limit``."""
    with open_regular(path, follow) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit and not tail:
                raise Damaged(f"{path} is {size} bytes, over the {limit} a file like it can be")
            start = max(size - limit, 0)
            f.seek(start)
            # In pieces no larger than the file (or 64 KiB past its end): one read(limit) allocates the whole
            # limit first, 16 MiB for each 5 KB node file. A file still growing is read until the bound.
            data = f.read(min(size - start, limit))
            while len(data) < limit and (more := f.read(min(limit - len(data), 65536))):
                data += more
            return data
        except OSError as exc:
            raise Damaged(f"cannot read {path}: {exc.strerror or exc}") from None


def read_text(path: Path, limit: int = MAX_BYTES, follow: bool = False) -> str:
    """The file as strict UTF-8 text; Damaged for bytes that are not (a torn write, a foreign file)."""
    data = read_bytes(path, limit, follow=follow)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Damaged(f"{path} is not UTF-8 text (byte {exc.start})") from None


def tail_text(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a log (a log may hold anything: bad bytes are replaced); "" if unreadable."""
    try:
        return read_bytes(path, limit, tail=True).decode(errors="replace")
    except (OSError, Damaged):
        return ""


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _int64(text: str) -> int | None:
    # hpcdist writes no integer beyond 64 bits; a larger one cannot even become a float for a table or a chart.
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


# Unix times no clock running hpcdist gives (none, or before 1970, or past 2106): a made-up time is absent, so that no
# reader turns it into an age of 56 years, a phase of 10^300 seconds, a goodput of NaN, or a rank never stale.
CLOCK = (0.0, 2.0**32)


def unix_time(value: float | int | None) -> float | None:
    """``value`` as a time a clock could have stamped (inside CLOCK), else None."""
    return float(value) if value is not None and CLOCK[0] < value < CLOCK[1] else None


def count(text: str) -> int | None:
    """``text`` as a count (ASCII digits, at most nine), else None: str.isdigit() also passes "²", which int()
    refuses, int() itself takes "1_0" and "٣", and a count of thousands of digits int() refuses too."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def depth(value: Any) -> int:
    """How deeply lists and mappings nest in ``value`` (a scalar is 0); iterative, so no depth can overflow."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str) -> Any:
    """JSON as hpcdist writes it, nested at most MAX_DEPTH (ValueError otherwise); a number that is not finite
    (NaN, Infinity, 1e400) or an integer beyond 64 bits reads as null, so that a reader takes that field as
    absent and keeps the rest."""
    try:
        value = json.loads(text, parse_constant=lambda name: None, parse_float=_finite, parse_int=_int64)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if depth(value) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def read_json(path: Path, limit: int = MAX_BYTES) -> Any:
    """The JSON value in ``path``; FileNotFoundError when absent, Damaged for anything that is not such JSON."""
    text = read_text(path, limit)
    try:
        return loads(text)
    except ValueError as exc:
        raise Damaged(f"{path} is not a JSON file hpcdist wrote ({str(exc).splitlines()[0][:80]})") from None


def json_object(path: Path, limit: int = MAX_BYTES) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is absent or damaged (a reader may race its writer)."""
    try:
        data = read_json(path, limit)
    except (OSError, Damaged):
        return None
    return data if isinstance(data, dict) else None


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines text, one a line; a torn or foreign line is skipped."""
    out = []
    for line in text.splitlines():
        try:
            data = loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def lines_of(path: Path, limit: int = MAX_BYTES) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; [] when it is absent or damaged as a whole. Of a file over ``limit``
    only the newest lines are read (the first, likely cut, line is dropped)."""
    try:
        data = read_bytes(path, limit, tail=True)
    except (OSError, Damaged):
        return []
    if len(data) == limit:
        data = data.partition(b"\n")[2]
    return json_lines(data.decode("utf-8", errors="replace"))


def is_a(value: Any, kind: Any) -> bool:
    """``value`` has JSON type ``kind`` (str, int, float, bool, or ``X | None``): bool is no int, int is a float."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(is_a(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def well_typed(data: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the fields of ``schema`` whose value has another type: an unreadable field is absent."""
    return {k: v for k, v in data.items() if k not in schema or is_a(v, schema[k])}


def typed(cls: type, data: Mapping[str, Any]) -> Any:
    """A frozen dataclass from a file's mapping, every field given having its declared type; unknown keys are
    ignored (a newer hpcdist may add some). TypeError naming the first field that does not fit."""
    hints = typing.get_type_hints(cls)
    values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    wrong = next((k for k, v in values.items() if not is_a(v, hints[k])), None)
    if wrong is not None:
        raise TypeError(f"{wrong} is {type(values[wrong]).__name__}, not {hints[wrong]}")
    return cls(**values)


def folder(path: Path, pattern: str = "*", most: int = 100_000) -> list[Path]:
    """Entries of a job directory's folder matching ``pattern`` (at most ``most``); [] when ``path`` is not a
    real folder: a symbolic link there (to /etc, say) is damage, never followed."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            return []
        return list(itertools.islice(path.glob(pattern), most))
    except OSError:
        return []


@contextlib.contextmanager
def kept(many: bool = True) -> Iterator[None]:
    """A block that parses ``many`` values the process keeps (4,096 nodes' heartbeats): the garbage collector's
    passes over 32,768 beats were 0.4 s of ``top``'s 2.1 s and 0.7 s of ``report``'s. So none while parsing (JSON
    makes no reference cycles) and none over what it made after (gc.freeze); what an earlier block froze is
    collected first, so a process that reads again and again (``top``, ``submit --wait``) keeps no garbage frozen.
    A few values are parsed as anything else is."""
    if not many:
        yield
        return
    gc.unfreeze()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


def name_too_long(path: str) -> bool:
    """Whether some component of ``path`` is longer than a file name can be (the OS would say ENAMETOOLONG)."""
    return any(len(part.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES for part in str(path).split("/"))


def check_name(name: str, what: str) -> str:
    """``name`` unchanged if every path component of it fits the filesystem; ValueError naming ``what``."""
    if name_too_long(name):
        raise ValueError(f"{what} {str(name)[:40]!r}... has a name longer than {MAX_NAME_BYTES} bytes, more than "
                         "a file name can be; give a shorter one")
    return name
