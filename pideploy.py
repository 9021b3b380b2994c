"""piDeploy: a self-healing orchestrator for per-user AI-assistant containers.

The command line. Errors become one line on stderr and a non-zero exit here, at
the edge; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config as config_module
import db
import gate
from config import Config
from errors import PiDeployError
from observability import setup_logging

logger = logging.getLogger("pideploy")

Command = Callable[[argparse.Namespace, Config], int]
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = function
        return function

    return register


# ---------------------------------------------------------------------------
# The runtime: database, engine, proxy (opened once per process)
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def open_database(config: Config) -> Iterator[db.Postgres]:
    postgres = db.Postgres(config)
    try:
        yield postgres
    finally:
        postgres.close()


# ---------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _check(name: str, probe: Callable[[], str], fix: str, required: bool = True) -> Check:
    try:
        return Check(name, True, probe(), required=required)
    except PiDeployError as error:
        return Check(name, False, error.message, fix, required)
    except (OSError, subprocess.SubprocessError) as error:
        return Check(name, False, str(error), fix, required)


def doctor_checks(config: Config, online: bool) -> list[Check]:
    from engine import DockerEngine
    from proxy import proxy_from_config

    checks: list[Check] = []

    def database() -> str:
        with open_database(config) as postgres:
            version = postgres.db.schema_version()
            where = "embedded cluster in " + str(config.home / "pg") if postgres.embedded else db.redact(config.database_url)
        return f"reachable ({where}), schema version {version}"

    checks.append(_check("database", database, "set DATABASE_URL, or install PostgreSQL server binaries"))

    def engine() -> str:
        engine = DockerEngine(config.docker_host or None, timeout=10)
        info = engine.version()
        if not engine.image_exists(config.image):
            raise PiDeployError(f"API {info.get('api_version')} reachable, but image {config.image} is missing")
        return f"{info.get('name', 'engine')} {info.get('version', '?')}, API {info.get('api_version')}, image {config.image} present"

    checks.append(
        _check(
            "container engine",
            engine,
            'start one (eval "$(scripts/stack.sh up)") or set DOCKER_HOST; load the image or set PIDEPLOY_IMAGE',
        )
    )

    def nginx() -> str:
        binary = shutil.which(config.nginx_bin)
        if binary is None:
            raise PiDeployError(f"{config.nginx_bin} not found on PATH")
        proxy = proxy_from_config(config)
        return proxy.validate()

    checks.append(_check("nginx", nginx, "install nginx (apt-get install nginx) or set PIDEPLOY_NGINX_*"))

    for label, path in (("data dir", config.home), ("trace dir", config.traces), ("alerts file dir", config.alerts.parent)):
        checks.append(_check(label, lambda p=path: _writable(p), f"make {path} writable or set PIDEPLOY_HOME"))

    for model in config.models:
        checks.append(_check(f"model {model.name}", lambda m=model: _model_check(m, online), "", required=False))
        if not checks[-1].ok:
            checks[-1].fix = f"export {model.api_key_env}=... (the playbook covers tasks meanwhile)"
    return checks


def _writable(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
        pass
    return f"{path} writable"


def _model_check(model: config_module.ModelConfig, online: bool) -> str:
    if not model.api_key:
        raise PiDeployError(f"no API key: {model.api_key_env} is unset and ~/.pi/agent/auth.json has none")
    if not online:
        return f"key present ({model.api_key_env}); reachability not checked (use --online)"
    request = urllib.request.Request(  # noqa: S310 (the configured https endpoint)
        model.base_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {model.api_key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=min(model.timeout, 10)) as response:  # noqa: S310
            return f"reachable (HTTP {response.status})"
    except urllib.error.HTTPError as error:
        raise PiDeployError(f"{model.base_url} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise PiDeployError(f"{model.base_url} unreachable: {error}") from None


@command("doctor")
def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    checks = doctor_checks(config, args.online)
    healthy = all(c.ok for c in checks if c.required)
    if args.format == "json":
        print(json.dumps({"ok": healthy, "checks": [c.__dict__ for c in checks]}, indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"{mark}  {c.name}: {c.detail}" + (f"  -> fix: {c.fix}" if not c.ok and c.fix else ""))
        print("ready to serve" if healthy else "not ready to serve")
    return 0 if healthy else 1


# ---------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------


@command("gate")
def cmd_gate(args: argparse.Namespace, config: Config) -> int:
    return gate.cli(args.bash_command, [config.home, config.traces, *gate.DEFAULT_READ_ROOTS])


# ---------------------------------------------------------------------------
# The parser and the edge
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pideploy.py",
        description="piDeploy: a self-healing orchestrator for per-user AI-assistant containers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--log-format", choices=("json", "text"), help="log format (default: PIDEPLOY_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctor = sub.add_parser("doctor", help="check everything serve needs, one line each")
    doctor.add_argument("--online", action="store_true", help="also call each model endpoint")
    doctor.add_argument("--format", choices=("text", "json"), default="text")

    gate_cmd = sub.add_parser("gate", help="ask the bash gate whether a command is allowed")
    gate_cmd.add_argument("bash_command", metavar="COMMAND")

    for extend in PARSER_EXTENSIONS:
        extend(sub)
    return parser


# Other modules' subcommands (serve, submit, heartbeat, eval ...) register here.
PARSER_EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_module.load()
        setup_logging(args.log_format or config.log_format, "DEBUG" if args.debug else config.log_level)
        return COMMANDS[args.command](args, config)
    except PiDeployError as error:
        if args.debug:
            raise
        print(f"pideploy: error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
