from flatpkg import strutils
from flatpkg.typeutils import make_sentinel


def test_pluralize():
    assert strutils.pluralize("city") == "cities"
    assert strutils.pluralize("cat") == "cats"
    assert strutils.pluralize("cat", 1) == "cat"


def test_strip_prefix():
    assert strutils.strip_prefix("prefix-name", "prefix-") == "name"
    assert strutils.strip_prefix("name", "prefix-") == "name"


def test_sentinel_is_falsy():
    assert not make_sentinel("X") and repr(make_sentinel("X")) == "X"
