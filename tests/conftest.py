"""Shared fixtures. Tests mirror the files: tests/test_tools.py for tools.py, ...

Real-stack tests are marked `stack` and call `require_stack(...)`: on a laptop
without the stack they skip with a message saying what to run; with CI=true a
missing stack fails the test instead, so CI never reports a skipped check as
passing.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from localio import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config as config_module  # noqa: E402
import db  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STACK_HINT = 'start the real stack first: eval "$(scripts/stack.sh up)"'


def require_stack(what: str, available: bool, why: str = "") -> None:
    """Skip (laptop) or fail (CI=true) when a real-stack part is missing."""
    if available:
        return
    message = f"{what} is not available{': ' + why if why else ''} ({STACK_HINT})"
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


# ---------------------------------------------------------------------------
# configuration: tests never see the operator's PIDEPLOY_* settings
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PIDEPLOY_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.pi/agent/auth.json of the operator's


def make_config(tmp_path: Path, **settings: object) -> config_module.Config:
    """A Config for a test: home in tmp_path, settings given as field=value."""
    env = {"PIDEPLOY_HOME": str(tmp_path / "pideploy")}
    for key, value in settings.items():
        env["PIDEPLOY_" + key.upper()] = str(value)
    return config_module.load(env=env, cwd=tmp_path, auth_path=tmp_path / "no-auth.json")


# ---------------------------------------------------------------------------
# PostgreSQL: one embedded cluster per test session, a fresh database per test
# ---------------------------------------------------------------------------


def _short_home() -> Path:
    # Not under pytest's tmp dir: that is 0700, and as root the cluster runs as
    # `postgres`, which must be able to enter the home; /tmp also keeps the
    # socket path short.
    return Path(tempfile.mkdtemp(prefix="pdt-", dir="/tmp"))


@pytest.fixture
def pg_home() -> Iterator[Path]:
    """A PIDEPLOY_HOME where an embedded cluster can live (removed afterwards)."""
    home = _short_home()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[db.EmbeddedPostgres | None]:
    if db.find_server_bindir() is None:
        yield None
        return
    home = _short_home()
    cluster = db.EmbeddedPostgres(home)
    cluster.start()
    yield cluster
    cluster.release()
    shutil.rmtree(home, ignore_errors=True)


_database_numbers = itertools.count(1)


@pytest.fixture
def database_url(pg_cluster: db.EmbeddedPostgres | None) -> Iterator[str]:
    """The conninfo of a new, empty database (schema not applied)."""
    require_stack("PostgreSQL", pg_cluster is not None, db.INSTALL_HINT)
    assert pg_cluster is not None
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(pg_cluster.admin_conninfo, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    yield f"host={pg_cluster.dir} dbname={name} user={db.DB_USER}"
    with psycopg.connect(pg_cluster.admin_conninfo, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database(database_url: str) -> Iterator[db.Database]:
    """A fresh database with the schema applied."""
    database = db.Database(database_url)
    database.apply_schema()
    yield database
    database.close()


# ---------------------------------------------------------------------------
# engine and proxy (tests/test_engine.py, tests/test_proxy.py; usable by any
# test that needs the real container engine, nginx or a free loopback port)
# ---------------------------------------------------------------------------

from engine import DockerEngine  # noqa: E402
from errors import EngineError  # noqa: E402

GATEWAY_IMAGE = "localhost/pideploy-gateway:latest"


@functools.cache
def _docker_unavailable() -> str:
    """Why the real engine cannot be used ("" when it can): probed once per session."""
    try:
        real = DockerEngine(timeout=5)
        real.version()
    except EngineError as error:
        return error.message
    if not real.image_exists(GATEWAY_IMAGE):
        return f"the image {GATEWAY_IMAGE} is not in the engine at {real.where}"
    return ""


@pytest.fixture
def docker_engine() -> Iterator[DockerEngine]:
    """The real engine (DOCKER_HOST) with the gateway image; skips or fails (CI) without it."""
    why = _docker_unavailable()
    require_stack("container engine", not why, why)
    yield DockerEngine()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


# ---------------------------------------------------------------------------
# A tools world: Runtime over a real database plus the real or in-memory
# engine and proxy (tests of tools, the agent loop, the heartbeat, evals)
# ---------------------------------------------------------------------------

import dataclasses  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import tools  # noqa: E402
from config import Config  # noqa: E402
from engine import LABEL_NAMESPACE, Engine, MemoryEngine  # noqa: E402
from proxy import MemoryProxy, NginxProxy, Proxy, route_instance, route_key  # noqa: E402


@dataclass
class World:
    rt: tools.Runtime
    trace_dir: Path

    def ctx(
        self, user: str | None = "alice", instance_id: int | None = None, **kwargs: Any
    ) -> tools.ToolContext:
        return tools.ToolContext.direct(self.trace_dir, user, "test", instance_id, **kwargs)

    def row(self, instance_id: int) -> db.Row | None:
        return self.rt.db.one("instance_get", id=instance_id)

    def events(self, instance_id: int) -> list[str]:
        rows = self.rt.db.all("event_list_for_instance", instance_id=instance_id, limit=100)
        return [r["kind"] for r in reversed(rows)]

    def containers(self, instance_id: int | None = None) -> list[Any]:
        labels = {LABEL_NAMESPACE: self.rt.config.namespace}
        found = self.rt.engine.list(labels)
        if instance_id is None:
            return found
        return [c for c in found if c.labels.get("pideploy.instance") == str(instance_id)]

    def route(self, instance_id: int) -> str | None:
        """The instance's route key (proxy.route_key); for a deleted one, any route left for its id."""
        row = self.row(instance_id)
        if row is not None:
            return route_key(row, self.rt.config)
        return next((k for k in self.rt.proxy.routes() if route_instance(k) == instance_id), None)

    def through_nginx(self, instance_id: int, path: str = "healthz") -> tuple[int, str]:
        key = self.route(instance_id)
        if key is None:
            return 404, ""
        url = self.rt.proxy.url_for(key) + path
        if isinstance(self.rt.proxy, MemoryProxy):  # no nginx in memory: follow the route by hand
            port = self.rt.proxy.routes().get(key)
            if port is None:
                return 404, ""
            url = f"http://127.0.0.1:{port}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""

    def create(self, name: str = "alpha", user: str = "alice", **config: Any) -> dict[str, Any]:
        return tools.instance_create(self.rt, self.ctx(user), name, config or None)


def make_world(engine: Engine, proxy: Proxy, database: db.Database, tmp_path: Path, **settings: Any) -> World:
    # A slice of the instances' port range of its own: worlds of other test processes (other
    # checkouts on this machine) allocate from the same start otherwise, and race for the port.
    low = random.randrange(20_000, 29_900, 100)
    base = {
        "namespace": f"t{uuid.uuid4().hex[:8]}",
        "health_timeout": 30,  # a bound, not a wait: a loaded machine can be slow to start one
        "stop_timeout": 3,
        "port_range": f"{low}-{low + 99}",
    }
    config: Config = make_config(tmp_path, **{**base, **settings})
    proxy.ensure_running()
    return World(tools.Runtime(config, database, engine, proxy), tmp_path / "traces")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxProxy]:
    require_stack("nginx", nginx_binary() is not None)
    proxy = NginxProxy.embedded(
        tmp_path / "nginx", listen=f"127.0.0.1:{free_port()}", nginx_bin=str(nginx_binary())
    )
    yield proxy
    proxy.close(stop=True)


def _cleanup(world: World) -> None:
    for container in world.containers():
        world.rt.engine.remove(container.id)


@pytest.fixture
def real_world(
    docker_engine: DockerEngine, nginx: NginxProxy, database: db.Database, tmp_path: Path
) -> Iterator[World]:
    world = make_world(docker_engine, nginx, database, tmp_path)
    yield world
    _cleanup(world)


@pytest.fixture(params=["memory", "real"])
def any_world(request: pytest.FixtureRequest, database: db.Database, tmp_path: Path) -> Iterator[World]:
    if request.param == "real":
        world: World = request.getfixturevalue("real_world")
        yield world
        return
    world = make_world(MemoryEngine(), MemoryProxy(), database, tmp_path)
    yield world
    _cleanup(world)


def make_config_like(w: World, **changes: Any) -> Config:
    return dataclasses.replace(w.rt.config, **changes)


@pytest.fixture
def memory_world(database: db.Database, tmp_path: Path) -> Iterator[World]:
    """In-memory engine and proxy over a real database: fast, for loop and unit tests."""
    world = make_world(MemoryEngine(), MemoryProxy(), database, tmp_path)
    yield world
    _cleanup(world)


# ---------------------------------------------------------------------------
# Faults: an engine outage in a window, a database restart
# ---------------------------------------------------------------------------


class EngineOutage:
    """The real engine, with an outage: while `down`, every call goes to a DockerEngine on a
    socket nobody serves (DOCKER_HOST pointed at a dead socket), so the errors are the real
    ones ("container engine unreachable"). `after(method, n)` starts the outage at that
    method's call number n + 1 (the first n succeed); `end()` brings the engine back."""

    CALLS = frozenset(
        {"version", "image_exists", "tag_image", "create", "start", "stop", "kill", "remove", "rename"}
        | {"inspect", "list", "logs", "events"}
    )

    def __init__(self, real: DockerEngine, folder: Path) -> None:
        self.real = real
        self.dead = DockerEngine(f"unix://{folder}/no-engine.sock", timeout=2)
        self.down = False
        self._countdown: dict[str, int] = {}

    def after(self, method: str, successes: int) -> None:
        self._countdown[method] = successes

    def begin(self) -> None:
        self.down = True

    def end(self) -> None:
        self.down, self._countdown = False, {}

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.real, name)
        if name not in self.CALLS:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in self._countdown:
                self._countdown[name] -= 1
                if self._countdown[name] < 0:
                    self.down = True
            return getattr(self.dead if self.down else self.real, name)(*args, **kwargs)

        return call


def restart_cluster(cluster: db.EmbeddedPostgres) -> None:
    """`pg_ctl restart -m fast`: every session ends, the server is back when this returns."""
    bindir = db.find_server_bindir()
    assert bindir is not None
    out = cluster._pg(  # its own runner: the right user and folder
        bindir, "pg_ctl", "restart", "-m", "fast", "-w", "-D", str(cluster.data), "-l", str(cluster.log_file)
    )
    assert out.returncode == 0, out.stderr
