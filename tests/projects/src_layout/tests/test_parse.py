import pytest

from inipkg import parse_line, split_pairs


def test_parse_line():
    assert parse_line("a = 1") == ("a", "1")


def test_parse_line_without_equals():
    with pytest.raises(ValueError):
        parse_line("nothing")


def test_split_pairs_skips_comments_and_blank_lines():
    assert split_pairs("# c\n\na=1\nb = 2\n") == [("a", "1"), ("b", "2")]
