from .itertoolz import *  # noqa: F401,F403
