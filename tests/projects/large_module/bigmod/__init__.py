from .more import *  # noqa: F401,F403
