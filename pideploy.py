"""piDeploy: a self-healing orchestrator for per-user AI-assistant containers.

The command line. Errors become one line on stderr and a non-zero exit here, at
the edge; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import getpass
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import api
import config as config_module
import db
import httpd
import tasks
from config import Config
from errors import BadRequest, ConfigError, InfraUnavailable, NotFound, PiDeployError
from observability import Outcome, setup_logging
from proxy import proxy_from_config

# The agent loop (openai), the engine (docker), the bash gate (bashlex), the heartbeat and the
# eval harness are imported by the commands that use them: `--help`, `tasks` and `instances`
# start without them (tests/test_pideploy.py checks; `make bench` times them).
if TYPE_CHECKING:
    import agent
    import tools

logger = logging.getLogger("pideploy")  # run as a script, __name__ would be "__main__"

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


@contextlib.contextmanager
def open_runtime(config: Config, *, pool_size: int = 10) -> Iterator[tools.Runtime]:
    """Postgres, the engine and the proxy (nginx running), closed in reverse order."""
    import tools
    from engine import engine_from_config

    with contextlib.ExitStack() as opened:
        postgres = db.Postgres(config, max_size=pool_size)
        opened.callback(postgres.close)
        engine = engine_from_config(config)
        opened.callback(getattr(engine, "close", lambda: None))
        proxy = proxy_from_config(config)
        opened.callback(proxy.close)
        proxy.ensure_running()
        yield tools.Runtime(config, postgres.db, engine, proxy)


def task_runner(rt: tools.Runtime, config: Config) -> tasks.Runner:
    """The real runner: one chain per worker, the agent loop for each task (a heartbeat task
    is a round like any other; the queue only schedules it)."""
    import agent
    import heartbeat
    import models

    limits = agent.Limits.from_config(config)
    chain = models.Chain.from_config(config, models.DatabaseCooldowns(rt.db), limits)

    def run(task: db.Row, cancelled: tasks.Cancelled) -> Outcome:
        if task["type"] == "heartbeat":
            report = heartbeat.Heartbeat(rt, config).round("task")
            left = None if report.ok else f"{len(report.unrepaired)} drift(s) left unrepaired"
            return Outcome(
                "failed" if left else "succeeded",
                report.to_dict(),
                "tool_execution_error" if left else None,
                left,
                0,
                report.cost_usd,
                0,
                report.trace_file or "",
            )
        return agent.run_task(
            spec_from_row(task), agent.ToolsEnvironment(rt), chain, limits, cancelled=cancelled
        )

    return run


def spec_from_row(task: db.Row) -> agent.TaskSpec:
    import agent

    system = task["type"] == "heartbeat" and task["user_id"] == tasks.SYSTEM_USER
    return agent.TaskSpec(
        type=task["type"],
        user_id=None if system else task["user_id"],
        params=dict(task["params"] or {}),
        instance_id=task["instance_id"],
        id=task["id"],
    )


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
    checks: list[Check] = []

    def database() -> str:
        with open_database(config) as postgres:
            version = postgres.db.schema_version()
            where = (
                "embedded cluster in " + str(config.home / "pg")
                if postgres.embedded
                else db.redact(config.database_url)
            )
        return f"reachable ({where}), schema version {version}"

    checks.append(_check("database", database, "set DATABASE_URL, or install PostgreSQL server binaries"))

    def engine() -> str:
        from engine import DockerEngine

        engine = DockerEngine(config.docker_host or None, timeout=10)
        info = engine.version()
        if not engine.image_exists(config.image):
            raise PiDeployError(
                f"API {info.get('api_version')} reachable, but image {config.image} is missing"
            )
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

    folders = (
        ("data dir", config.home),
        ("trace dir", config.traces),
        ("alerts file dir", config.alerts.parent),
    )
    for label, path in folders:
        checks.append(
            _check(label, functools.partial(_writable, path), f"make {path} writable or set PIDEPLOY_HOME")
        )

    def bash_sandbox() -> str:
        import gate

        if not gate.landlock_abi():
            raise PiDeployError(gate.sandbox_status())
        trial = gate.run("uptime", timeout=10)  # the sandbox is set up for real, not only detected
        if trial.exit_code != 0:
            raise PiDeployError(f"a sandboxed `uptime` failed: {trial.stderr.strip() or trial.exit_code}")
        return gate.sandbox_status()

    checks.append(
        _check(
            "bash sandbox",
            bash_sandbox,
            "a Linux 5.13+ kernel with Landlock enabled (the bash gate's command check works without it)",
            required=False,
        )
    )

    for model in config.models:
        fix = f"export {model.api_key_env}=... (the playbook covers tasks meanwhile)"
        checks.append(
            _check(f"model {model.name}", functools.partial(_model_check, model, online), fix, required=False)
        )
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
    import gate

    # An operator's scope: piDeploy's files, and nginx only with piDeploy's own configuration
    # (its home holds every instance's storage folder, which the instance itself writes).
    nginx = gate.NginxPin.from_command(proxy_from_config(config).test_cmd)  # nothing is started
    return gate.cli(args.bash_command, [config.home, config.traces, *gate.DEFAULT_READ_ROOTS], nginx)


# ---------------------------------------------------------------------------
# The parser and the edge
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pideploy.py",
        description="piDeploy: a self-healing orchestrator for per-user AI-assistant containers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--log-format", choices=("json", "text"), help="log format (default: PIDEPLOY_LOG_FORMAT)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctor = sub.add_parser("doctor", help="check everything serve needs, one line each")
    doctor.add_argument("--online", action="store_true", help="also call each model endpoint")
    doctor.add_argument("--format", choices=("text", "json"), default="text")

    gate_cmd = sub.add_parser("gate", help="ask the bash gate whether a command is allowed")
    gate_cmd.add_argument("bash_command", metavar="COMMAND")

    _add_queue_commands(sub)
    _add_heartbeat_command(sub)
    _add_eval_command(sub)
    return parser


# ---------------------------------------------------------------------------
# serve, and the queue's commands: submit, tasks, instances, events, cancel.
# These talk to the database directly, so they work with or without serve.
# ---------------------------------------------------------------------------


_MAX_ID = 2**63 - 1  # Postgres bigint


def _whole(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
    return value


def _id(text: str) -> int:
    return _whole(text, 1, _MAX_ID)


def _count(text: str) -> int:
    return _whole(text, 1, 10_000)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _hostport(text: str) -> str:
    if not config_module.valid_hostport(text):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 1-65535), got {text!r}")
    return text


def _add_queue_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the service: task workers, the heartbeat loop and the HTTP API")
    serve.add_argument(
        "--workers",
        type=lambda t: _whole(t, 1, 64),
        help="task worker threads (default: PIDEPLOY_WORKERS, 2)",
    )
    serve.add_argument(
        "--listen", type=_hostport, help="HOST:PORT of the HTTP API (default: PIDEPLOY_LISTEN)"
    )
    serve.add_argument("--no-heartbeat", action="store_true", help="do not run the heartbeat loop")
    # Also accepted after the command (`serve --log-format text`); SUPPRESS keeps the global one otherwise.
    serve.add_argument(
        "--log-format", choices=("json", "text"), default=argparse.SUPPRESS, help="json or text"
    )
    serve.add_argument(
        "--grace", type=_seconds, help="seconds running tasks get at shutdown (PIDEPLOY_SHUTDOWN_GRACE)"
    )

    submit = sub.add_parser("submit", help="queue a task (a running serve, now or later, works it)")
    submit.add_argument("type", choices=tasks.TYPES)
    submit.add_argument("--user", required=True, help="the acting user (heartbeat tasks: system)")
    submit.add_argument(
        "--instance", type=_id, help="the instance (every type but heartbeat and a new create)"
    )
    submit.add_argument("--params", default="{}", help='JSON object, e.g. \'{"name": "alice"}\'')
    submit.add_argument("--idempotency-key", help="a repeat with the same key returns the first task")
    submit.add_argument(
        "--wait", action="store_true", help="show progress; exit 0 only if the task succeeded"
    )
    submit.add_argument("--timeout", type=_seconds, help="with --wait: give up after this many seconds")

    listing = {
        "tasks": "recent tasks, newest first",
        "instances": "instances",
        "events": "instance history, newest first",
    }
    for name, text in listing.items():
        parser = sub.add_parser(name, help=text)
        parser.add_argument("--format", choices=("table", "json"), default="table")
        parser.add_argument("--user", help="only this user's")
        if name != "instances":
            parser.add_argument("--instance", type=_id, help="only this instance's")
            parser.add_argument("--limit", type=_count, default=50, help="at most this many (1-10000)")
        if name == "tasks":
            parser.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))

    cancel = sub.add_parser(
        "cancel", help="cancel a task: queued ones at once, running ones at their next lease renewal"
    )
    cancel.add_argument("task", type=_id)


def _listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _dashboard_url(config: Config, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}/"
    if not config.api_token:
        return base
    user = re.sub(r"[^A-Za-z0-9_.@-]", "", getpass.getuser()) or "admin"
    # The token goes into the URL only for a loopback listener: that URL is for the operator's own browser.
    token = config.api_token if httpd.is_loopback(host) else "<PIDEPLOY_API_TOKEN>"
    return base + "?" + urllib.parse.urlencode({"token": token, "user": user})


def _raise_file_limit() -> None:
    """Open HTTP connections each hold a file descriptor: up to 65536 if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as error:
        logger.warning(
            "cannot raise the file limit from %d: %s", soft, error, extra={"action": "serve_file_limit"}
        )


@command("serve")
def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    workers = args.workers or config.workers
    grace = config.shutdown_grace if args.grace is None else args.grace
    host, port = _listen_address(args.listen or config.listen)
    if not config.api_token and not httpd.is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host}:{port} without PIDEPLOY_API_TOKEN: set a token, or listen on 127.0.0.1",
            key="listen",
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info(
            "%s received: shutting down", signal.Signals(signum).name, extra={"action": "serve_signal"}
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _raise_file_limit()
    # Each worker may hold a pool connection for an instance lock while its tool opens transactions.
    with open_runtime(config, pool_size=3 * workers + 10) as rt:
        queue = tasks.Queue(rt.db, config.max_attempts)
        pool = tasks.WorkerPool(
            queue,
            lambda: task_runner(rt, config),
            workers,
            lease_s=config.lease_seconds,
            poll_interval=config.poll_interval,
        )
        try:
            server = httpd.make_server(api.Api(config, rt.db, queue, rt.proxy), host, port)
        except OSError as error:  # most often: another serve (or anything) already listens there
            raise InfraUnavailable(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        threads = [threading.Thread(target=server.serve_forever, args=(0.5,), name="http", daemon=True)]
        # Notices a database outage (and restarts an embedded cluster that died) within seconds.
        watchdog = threading.Thread(target=rt.db.watch, args=(stop,), name="db-watch", daemon=True)
        threads.append(watchdog)
        if not args.no_heartbeat:
            import heartbeat

            loop = heartbeat.Heartbeat(rt, config)
            threads.append(threading.Thread(target=loop.run, args=(stop,), name="heartbeat", daemon=True))
        pool.start()
        for thread in threads:
            thread.start()
        bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
        if not config.api_token:
            logger.warning(
                "no PIDEPLOY_API_TOKEN: the API is open to local callers only (X-User-Id is still required)",
                extra={"action": "serve_no_token"},
            )
        logger.info(
            "serving on http://%s:%s with %d worker(s); dashboard: %s",
            bound_host,
            bound_port,
            workers,
            _dashboard_url(config, bound_host, bound_port),
            extra={"action": "serve_ready", "listen": f"{bound_host}:{bound_port}", "workers": workers},
        )
        while not stop.wait(1.0):
            pass
        rt.db.health.suspect()  # wakes the watchdog, which sees `stop`
        server.shutdown()  # new requests go to another serve; the queue keeps what they submitted
        released = pool.shutdown(grace)
        for thread in threads[1:]:
            thread.join(grace)
        server.server_close()
        logger.info(
            "stopped; %d task(s) given back to the queue",
            len(released),
            extra={"action": "serve_stopped", "released": released},
        )
    return 0


def _print_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]], fmt: str) -> None:
    """A list of objects as JSON, or as a table with aligned columns (header, key)."""
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    cells = [[header.upper() for header, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for _, key in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    text = str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


@command("submit")
def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    try:
        params = json.loads(args.params)
    except ValueError as error:
        raise BadRequest(f"--params is not valid JSON: {error}") from None
    params = tasks.check_params(args.type, params)
    with open_database(config) as postgres:
        queue = tasks.Queue(postgres.db, config.max_attempts)
        submitted = _submit(queue, args, params, config.image)
        task = submitted.task
        note = "" if submitted.created else " (a repeat: the unfinished task is returned)"
        print(f"task {task['id']} {task['status']}{note}", file=sys.stderr)
        if not args.wait:
            print(json.dumps({"task_id": task["id"], "instance_id": task["instance_id"], "status": task["status"],
                              "deduplicated": not submitted.created}))  # fmt: skip
            return 0
        final = _wait_for(queue, task["id"], args.timeout)
    print(json.dumps(api.task_json(final), default=str))
    if final["status"] == "succeeded":
        return 0
    print(
        f"pideploy: task {final['id']} {final['status']}: {final['error_class']}: {final['last_error']}",
        file=sys.stderr,
    )
    return 1


def _submit(
    queue: tasks.Queue, args: argparse.Namespace, params: dict[str, Any], image: str
) -> tasks.Submitted:
    if args.type == "heartbeat":
        if args.user != tasks.SYSTEM_USER:
            raise BadRequest(f"heartbeat tasks run as --user {tasks.SYSTEM_USER}")
        return queue.submit_heartbeat(params, args.idempotency_key)
    if args.type == "instance_create":
        if args.instance is not None:  # names the instance the create is about: it must be that one
            row = queue.db.one("instance_get_owned", id=args.instance, user_id=args.user)
            if row is None:
                raise NotFound(f"no instance {args.instance} of user {args.user}")
            if row["name"] != params["name"]:
                raise BadRequest(f"instance {args.instance} is named {row['name']!r}, not {params['name']!r}")
        # The API's path, so the same answers: a repeat is deduplicated, an existing name is a 409.
        _, submitted = queue.submit_create(
            args.user, params["name"], params.get("config"), image, args.idempotency_key
        )
        return submitted
    if args.instance is None:
        raise BadRequest(f"{args.type} needs --instance")
    return queue.submit_action(args.user, args.type, args.instance, params, args.idempotency_key)


def _wait_for(queue: tasks.Queue, task_id: int, timeout: float | None) -> db.Row:
    """Poll the task row until it ends, telling each change on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = ""
    while True:
        task = queue.get(task_id)
        state = f"{task['status']}:{task['attempts']}"
        if state != seen:
            seen = state
            if task["status"] == "running":
                print(
                    f"task {task_id} running (attempt {task['attempts']}, {task['locked_by']})",
                    file=sys.stderr,
                )
            elif task["status"] == "queued" and task["attempts"]:
                print(f"task {task_id} queued again (after {task['attempts']} attempt(s))", file=sys.stderr)
        if task["finished_at"] is not None:
            took = f" in {task['duration_s']:.1f}s" if task["duration_s"] is not None else ""
            print(f"task {task_id} {task['status']}{took}", file=sys.stderr)
            return task
        if deadline is not None and time.monotonic() >= deadline:
            raise PiDeployError(f"task {task_id} is still {task['status']} after {timeout:.0f}s")
        time.sleep(0.25)


@command("tasks")
def cmd_tasks(args: argparse.Namespace, config: Config) -> int:
    with open_database(config) as postgres:
        rows = tasks.Queue(postgres.db).list(args.user, args.status, args.instance, args.limit)
    if args.format == "json":
        _print_rows(
            [{**api.task_json(r), "locked_by": r["locked_by"], "trace_file": r["trace_file"]} for r in rows],
            [],
            "json",
        )
        return 0
    columns = [("id", "id"), ("type", "type"), ("status", "status"), ("user", "user_id"), ("instance", "instance_id"),
               ("tries", "attempts"), ("created", "created_at"), ("took_s", "duration_s"), ("error", "last_error")]  # fmt: skip
    _print_rows(rows, columns, "table")
    return 0


@command("instances")
def cmd_instances(args: argparse.Namespace, config: Config) -> int:
    with open_database(config) as postgres:
        if args.user:
            rows = postgres.db.all("instance_list_for_user", user_id=args.user)
        else:
            rows = postgres.db.all("instance_list_all")
    columns = [("id", "id"), ("user", "user_id"), ("name", "name"), ("status", "status"), ("port", "port"),
               ("image", "image"), ("error", "last_error")]  # fmt: skip
    routes = proxy_from_config(config)  # only for the route URLs: nothing is started
    _print_rows([api.instance_json(r, config, routes) for r in rows], columns, args.format)
    return 0


@command("events")
def cmd_events(args: argparse.Namespace, config: Config) -> int:
    with open_database(config) as postgres:
        if args.instance is not None:
            rows = postgres.db.all("event_list_for_instance", instance_id=args.instance, limit=args.limit)
        elif args.user:
            rows = postgres.db.all("event_list_for_user", user_id=args.user, limit=args.limit)
        else:
            rows = postgres.db.all("event_list_all", limit=args.limit)
    if args.user:
        rows = [r for r in rows if r["user_id"] == args.user]
    columns = [("id", "id"), ("time", "created_at"), ("instance", "instance_id"), ("user", "user_id"),
               ("task", "task_id"), ("kind", "kind"), ("detail", "detail")]  # fmt: skip
    _print_rows(rows, columns, args.format)
    return 0


@command("cancel")
def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    with open_database(config) as postgres:
        row = tasks.Queue(postgres.db).cancel(args.task)
    if row["status"] == "cancelled":
        print(f"task {row['id']} cancelled")
    else:
        print(f"task {row['id']} is running: cancel requested (it stops at its next lease renewal)")
    return 0


# ---------------------------------------------------------------------------
# heartbeat (heartbeat.py): `--once` from cron; without it, rounds in the foreground
# ---------------------------------------------------------------------------


def _add_heartbeat_command(sub: Any) -> None:
    beat = sub.add_parser(
        "heartbeat", help="check the database, containers and nginx agree, and repair them (cron: --once)"
    )
    beat.add_argument(
        "--once", action="store_true", help="one round; exit 0 if it left no drift unrepaired, else 1"
    )
    beat.add_argument("--format", choices=("text", "json"), default="text", help="output of --once")


@command("heartbeat")
def cmd_heartbeat(args: argparse.Namespace, config: Config) -> int:
    import heartbeat

    with open_runtime(config) as rt:
        return heartbeat.cli(rt, config, once=args.once, fmt=args.format)


# ---------------------------------------------------------------------------
# eval (evals/): `eval record` turns a real run's trace into a draft eval case
# ---------------------------------------------------------------------------


def _add_eval_command(sub: Any) -> None:
    evals = sub.add_parser("eval", help="the eval dataset (run it with make eval)")
    actions = evals.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    record = actions.add_parser("record", help="turn a run's trace JSON into a draft case in evals/cases/")
    record.add_argument("trace_file", type=Path, metavar="TRACE_FILE")
    record.add_argument("--out", type=Path, help="where to write the case (default evals/cases/<id>.json)")


@command("eval")
def cmd_eval(args: argparse.Namespace, config: Config) -> int:
    from evals.record import RecordError, record

    try:
        path = record(args.trace_file, args.out)
    except RecordError as error:
        raise BadRequest(str(error)) from None
    print(f"wrote {path}: a draft (needs_review); check its world and expectations, then make eval")
    return 0


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
