"""A src/ layout package (as iniconfig, tomli, packaging): importable only with src/ on the path."""

from inipkg.parse import parse_line, split_pairs

__all__ = ["parse_line", "split_pairs"]
