"""Specifications of hpc.shown: values from files and ranks shown on a terminal or in Markdown, never as they came."""

from __future__ import annotations

from hpc import shown


def test_a_value_is_its_ascii_repr_cut_short():
    assert shown.value("gpu\x1b[2J") == "'gpu\\x1b[2J'"
    assert shown.value("x" * 100, limit=10) == "'xxxxxxxxx..."


def test_a_line_makes_escapes_visible_and_a_block_keeps_its_newlines():
    assert shown.line("a\rb\x1b[K") == "a\\rb\\x1b[K"
    assert shown.block("one\ntwo\x07") == "one\ntwo\\x07"


def test_aligned_pads_each_column_to_its_widest_cell_and_right_aligns_the_numbered_ones():
    assert shown.aligned([("name", "n"), ("a", "10"), ("bbb", "7")], right={1}) == [
        "name   n", "a     10", "bbb    7"]


def test_markdown_escapes_a_pipe_in_a_cell_and_right_aligns_the_numbered_columns():
    assert shown.markdown([("config", "images/s"), ("ddp|zero", "812")], right={1}) == [
        "| config | images/s |", "|---|---:|", "| ddp\\|zero | 812 |"]


def test_a_number_is_formatted_and_an_absent_one_is_a_dash_or_the_word_asked_for():
    assert shown.number(0.12345, ".3f") == "0.123" and shown.number(1234, "d") == "1234"
    assert shown.number(None, ".3f") == "-" and shown.number(None, ".1f", "missing") == "missing"
