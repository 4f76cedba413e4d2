from .core import decode, encode  # noqa: F401
from .package_data import __version__  # noqa: F401
