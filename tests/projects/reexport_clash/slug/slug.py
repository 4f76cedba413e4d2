"""`slug/__init__.py` re-exports this module's names, so `slug.slug` is the function, not
this module (as python-slugify's `slugify.slugify`)."""

import re

__all__ = ["slug", "smart_truncate"]


def slug(text, separator="-"):
    words = re.findall(r"[a-z0-9]+", text.lower())
    return separator.join(words)


def smart_truncate(text, max_length=0):
    if not max_length or len(text) <= max_length:
        return text
    return text[:max_length].rsplit(" ", 1)[0]
