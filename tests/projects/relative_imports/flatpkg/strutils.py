"""A flat package whose modules import each other relatively (as boltons does)."""

from .typeutils import make_sentinel

_MISSING = make_sentinel()


def pluralize(word, count=_MISSING):
    if count is not _MISSING and count == 1:
        return word
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + "s"


def strip_prefix(text, prefix):
    return text[len(prefix):] if text.startswith(prefix) else text
