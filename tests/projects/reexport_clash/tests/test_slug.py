from slug import slug, smart_truncate


def test_slug():
    assert slug("This is a test ---") == "this-is-a-test"
    assert slug("Hello World", separator="_") == "hello_world"


def test_smart_truncate():
    assert smart_truncate("one two three", 9) == "one two"
    assert smart_truncate("short") == "short"
