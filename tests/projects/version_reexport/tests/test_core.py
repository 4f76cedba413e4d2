import pytest

import verpkg as v


def test_round_trip():
    assert v.decode(v.encode("abc")) == "abc"


def test_wrong_types():
    with pytest.raises(ValueError):
        v.encode(b"abc")
    with pytest.raises(ValueError):
        v.decode("abc")


def test_version():
    assert v.__version__ == "3.10"
