"""hpc.templating: the filters that quote each value for its place in a script."""

from __future__ import annotations

import pytest

from hpc import templating


def test_sbatch_filter_quotes_for_sbatch() -> None:
    assert templating.sbatch_quote("n[1-2]") == "n[1-2]"
    assert templating.sbatch_quote('a "b"\\c') == '"a \\"b\\"\\\\c"'
    with pytest.raises(templating.RenderError):
        templating.sbatch_quote("a\nb")


def test_comment_filter_keeps_a_comment_on_one_line() -> None:
    assert templating.comment("a\nb\rc\u2028d\x1b") == "a\\nb\\rc\\u2028d\\x1b"
