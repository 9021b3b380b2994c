"""One conformance suite for every Proxy: MemoryProxy and NginxProxy (a real nginx).

The nginx variant runs an embedded nginx in a temporary prefix on a free
loopback port and stops it afterwards. Tests marked nginx-only cover what only
a real nginx does: 404 for an unknown key, the redirect, WebSocket upgrades,
`nginx -t` failures, locking across processes and reuse of a running nginx.
"""

from __future__ import annotations

import fcntl
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxy
from errors import ProxyError
from localio import free_port, loopback_opener
from proxy import MemoryProxy, NginxProxy
from tests.conftest import ROOT, make_config, nginx_binary, require_stack


class _Backend(http.server.BaseHTTPRequestHandler):
    """A stand-in instance: /healthz is 200; a WebSocket upgrade is accepted and echoed."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            self.wfile.write(self.rfile.read(4))  # echo one frame-sized chunk
            self.close_connection = True
            return
        body = f"{self.path} prefix={self.headers.get('X-Forwarded-Prefix')}".encode()
        self.send_response(200 if self.path.startswith("/healthz") or self.path.startswith("/p") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    """The port of a live instance stand-in."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _nginx(prefix: Path, listen: str | None = None) -> NginxProxy:
    binary = nginx_binary()
    require_stack("nginx", binary is not None, "apt-get install nginx")
    assert binary is not None
    return NginxProxy.embedded(prefix, listen or f"127.0.0.1:{free_port()}", nginx_bin=binary)


@pytest.fixture(params=["memory", pytest.param("nginx", marks=pytest.mark.stack)])
def px(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryProxy | NginxProxy]:
    chosen: MemoryProxy | NginxProxy = (
        MemoryProxy() if request.param == "memory" else _nginx(tmp_path / "ngx")
    )
    chosen.ensure_running()
    yield chosen
    if isinstance(chosen, NginxProxy):
        chosen.close(stop=True)
    else:
        chosen.close()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxProxy]:
    started = _nginx(tmp_path / "ngx")
    started.ensure_running()
    yield started
    started.close(stop=True)


_opener = loopback_opener(proxy._NoRedirect())


def fetch(url: str) -> tuple[int, str, str | None]:
    """(status, body, Location) without following redirects."""
    try:
        with _opener.open(url, timeout=3) as reply:
            return reply.status, reply.read().decode(), reply.headers.get("Location")
    except urllib.error.HTTPError as error:
        return error.code, "", error.headers.get("Location")


def served_generation(nginx: NginxProxy) -> str:
    return fetch(nginx.probe_url + proxy.GENERATION_PATH)[1].strip()


# -- every proxy -----------------------------------------------------------------


def test_apply_and_routes_round_trip(px: MemoryProxy | NginxProxy) -> None:
    assert px.routes() == {}
    px.apply({"1": 20001, "abc-D_2": 20002})
    assert px.routes() == {"1": 20001, "abc-D_2": 20002}
    px.apply({"1": 20003})
    assert px.routes() == {"1": 20003}
    px.apply({})
    assert px.routes() == {}


@pytest.mark.parametrize(
    "bad",
    [{"a/b": 1}, {"a b": 1}, {"": 1}, {".generation": 1}, {"a": 0}, {"a": 65536}, {"a": "80"}, {"a": True}],
    ids=["slash", "space", "empty", "dot", "port0", "port65536", "port-str", "port-bool"],
)
def test_invalid_routes_raise_and_keep_the_map(px: MemoryProxy | NginxProxy, bad: dict[str, object]) -> None:
    px.apply({"keep": 20001})
    with pytest.raises(ProxyError):
        px.apply(bad)  # type: ignore[arg-type]
    assert px.routes() == {"keep": 20001}


def test_keys_differing_only_in_case_are_refused(px: MemoryProxy | NginxProxy) -> None:
    with pytest.raises(ProxyError, match="differ only in case"):
        px.apply({"ab": 20001, "AB": 20002})
    assert px.routes() == {}


def test_check_true_for_live_false_for_dead_and_unknown(px: MemoryProxy | NginxProxy, backend: int) -> None:
    px.apply({"live": backend, "dead": free_port()})
    assert px.check(["live", "dead", "unknown"], timeout=2) == {"live": True, "dead": False, "unknown": False}
    assert px.check([]) == {}


def test_parse_map_skips_what_it_cannot_read() -> None:
    text = "# header\n.generation abc;\nok 20001;\nsup \u00b2;\nbad key 1;\nneg -1;\n"
    assert proxy.parse_map(text) == ({"ok": 20001}, "abc")


def test_url_for(px: MemoryProxy | NginxProxy) -> None:
    assert px.url_for("42") == f"{px.base_url}/i/42/"


def test_concurrent_applies_from_threads_end_consistent(px: MemoryProxy | NginxProxy) -> None:
    maps = [{f"t{n}-{i}": 20000 + 10 * n + i for i in range(5)} for n in range(2)]
    errors: list[BaseException] = []

    def worker(routes: dict[str, int]) -> None:
        try:
            for _ in range(4):
                px.apply(routes)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(routes,)) for routes in maps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert px.routes() in maps
    if isinstance(px, NginxProxy):
        assert served_generation(px) == proxy.parse_map(px.map_path.read_text())[1]


# -- a real nginx ------------------------------------------------------------------


@pytest.mark.stack
def test_nginx_routes_paths_queries_and_404s(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"7": backend})
    assert fetch(nginx.url_for("7") + "p/a%20b?x=1&y=%2F") == (200, "/p/a%20b?x=1&y=%2F prefix=/i/7", None)
    assert fetch(nginx.url_for("8") + "healthz")[0] == 404  # unknown key
    assert fetch(nginx.base_url + "/elsewhere")[0] == 404
    assert fetch(nginx.base_url + "/healthz")[:2] == (200, "ok\n")  # nginx itself


@pytest.mark.stack
def test_nginx_redirects_a_bare_key_to_its_slash(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"7": backend})
    assert fetch(nginx.base_url + "/i/7")[::2] == (301, "/i/7/")
    assert fetch(nginx.base_url + "/i/7?a=1")[::2] == (301, "/i/7/?a=1")


@pytest.mark.stack
def test_nginx_passes_websocket_upgrades(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"ws": backend})
    host, _, port = nginx.listen.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=3) as conn:
        conn.sendall(
            b"GET /i/ws/socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1024)
        assert head.startswith(b"HTTP/1.1 101")
        conn.sendall(b"ping")
        echoed = head.split(b"\r\n\r\n", 1)[1]
        while len(echoed) < 4:
            echoed += conn.recv(16)
        assert echoed == b"ping"


@pytest.mark.stack
def test_nginx_test_failure_keeps_the_last_good_map(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"good": backend})
    generation = served_generation(nginx)
    assert nginx.prefix is not None
    broken = nginx.prefix / "conf.d" / "broken.conf"
    broken.write_text("this_is_not_a_directive on;\n")  # included by nginx.conf: nginx -t fails
    with pytest.raises(ProxyError, match="unknown directive") as caught:
        nginx.apply({"good": backend, "new": backend})
    assert "last good map is kept" in caught.value.message
    assert nginx.routes() == {"good": backend}
    assert fetch(nginx.url_for("good") + "healthz")[0] == 200  # still routed
    assert served_generation(nginx) == generation  # nothing was reloaded
    broken.unlink()
    nginx.apply({"good": backend, "new": backend})
    assert fetch(nginx.url_for("new") + "healthz")[0] == 200


_APPLY_LOOP = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import proxy
p = proxy.NginxProxy.embedded(Path(sys.argv[2]), sys.argv[3], nginx_bin=sys.argv[4])
for _ in range(4):
    p.apply({f"{sys.argv[5]}{i}": 21000 + i for i in range(5)})
"""


@pytest.mark.stack
def test_nginx_concurrent_applies_from_processes_end_consistent(nginx: NginxProxy) -> None:
    assert nginx.prefix is not None
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _APPLY_LOOP,
                str(ROOT),
                str(nginx.prefix),
                nginx.listen,
                nginx.nginx_bin,
                tag,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p", "q")
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=30)
        assert run.returncode == 0, stderr
    maps = [{f"{tag}{i}": 21000 + i for i in range(5)} for tag in ("p", "q")]
    assert nginx.routes() in maps
    assert served_generation(nginx) == proxy.parse_map(nginx.map_path.read_text())[1]
    assert [p.name for p in nginx.prefix.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.stack
def test_nginx_is_reused_by_a_second_proxy_on_the_same_prefix(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"r": backend})
    pid = nginx._master_pid()
    assert nginx.prefix is not None
    second = NginxProxy.embedded(nginx.prefix, nginx.listen, nginx_bin=nginx.nginx_bin)
    second.ensure_running()
    assert second._master_pid() == pid
    assert second.routes() == {"r": backend}
    second.apply({"r": backend, "s": backend})
    assert nginx.routes() == {"r": backend, "s": backend}
    assert second.check(["r", "s"]) == {"r": True, "s": True}
    second.close()  # the default leaves nginx running
    assert nginx._master_pid() == pid


def test_problem_is_empty_while_nginx_serves_the_live_map(px: MemoryProxy | NginxProxy, backend: int) -> None:
    px.apply({"a": backend})
    assert px.problem() == ""


@pytest.mark.stack
def test_nginx_killed_with_9_is_a_problem_until_a_new_master_replaces_its_workers(
    nginx: NginxProxy, backend: int
) -> None:
    # A master killed with -9 leaves its workers serving the last map and holding the port:
    # nothing can reload them, and a new master could not bind until they are gone.
    nginx.apply({"a": backend})
    master = nginx._master_pid()
    assert master is not None
    os.kill(master, signal.SIGKILL)
    limit = time.monotonic() + 5
    while NginxProxy._alive(master) and time.monotonic() < limit:
        time.sleep(0.02)
    assert fetch(nginx.url_for("a") + "healthz")[0] == 200  # an orphaned worker still answers
    assert "has no master process; orphaned workers [" in nginx.problem()

    nginx.apply({"a": backend, "b": backend})

    assert nginx.problem() == ""
    assert nginx._master_pid() not in (None, master)
    assert nginx.check(["a", "b"]) == {"a": True, "b": True}


@pytest.mark.stack
def test_a_reload_in_progress_is_no_problem_but_a_map_nginx_never_loads_is(
    nginx: NginxProxy, backend: int
) -> None:
    # Right after a reload, old workers answer with the last map for a moment: not a fault (an
    # operator's `nginx -s reload` made the heartbeat alert nginx_down). A map nginx never
    # loads is one.
    from proxy import render_map

    nginx.apply({"a": backend})
    nginx.map_path.write_text(render_map({"a": backend, "b": backend}, "never-loaded"))
    assert "the map file is generation 'never-loaded'" in nginx.problem()
    pid = nginx._master_pid()
    assert pid is not None
    for n in range(5):
        nginx.map_path.write_text(render_map({"a": backend}, f"reloaded-{n}"))
        os.kill(pid, signal.SIGHUP)
        assert nginx.problem() == ""


@pytest.mark.stack
def test_nginx_stopped_is_a_problem_until_started(nginx: NginxProxy, backend: int) -> None:
    nginx.apply({"a": backend})
    nginx.close(stop=True)
    assert "has no master process" in nginx.problem() and "orphaned" not in nginx.problem()
    nginx.ensure_running()
    assert nginx.problem() == "" and nginx.check(["a"]) == {"a": True}


@pytest.mark.stack
def test_nginx_ignores_a_stale_pid_file(tmp_path: Path) -> None:
    stale = _nginx(tmp_path / "ngx")
    assert stale.prefix is not None
    stale.prefix.mkdir(parents=True)
    (stale.prefix / "nginx.pid").write_text(f"{os.getpid()}\n")  # a live process, not our nginx
    try:
        stale.ensure_running()
        assert stale._master_pid() not in (None, os.getpid())
    finally:
        stale.close(stop=True)
    assert stale._master_pid() is None


@pytest.mark.stack
def test_nginx_port_in_use_is_a_clear_proxy_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = _nginx(tmp_path / "ngx", f"127.0.0.1:{squatter.getsockname()[1]}")
        with pytest.raises(ProxyError, match="already in use"):
            busy.ensure_running()
    assert busy._master_pid() is None


@pytest.mark.stack
def test_external_mode_writes_the_map_and_runs_the_commands(nginx: NginxProxy, backend: int) -> None:
    assert nginx.prefix is not None
    where = f"-p {nginx.prefix}/ -e {nginx.prefix}/logs/error.log -c {nginx.prefix}/nginx.conf"
    external = NginxProxy.external(
        nginx.map_path,
        f"{nginx.nginx_bin} -t -q {where}",
        f"{nginx.nginx_bin} -s reload {where}",
        nginx.base_url,
    )
    external.ensure_running()
    external.apply({"ext": backend})
    assert external.check(["ext"]) == {"ext": True}
    assert served_generation(nginx) == proxy.parse_map(nginx.map_path.read_text())[1]
    bad = NginxProxy.external(nginx.map_path, "false", "true", nginx.base_url)
    with pytest.raises(ProxyError, match="last good map"):
        bad.apply({"other": backend})
    assert external.routes() == {"ext": backend}


def test_proxy_from_config_picks_the_mode(tmp_path: Path) -> None:
    embedded = proxy.proxy_from_config(make_config(tmp_path, nginx_listen="127.0.0.1:8999"))
    assert embedded.prefix is not None and embedded.prefix.name == "nginx"
    assert embedded.url_for("1") == "http://127.0.0.1:8999/i/1/"
    external = proxy.proxy_from_config(
        make_config(
            tmp_path,
            nginx_map=str(tmp_path / "routes.map"),
            nginx_reload_cmd="systemctl reload nginx",
            nginx_url="https://pi.example/",
        )
    )
    assert external.prefix is None and external.reload_cmd == ["systemctl", "reload", "nginx"]
    assert external.url_for("1") == "https://pi.example/i/1/"


@pytest.mark.stack
def test_nginx_apply_waits_for_the_lock_file(nginx: NginxProxy, backend: int) -> None:
    """The fcntl lock beside the map is what keeps another process out: hold it and see apply wait."""
    done = threading.Event()

    def apply() -> None:
        nginx.apply({"l": backend})
        done.set()

    with open(nginx.lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        applying = threading.Thread(target=apply)
        applying.start()
        assert not done.wait(0.3)
        assert nginx.routes() == {}
        fcntl.flock(held, fcntl.LOCK_UN)
    assert done.wait(10)
    applying.join()
    assert nginx.routes() == {"l": backend}


@pytest.mark.stack
def test_nginx_validate_checks_without_touching_live_files(tmp_path: Path, backend: int) -> None:
    fresh = _nginx(tmp_path / "ngx")
    assert "configuration valid, not running yet" in fresh.validate()
    assert fresh.prefix is not None and not fresh.prefix.exists()  # nothing written
    fresh.ensure_running()
    try:
        fresh.apply({"v": backend})
        live = fresh.map_path.read_text()
        assert "running (pid" in fresh.validate()
        (fresh.prefix / "conf.d" / "broken.conf").write_text("nope;\n")
        with pytest.raises(ProxyError, match="unknown directive"):
            fresh.validate()
        assert fresh.map_path.read_text() == live
    finally:
        fresh.close(stop=True)
