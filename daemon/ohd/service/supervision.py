"""What a SIGHUP may change while the daemon runs.

A reload compares the running settings with freshly read ones: `LIVE_KEYS` are applied
to the running daemon, any other changed key is only named (it needs a restart), and
the running settings never take a value that failed to apply. The rule files of
tasks.d/ are registered again (rules whose file is gone or no rule any more forgotten).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ohd import logfmt
from ohd.config import Settings
from ohd.intake.rules import RuleBook

log = logging.getLogger("ohd.supervision")

# Settings a SIGHUP applies to the running daemon; any other changed key needs a restart
# (database_url, state_dir, runtime_dir, repos, base_url, ...).
POLICY_KEYS = frozenset({"free_rpm", "free_rpd", "rate_limits", "daily_limits", "quota_window_s",
                         "quota_margin_s", "breaker_failures", "breaker_reset_s",
                         "allow_paid", "paid_models", "daily_request_cap", "daily_cost_cap_usd"})
SELECTION_KEYS = frozenset({"model_selection", "model_priors", "model_tags", "selection_epsilon",
                            "selection_prior_calls", "selection_latency_ref_ms", "selection_history"})
LADDER_KEYS = frozenset({"test_runs", "test_timeout_s", "test_python", "test_parallel", "rule_levels",
                         "test_sandbox", "test_memory_mb", "allow_risky_tests"})   # how candidates are judged
LOG_KEYS = frozenset({"log_level", "log_format", "log_file"})
WEBHOOK_KEYS = frozenset({"webhooks", "webhook_timeout_s", "webhook_retry_s", "webhook_retry_max_s",
                          "webhook_max_age_s"})
LIVE_KEYS = (frozenset({"workers", "models", "agents"}) | LOG_KEYS | POLICY_KEYS | LADDER_KEYS | SELECTION_KEYS
             | WEBHOOK_KEYS)


def hook_secrets(settings: Settings) -> dict[str, SecretStr]:
    """The webhooks' secrets by the variable they were read from (at the daemon's start)."""
    return {hook.secret_env: hook.secret for hook in settings.webhooks if hook.secret_env and hook.secret is not None}


def with_secrets(settings: Settings, secrets: dict[str, SecretStr]) -> Settings:
    """`settings` read again, each hook given the secret its `secret_env` held at the start: the
    daemon removed those variables from its environment once read, so a reload finds them unset.
    A hook naming a variable the daemon never read keeps no secret (and is refused)."""
    hooks = [hook.model_copy(update={"secret": secrets[hook.secret_env]})
             if hook.secret is None and hook.secret_env in secrets else hook for hook in settings.webhooks]
    return settings.model_copy(update={"webhooks": hooks}) if hooks != settings.webhooks else settings


def live_changes(old: Settings, new: Settings) -> dict[str, Any]:
    """The changed keys a running daemon can take, with their new values; the others are
    logged as needing a restart (an unknown log level is logged and left out)."""
    changed = [key for key in Settings.model_fields if getattr(old, key) != getattr(new, key)]
    if later := [key for key in changed if key not in LIVE_KEYS]:
        log.warning("reload: %s changed but only take(s) effect after a restart of ohd", ", ".join(later))
    live = {key: getattr(new, key) for key in changed if key in LIVE_KEYS}
    if "log_level" in live and not isinstance(logging.getLevelName(new.log_level.upper()), int):
        log.warning("reload: unknown log_level %r; keeping %s", new.log_level, old.log_level)
        del live["log_level"]
    return live


def apply_logging(old: Settings, live: dict[str, Any]) -> None:
    """Install the log handlers again with the reloaded level, format and file. With a
    `log_file` this happens on every reload, so a file moved away by logrotate is let go and
    created again. A new log_file that cannot be opened is logged and dropped from `live`
    (the running file is kept)."""
    if not LOG_KEYS & live.keys() and old.log_file is None:
        return
    level, fmt = live.get("log_level", old.log_level), live.get("log_format", old.log_format)
    secrets = [old.api_key.get_secret_value()] if old.api_key else []
    files = [live["log_file"], old.log_file] if "log_file" in live else [old.log_file]
    for path in files:
        try:
            logfmt.setup(level, fmt, secrets, path)    # opens the file before it touches the handlers
        except OSError as exc:
            log.error("reload: cannot open log_file %s (%s)", path, exc)
            live.pop("log_file", None)
        else:
            return


def reread_rules(repos: list[Path], rulebook: RuleBook) -> None:
    """Register every rule file of each repo's tasks.d/ again; forget rules whose file is no rule now."""
    for repo in repos:
        rulebook.load(repo, forget_others=True)
