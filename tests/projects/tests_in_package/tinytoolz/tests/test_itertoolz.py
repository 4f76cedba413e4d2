from tinytoolz import first, last, take


def test_first_and_last():
    assert first([1, 2, 3]) == 1
    assert last([1, 2, 3]) == 3


def test_take():
    assert take(2, iter([1, 2, 3])) == [1, 2]
    assert take(5, [1]) == [1]
