"""Show a value that came from a file, an argument or a rank on a terminal: escaped, cut short, never a file's body.

    value(x)                           # its repr, ASCII only, at most 60 characters
    number(0.1234, ".3f")              # "0.123"; "-" for an absent number
    unknown_keys(keys, valid)          # "2 unknown key(s), the first 'x'; valid keys: a, b"
    line(text)                         # one printable line: escapes and control characters made visible
    aligned([header, *rows])           # a table's lines, its columns aligned
    markdown([header, *rows])          # the same as a GitHub-flavoured Markdown table
"""

from __future__ import annotations

from typing import Any, Container, Iterable, Sequence


def value(x: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, ASCII only, cut short."""
    text = ascii(x)
    return text if len(text) <= limit else text[:limit] + "..."


def number(x: float | None, spec: str, absent: str = "-") -> str:
    """A number as ``format(x, spec)`` makes it, ``absent`` where there is none."""
    return absent if x is None else format(x, spec)


def unknown_keys(keys: Iterable[Any], valid: Iterable[str]) -> str:
    """The count of ``keys`` and the first (in file order), never all of them: a file that is not YAML of
    ours (a password file read as a profile) would otherwise be printed line by line."""
    keys = list(keys)
    first = keys[0] if keys else ""
    return f"{len(keys)} unknown key(s), the first {value(first, 40)}; valid keys: {', '.join(valid)}"


def line(text: Any, limit: int = 500) -> str:
    """``text`` as one line a terminal shows as it is: every non-printable character (an escape sequence,
    a newline, a carriage return) written as its Python escape; cut at ``limit`` characters."""
    text = str(text)
    out = text if text.isprintable() else "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


def block(text: Any) -> str:
    """Lines for a terminal: each as ``line`` makes it (no cut), the newlines between them kept."""
    return "\n".join(line(part, limit=1 << 30) for part in str(text).split("\n"))


def aligned(rows: Iterable[Sequence[str]], right: Container[int] = ()) -> list[str]:
    """Rows of cells as lines of a table: each column as wide as its widest cell, two blanks between columns, a cell
    left-aligned (right-aligned in the columns numbered in ``right``), no blank at a line's end."""
    rows = list(rows)
    widths = [max(map(len, column)) for column in zip(*rows)]
    pads = [str.rjust if i in right else str.ljust for i in range(len(widths))]
    return ["  ".join(pad(cell, w) for pad, cell, w in zip(pads, row, widths)).rstrip() for row in rows]


def markdown(rows: Iterable[Sequence[str]], right: Container[int] = ()) -> list[str]:
    """Rows of cells, the first the header, as the lines of a GitHub-flavoured Markdown table: the columns numbered
    in ``right`` right-aligned, a ``|`` inside a cell escaped (a label may hold one)."""
    header, *body = rows

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
    return [row(header), rule, *map(row, body)]
