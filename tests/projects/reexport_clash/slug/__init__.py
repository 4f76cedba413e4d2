from .slug import *  # noqa: F401,F403
from .__version__ import __version__  # noqa: F401
