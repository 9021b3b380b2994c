"""nginx behind a small Protocol: routes from instance keys to host ports.

Every instance route is `/i/<key>/` on the proxy's base URL, proxied to
`127.0.0.1:<port>/`. `NginxProxy` writes a `map` file atomically beside the
live one, validates it with `nginx -t`, keeps the last good map when that
fails, and reloads. In embedded mode (no PIDEPLOY_NGINX_MAP) it runs its own
nginx under PIDEPLOY_HOME/nginx on loopback; in external mode it writes the map
an operator's nginx includes and runs the configured test and reload commands.
`MemoryProxy` keeps routes in a dict. Both pass tests/test_proxy.py.

Route keys: `route_key(row, config)` is the one place that names an instance's route:
`<id>-<route_token>`, the token a random 32 hex digits kept on the instance row, so a route
cannot be guessed from the sequential id; a wrong or missing token is the same 404 as a
missing instance. With PIDEPLOY_ROUTE_TOKENS=off (an operator's own auth guards /i/) it is
`<id>`. `route_instance(key)` reads the id back from either form, so a route left in the
other form (after an upgrade, or the setting changed) is a stale route of that instance.

How a route works: `map $pideploy_key $pideploy_port { default ""; include
routes.map; }` where `$pideploy_key` is captured by the location regex. nginx
evaluates a map lazily, when the variable is first read, so the capture is
there by then (checked with nginx 1.22). nginx map keys are case-insensitive:
"ab" and "AB" are the same route, so apply() refuses such a pair.

How a reload is confirmed: every map carries one more entry, `.generation
<token>`, new at each apply, and `GET /_pideploy/generation` answers the token
of the map nginx has loaded (a route key can never be `.generation`: keys are
`[0-9A-Za-z_-]+`). On SIGHUP the master starts new workers, sleeps 100 ms,
then tells the old workers to stop; until then both accept, so a request may
still meet the old map after a first answer with the new token. apply()
therefore returns only when a fresh connection gets the new token AND none of
the master's old workers still accepts (each is gone or titled "worker process
is shutting down"; nginx closes the listening sockets right after setting that
title). Measured: ~0.14 s per apply, whatever the number of routes, ~0.1 s of
it nginx's own pause. External mode knows no master pid: it waits for the
token only (add SERVER_SNIPPET to the operator's server block; without it the
wait is skipped with a warning).

The embedded nginx outlives the piDeploy process on purpose: `close()` leaves
it running so instances stay routed across restarts, and the next
`ensure_running()` reuses it (its pid file names a live nginx master started
with this prefix). `close(stop=True)` stops it (tests, `pideploy down`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from errors import ProxyError
from localio import loopback_opener, write_atomic

if TYPE_CHECKING:
    from config import Config

logger = logging.getLogger(__name__)

KEY = re.compile(r"[0-9A-Za-z_-]+")
_INSTANCE_KEY = re.compile(r"([0-9]{1,18})(-[0-9a-f]+)?")
GENERATION_KEY = ".generation"
GENERATION_PATH = "/_pideploy/generation"
CONFIRM_TIMEOUT = 10.0  # seconds for nginx to serve a new map after a reload or start
RELOAD_SETTLE = 2.0  # seconds a served map may lag the file before it counts as nginx's fault
# nginx's master sleeps 100 ms between starting new workers and stopping the old.
EXTERNAL_RELOAD_PAUSE = 0.15
MAP_HEADER = "# piDeploy routes: instance key -> 127.0.0.1 port. Written by proxy.py; do not edit.\n"


class Proxy(Protocol):
    def ensure_running(self) -> None:
        """Embedded mode: start nginx if it is not running. External: check the binary."""
        ...

    def apply(self, routes: Mapping[str, int]) -> None:
        """Make the live routes exactly `routes`. ProxyError (last good map kept) if invalid."""
        ...

    def routes(self) -> dict[str, int]:
        """The live route map as nginx has it (read from the map file)."""
        ...

    def url_for(self, key: str) -> str:
        """The public URL of one instance's route, ending in '/'."""
        ...

    def check(self, keys: Iterable[str], timeout: float = 2.0) -> dict[str, bool]:
        """GET <url_for(key)>healthz through the proxy, concurrently; True if 200."""
        ...

    def problem(self) -> str:
        """Why nginx does not serve the live route map now; "" when it does."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------
# route keys
# ---------------------------------------------------------------------------


def route_key(row: Mapping[str, Any], config: Config) -> str:
    """The route key of an instance row: `<id>-<route_token>`, or `<id>` with route tokens off."""
    if config.route_tokens == "off":
        return str(row["id"])
    return f"{row['id']}-{row['route_token']}"


def route_instance(key: str) -> int | None:
    """The instance a route key is for, in either form; None for a key piDeploy never writes."""
    match = _INSTANCE_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


def shown_key(key: str) -> str:
    """A route key as logs, traces, events and models see it: the token left out."""
    match = _INSTANCE_KEY.fullmatch(key)
    return f"{match.group(1)}-<token>" if match and match.group(2) else key


# ---------------------------------------------------------------------------
# the map file and the nginx configuration
# ---------------------------------------------------------------------------


def validate(routes: Mapping[str, int]) -> dict[str, int]:
    """The routes as a plain dict, or ProxyError naming the first bad entry."""
    checked: dict[str, int] = {}
    folded: dict[str, str] = {}
    for key, port in routes.items():
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise ProxyError(f"invalid route key {key!r}: use letters, digits, - and _", key=str(key))
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ProxyError(f"invalid port {port!r} for route {key!r}: an integer 1..65535", key=key)
        if key.lower() in folded:
            raise ProxyError(
                f"route keys {folded[key.lower()]!r} and {key!r} differ only in case: nginx maps them to one route",
                key=key,
            )
        folded[key.lower()] = key
        checked[key] = port
    return checked


def render_map(routes: Mapping[str, int], generation: str) -> str:
    lines = [MAP_HEADER, f"{GENERATION_KEY} {generation};\n"]
    lines += [f"{key} {port};\n" for key, port in sorted(routes.items())]
    return "".join(lines)


def parse_map(text: str) -> tuple[dict[str, int], str]:
    """(routes, generation) from a map file's text; a line that is not `key value;` is skipped."""
    routes: dict[str, int] = {}
    generation = ""
    for line in text.splitlines():
        parts = line.split("#", 1)[0].strip().rstrip(";").split()
        if len(parts) != 2:
            continue
        key, value = parts
        if key == GENERATION_KEY:
            generation = value
        elif KEY.fullmatch(key) and value.isascii() and value.isdigit():
            routes[key] = int(value)
    return routes, generation


def http_snippet(map_path: Path) -> str:
    """The http-level part of the routing: goes into an operator's nginx in external mode."""
    return f"""\
map $http_upgrade $pideploy_connection {{
    default upgrade;
    ""      close;
}}
map $pideploy_key $pideploy_port {{
    default "";
    include {map_path};
}}
"""


SERVER_SNIPPET = r"""
location ~ ^/i/(?<pideploy_key>[0-9A-Za-z_-]+)$ {
    return 301 /i/$pideploy_key/$is_args$args;
}
location ~ ^/i/(?<pideploy_key>[0-9A-Za-z_-]+)/ {
    if ($pideploy_port = "") {
        return 404;
    }
    rewrite ^/i/[^/]+(/.*)$ $1 break;
    proxy_pass http://127.0.0.1:$pideploy_port;
    proxy_http_version 1.1;
    proxy_set_header Host $http_host;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection $pideploy_connection;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Prefix /i/$pideploy_key;
    proxy_redirect / /i/$pideploy_key/;
    proxy_buffering off;
    proxy_request_buffering off;
    proxy_read_timeout 1h;
    proxy_send_timeout 1h;
}
location = /_pideploy/generation {
    set $pideploy_key .generation;
    default_type text/plain;
    return 200 "$pideploy_port\n";
}
"""
"""The server-level part of the routing: goes into an operator's server block in external mode."""


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


def embedded_conf(prefix: Path, listen: str, map_path: Path, conf_d: Path | None = None) -> str:
    temp = prefix / "temp"
    conf_d = conf_d or prefix / "conf.d"
    return f"""\
# Generated by piDeploy (proxy.py) for its embedded nginx; rewritten at start.
# Server-level additions go in {conf_d}/*.conf.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    server_tokens off;
    absolute_redirect off;
    default_type application/octet-stream;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

{_indent(http_snippet(map_path), 4)}
    server {{
        listen {listen};

        location = /healthz {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location / {{
            return 404;
        }}
{_indent(SERVER_SNIPPET, 8)}
        include {conf_d}/*.conf;
    }}
}}
"""


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_opener = loopback_opener(_NoRedirect())


def _get(url: str, timeout: float) -> tuple[int | None, str]:
    """(status, body) of one GET, no proxies, no redirects; (None, why) when nothing answers."""
    try:
        with _opener.open(url, timeout=timeout) as reply:
            return reply.status, reply.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (OSError, ValueError) as error:
        return None, str(error)


def _check_all(urls: Mapping[str, str], timeout: float) -> dict[str, bool]:
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="proxy-check") as pool:
        statuses = pool.map(lambda url: _get(url, timeout)[0], urls.values())
        return {key: status == 200 for key, status in zip(urls, statuses, strict=True)}


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


class NginxProxy:
    """Routes in an nginx map file; embedded (its own nginx) or external (an operator's)."""

    def __init__(
        self,
        *,
        map_path: Path,
        base_url: str,
        test_cmd: list[str],
        reload_cmd: list[str] | None,
        probe_url: str,
        prefix: Path | None = None,
        listen: str = "",
        nginx_bin: str = "nginx",
    ) -> None:
        self.map_path = map_path
        self.lock_path = map_path.with_name(map_path.name + ".lock")
        self.base_url = base_url.rstrip("/")
        self.test_cmd = test_cmd
        self.reload_cmd = reload_cmd  # None: embedded, SIGHUP to the master named by the pid file
        self.probe_url = probe_url.rstrip("/")
        self.prefix = prefix
        self.listen = listen
        self.nginx_bin = nginx_bin
        self._lock = threading.Lock()
        self._probe_missing = False  # external nginx without the generation location

    @classmethod
    def embedded(
        cls,
        prefix_dir: Path,
        listen: str = "127.0.0.1:8780",
        nginx_bin: str = "nginx",
        base_url: str | None = None,
    ) -> NginxProxy:
        prefix = prefix_dir.resolve()
        conf = prefix / "nginx.conf"
        return cls(
            map_path=prefix / "routes.map",
            base_url=base_url or f"http://{listen}",
            test_cmd=[
                nginx_bin,
                "-t",
                "-q",
                "-p",
                f"{prefix}/",
                "-e",
                f"{prefix}/logs/error.log",
                "-c",
                str(conf),
            ],
            reload_cmd=None,
            probe_url=f"http://{listen}",
            prefix=prefix,
            listen=listen,
            nginx_bin=nginx_bin,
        )

    @classmethod
    def external(cls, map_path: Path, test_cmd: str, reload_cmd: str, base_url: str) -> NginxProxy:
        return cls(
            map_path=map_path,
            base_url=base_url,
            test_cmd=shlex.split(test_cmd),
            reload_cmd=shlex.split(reload_cmd),
            probe_url=base_url,
        )

    # -- the Protocol --------------------------------------------------------

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/i/{key}/"

    def routes(self) -> dict[str, int]:
        return parse_map(_read(self.map_path) or "")[0]

    def check(self, keys: Iterable[str], timeout: float = 2.0) -> dict[str, bool]:
        return _check_all({key: self.url_for(key) + "healthz" for key in keys}, timeout)

    def problem(self) -> str:
        # A reload in progress (ours, or an operator's `nginx -s reload`) has old workers answer
        # with the last map for a moment: only a mismatch that lasts RELOAD_SETTLE is a fault.
        deadline = time.monotonic() + RELOAD_SETTLE
        while True:
            # Under the map's lock: an apply in progress (map written, reload pending) is not a fault.
            with self._locked():
                generation = parse_map(_read(self.map_path) or "")[1]
                if self.prefix is not None and self._master_pid() is None:
                    orphans = self._orphaned_workers()
                    left = f"; orphaned workers {orphans} still answer with the last map" if orphans else ""
                    return f"the embedded nginx under {self.prefix} has no master process{left}"
                status, body = _get(self.probe_url + GENERATION_PATH, 1.0)
            if status is None:
                return f"nothing answers at {self.probe_url} ({body})"
            if status == 404 and self.prefix is None:
                return (
                    ""  # an operator's nginx without SERVER_SNIPPET: it answers, and that is all we can tell
                )
            if status == 200 and body.strip() == generation:
                return ""
            if time.monotonic() >= deadline:
                return (
                    f"{self.probe_url}{GENERATION_PATH} answered {status} {body.strip()[:40]!r}; "
                    f"the map file is generation {generation!r}"
                )
            time.sleep(0.1)

    def ensure_running(self) -> None:
        with self._locked():
            if self.prefix is None:
                program = self.test_cmd[0] if self.test_cmd else ""
                if not shutil.which(program):
                    raise ProxyError(f"nginx test command not found: {program!r} (PIDEPLOY_NGINX_TEST_CMD)")
                if _read(self.map_path) is None:
                    write_atomic(self.map_path, render_map({}, secrets.token_hex(8)))
                return
            self._ensure_embedded()

    def apply(self, routes: Mapping[str, int]) -> None:
        wanted = validate(routes)
        started = time.monotonic()
        with self._locked():
            if self.prefix is not None and self._master_pid() is None:
                self._ensure_embedded()
            last_good = _read(self.map_path)
            current, generation = parse_map(last_good or "")
            if last_good is not None and current == wanted and self._serving(generation):
                return
            generation = secrets.token_hex(8)
            write_atomic(self.map_path, render_map(wanted, generation))
            problem = self._test()
            if problem:
                write_atomic(self.map_path, last_good or render_map({}, secrets.token_hex(8)))
                raise ProxyError(f"nginx rejected the new routes; the last good map is kept: {problem}")
            self._confirm(generation, self._reload())
        logger.info(
            "routes applied",
            extra={
                "action": "proxy_apply",
                "routes": len(wanted),
                "seconds": round(time.monotonic() - started, 4),
            },
        )

    def validate(self) -> str:
        """Check nginx without changing anything live (doctor): a one-line description, else ProxyError."""
        try:
            done = subprocess.run(
                [self.nginx_bin if self.prefix else self.test_cmd[0], "-v"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            version = (done.stderr or done.stdout).strip().removeprefix("nginx version: ")
        except (OSError, IndexError, subprocess.TimeoutExpired) as error:
            raise ProxyError(f"cannot run nginx: {error}") from None
        if self.prefix is None:
            problem = self._test()
            if problem:
                raise ProxyError(problem)
            return f"{version}, external: {shlex.join(self.test_cmd)} passes with the map {self.map_path}"
        with tempfile.TemporaryDirectory(prefix="pideploy-nginx-check-") as scratch:
            where = Path(scratch)
            for folder in ("logs", "temp"):
                (where / folder).mkdir()
            (where / "routes.map").write_text(_read(self.map_path) or render_map({}, "check"))
            conf = embedded_conf(where, self.listen, where / "routes.map", conf_d=self.prefix / "conf.d")
            (where / "nginx.conf").write_text(conf)
            problem = self._run(
                [
                    self.nginx_bin,
                    "-t",
                    "-q",
                    "-p",
                    f"{where}/",
                    "-e",
                    f"{where}/logs/error.log",
                    "-c",
                    f"{where}/nginx.conf",
                ],
                "nginx -t",
            )
        if problem:
            raise ProxyError(problem)
        pid = self._master_pid()
        if pid is None:
            self._check_listen_free()
        state = f"running (pid {pid})" if pid else "not running yet (starts with the service)"
        return f"{version}, embedded under {self.prefix} on {self.listen}: configuration valid, {state}"

    def close(self, stop: bool = False) -> None:
        """Leaves an embedded nginx running (instances stay routed) unless `stop`."""
        if not stop or self.prefix is None:
            return
        with self._locked():
            pid = self._master_pid()
            if pid is None:
                return
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            logger.info("nginx stopped", extra={"action": "nginx_stop", "pid": pid})

    # -- locking, testing, reloading ------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This object's threads, then every process (and every other object) using the map."""
        with self._lock:
            self.map_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _run(self, command: list[str], what: str) -> str:
        """'' if the command succeeded, else its message."""
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{what} ({shlex.join(command)}) failed: {error}"
        if done.returncode == 0:
            return ""
        output = (done.stderr.strip() or done.stdout.strip()).replace("\n", "; ")
        return f"{what} ({shlex.join(command)}) exited {done.returncode}: {output}"

    def _test(self) -> str:
        return self._run(self.test_cmd, "nginx -t")

    def _reload(self) -> set[int]:
        """Reload; returns the embedded master's workers of the old configuration."""
        if self.reload_cmd is not None:
            problem = self._run(self.reload_cmd, "nginx reload")
            if problem:
                raise ProxyError(problem)
            return set()
        pid = self._master_pid()
        if pid is None:
            raise ProxyError(f"the embedded nginx under {self.prefix} is not running")
        old_workers = set(self._accepting_workers(pid))
        os.kill(pid, signal.SIGHUP)
        return old_workers

    @staticmethod
    def _accepting_workers(master: int) -> list[int]:
        """The master's workers that still accept connections (not 'is shutting down')."""
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            return []
        accepting = []
        for child in children:
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "worker process" in title and "shutting down" not in title:
                accepting.append(int(child))
        return accepting

    def _serving(self, generation: str) -> bool:
        """Whether nginx answers this map generation now (never known without the probe location)."""
        status, body = _get(self.probe_url + GENERATION_PATH, 1.0)
        return status == 200 and body.strip() == generation

    def _confirm(self, generation: str, old_workers: Set[int] = frozenset()) -> None:
        """Wait until nginx serves the new map: reload is asynchronous.

        A fresh connection must get the new generation (a new worker runs). On
        a reload the master starts the new workers, sleeps 100 ms, and only
        then tells the old ones to stop; until an old worker has closed its
        listening socket it may still answer with the old map. Embedded: wait
        until none of `old_workers` accepts. External (no master pid known):
        wait out that pause after the first new answer.
        """
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        status, body = None, ""
        master = self._master_pid() if self.prefix is not None else None
        first_seen: float | None = None
        while time.monotonic() < deadline:
            status, body = _get(self.probe_url + GENERATION_PATH, 1.0)
            if status == 200 and body.strip() == generation:
                now = time.monotonic()
                first_seen = first_seen or now
                if master is not None:
                    if not old_workers & set(self._accepting_workers(master)):
                        return
                elif now - first_seen >= EXTERNAL_RELOAD_PAUSE:
                    return
            elif status == 404 and self.prefix is None:
                if not self._probe_missing:
                    logger.warning(
                        "%s%s answers 404: add proxy.SERVER_SNIPPET to the server block to confirm reloads",
                        self.probe_url,
                        GENERATION_PATH,
                        extra={"action": "proxy_probe_missing"},
                    )
                    self._probe_missing = True
                return
            time.sleep(0.005)
        raise ProxyError(
            f"nginx did not serve the new routes within {CONFIRM_TIMEOUT:.0f}s "
            f"({self.probe_url}{GENERATION_PATH} answered {status} {body.strip()[:200]!r})"
        )

    # -- the embedded nginx ----------------------------------------------------

    @property
    def _conf_path(self) -> Path:
        assert self.prefix is not None
        return self.prefix / "nginx.conf"

    @staticmethod
    def _alive(pid: int) -> bool:
        """Running, not a zombie: the daemonised master's parent is init, which may reap late."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")

    def _master_pid(self) -> int | None:
        """The pid in the pid file, if it is a live nginx master started with this configuration."""
        assert self.prefix is not None
        try:
            pid = int((self.prefix / "nginx.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            return None
        if "nginx: master process" in cmdline and str(self._conf_path) in cmdline:
            return pid
        return None

    def _ensure_embedded(self) -> None:
        """Under the lock: write the configuration, then start nginx or reuse (and maybe reload) it."""
        assert self.prefix is not None
        for folder in ("logs", "temp", "conf.d"):
            (self.prefix / folder).mkdir(parents=True, exist_ok=True)
        conf = embedded_conf(self.prefix, self.listen, self.map_path)
        conf_changed = _read(self._conf_path) != conf
        if conf_changed:
            write_atomic(self._conf_path, conf)
        text = _read(self.map_path)
        generation = parse_map(text or "")[1]
        if text is None or not generation:
            routes = parse_map(text or "")[0]
            generation = secrets.token_hex(8)
            write_atomic(self.map_path, render_map(routes, generation))
        pid = self._master_pid()
        if pid is not None:
            if conf_changed or not self._serving(generation):
                problem = self._test()
                if problem:
                    raise ProxyError(f"the embedded nginx configuration is invalid: {problem}")
                self._confirm(generation, self._reload())
                logger.info("nginx reloaded", extra={"action": "nginx_reuse", "pid": pid, "reloaded": True})
            else:
                logger.info("nginx reused", extra={"action": "nginx_reuse", "pid": pid, "reloaded": False})
            return
        self._stop_orphaned_workers()
        self._check_listen_free()
        problem = self._test()
        if problem:
            raise ProxyError(f"the embedded nginx configuration is invalid: {problem}")
        start = [
            self.nginx_bin,
            "-p",
            f"{self.prefix}/",
            "-e",
            f"{self.prefix}/logs/error.log",
            "-c",
            str(self._conf_path),
        ]
        problem = self._run(start, "starting nginx")
        if problem:
            if "Address already in use" in problem:
                raise ProxyError(f"cannot start nginx: {self.listen} is already in use ({problem})")
            raise ProxyError(problem)
        self._confirm(generation)
        logger.info(
            "nginx started", extra={"action": "nginx_start", "pid": self._master_pid(), "listen": self.listen}
        )

    def _orphaned_workers(self) -> list[int]:
        """nginx processes of this prefix whose master is gone (killed with -9): they go on
        serving the last map and hold the listening socket, so no new master could start."""
        assert self.prefix is not None
        log = str(self.prefix / "logs" / "error.log")
        master = self._master_pid()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes()
                if not title.startswith(b"nginx: ") or b"master process" in title:
                    continue
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                if master is not None and parent == master:
                    continue
                if any(os.readlink(fd) == log for fd in (entry / "fd").iterdir()):
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
        return found

    def _stop_orphaned_workers(self) -> None:
        orphans = self._orphaned_workers()
        if not orphans:
            return
        logger.warning(
            "stopping nginx workers %s left by a master that died", orphans, extra={"action": "nginx_orphans"}
        )
        for pid in orphans:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(self._alive(pid) for pid in orphans) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in orphans:
            if self._alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def _check_listen_free(self) -> None:
        """nginx retries a busy port for ~2.5 s before it fails: find out at once."""
        host, _, port = self.listen.rpartition(":")
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.strip("[]") or "0.0.0.0", int(port)))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ProxyError(
                        f"cannot start nginx: {self.listen} is already in use by another program "
                        "(set PIDEPLOY_NGINX_LISTEN to a free address)",
                        listen=self.listen,
                    ) from None
                raise ProxyError(
                    f"cannot start nginx on {self.listen}: {error}", listen=self.listen
                ) from None


# ---------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------


class MemoryProxy:
    """Routes in a dict; check() asks each backend's /healthz directly (no nginx)."""

    def __init__(self, base_url: str = "http://127.0.0.1:0") -> None:
        self.base_url = base_url.rstrip("/")
        self._routes: dict[str, int] = {}
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        pass

    def apply(self, routes: Mapping[str, int]) -> None:
        wanted = validate(routes)
        with self._lock:
            self._routes = wanted

    def routes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._routes)

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/i/{key}/"

    def check(self, keys: Iterable[str], timeout: float = 2.0) -> dict[str, bool]:
        routes = self.routes()
        urls = {key: f"http://127.0.0.1:{routes[key]}/healthz" if key in routes else "" for key in keys}
        found = _check_all({key: url for key, url in urls.items() if url}, timeout)
        return {key: found.get(key, False) for key in urls}

    def problem(self) -> str:
        return ""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# from the configuration
# ---------------------------------------------------------------------------


def proxy_from_config(config: Config) -> NginxProxy:
    if config.embedded_nginx:
        return NginxProxy.embedded(
            config.home / "nginx", config.nginx_listen, config.nginx_bin, base_url=config.routes_url
        )
    return NginxProxy.external(
        Path(config.nginx_map), config.nginx_test_cmd, config.nginx_reload_cmd, config.routes_url
    )
