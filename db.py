"""PostgreSQL: the embedded default cluster, the connection pool and named queries.

With no DATABASE_URL, piDeploy owns a private cluster under PIDEPLOY_HOME/pg,
listening only on a unix socket in that folder. Several piDeploy processes on
one data dir share it: each holds a shared lock on `users.lock` while it uses
the cluster, and the last one out stops it. A process killed with -9 drops its
lock with its file descriptors, so the next start simply reuses the cluster.

psycopg errors are translated into piDeploy's own where they enter (`_translate`).
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import pwd
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from config import Config
from errors import BadRequest, Conflict, DatabaseError, InfraUnavailable, PiDeployError

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 2
_SCHEMA_LOCK = 8_700_001  # advisory lock key: one schema apply at a time
SOCKET_PATH_MAX = 100  # unix socket paths are limited to ~107 bytes
DB_NAME = "pideploy"
DB_USER = "pideploy"
# psycopg_pool retries a lost connection with a doubling pause and gives up after
# reconnect_timeout (300 s by default: by then its pauses are two minutes long, so the pool
# comes back minutes after the database did, and after giving up it reconnects only when asked).
# A short timeout keeps its pauses short; a request after it gave up starts a new attempt.
RECONNECT_TIMEOUT = 10.0
OUTAGE_WAIT = 1.0  # while the database is known to be down, a caller waits this long, not 30 s
PROBE_INTERVAL = 5.0  # serve's watchdog checks the database this often while it is up
PROBE_PAUSE_MAX = 10.0  # and at most this long apart while it is down

Row = dict[str, Any]


def load_queries(path: Path = HERE / "queries.sql") -> dict[str, str]:
    """Split queries.sql on its `-- name: NAME` headers."""
    queries: dict[str, str] = {}
    name = ""
    lines: list[str] = []
    for line in path.read_text().splitlines():
        header = re.match(r"--\s*name:\s*(\w+)\s*$", line)
        if header:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = header.group(1), []
            if name in queries:
                raise ValueError(f"duplicate query name {name} in {path}")
        elif name and not line.startswith("-- ===="):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


QUERIES = load_queries()


def _translate(error: psycopg.Error) -> Exception:
    diag = getattr(error, "diag", None)
    constraint = getattr(diag, "constraint_name", None) or ""
    detail = (getattr(diag, "message_primary", None) or str(error)).strip()
    if isinstance(error, psycopg.errors.UniqueViolation | psycopg.errors.ForeignKeyViolation):
        return Conflict(detail, constraint=constraint)
    if isinstance(error, psycopg.errors.CheckViolation | psycopg.errors.NotNullViolation | psycopg.DataError):
        # DataError: a value Postgres cannot take (an id beyond bigint, a malformed number...).
        return BadRequest(detail, constraint=constraint)
    if isinstance(error, psycopg.errors.RaiseException):
        return Conflict(detail)
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseError(f"database unavailable: {detail}")
    return error  # a programming error: let it surface with its traceback


def _connection_lost(error: psycopg.Error) -> bool:
    """A connection-level failure (the server gone or restarting), not a failed statement."""
    sqlstate = getattr(getattr(error, "diag", None), "sqlstate", None) or ""
    return (
        sqlstate.startswith("08")
        or sqlstate in ("57P01", "57P02", "57P03")
        or (isinstance(error, psycopg.OperationalError | psycopg.InterfaceError) and not sqlstate)
    )


class Health:
    """Whether the database answers, as last seen; each change is logged once.

    `down` is set by a probe that could not connect and cleared by anything that reached the
    database; `suspect()` asks serve's watchdog (Database.watch) to probe now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.reason = ""
        self.suspected = threading.Event()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def mark_down(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
        logger.warning("database unavailable: %s", reason, extra={"action": "db_down"})

    def mark_up(self) -> None:
        if self.down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.down_since is None:
                return
            seconds, self.down_since = time.monotonic() - self.down_since, None
        logger.info(
            "database reachable again after %.1fs",
            seconds,
            extra={"action": "db_up", "seconds": round(seconds, 3)},
        )

    def suspect(self) -> None:
        self.suspected.set()


def _adapt(params: dict[str, Any]) -> dict[str, Any]:
    return {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in params.items()}


class Database:
    """A connection pool plus the named queries. Rows come back as dicts."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        self.conninfo = conninfo
        self.health = Health()
        self.revive: Callable[[], bool] | None = None  # the embedded cluster's restart (Postgres sets it)
        # One direct attempt first: an unreachable database is one clear error at once,
        # instead of the pool's retries and warnings until its timeout.
        try:
            psycopg.connect(conninfo, connect_timeout=5).close()
        except psycopg.Error as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DatabaseError(f"cannot connect to the database at {redact(conninfo)}: {reason}") from None
        self.pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            conninfo,
            connection_class=psycopg.Connection[Row],
            min_size=min_size,
            max_size=max_size,
            kwargs={"row_factory": dict_row, "autocommit": True},
            # A connection a restarted server closed is found before it is handed out, and
            # replaced: a restart between two tasks costs them nothing.
            check=self._check,
            reconnect_timeout=reconnect_timeout,
            open=False,
            name="pideploy",
        )
        try:
            self.pool.open(wait=True, timeout=10)
        except PoolTimeout:
            self.pool.close()
            raise DatabaseError(f"cannot connect to the database at {redact(conninfo)}") from None

    def close(self) -> None:
        self.pool.close()

    def _check(self, conn: psycopg.Connection[Row]) -> None:
        """The pool's check before it hands a connection out; a dead one makes the watchdog look."""
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            self.health.suspect()
            raise

    @contextmanager
    def connection(self, wait: float | None = None) -> Iterator[psycopg.Connection[Row]]:
        """A pooled connection (autocommit). The pool waits up to `wait` seconds (its own 30 s by
        default) for one, but once the database is known to be down a caller gives up within
        OUTAGE_WAIT: the wait goes in slices, with a look at the database's health between."""
        total = self.pool.timeout if wait is None else wait
        deadline = time.monotonic() + total
        while True:
            try:
                conn = self.pool.getconn(min(OUTAGE_WAIT, max(0.0, deadline - time.monotonic())))
                break
            except PoolTimeout:
                if self.health.down or time.monotonic() >= deadline:
                    self.health.suspect()
                    why = self.health.reason if self.health.down else f"no connection within {total:g}s"
                    raise DatabaseError(f"database unavailable: {why}") from None
        try:
            with conn:
                yield conn
        finally:
            self.pool.putconn(conn)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Row]]:
        """A connection inside one transaction; commits on success."""
        try:
            with self.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as error:
            if _connection_lost(error):
                self.health.suspect()
            raise _translate(error) from error
        self.health.mark_up()

    def _run(self, query: str, params: dict[str, Any], conn: psycopg.Connection[Row]) -> psycopg.Cursor[Row]:
        try:
            return conn.execute(QUERIES[query], _adapt(params))
        except psycopg.Error as error:
            if _connection_lost(error):
                self.health.suspect()
            raise _translate(error) from error

    def ping(self, wait: float = OUTAGE_WAIT) -> int:
        """The schema version, or DatabaseError at once (/healthz): a database known to be down
        is not asked again here (the watchdog does that), and a pool with no connection to give
        is an answer after `wait` seconds, not after the pool's 30 s."""
        if self.health.down:
            raise DatabaseError(f"database unavailable: {self.health.reason}")
        with self.connection(wait) as conn:
            row = self._run("schema_version", {}, conn).fetchone()
        return int(row["version"]) if row else 0

    def probe(self) -> str:
        """One direct connection, outside the pool: "" when the database answers, else why."""
        try:
            psycopg.connect(self.conninfo, connect_timeout=3).close()
        except psycopg.Error as error:
            return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ""

    def watch(self, stop: threading.Event) -> None:
        """serve's watchdog: probe every PROBE_INTERVAL, or at once when a caller lost its
        connection; while the database is down, probe with a doubling pause (up to
        PROBE_PAUSE_MAX) until it answers, and restart the embedded cluster if it died (`revive`).
        Each change of state is logged once, and so is the first failed restart of an outage."""
        pause, restart_failed = 0.5, False
        while not stop.is_set():
            if self.health.down:  # paced by the backoff, whoever else notices the outage meanwhile
                stop.wait(pause)
            else:
                self.health.suspected.wait(PROBE_INTERVAL)
            self.health.suspected.clear()
            if stop.is_set():
                return
            problem = self.probe()
            if not problem:
                if self.health.down:
                    self.pool.check()  # hand back no connection the outage killed
                self.health.mark_up()
                pause, restart_failed = 0.5, False
                continue
            self.health.mark_down(problem)
            pause = min(PROBE_PAUSE_MAX, pause * 2)
            if self.revive is None:
                continue
            try:
                if self.revive():
                    logger.warning(
                        "the embedded PostgreSQL was not running: started it again",
                        extra={"action": "pg_restart"},
                    )
                    pause = 0.5
            except PiDeployError as error:  # retried at the next probe (a dying server's backends
                # may hold its shared memory for a moment)
                if not restart_failed:
                    logger.warning(
                        "cannot start the embedded PostgreSQL yet (%s); trying again", error.message,
                        extra={"action": "pg_restart_failed"},
                    )  # fmt: skip
                restart_failed = True

    def one(self, query: str, /, conn: psycopg.Connection[Row] | None = None, **params: Any) -> Row | None:
        """The first row of a named query, in `conn`'s transaction or a new one."""
        if conn is not None:
            return self._run(query, params, conn).fetchone()
        with self.transaction() as own:
            return self._run(query, params, own).fetchone()

    def all(self, query: str, /, conn: psycopg.Connection[Row] | None = None, **params: Any) -> list[Row]:
        if conn is not None:
            return self._run(query, params, conn).fetchall()
        with self.transaction() as own:
            return self._run(query, params, own).fetchall()

    def execute(self, query: str, /, conn: psycopg.Connection[Row] | None = None, **params: Any) -> int:
        """Run a named statement; the number of rows it touched."""
        if conn is not None:
            return self._run(query, params, conn).rowcount
        with self.transaction() as own:
            return self._run(query, params, own).rowcount

    def unlock(self, query: str, /, conn: psycopg.Connection[Row], **params: Any) -> None:
        """Release a session advisory lock taken on `conn`. A session that died meanwhile (the
        server restarted, the connection was cut) holds nothing any more: the server released
        its locks with it, so that is no error, and the work done under the lock stands."""
        try:
            self.one(query, conn, **params)
        except DatabaseError as error:
            if not conn.closed:
                raise
            logger.info(
                "%s: the lock went with its lost session (%s)",
                query,
                error.message,
                extra={"action": "lock_lost_with_session"},
            )

    def apply_schema(self) -> int:
        sql = (HERE / "schema.sql").read_text()
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(sql.encode())  # no parameters: sent as one simple query
        return self.schema_version()

    def schema_version(self) -> int:
        row = self.one("schema_version")
        return int(row["version"]) if row else 0

    def listen_connection(self, channel: str) -> psycopg.Connection[Row]:
        """A dedicated autocommit connection LISTENing on `channel` (not from the pool)."""
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row)
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        except psycopg.Error as error:
            raise _translate(error) from error
        return conn


def redact(conninfo: str) -> str:
    """A connection string fit for a log line: no password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"password=\S+", "password=***", conninfo))


# ---------------------------------------------------------------------------
# The embedded cluster
# ---------------------------------------------------------------------------

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found: install them "
    "(Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL to an existing database"
)


def find_server_bindir() -> Path | None:
    """initdb and pg_ctl: on PATH, via `pg_config --bindir`, or under /usr/lib/postgresql."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass

    def version(path: str) -> tuple[int, ...]:
        digits = re.findall(r"\d+", Path(path).parent.name)
        return tuple(int(d) for d in digits)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


class EmbeddedPostgres:
    """A private cluster in `home/pg`, shared safely by every piDeploy process on that home."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "pg"
        self.data = self.dir / "data"
        self.log_file = self.dir / "server.log"
        self._users_fd: int | None = None
        self._run_as: pwd.struct_passwd | None = None

    @property
    def conninfo(self) -> str:
        return f"host={self.dir} dbname={DB_NAME} user={DB_USER}"

    @property
    def admin_conninfo(self) -> str:
        return f"host={self.dir} dbname=postgres user={DB_USER}"

    def _lock(self, name: str, mode: int) -> int:
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            raise
        return fd

    def _as_user(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _pg(self, bindir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(bindir / args[0]), *args[1:]],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.dir,
                **self._as_user(),
            )
        except subprocess.TimeoutExpired:
            raise InfraUnavailable(
                f"{args[0]} did not finish within {timeout:.0f}s (see {self.log_file})"
            ) from None

    def _prepare_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.dir / ".s.PGSQL.5432")) > SOCKET_PATH_MAX:
            raise InfraUnavailable(
                f"the data dir path {self.dir} is too long for a unix socket: set PIDEPLOY_HOME to a shorter path"
            )
        if os.geteuid() != 0:
            return
        # initdb refuses to run as root: the server runs as the `postgres` system user.
        try:
            self._run_as = pwd.getpwnam("postgres")
        except KeyError:
            raise InfraUnavailable(
                "running as root, the embedded PostgreSQL needs the unprivileged `postgres` user: "
                "install PostgreSQL from your distribution's packages, or set DATABASE_URL"
            ) from None
        for parent in [*reversed(self.dir.parents), self.dir]:
            mode = parent.stat().st_mode
            owner = parent.stat().st_uid
            if owner not in (0, self._run_as.pw_uid) or parent == self.dir:
                continue
            if parent == self.dir.parent and not mode & 0o001:
                # Our own home: let the server user pass through it (not list it).
                os.chmod(parent, (mode & 0o777) | 0o001)
                continue
            if owner == 0 and not mode & 0o001 and parent != Path("/"):
                raise InfraUnavailable(
                    f"the postgres user cannot enter {parent} (mode {oct(mode & 0o777)}): "
                    "set PIDEPLOY_HOME to a folder outside it (the default as root is /var/lib/pideploy)"
                )
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        os.chown(self.dir, uid, gid)
        os.chmod(self.dir, 0o700)
        for name in ("users.lock", "control.lock"):
            path = self.dir / name
            path.touch(exist_ok=True)
            os.chown(path, uid, gid)

    def start(self) -> None:
        """Initialise on first use, start unless already running, hold a user's share."""
        bindir = find_server_bindir()
        if bindir is None:
            raise InfraUnavailable(INSTALL_HINT)
        self._prepare_dirs()
        control = self._lock("control.lock", fcntl.LOCK_EX)
        started = False
        try:
            self._users_fd = self._lock("users.lock", fcntl.LOCK_SH)
            if not (self.data / "PG_VERSION").is_file():
                self._initdb(bindir)
            if not self._running(bindir):
                self._start_server(bindir)
            self._ensure_database()
            started = True
        finally:
            os.close(control)
            if not started:  # after the control lock: release() takes it too
                self.release()

    def _running(self, bindir: Path) -> bool:
        """Whether a postmaster serves the data dir. A postmaster that died leaves its pid file
        (and, under an init that does not reap, a zombie that still answers kill(pid, 0), so
        `pg_ctl status` and the server's own check take it for alive): such a file names no
        server and is removed, or the cluster could never start again. Under the control lock."""
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        if not Path("/proc").is_dir():  # no /proc to look in: pg_ctl's word
            return self._pg(bindir, "pg_ctl", "status", "-D", str(self.data), timeout=30).returncode == 0
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            alive = state not in ("Z", "X") and b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, IndexError):
            alive = False
        if not alive:
            logger.warning(
                "the embedded PostgreSQL's pid file names no running server (pid %d): removed",
                pid,
                extra={"action": "pg_stale_pid"},
            )
            pid_file.unlink(missing_ok=True)
        return alive

    def revive(self) -> bool:
        """Start the server again if it is not running (it died, or was stopped under us): serve
        calls this while the database does not answer. Only a process holding a share (one
        that started or uses the cluster) does; under the control lock, like start(), so of
        several serve processes sharing the cluster one starts it and the others find it up."""
        bindir = find_server_bindir()
        if self._users_fd is None or bindir is None:
            return False
        control = self._lock("control.lock", fcntl.LOCK_EX)
        try:
            if self._users_fd is None:  # released meanwhile: this process is on its way out
                return False
            if self._running(bindir):
                return False
            self._start_server(bindir)
            return True
        finally:
            os.close(control)

    def _initdb(self, bindir: Path) -> None:
        if self.data.exists() and any(self.data.iterdir()):
            raise InfraUnavailable(f"{self.data} exists but holds no cluster: move it away and start again")
        logger.info("initialising the embedded PostgreSQL in %s", self.data, extra={"action": "pg_initdb"})
        self.data.mkdir(mode=0o700, exist_ok=True)
        if self._run_as:
            os.chown(self.data, self._run_as.pw_uid, self._run_as.pw_gid)
        out = self._pg(
            bindir, "initdb", "-D", str(self.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-locale"
        )
        if out.returncode != 0:
            raise InfraUnavailable(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")

    def _start_server(self, bindir: Path) -> None:
        logger.info("starting the embedded PostgreSQL", extra={"action": "pg_start"})
        options = f"-k {self.dir} -c listen_addresses='' -c unix_socket_permissions=0700"
        out = self._pg(
            bindir,
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log_file), "-o", options,
        )  # fmt: skip
        if out.returncode != 0:
            tail = self.log_file.read_text()[-800:] if self.log_file.exists() else ""
            raise InfraUnavailable(
                f"the embedded PostgreSQL did not start: {out.stderr.strip()} {tail}".strip()
            )

    def _ensure_database(self) -> None:
        try:
            with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
                if not exists:
                    conn.execute(f"CREATE DATABASE {DB_NAME}")
        except psycopg.errors.DuplicateDatabase:
            pass  # another process created it between our check and our create
        except psycopg.Error as error:
            raise _translate(error) from error

    def release(self) -> None:
        """Give up this process's share; the last process out stops the cluster."""
        if self._users_fd is None:
            return
        os.close(self._users_fd)
        self._users_fd = None
        bindir = find_server_bindir()
        if bindir is None:
            return
        control = self._lock("control.lock", fcntl.LOCK_EX)
        try:
            try:
                alone = self._lock("users.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info(
                    "embedded PostgreSQL left running for other processes", extra={"action": "pg_shared"}
                )
                return
            try:
                logger.info("stopping the embedded PostgreSQL", extra={"action": "pg_stop"})
                self._pg(bindir, "pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data), timeout=60)
            finally:
                os.close(alone)
        finally:
            os.close(control)


class Postgres:
    """The database piDeploy uses: DATABASE_URL, or the embedded cluster it starts."""

    def __init__(self, config: Config, *, max_size: int = 10) -> None:
        self.embedded: EmbeddedPostgres | None = None
        if config.database_url:
            conninfo = config.database_url
        else:
            self.embedded = EmbeddedPostgres(config.home)
            self.embedded.start()
            conninfo = self.embedded.conninfo
        try:
            self.db = Database(conninfo, max_size=max_size)
            if self.embedded:
                self.db.revive = self.embedded.revive
            self.db.apply_schema()
        except BaseException:
            if self.embedded:
                self.embedded.release()
            raise

    def close(self) -> None:
        self.db.close()
        if self.embedded:
            self.embedded.release()
