import bigmod


def test_chunked_and_flatten():
    assert bigmod.chunked([1, 2, 3], 2) == [[1, 2], [3]]
    assert bigmod.flatten([[1], [2, 3]]) == [1, 2, 3]


def test_generated_functions():
    assert bigmod.offset_7(1) == 8
