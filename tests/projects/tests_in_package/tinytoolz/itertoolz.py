"""A package that ships its tests inside it, in tinytoolz/tests/ (as toolz does)."""

__all__ = ["first", "last", "take"]


def first(seq):
    return next(iter(seq))


def last(seq):
    item = None
    for item in seq:
        pass
    return item


def take(n, seq):
    out = []
    for item in seq:
        if len(out) >= n:
            break
        out.append(item)
    return out
