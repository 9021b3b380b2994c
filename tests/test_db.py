from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import db
import errors
from tests.conftest import ROOT, make_config, require_stack, restart_cluster

pytestmark = pytest.mark.stack


def test_schema_applies_twice_and_reports_its_version(database: db.Database) -> None:
    assert database.apply_schema() == db.SCHEMA_VERSION
    assert database.apply_schema() == db.SCHEMA_VERSION


def test_instances_from_before_route_tokens_each_get_their_own(database: db.Database) -> None:
    # The database of a piDeploy from before route tokens: its rows get one at the next start.
    with database.transaction() as conn:
        conn.execute("ALTER TABLE instance DROP COLUMN route_token")
    old = [_instance(database, name) for name in ("a", "b", "c")]
    assert "route_token" not in old[0]
    database.apply_schema()
    tokens = [database.one("instance_get", id=row["id"])["route_token"] for row in old]  # type: ignore[index]
    assert len(set(tokens)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens)
    assert _instance(database, "d")["route_token"] not in tokens
    # The CHECK: 32 lowercase hex digits.
    with pytest.raises(errors.BadRequest), database.transaction() as conn:
        conn.execute("UPDATE instance SET route_token = 'ABC' WHERE id = %s", (old[0]["id"],))


def test_named_queries_are_loaded_from_queries_sql() -> None:
    assert "instance_insert" in db.QUERIES
    assert "%(user_id)s" in db.QUERIES["instance_insert"]


def _instance(database: db.Database, name: str = "a", user: str = "u1") -> db.Row:
    row = database.one("instance_insert", user_id=user, name=name, image="img", config={})
    assert row is not None
    return row


def test_constraints_live_in_the_database(database: db.Database) -> None:
    first = _instance(database, "a")
    with pytest.raises(errors.BadRequest), database.transaction() as conn:
        conn.execute("UPDATE instance SET status = 'bogus' WHERE id = %s", (first["id"],))
    with pytest.raises(errors.Conflict):
        _instance(database, "a")  # (user_id, name) is unique
    with pytest.raises(errors.BadRequest):
        _instance(database, "Bad Name!")
    with pytest.raises(errors.BadRequest):  # Postgres' `$` is the end of the string (no newline mode)
        _instance(database, "web\n")
    second = _instance(database, "b")
    common: dict[str, Any] = {
        "status": "running",
        "container_id": "c",
        "storage_path": "/x",
        "image": "i",
        "config": {},
    }
    database.one("instance_set_runtime", id=first["id"], port=20001, last_error=None, **common)
    with pytest.raises(errors.Conflict):  # a host port belongs to one instance
        database.one("instance_set_runtime", id=second["id"], port=20001, last_error=None, **common)


def test_events_are_append_only(database: db.Database) -> None:
    row = _instance(database)
    event = database.one(
        "event_insert", instance_id=row["id"], user_id="u1", task_id=None, kind="created", detail={}
    )
    assert event is not None
    with pytest.raises(errors.Conflict), database.transaction() as conn:
        conn.execute("DELETE FROM event")
    assert database.all("event_list_for_instance", instance_id=row["id"], limit=10)


def test_events_outlive_their_instance(database: db.Database) -> None:
    row = _instance(database)
    database.one("event_insert", instance_id=row["id"], user_id="u1", task_id=None, kind="created", detail={})
    database.one("instance_delete", id=row["id"])
    assert len(database.all("event_list_for_instance", instance_id=row["id"], limit=10)) == 1


def test_embedded_cluster_survives_restart_and_is_shared(tmp_path: Path, pg_home: Path) -> None:
    require_stack("PostgreSQL server binaries", db.find_server_bindir() is not None, db.INSTALL_HINT)
    config = make_config(tmp_path, home=pg_home)
    first = db.Postgres(config)
    row = first.db.one("instance_insert", user_id="u", name="keep", image="i", config={})
    assert row is not None
    second = db.Postgres(config)  # a second process on the same data dir shares the cluster
    first.close()  # not the last user: the cluster must stay up for `second`
    assert second.db.one("instance_get", id=row["id"]) is not None
    second.close()  # the last user stops it
    assert not (config.home / "pg" / "data" / "postmaster.pid").exists()
    third = db.Postgres(config)  # restarted: the data survived
    kept = third.db.one("instance_get", id=row["id"])
    third.close()
    assert kept is not None and kept["name"] == "keep"


def test_embedded_cluster_is_shared_across_processes(tmp_path: Path, pg_home: Path) -> None:
    require_stack("PostgreSQL server binaries", db.find_server_bindir() is not None, db.INSTALL_HINT)
    config = make_config(tmp_path, home=pg_home)
    holder = db.Postgres(config)
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import config, db; "
        "pg = db.Postgres(config.load()); print(pg.db.schema_version()); pg.close()"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={"PIDEPLOY_HOME": str(config.home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(db.SCHEMA_VERSION)
    assert holder.db.schema_version() == db.SCHEMA_VERSION  # the child did not stop it under us
    holder.close()


def test_missing_server_binaries_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "find_server_bindir", lambda: None)
    with pytest.raises(errors.InfraUnavailable, match="apt-get install postgresql"):
        db.Postgres(make_config(tmp_path))


def test_an_unreachable_database_is_one_clear_error_at_once() -> None:
    with pytest.raises(errors.DatabaseError, match=r"cannot connect to the database at .*Connection refused"):
        db.Database("postgresql://nobody@127.0.0.1:1/x")


# ---------------------------------------------------------------------------
# A restarted or dead server
# ---------------------------------------------------------------------------


@pytest.fixture
def own(tmp_path: Path, pg_home: Path) -> Iterator[db.Postgres]:
    """A cluster of this test's own, to restart and kill."""
    require_stack("PostgreSQL server binaries", db.find_server_bindir() is not None, db.INSTALL_HINT)
    postgres = db.Postgres(make_config(tmp_path, home=pg_home))
    yield postgres
    postgres.close()


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    limit = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < limit, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_lock_whose_session_a_restart_ended_is_released_without_error(own: db.Postgres) -> None:
    database, cluster = own.db, own.embedded
    assert cluster is not None
    with database.pool.connection() as conn:
        assert database.one("instance_try_lock", conn, space=1, id=7)["ok"]  # type: ignore[index]
        restart_cluster(cluster)
        database.unlock("instance_unlock", conn, space=1, id=7)  # the server released it already
    # Every pooled connection died with the restart: each is replaced before it is handed out.
    assert [database.schema_version() for _ in range(3)] == [db.SCHEMA_VERSION] * 3
    with database.pool.connection() as conn:
        assert database.one("instance_try_lock", conn, space=1, id=7)["ok"]  # type: ignore[index]
        database.unlock("instance_unlock", conn, space=1, id=7)


def _kill_postmaster(cluster: db.EmbeddedPostgres) -> None:
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)  # as root the server runs as `postgres`: root may signal it
    bindir = db.find_server_bindir()
    assert bindir is not None
    _until(
        "the server to be gone",
        lambda: cluster._pg(bindir, "pg_ctl", "status", "-D", str(cluster.data)).returncode != 0,
    )


def test_an_outage_is_said_once_answered_at_once_and_its_end_is_said_once(
    own: db.Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    database, cluster = own.db, own.embedded
    assert cluster is not None
    caplog.set_level(logging.INFO, logger="db")
    revive, database.revive = database.revive, None  # the restart comes later, by hand
    stop = threading.Event()
    watchdog = threading.Thread(target=database.watch, args=(stop,), daemon=True)
    watchdog.start()
    try:
        _kill_postmaster(cluster)
        with pytest.raises(errors.DatabaseError):
            database.schema_version()  # a caller finds its connection gone: the watchdog probes
        _until("the outage to be seen", lambda: database.health.down)
        started = time.monotonic()
        with pytest.raises(errors.DatabaseError, match=r"database unavailable: connection .*failed"):
            database.ping()  # /healthz: at once, with the reason
        assert time.monotonic() - started < 0.5
        started = time.monotonic()
        with pytest.raises(errors.DatabaseError, match="database unavailable"):
            database.one("schema_version")  # any caller: after OUTAGE_WAIT, not the pool's 30 s
        assert time.monotonic() - started < db.OUTAGE_WAIT + 2
        time.sleep(3)  # probes go on meanwhile, with a growing pause, and say nothing new

        assert revive is not None and revive()
        _until("the watchdog to see it back", lambda: not database.health.down)
        assert database.ping() == db.SCHEMA_VERSION
    finally:
        stop.set()
        database.health.suspect()
        watchdog.join(10)
    said = [r.action for r in caplog.records if getattr(r, "action", "") in ("db_down", "db_up")]  # type: ignore[attr-defined]
    assert said == ["db_down", "db_up"]


def test_the_watchdog_starts_an_embedded_cluster_that_died(
    own: db.Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    database, cluster = own.db, own.embedded
    assert cluster is not None and database.revive is not None
    caplog.set_level(logging.INFO, logger="db")
    stop = threading.Event()
    watchdog = threading.Thread(target=database.watch, args=(stop,), daemon=True)
    watchdog.start()
    try:
        _kill_postmaster(cluster)
        database.health.suspect()
        _until(
            "the cluster to be started again",
            lambda: any(getattr(r, "action", "") == "pg_restart" for r in caplog.records),
        )
        _until("the database to answer", lambda: not database.health.down and database.probe() == "")
        assert database.schema_version() == db.SCHEMA_VERSION
    finally:
        stop.set()
        database.health.suspect()
        watchdog.join(10)
    assert [getattr(r, "action", "") for r in caplog.records].count("pg_restart") == 1


def test_a_released_share_never_revives_the_cluster(tmp_path: Path, pg_home: Path) -> None:
    # The last process out stops the cluster: its watchdog, still probing, must not start it again.
    require_stack("PostgreSQL server binaries", db.find_server_bindir() is not None, db.INSTALL_HINT)
    postgres = db.Postgres(make_config(tmp_path, home=pg_home))
    assert postgres.embedded is not None
    postgres.close()
    assert postgres.embedded.revive() is False
    assert not (pg_home / "pg" / "data" / "postmaster.pid").exists()
