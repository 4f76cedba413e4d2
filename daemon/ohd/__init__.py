"""ohd: a local daemon that does development chores with LLMs in the background."""

__version__ = "0.1.0"
