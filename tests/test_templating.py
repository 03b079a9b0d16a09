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


def _render(tmp_path, text: str, value: str) -> str:
    (tmp_path / "t.j2").write_text(text)
    env = templating.environment((str(tmp_path),))
    return templating.render_template(env, "t.j2", {"value": value})


@pytest.mark.parametrize("text", [
    "{{ value | safe }}",
    '{{ "x" | q ~ value }}',
    '{{ "x" | q + value }}',
    '{{ "%s" | q | format(value) }}',
    '{{ ["a" | q, value] | join(" ") }}',
    '{{ "cat <" ~ value | q }}',
])
def test_a_raw_value_joined_to_quoted_text_fails_the_render_never_arrives_unquoted_or_html_escaped(
        tmp_path, text: str) -> None:
    with pytest.raises(templating.RenderError, match="unquoted"):
        _render(tmp_path, text, "a;touch PWNED<")


def test_quoted_text_joins_plain_tokens_and_macros_still_count_as_quoted(tmp_path) -> None:
    text = '{% macro m(v) %}run {{ v | q }}{% endmacro %}{{ value | q + "/x" }} {{ m(value) }}'
    assert _render(tmp_path, text, "a b") == "'a b'/x run 'a b'"


@pytest.mark.parametrize("broken,words", [
    ("{% macro m() %}\n{{ nosuch }}{% endmacro %}", ["'nosuch' is undefined", "lib.j2:2"]),
    ("{% macro m() %}\n{% if %}{% endmacro %}", ["Expected an expression", "lib.j2:2"]),
    ('{% macro m() %}{% include "gone.j2" %}{% endmacro %}', ["gone.j2", "no template directory holds"]),
])
def test_a_broken_template_is_named_where_it_breaks_with_what_to_do(tmp_path, broken: str, words: list[str]) -> None:
    # t.j2 renders fine itself: the fault is in lib.j2, which it imports; that is the file to fix.
    (tmp_path / "lib.j2").write_text(broken)
    with pytest.raises(templating.RenderError) as refused:
        _render(tmp_path, '{% from "lib.j2" import m %}{{ m() }}', "x")
    message = str(refused.value)
    assert all(word in message for word in [*words, str(tmp_path)]) and "fix" in message and "\n" not in message
