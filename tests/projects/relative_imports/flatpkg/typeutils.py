def make_sentinel(name="_MISSING"):
    class Sentinel:
        def __repr__(self):
            return name

        def __bool__(self):
            return False

    return Sentinel()
