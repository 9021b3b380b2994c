"""Configuration, read once: PIDEPLOY_* environment variables and an optional TOML file.

Every setting has a default that works on a fresh machine with no file at all.
The TOML file (PIDEPLOY_CONFIG, else ./pideploy.toml when present) holds the
model chain under [[models]] and may set any setting under [settings] (the
environment wins over the file). Anything unknown or malformed fails at start
with a ConfigError that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errors import ConfigError

ENV_PREFIX = "PIDEPLOY_"
DEFAULT_CONFIG_FILE = "pideploy.toml"  # in the working directory, used when present
# The fewest output tokens worth asking a model for: a tool call with its JSON arguments.
# A smaller max_tokens could only ever produce cut answers, so it is refused at load.
MIN_OUTPUT_TOKENS = 256


@dataclass(frozen=True)
class ModelConfig:
    """One link of the fallback chain: an OpenAI-compatible endpoint and its prices."""

    name: str
    base_url: str
    model: str
    api_key_env: str
    auth_provider: str = ""  # key in ~/.pi/agent/auth.json, for operators who use pi
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    timeout: float = 60.0
    # Compatibility with servers that differ from OpenAI's (README, "The model chain"):
    stream: bool = True  # false: one plain JSON answer per call
    tool_choice: str = "none-sent"  # "auto" | "required": sent as is; "none-sent": not sent
    send_usage_request: bool = True  # stream_options.include_usage (some servers refuse it)
    tool_schema: str = "full"  # "plain": tool specs without length, pattern and range limits
    api_key: str = field(default="", repr=False)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    {
        "name": "minimax-m2.5-free",
        "base_url": "https://opencode.ai/zen/v1",
        "model": "minimax-m2.5-free",
        "api_key_env": "OPENCODE_API_KEY",
        "auth_provider": "opencode",
    },
    {
        "name": "glm-5-free",
        "base_url": "https://opencode.ai/zen/v1",
        "model": "glm-5-free",
        "api_key_env": "OPENCODE_API_KEY",
        "auth_provider": "opencode",
    },
    {
        "name": "gemini-3-flash",
        "base_url": "https://generativelanguage.googleapis.com/v1beta/openai/",
        "model": "gemini-3-flash",
        "api_key_env": "GEMINI_API_KEY",
        "auth_provider": "google",
        "input_usd_per_mtok": 0.50,
        "output_usd_per_mtok": 3.00,
    },
)


def default_home() -> Path:
    # As root the cluster runs as an unprivileged user that cannot enter /root,
    # so root's data lives where system services keep theirs.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/pideploy")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "pideploy"


@dataclass(frozen=True)
class Config:
    """Every setting piDeploy has. Field name `foo_bar` is env PIDEPLOY_FOO_BAR."""

    home: Path = field(default_factory=default_home)
    database_url: str = ""  # empty: the embedded cluster under home/pg
    docker_host: str = ""  # empty: the docker SDK's own default (DOCKER_HOST, the socket)
    listen: str = "127.0.0.1:8700"
    api_token: str = field(default="", repr=False)
    workers: int = 2
    namespace: str = "default"  # label value that scopes what this deployment owns
    image: str = "localhost/pideploy-gateway:latest"
    container_port: int = 8080
    port_range: str = "20000-29999"
    health_timeout: float = 30.0
    stop_timeout: float = 10.0
    nginx_bin: str = "nginx"
    nginx_listen: str = "127.0.0.1:8780"  # the embedded nginx, when nginx_map is unset
    nginx_map: str = ""  # set: write routes here for an operator-run nginx
    nginx_test_cmd: str = "nginx -t"
    nginx_reload_cmd: str = "nginx -s reload"
    nginx_url: str = ""  # empty: http://<nginx_listen>
    route_tokens: str = "on"  # "off": routes are /i/<id>/, for an nginx with its own auth in front
    trace_dir: Path | None = None
    alerts_file: Path | None = None
    retention_days: float = 30.0  # traces and heartbeat rounds older than this are pruned; 0: kept
    lock_dir: Path | None = None
    agent: str = "on"  # "off": the deterministic playbook only
    max_turns: int = 12
    loop_guard_repeats: int = 3  # the same tool call this many times in a row: agent_stuck
    max_tokens: int = 2048
    run_cost_cap: float = 0.25
    run_token_cap: int = 200_000
    heartbeat_cost_cap: float = 0.05
    run_timeout: float = 300.0
    tool_timeout: float = 120.0
    model_retries: int = 2
    model_backoff: float = 1.0
    model_backoff_max: float = 20.0
    model_cooldown: float = 300.0
    heartbeat_interval: float = 60.0
    heartbeat_probe_timeout: float = 2.0
    recovery_max_failures: int = 3
    recovery_backoff: float = 5.0
    recovery_backoff_max: float = 60.0
    healthy_reset: float = 300.0
    stuck_timeout: float = 600.0
    lease_seconds: float = 30.0
    max_attempts: int = 3
    poll_interval: float = 2.0
    shutdown_grace: float = 30.0
    log_format: str = "json"
    log_level: str = "INFO"
    alert_cost_usd: float = 0.10
    alert_turns: int = 10
    alert_tool_error_rate: float = 0.5
    alert_slow_seconds: float = 120.0
    eval_pass_threshold: float = 0.8
    models: tuple[ModelConfig, ...] = ()
    source: str = "defaults"  # where the settings came from, for messages

    @property
    def traces(self) -> Path:
        return self.trace_dir or self.home / "traces"

    @property
    def alerts(self) -> Path:
        return self.alerts_file or self.home / "alerts.jsonl"

    @property
    def locks(self) -> Path:
        return self.lock_dir or self.home / "locks"

    @property
    def storage(self) -> Path:
        return self.home / "instances"

    @property
    def embedded_nginx(self) -> bool:
        return not self.nginx_map

    @property
    def routes_url(self) -> str:
        return (self.nginx_url or f"http://{self.nginx_listen}").rstrip("/")

    @property
    def ports(self) -> tuple[int, int]:
        low, _, high = self.port_range.partition("-")
        return int(low), int(high)


# Settings that are not plain scalars, or that come from standard variables.
_STANDARD_ENV = {"database_url": "DATABASE_URL", "docker_host": "DOCKER_HOST"}
_NOT_SETTINGS = {"models", "source"}
_CHOICES = {"agent": ("on", "off"), "log_format": ("json", "text"), "route_tokens": ("on", "off")}


def _settings() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(Config) if f.name not in _NOT_SETTINGS}


def _parse(name: str, raw: object, source: str) -> Any:
    kind = _settings()[name].type
    where = f"{name} ({source})"
    if isinstance(raw, str) and not raw.isprintable():
        # A newline or another control character in a setting is a copy-paste slip that would
        # otherwise reach a label, a command line or a header: say so at start.
        raise ConfigError(
            f"invalid value {raw!r} for {where}: contains a control character (a newline?)",
            key=name,
            source=source,
        )
    try:
        if kind in ("int", "float") and (
            isinstance(raw, bool) or (isinstance(raw, str) and not raw.isascii())
        ):
            raise ValueError(raw)  # int() and float() read other scripts' digits too
        if kind == "int":
            value: Any = int(raw)  # type: ignore[call-overload]
        elif kind == "float":
            value = float(raw)  # type: ignore[arg-type]
        elif kind in ("Path", "Path | None"):
            value = Path(str(raw)).expanduser() if str(raw) else None
        else:
            if not isinstance(raw, str):
                raise ValueError(raw)
            value = raw
    except (TypeError, ValueError):
        raise ConfigError(
            f"invalid value {raw!r} for {where}: expected {kind}", key=name, source=source
        ) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"invalid value {raw!r} for {where}: must be >= 0", key=name, source=source)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(
            f"invalid value {raw!r} for {where}: one of {', '.join(_CHOICES[name])}",
            key=name,
            source=source,
        )
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise ConfigError(
            f"cannot read config file {path}: {error.strerror}", key="PIDEPLOY_CONFIG", source=str(path)
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}", source=str(path)) from None


def _auth_file_key(auth_path: Path, provider: str) -> str:
    """A key from pi's auth.json ({provider: {"type": "api_key", "key": ...}} or a bare string)."""
    if not provider or not auth_path.is_file():
        return ""
    try:
        entries = json.loads(auth_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"cannot read {auth_path}: not valid JSON", source=str(auth_path)) from None
    entry = entries.get(provider) if isinstance(entries, dict) else None
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in ("key", "apiKey", "access"):
            if isinstance(entry.get(key), str):
                return str(entry[key])
    return ""


_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig) if f.name != "api_key"}
_MODEL_CHOICES = {"tool_choice": ("auto", "required", "none-sent"), "tool_schema": ("full", "plain")}


def _model(raw: object, index: int, source: str, env: Mapping[str, str], auth: Path) -> ModelConfig:
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} in {source} must be a table", key=where, source=source)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _MODEL_FIELDS:
            known = ", ".join(_MODEL_FIELDS)
            raise ConfigError(
                f"unknown key {where}.{key} in {source} (known: {known})", key=f"{where}.{key}", source=source
            )
        kind = _MODEL_FIELDS[key].type
        if kind == "str":
            ok = isinstance(value, str) and value in _MODEL_CHOICES.get(key, (value,))
        elif kind == "bool":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if not ok:
            expected = " | ".join(_MODEL_CHOICES[key]) if key in _MODEL_CHOICES else kind
            raise ConfigError(
                f"invalid value {value!r} for {where}.{key} in {source}: expected {expected}",
                key=f"{where}.{key}",
                source=source,
            )
        values[key] = float(value) if kind == "float" else value
    for required in ("name", "base_url", "model", "api_key_env"):
        if required not in values:
            raise ConfigError(
                f"{where} in {source} needs {required}", key=f"{where}.{required}", source=source
            )
    model = ModelConfig(**values)
    key = env.get(model.api_key_env, "") or _auth_file_key(auth, model.auth_provider)
    return dataclasses.replace(model, api_key=key)


def load(
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    auth_path: Path | None = None,
) -> Config:
    """Build the one Config from the environment (and the TOML file it names)."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    auth = auth_path or Path.home() / ".pi" / "agent" / "auth.json"
    settings = _settings()

    file_path: Path | None = None
    if env.get(ENV_PREFIX + "CONFIG"):
        file_path = Path(env[ENV_PREFIX + "CONFIG"]).expanduser()
    elif (cwd / DEFAULT_CONFIG_FILE).is_file():
        file_path = cwd / DEFAULT_CONFIG_FILE
    document = _read_toml(file_path) if file_path else {}
    source = str(file_path) if file_path else "defaults"

    values: dict[str, Any] = {}
    for key in document:
        if key not in ("settings", "models"):
            raise ConfigError(
                f"unknown key {key!r} in {source} (known: settings, models)", key=key, source=source
            )
    file_settings = document.get("settings", {})
    if not isinstance(file_settings, dict):
        raise ConfigError(f"[settings] in {source} must be a table", key="settings", source=source)
    for key, raw in file_settings.items():
        if key not in settings:
            raise ConfigError(f"unknown setting {key!r} in {source}", key=key, source=source)
        values[key] = _parse(key, raw, source)

    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in settings or key in _STANDARD_ENV:
            raise ConfigError(f"unknown environment variable {name}", key=name, source="environment")
        values[key] = _parse(key, raw, f"environment {name}")
    for key, name in _STANDARD_ENV.items():
        if env.get(name):
            values[key] = env[name]

    raw_models = document.get("models", list(DEFAULT_MODELS))
    if not isinstance(raw_models, list):
        raise ConfigError(f"models in {source} must be an array of tables", key="models", source=source)
    models = tuple(_model(raw, i, source, env, auth) for i, raw in enumerate(raw_models))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names in {source} must be unique: {names}", key="models", source=source)

    config = Config(**values, models=models, source=source)
    _check(config)
    return config


def _check(config: Config) -> None:
    checks: list[tuple[str, Callable[[Config], bool], str]] = [
        ("port_range", _valid_range, "LOW-HIGH with 1024 <= LOW <= HIGH <= 65535"),
        ("listen", lambda c: valid_hostport(c.listen), "HOST:PORT"),
        ("nginx_listen", lambda c: valid_hostport(c.nginx_listen), "HOST:PORT"),
        ("workers", lambda c: c.workers >= 1, "at least 1"),
        ("max_turns", lambda c: c.max_turns >= 1, "at least 1"),
        (
            "max_tokens",
            lambda c: c.max_tokens >= MIN_OUTPUT_TOKENS,
            f"at least {MIN_OUTPUT_TOKENS} (room for one tool call with its arguments)",
        ),
        ("loop_guard_repeats", lambda c: c.loop_guard_repeats >= 2, "at least 2"),
        ("max_attempts", lambda c: c.max_attempts >= 1, "at least 1"),
        (
            "namespace",
            lambda c: re.fullmatch(r"[A-Za-z0-9_-]+", c.namespace) is not None,
            "letters, digits, - and _",
        ),
    ]
    for key, ok, expected in checks:
        try:
            valid = ok(config)
        except ValueError:
            valid = False
        if not valid:
            value = getattr(config, key)
            raise ConfigError(
                f"invalid value {value!r} for {key} ({config.source} or PIDEPLOY_{key.upper()}): expected {expected}",
                key=key,
                source=config.source,
            )


def _valid_range(config: Config) -> bool:
    low, high = config.ports
    return 1024 <= low <= high <= 65535


def valid_hostport(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return (
        bool(sep and host)
        and host.isprintable()
        and re.fullmatch(r"[0-9]{1,5}", port) is not None
        and 0 < int(port) < 65536
    )


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, type) for every setting: the README's table is built from this."""
    rows = [(ENV_PREFIX + "CONFIG", DEFAULT_CONFIG_FILE, "path")]  # names the file the rest may come from
    defaults = Config(home=Path("<home>"))
    for name, f in _settings().items():
        variable = _STANDARD_ENV.get(name, ENV_PREFIX + name.upper())
        default = getattr(defaults, name)
        rows.append((variable, "" if default is None else str(default), str(f.type)))
    return rows
