"""A very large module re-exported by its package (as more-itertools' more.py): the copy
helper appends generated functions until it is as long as the issue's 5,600 lines."""


def chunked(seq, n):
    seq = list(seq)
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def flatten(nested):
    return [item for part in nested for item in part]
