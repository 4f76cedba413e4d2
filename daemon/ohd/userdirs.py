"""The user's folders ohd defaults to, from platformdirs: config, state, runtime and cache.

One place for them, so the settings (`ohd.config`) and the read-only commands' fast path
(`ohd.cli.fastpath`, which does not import the settings model) agree on every default.
A leaf: it imports nothing of ohd.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP = "ohd"
CONFIG_NAME = "config.toml"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def runtime_dir() -> Path:
    # Without XDG_RUNTIME_DIR (cron, su, CI) platformdirs falls back to /tmp/runtime-<uid>
    # and warns; the fallback is what we want, the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


def config_path(env: Mapping[str, str]) -> Path:
    """The config file when no `--config` is given: `$OHD_CONFIG`, else `<config dir>/config.toml`."""
    if env.get("OHD_CONFIG"):
        return Path(env["OHD_CONFIG"]).expanduser()
    return config_dir() / CONFIG_NAME
