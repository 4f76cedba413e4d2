"""Settings: one TOML file, overridden by `OHD_*` environment variables, then by flags.

The file is `--config`, else `$OHD_CONFIG`, else `<user config dir>/ohd/config.toml`
(platformdirs, through `ohd.userdirs`). Every key can be set as `OHD_<KEY>` (lists as JSON or comma-separated).
The API key is read from the environment variable named by `api_key_env`
(default `OPENROUTER_API_KEY`), held as a `SecretStr`, and never logged or stored.
Only `cli` and `daemon` import this module; everything below gets plain values.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ohd import userdirs
from ohd.core import events, layout
from ohd.errors import ConfigError

APP = userdirs.APP
OPENROUTER_URL = "https://openrouter.ai/api/v1"
# Free models tried in order when a task says `models: [auto]`; override with `models`.
DEFAULT_MODELS = (
    "meta-llama/llama-3.3-70b-instruct:free",
    "qwen/qwen-2.5-coder-32b-instruct:free",
    "mistralai/mistral-small-3.1-24b-instruct:free",
    "google/gemma-3-27b-it:free",
)
_LIST_KEYS = {"models", "repos", "paid_models"}
# `OHD_*` variables ohd reads that are no setting: the config file's path, the git hooks' switch
# (`OHD_HOOKS=off`), the test suite's PostgreSQL
# and the agent runners' proxy token in an agent's environment
NOT_SETTINGS = frozenset({"OHD_CONFIG", "OHD_HOOKS", "OHD_TEST_POSTGRES_URL", "OHD_AGENT_KEY",
                          "OHD_DASHBOARD_SCREENSHOTS"})   # the dashboard test saves its screenshots there
# JSON objects in OHD_* variables
_DICT_KEYS = {"repo_names", "rate_limits", "daily_limits", "model_priors", "model_tags", "rule_levels", "agents",
              "webhooks"}


class ModelPrior(BaseModel):
    """What model selection assumes of a model before it has history (`model_priors`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quality: float = Field(default=0.5, ge=0, le=1)       # expected validation score
    success: float = Field(default=0.5, ge=0, le=1)       # expected accepted / calls
    latency_ms: float | None = Field(default=None, gt=0)  # expected p50; None: neutral


class AgentSettings(BaseModel):
    """`[agents]`: how ohd starts the coding agents of the agent runners (see the README's Agent runners).

    Templates are argv lists, never a shell line; their placeholders are `{prompt_file}`, `{model}`,
    `{base_url}`, `{api_key_env}` (the NAME of the variable holding the run's proxy token),
    `{worktree}` and `{target}`. The agent's environment holds `pass_env` and what its runner needs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    aider: list[str] = Field(default_factory=lambda: ["aider"], min_length=1)   # the argv before aider's options
    openhands_python: str = "python3"   # an interpreter that has openhands-sdk and openhands-tools
    command: list[str] = Field(default_factory=list)   # runner `command`'s argv template
    pass_env: list[str] = Field(default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"])


class WebhookSettings(BaseModel):
    """One entry of `webhooks`: where ohd posts which events (README "Webhooks"). The secret is read
    from the variable `secret_env` names, never from the file, and never logged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    events: list[str] = Field(default_factory=lambda: list(events.EVENTS), min_length=1)
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    format: Literal["json", "slack", "discord"] = "json"
    # this hook's own delivery time limit and backoff; None: webhook_timeout_s, webhook_retry_s, webhook_retry_max_s
    timeout_s: float | None = Field(default=None, gt=0)
    retry_s: float | None = Field(default=None, gt=0)
    retry_max_s: float | None = Field(default=None, gt=0)
    secret: SecretStr | None = Field(default=None, exclude=True, repr=False)   # from $secret_env, by `load`

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a webhook URL is http:// or https:// with a host, not {url.split('?')[0][:60]!r}")
        return url

    @field_validator("events")
    @classmethod
    def _known_events(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in events.EVENTS:
                raise ValueError(f"unknown webhook event {name!r} (known: {', '.join(events.EVENTS)})")
        return list(dict.fromkeys(names))

    @property
    def key(self) -> str:
        return events.hook_key(self.url)


class Settings(BaseModel):
    """Validated configuration; unknown keys are errors so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = OPENROUTER_URL
    # what the server at base_url is: "auto" decides by its host (openrouter.ai or not)
    provider: Literal["auto", "openrouter", "self-hosted"] = "auto"
    api_key_env: str = "OPENROUTER_API_KEY"
    api_key: SecretStr | None = Field(default=None, exclude=True)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    offline: bool = False
    workers: int = Field(default=4, ge=1, le=256)
    database_url: str = ""
    store_lock_wait_s: float = Field(default=30.0, ge=0)   # a write's wait for another process's SQLite lock
    state_dir: Path = Field(default_factory=userdirs.state_dir)
    runtime_dir: Path = Field(default_factory=userdirs.runtime_dir)
    repos: list[Path] = Field(default_factory=list)
    # repo path -> its name: the repo's identity in a fleet (README "A fleet of clones"); unnamed: its
    # root commit and origin URL, else its path
    repo_names: dict[str, str] = Field(default_factory=dict)
    lease_s: float = Field(default=60.0, gt=0)
    crash_limit: int = Field(default=3, ge=1)   # runs of one task crashes may interrupt before it fails
    grace_s: float = Field(default=30.0, ge=0)
    heartbeat_s: float = Field(default=5.0, gt=0)       # the daemon's heartbeat in the store's `daemon` table
    daemon_lost_s: float = Field(default=30.0, gt=0)    # a daemon silent this long is lost: its leases return
    request_timeout_s: float = Field(default=120.0, gt=0)
    # the one proxy for the model server (http:// or https://); HTTP_PROXY and the like are ignored
    proxy: str = Field(default="", pattern=r"^(https?://\S+)?$")
    settle_s: float = Field(default=0.3, ge=0)
    quiet_s: float = Field(default=2.0, ge=0)               # working-tree debounce (standing rules)
    test_runs: int = Field(default=2, ge=0, le=10)          # pytest runs per unit_test candidate; 0 = none
    test_timeout_s: float = Field(default=60.0, gt=0)         # each pytest run's time limit
    test_parallel: int = Field(default=0, ge=0)   # test processes at once, over all workers; 0 = one per CPU
    test_python: str = "auto"   # runs the tests: "auto" = the repo's .venv/venv if it has pytest, else ohd's
    # where generated tests run (README "Threat model"): "auto" = the strongest level that works here;
    # a level = that one or, where it does not work, the next weaker one
    test_sandbox: Literal["auto", "namespace", "landlock", "process"] = "auto"
    test_memory_mb: int = Field(default=4096, ge=64)   # each test process's memory (RLIMIT_DATA)
    allow_risky_tests: bool = False   # run tests the static screen refuses (subprocess, sockets, os.system, ...)
    # task type (or "*") -> rule -> error | warning | info | off; checked against the rules at start-up
    rule_levels: dict[str, dict[str, Literal["error", "warning", "info", "off"]]] = Field(default_factory=dict)
    schedule_grace_s: float = Field(default=3600.0, ge=0)   # a missed cron firing runs once if this recent
    timezone: str | None = None                             # of cron schedules; None: local time
    max_tokens: int = Field(default=4096, ge=1)
    temperature: float = Field(default=0.2, ge=0, le=2)
    app_url: str = "https://github.com/ohd-dev/ohd"
    app_title: str = "ohd"
    log_level: str = "INFO"
    log_format: str = Field(default="text", pattern="^(text|json)$")   # json: one JSON object a line
    log_file: Path | None = None          # also log here (and `ohd logs` prints its tail)
    call_history: bool = True                # store each model call's prompt and response (`ohd show ID --calls`)
    call_history_max_bytes: int = Field(default=200_000, ge=1000)   # per prompt and per response; cut with a marker
    # the model governor (issue 3): known limits are paced, never hit; 0 = no such limit
    free_rpm: int = Field(default=20, ge=0)          # requests per minute per `:free` model
    free_rpd: int = Field(default=50, ge=0)          # requests per UTC day per key, all `:free` models
    rate_limits: dict[str, PositiveInt] = Field(default_factory=dict)   # model -> requests per minute
    daily_limits: dict[str, PositiveInt] = Field(default_factory=dict)  # model -> requests per UTC day
    quota_window_s: float = Field(default=60.0, gt=0)                   # the sliding window of `*_rpm`
    quota_margin_s: float = Field(default=0.25, ge=0, le=10)            # added to the window
    breaker_failures: int = Field(default=3, ge=1)   # consecutive failures that open a model's breaker
    breaker_reset_s: float = Field(default=60.0, gt=0)   # open breaker -> one probe after this long
    # the catalogue and budgets: `discover` (or models = ["auto"]) takes the free models of GET /models
    discover: bool = False
    catalogue_refresh_s: float = Field(default=3600.0, gt=0)   # GET /models again after this long
    allow_paid: bool = False                             # strict free-only mode unless true
    paid_models: list[str] = Field(default_factory=list)   # paid models allowed in strict mode
    daily_request_cap: int = Field(default=0, ge=0)      # requests per UTC day, every model; 0 = none
    daily_cost_cap_usd: float = Field(default=0.0, ge=0)   # USD per UTC day (execution costs); 0 = none
    # model selection (issue 3 item 5): `auto` tries the models best first per task type
    model_selection: bool = True                      # false: `auto` keeps the order of `models`
    model_priors: dict[str, ModelPrior] = Field(default_factory=dict)   # model -> prior before history
    model_tags: dict[str, list[str]] = Field(default_factory=dict)      # model -> speed/balanced/quality/...
    selection_epsilon: float = Field(default=0.05, ge=0, le=1)          # chance to try a less measured model
    selection_prior_calls: float = Field(default=5.0, ge=0)             # the prior weighs this many calls
    selection_latency_ref_ms: float = Field(default=10_000.0, gt=0)     # the p50 that scores 0.5
    selection_history: int = Field(default=1000, ge=1)                  # newest executions weighed
    agents: AgentSettings = Field(default_factory=AgentSettings)        # the agent runners (issue 13)
    # the web listener (issue 14): "host:port" ("127.0.0.1:8767", "[::1]:8767"); "" = off
    http_listen: str = ""
    http_metrics_public: bool = True     # GET /metrics without the token (a scraper has none)
    # webhooks (issue 14): events posted through the store's outbox, at least once, in order per task
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    webhook_timeout_s: float = Field(default=10.0, gt=0)       # each delivery's HTTP time limit
    webhook_retry_s: float = Field(default=5.0, gt=0)          # the first retry's wait; doubled per failure
    webhook_retry_max_s: float = Field(default=900.0, gt=0)    # the longest wait between two tries
    webhook_max_age_s: float = Field(default=86400.0, gt=0)    # an event undelivered this long is dead

    @field_validator("repos")
    @classmethod
    def _absolute_repos(cls, repos: list[Path]) -> list[Path]:
        return [Path(r).expanduser().resolve() for r in repos]

    @field_validator("repo_names")
    @classmethod
    def _named_repos(cls, names: dict[str, str]) -> dict[str, str]:
        for name in names.values():
            if not name.strip():
                raise ValueError("a repo's name is not empty")
        return {str(Path(path).expanduser().resolve()): name.strip() for path, name in names.items()}

    @field_validator("http_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.strip():
            listen_address(value)       # ValueError: the message says what is wrong
        return value.strip()

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The web listener's (host, port); None when it is off."""
        return listen_address(self.http_listen) if self.http_listen else None

    @model_validator(mode="after")
    def _lost_after_heartbeats(self) -> Settings:
        if self.daemon_lost_s <= self.heartbeat_s:
            raise ValueError(f"daemon_lost_s ({self.daemon_lost_s:g}) must be longer than heartbeat_s "
                             f"({self.heartbeat_s:g}): a live daemon would be taken for lost between two heartbeats")
        return self

    @property
    def hook_secret_envs(self) -> frozenset[str]:
        """The variables that hold the webhooks' secrets (not settings: no warning for them)."""
        return frozenset(hook.secret_env for hook in self.webhooks if hook.secret_env)

    @property
    def socket_path(self) -> Path:
        return layout.socket_path(self.runtime_dir)

    @property
    def database(self) -> str:
        """The database URL; the default is a SQLite file in the state directory."""
        return self.database_url or f"sqlite:///{layout.database_path(self.state_dir)}"

    @property
    def openrouter(self) -> bool:
        """The server is OpenRouter: `provider`, or with "auto" the host of `base_url`. It needs an
        API key and names its free models `:free`; a self-hosted server (Ollama, vLLM, LM Studio)
        needs no key and its unpriced models are free."""
        return self.provider == "openrouter" or (self.provider == "auto" and is_openrouter(self.base_url))

    @property
    def use_offline(self) -> bool:
        """The offline provider answers: `offline = true`, or OpenRouter is the server and no key is set."""
        return self.offline or (self.api_key is None and self.openrouter)


def is_openrouter(url: str) -> bool:
    """The host of `url` is openrouter.ai (or a subdomain of it)."""
    host = (urlsplit(url).hostname or "").lower()
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def listen_address(value: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) -> (host, port); ValueError saying what is wrong."""
    host, colon, port = value.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f"{value!r} is not host:port (e.g. \"127.0.0.1:8767\")")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. \"[::1]:8767\"")
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def key_file() -> Path:
    """`<user config dir>/ohd/env`: the file systemd's unit reads the API key from (`EnvironmentFile`)."""
    return userdirs.config_dir() / "env"


def default_config_path(env: Mapping[str, str]) -> Path:
    return userdirs.config_path(env)


def load(config_file: Path | None = None, env: Mapping[str, str] | None = None,
         **overrides: Any) -> Settings:
    """Build the settings: TOML file < `OHD_*` environment < explicit overrides (flags)."""
    env = os.environ if env is None else env
    path = config_file or default_config_path(env)
    values: dict[str, Any] = _read_toml(path, required=config_file is not None)
    values.update(_from_env(env))
    values.update({k: v for k, v in overrides.items() if v is not None})
    key_env = str(values.get("api_key_env", "OPENROUTER_API_KEY"))
    if env.get(key_env):
        values["api_key"] = env[key_env]
    values["webhooks"] = _hook_secrets(values.get("webhooks", []), env)
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration ({path}): {problems}") from None


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file not found: {path}") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "api_key" in data:
        raise ConfigError(f"{path}: do not put the API key in the config file; "
                          "set OPENROUTER_API_KEY (or the variable named by api_key_env)")
    hooks = data.get("webhooks", [])
    if isinstance(hooks, list) and any(isinstance(hook, dict) and "secret" in hook for hook in hooks):
        raise ConfigError(f"{path}: do not put a webhook's secret in the config file; "
                          "name the variable that holds it in secret_env")
    return data


def webhook(url: str, secret_env: str | None = None, fmt: str = "json",
            env: Mapping[str, str] | None = None) -> WebhookSettings:
    """One webhook from the command line (`ohd webhooks test`), its secret read as the daemon reads it;
    ConfigError when it is not valid or `secret_env` is not set."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {"url": url, "secret_env": secret_env, "format": fmt}
    try:
        hook = WebhookSettings(**_hook_secrets([values], env)[0])
    except ValidationError as exc:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    if secret_env and hook.secret is None:
        raise ConfigError(f"--secret-env names {secret_env}, which is not set (or empty)")
    return hook


def _hook_secrets(hooks: Any, env: Mapping[str, str]) -> Any:
    """Each webhook with its secret read from the variable its `secret_env` names (when set)."""
    if not isinstance(hooks, list):
        return hooks    # the model says what is wrong with it
    return [{**hook, "secret": env[name]} if isinstance(hook, dict) and isinstance(name := hook.get("secret_env"), str)
            and env.get(name) else hook for hook in hooks]


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    fields = set(Settings.model_fields) - {"api_key"}
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith("OHD_") or name == "OHD_CONFIG":
            continue
        key = name[4:].lower()
        if key not in fields:
            continue
        values[key] = _split_list(raw) if key in _LIST_KEYS else _json_object(raw) if key in _DICT_KEYS else raw
    return values


def unknown_variables(env: Mapping[str, str], api_key_env: str = "OPENROUTER_API_KEY",
                      secrets: frozenset[str] = frozenset()) -> list[str]:
    """A warning per `OHD_*` variable of `env` that ohd ignores, naming the closest setting.

    Unknown keys of the TOML file are errors; a variable may belong to another program, so
    an unknown one is only a warning (the caller shows it where the user looks).
    """
    known = {f"OHD_{key.upper()}" for key in set(Settings.model_fields) - {"api_key"}}
    problems = []
    for name in sorted(env):
        if (not name.startswith("OHD_") or name in known or name in NOT_SETTINGS or name == api_key_env
                or name in secrets):
            continue
        if name == "OHD_API_KEY":
            problems.append(f"{name} is ignored: the API key is read from {api_key_env} "
                            "(the variable named by api_key_env)")
            continue
        close = difflib.get_close_matches(name[4:], sorted(n[4:] for n in known | NOT_SETTINGS), n=1, cutoff=0.6)
        hint = f"did you mean OHD_{close[0]}?" if close else "see the README's Configuration for the settings"
        problems.append(f"{name} is not a setting ohd knows and is ignored; {hint}")
    return problems


def _json_object(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not a JSON object: {raw!r} ({exc.msg})") from None


def _split_list(raw: str) -> list[str]:
    raw = raw.strip()
    if raw.startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not a JSON list: {raw!r} ({exc.msg})") from None
        return [str(item) for item in parsed]
    return [part.strip() for part in raw.split(",") if part.strip()]
