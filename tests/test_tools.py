"""tools.py on the real stack (Podman engine, real nginx, real Postgres) and in memory.

The lifecycle suite runs against both worlds; the failure-injection tests need
the real parts (a real nginx to break, a real engine to refuse).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import db
import instances
import runtime
import tasks
import tools
from engine import DockerEngine
from errors import (
    DatabaseError,
    ImageNotFound,
    ProxyError,
    RolledBack,
    ToolArgumentError,
    ToolError,
    ToolRefused,
)
from proxy import NginxProxy, route_instance
from tests.conftest import (
    World,
    _cleanup,
    make_config,
    make_config_like,
    make_world,
    require_stack,
    restart_cluster,
)

pytestmark = pytest.mark.stack
V2 = "localhost/pideploy-gateway:v2"


# ---------------------------------------------------------------------------
# The whole lifecycle, with the world checked after each step
# ---------------------------------------------------------------------------


def test_full_lifecycle(any_world: World) -> None:
    w = any_world
    seen = 0

    def appended(instance_id: int) -> list[str]:
        """The event kinds the last step appended."""
        nonlocal seen
        kinds = w.events(instance_id)
        fresh, seen = kinds[seen:], len(kinds)
        return fresh

    created = w.create("alpha", env={"GATEWAY_LOG_MESSAGE": "hello"})
    iid, port = created["instance_id"], created["port"]
    row = w.row(iid)
    assert row is not None and row["status"] == "running" and row["port"] == port
    (container,) = w.containers(iid)
    assert container.running and container.labels["pideploy.user"] == "alice"
    assert row["container_id"] == container.id
    assert runtime.healthz(port)[0]
    assert w.through_nginx(iid) == (200, "ok")
    assert w.through_nginx(iid, "version")[1] == "v1"
    config_file = Path(row["storage_path"]) / runtime.CONFIG_FILE
    assert json.loads(config_file.read_text())["instance"] == {"id": iid, "name": "alpha", "user": "alice"}
    assert appended(iid) == ["create_requested", "create_started", "port_reserved", "created"]

    tools.instance_stop(w.rt, w.ctx(), iid)
    row = w.row(iid)
    assert row is not None and row["status"] == "stopped" and row["container_id"] == container.id
    (stopped,) = w.containers(iid)
    assert stopped.id == container.id and not stopped.running
    assert not runtime.healthz(port)[0]
    assert w.through_nginx(iid)[0] == 404
    assert w.route(iid) not in w.rt.proxy.routes()
    assert appended(iid) == ["stopped"]

    tools.instance_start(w.rt, w.ctx(), iid)
    row = w.row(iid)
    assert row is not None and row["status"] == "running" and row["port"] == port
    (started,) = w.containers(iid)
    assert started.id == container.id and started.running
    assert runtime.healthz(port)[0]
    assert w.through_nginx(iid) == (200, "ok")
    assert w.rt.proxy.routes()[w.route(iid)] == port  # type: ignore[index]
    assert appended(iid) == ["started"]

    updated = tools.instance_update(w.rt, w.ctx(), iid, image="localhost/pideploy-gateway:v2")
    assert updated["image"] == "localhost/pideploy-gateway:v2" and updated["routed"]
    row = w.row(iid)
    assert row is not None and row["status"] == "running" and row["image"] == updated["image"]
    (after,) = w.containers(iid)  # the old container is gone once the new one is healthy
    assert after.id != container.id and after.running and row["container_id"] == after.id
    assert after.name == runtime.container_name(w.rt.config, iid)
    assert runtime.healthz(port)[0]
    assert w.through_nginx(iid) == (200, "ok")
    assert w.through_nginx(iid, "version")[1] == "v2"
    assert appended(iid) == ["update_started", "updated"]

    tools.instance_delete(w.rt, w.ctx(), iid)
    assert w.row(iid) is None
    assert w.containers(iid) == []
    assert not config_file.parent.exists()
    assert not runtime.healthz(port)[0]
    assert w.through_nginx(iid)[0] == 404
    assert not [key for key in w.rt.proxy.routes() if route_instance(key) == iid]
    assert appended(iid) == ["delete_started", "deleted"]  # the history outlives the row


def test_repeats_are_idempotent(any_world: World) -> None:
    w = any_world
    iid = w.create("beta")["instance_id"]
    assert w.create("beta")["note"] == "already created"
    assert tools.instance_start(w.rt, w.ctx(), iid)["note"] == "already running"
    tools.instance_stop(w.rt, w.ctx(), iid)
    assert tools.instance_stop(w.rt, w.ctx(), iid)["note"] == "already stopped"
    tools.instance_delete(w.rt, w.ctx(), iid)
    assert tools.instance_delete(w.rt, w.ctx(instance_id=iid), iid)["note"] == "already deleted"
    assert len(w.containers()) == 0


def test_a_create_with_no_instance_row_takes_an_existing_name_only_for_the_same_request(
    memory_world: World,
) -> None:
    # A hand-inserted task (or a direct call) has no instance row: the submitted create's rule holds.
    w = memory_world
    iid = w.create("web", env={"A": "1"})["instance_id"]
    before = (w.row(iid), w.events(iid))
    assert w.create("web", env={"A": "1"})["note"] == "already created"
    for config in (None, {"env": {"A": "2"}}):  # no config is the empty config: not this instance's
        with pytest.raises(ToolRefused, match=r"already exists \(instance \d+\) with a different config"):
            tools.instance_create(w.rt, w.ctx(), "web", config)
    assert (w.row(iid), w.events(iid)) == before


def test_a_create_that_waited_for_the_lock_acts_on_the_row_as_it_is_then(memory_world: World) -> None:
    w = memory_world
    with w.rt.db.transaction() as conn:  # as submit_create leaves it
        row = w.rt.db.one(
            "instance_insert", conn, user_id="alice", name="web", image=w.rt.config.image, config={}
        )
    assert row is not None
    outcome: list[object] = []

    def hand_task() -> None:
        try:
            outcome.append(tools.instance_create(w.rt, w.ctx(), "web"))
        except ToolRefused as refused:
            outcome.append(refused)

    with instances.instance_lock(w.rt, w.ctx(), row["id"]):  # the instance's own create task holds it...
        racer = threading.Thread(target=hand_task)
        racer.start()
        time.sleep(0.5)  # ...while the hand task read `creating` and waits
        with w.rt.db.transaction() as conn:  # ...and fails
            conn.execute(
                "UPDATE instance SET status = 'error', last_error = 'image missing' WHERE id = %s",
                (row["id"],),
            )
    racer.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ToolRefused), outcome
    after = w.row(row["id"])
    assert after is not None and (after["status"], after["last_error"]) == ("error", "image missing")
    assert w.containers(row["id"]) == []


# ---------------------------------------------------------------------------
# Safety: ownership and scope, checked in the tool, recorded as an event
# ---------------------------------------------------------------------------
# Safety: ownership and scope, checked in the tool, recorded as an event
# ---------------------------------------------------------------------------


def test_ownership_is_enforced_whatever_the_model_asks(any_world: World) -> None:
    w = any_world
    iid = w.create("gamma", user="alice")["instance_id"]
    for tool in (tools.instance_stop, tools.instance_delete, tools.instance_start, tools.instance_status):
        with pytest.raises(ToolRefused, match="does not belong"):
            tool(w.rt, w.ctx("mallory"), iid)
    with pytest.raises(ToolRefused, match="does not belong"):
        tools.instance_update(w.rt, w.ctx("mallory"), iid, image="localhost/pideploy-gateway:v2")
    assert w.row(iid)["status"] == "running"  # type: ignore[index]
    assert w.events(iid).count("ownership_refused") == 5
    # A task about another instance of the same user may not touch this one either.
    with pytest.raises(ToolRefused, match="this task is about instance"):
        tools.instance_stop(w.rt, w.ctx("alice", instance_id=iid + 1000), iid)
    # A heartbeat round only acts on the instances of its drift report.
    with pytest.raises(ToolRefused, match="drift report"):
        tools.instance_start(w.rt, w.ctx(None, allowed_instances=frozenset({iid + 1})), iid)
    with pytest.raises(ToolRefused):
        tools.instance_delete(w.rt, w.ctx(None, allowed_instances=frozenset({iid})), iid)
    assert w.row(iid)["status"] == "running"  # type: ignore[index]


def test_an_instance_whose_create_failed_stays_error_whatever_is_asked_of_it(any_world: World) -> None:
    w = any_world
    with pytest.raises(RolledBack):
        w.create("broken", env={"GATEWAY_CRASH_AT_START": "1"})
    broken = w.rt.db.one("instance_by_name", user_id="alice", name="broken")
    assert broken is not None and broken["status"] == "error"
    iid, reason = broken["id"], broken["last_error"]
    # As a create killed on its last attempt leaves it: half built, never created.
    with w.rt.db.transaction() as conn:
        half = w.rt.db.one(
            "instance_insert", conn, user_id="alice", name="half", image=w.rt.config.image, config={}
        )
        assert half is not None
        conn.execute(
            "UPDATE instance SET status = 'error', storage_path = %s, port = %s,"
            " last_error = 'instance_create failed: worker w stopped renewing its lease' WHERE id = %s",
            (str(runtime.storage_for(w.rt, half["id"])), w.rt.config.ports[1], half["id"]),
        )
    for instance_id in (iid, half["id"]):
        before = (w.row(instance_id), w.events(instance_id))
        ctx = w.ctx(instance_id=instance_id)  # a task queued behind the create
        for act in (tools.instance_stop, tools.instance_start):
            with pytest.raises(ToolRefused, match=r"its create failed .*; delete it, then create it again"):
                act(w.rt, ctx, instance_id)
        with pytest.raises(ToolRefused, match="its create failed"):
            tools.instance_update(w.rt, ctx, instance_id, image=V2)
        with pytest.raises(ToolRefused, match="is error"):  # a heartbeat keeps the reason too
            tools.mark_error(
                w.rt, w.ctx(None, allowed_instances=frozenset({instance_id})), instance_id, "stuck"
            )
        assert (w.row(instance_id), w.events(instance_id)) == before
        assert w.containers(instance_id) == []
    assert w.row(iid)["last_error"] == reason  # type: ignore[index]
    tools.instance_delete(w.rt, w.ctx(), iid)  # what is left to do
    assert w.row(iid) is None


def test_a_heartbeat_never_marks_error_an_instance_its_user_stopped_meanwhile(memory_world: World) -> None:
    w = memory_world
    iid = w.create("paused")["instance_id"]
    tools.instance_stop(w.rt, w.ctx(), iid)  # after the round planned from a look at it running
    with pytest.raises(ToolRefused, match="is stopped"):
        tools.mark_error(w.rt, w.ctx(None, allowed_instances=frozenset({iid})), iid, "3 recoveries failed")
    assert w.row(iid)["status"] == "stopped"  # type: ignore[index]


def test_a_refused_call_naming_another_users_instance_is_recorded_on_it_whatever_refused_it(
    memory_world: World,
) -> None:
    w = memory_world
    bobs = w.create("target", user="bob")["instance_id"]
    own = w.create("mine", user="mallory")["instance_id"]
    container = w.row(bobs)["container_id"]  # type: ignore[index]
    ctx = w.ctx("mallory", instance_id=own)  # mallory's stop task
    allowed = tools.TOOLSETS["instance_stop"]
    for name, arguments, error in [
        ("mark_error", {"instance_id": bobs, "reason": "x"}, ToolArgumentError),  # not in the tool set
        ("instance_delete", {"instance_id": bobs}, ToolArgumentError),
        ("no_such_tool", {"instance_id": bobs}, ToolArgumentError),
        ("instance_stop", {"instance_id": bobs, "force": True}, ToolArgumentError),  # off the schema
        ("instance_stop", {"instance_id": str(bobs)}, ToolArgumentError),  # an id as a string
        ("bash", {"command": f"docker inspect {runtime.container_name(w.rt.config, bobs)}"}, ToolRefused),
        ("bash", {"command": f"docker logs {container[:12]}"}, ToolRefused),
        ("bash", {"command": f"curl -s http://127.0.0.1:{w.row(bobs)['port']}/healthz"}, ToolRefused),  # type: ignore[index]
        ("instance_stop", {"instance_id": bobs}, ToolRefused),  # the scope check, as before
    ]:
        with pytest.raises(error):
            tools.call(w.rt, ctx, name, arguments, allowed)
    events = w.rt.db.all("event_list_for_instance", instance_id=bobs, limit=100)
    refused = [e["detail"] for e in reversed(events) if e["kind"] == "ownership_refused"]
    assert [(d.get("refused_by"), d["tool"]) for d in refused] == [
        ("toolset", "mark_error"),
        ("toolset", "instance_delete"),
        ("toolset", "(unknown tool)"),  # a name the caller made up is not written into bob's history
        ("arguments", "instance_stop"),
        ("arguments", "instance_stop"),
        ("bash", "bash"),
        ("bash", "bash"),
        ("bash", "bash"),
        (None, "instance_stop"),
    ]
    assert all(d["actor"] == "mallory" and "does not belong to user mallory" in d["reason"] for d in refused)
    assert w.row(bobs)["status"] == "running"  # type: ignore[index]
    # A refusal about the task's own instance is no ownership matter; a heartbeat's is about its report.
    with pytest.raises(ToolArgumentError):
        tools.call(w.rt, ctx, "mark_error", {"instance_id": own, "reason": "x"}, allowed)
    assert "ownership_refused" not in w.events(own)
    with pytest.raises(ToolArgumentError):
        heartbeat = w.ctx(None, allowed_instances=frozenset({own}))
        tools.call(w.rt, heartbeat, "instance_delete", {"instance_id": bobs}, tools.TOOLSETS["heartbeat"])
    assert w.events(bobs).count("ownership_refused") == len(refused) + 1


def test_a_refusal_that_cannot_be_recorded_is_still_the_refusal(
    memory_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = memory_world
    bobs = w.create("target", user="bob")["instance_id"]

    def database_down(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("connection lost")

    monkeypatch.setattr(instances, "record_event", database_down)
    with pytest.raises(ToolArgumentError, match="unknown tool 'mark_error'"):
        tools.call(w.rt, w.ctx("mallory"), "mark_error", {"instance_id": bobs, "reason": "x"}, ("bash",))


def test_arguments_are_validated_against_the_schema(any_world: World) -> None:
    w = any_world
    allowed = tools.TOOLSETS["instance_create"]
    for name, arguments in [
        ("instance_create", {"name": "Bad Name"}),
        ("instance_create", {"name": "ok", "extra": 1}),
        ("instance_create", {"name": "ok", "config": {"env": {"lower": "x"}}}),
        ("instance_create", {"name": "ok", "config": {"instance": {"id": 1, "user": "bob"}}}),
        ("instance_create", {}),
        ("instance_create", ["not", "an", "object"]),
        ("instance_create", {"name": "web\n"}),  # `$` in a schema pattern is the end of the input
        ("instance_create", {"name": "ok", "config": {"env": {"FOO\n": "x"}}}),
        ("instance_delete", {"instance_id": 1}),  # not in this task type's tool set
        ("no_such_tool", {}),
    ]:
        with pytest.raises(ToolArgumentError):
            tools.call(w.rt, w.ctx(), name, arguments, allowed)
    assert w.rt.db.all("instance_list_all") == []


def test_pideploys_own_config_fields_win_over_a_config_stored_before_they_were_refused(
    memory_world: World,
) -> None:
    w = memory_world
    claims = {"instance": {"id": 1, "name": "x", "user": "bob"}, "gateway": {"port": 1}, "theme": "dark"}
    with w.rt.db.transaction() as conn:  # a row submitted before such keys were refused
        row = w.rt.db.one(
            "instance_insert", conn, user_id="alice", name="old", image=w.rt.config.image, config=claims
        )
    assert row is not None
    tools.instance_create(w.rt, w.ctx(instance_id=row["id"]), "old")
    stored = w.row(row["id"])
    assert stored is not None and stored["status"] == "running"
    written = json.loads((Path(stored["storage_path"]) / runtime.CONFIG_FILE).read_text())
    assert written == {
        "instance": {"id": row["id"], "name": "old", "user": "alice"},
        "gateway": {"port": w.rt.config.container_port},
        "theme": "dark",
    }
    # The keys the schema refuses are exactly the ones piDeploy writes.
    assert set(written) - {"theme"} == set(runtime.OWN_CONFIG_KEYS)


def _patterns(schema: object) -> list[str]:
    if isinstance(schema, dict):
        own = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
        return own + [p for value in schema.values() for p in _patterns(value)]
    if isinstance(schema, list):
        return [p for value in schema for p in _patterns(value)]
    return []


def test_schema_patterns_are_read_as_ecma_262() -> None:
    # The schemas are also tool specs for models, so they keep ECMA's `$` (the end of the input);
    # the validator reads them the same way, which Python's `re.search` alone does not.
    patterns = {p for tool in tools.TOOLS.values() for p in _patterns(tool.parameters)}
    assert patterns and all(p.endswith("$") for p in patterns)
    for pattern in patterns:
        regex = tools.ecma_regex(pattern)
        for sample in ("A", "a", "web", "FOO_1"):
            if regex.search(sample):
                assert not regex.search(sample + "\n") and not regex.search(sample + "\r\n")
    assert tools.ecma_regex(r"^a[$]$").search("a$") and not tools.ecma_regex(r"^a[$]$").search("a$\n")
    assert tools.ecma_regex(r"^a\$$").search("a$") and not tools.ecma_regex(r"^a\$$").search("a")
    assert tools.ecma_regex(r"^[\]$]+$").search("]$") and not tools.ecma_regex(r"^[\]$]+$").search("]\n")
    assert not tools.ecma_regex(r"^\d+$").search("\u0663")  # ECMA's \d is 0-9 only
    assert tools.SchemaValidator({"propertyNames": {"pattern": "^[A-Z]+$"}}).is_valid({"FOO": 1})
    assert not tools.SchemaValidator({"propertyNames": {"pattern": "^[A-Z]+$"}}).is_valid({"FOO\n": 1})


# ---------------------------------------------------------------------------
# Failures: every step of create and update rolls back
# ---------------------------------------------------------------------------


def _assert_create_rolled_back(w: World, name: str, step: str) -> None:
    row = w.rt.db.one("instance_by_name", user_id="alice", name=name)
    assert row is not None and row["status"] == "error"
    assert row["port"] is None and row["container_id"] is None and row["storage_path"] is None
    assert step in row["last_error"]
    assert w.containers(row["id"]) == []
    assert not (w.rt.config.storage / str(row["id"])).exists()
    assert w.events(row["id"])[-1] == "create_failed"


def test_create_with_a_missing_image_rolls_back(real_world: World) -> None:
    w = real_world
    w.rt = tools.Runtime(
        make_config_like(w, image="localhost/no-such-image:1"), w.rt.db, w.rt.engine, w.rt.proxy
    )
    with pytest.raises(RolledBack, match="step container"):
        w.create("noimage")
    _assert_create_rolled_back(w, "noimage", "container")


def test_create_with_every_port_taken_rolls_back(real_world: World) -> None:
    w = real_world
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        w.rt = tools.Runtime(
            make_config_like(w, port_range=f"{port}-{port}"), w.rt.db, w.rt.engine, w.rt.proxy
        )
        with pytest.raises(RolledBack, match="step port"):
            w.create("noport")
    _assert_create_rolled_back(w, "noport", "port")


def test_create_whose_health_check_never_passes_rolls_back(real_world: World) -> None:
    w = real_world
    w.rt = tools.Runtime(make_config_like(w, health_timeout=1), w.rt.db, w.rt.engine, w.rt.proxy)
    with pytest.raises(RolledBack, match="step health"):
        w.create("sick", env={"GATEWAY_HEALTHZ_DELAY": "600"})
    _assert_create_rolled_back(w, "sick", "health")


def test_create_of_a_container_that_crashes_rolls_back_with_its_exit_code(real_world: World) -> None:
    w = real_world
    with pytest.raises(RolledBack, match="exited with code 3"):
        w.create("crashy", env={"GATEWAY_CRASH_AT_START": "1"})
    _assert_create_rolled_back(w, "crashy", "health")


def test_create_when_nginx_config_is_invalid_rolls_back_and_keeps_old_routes(real_world: World) -> None:
    w = real_world
    keeper = w.create("keeper")["instance_id"]
    assert isinstance(w.rt.proxy, NginxProxy) and w.rt.proxy.prefix is not None
    broken = w.rt.proxy.prefix / "conf.d" / "broken.conf"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text("this is not nginx syntax\n")
    with pytest.raises(RolledBack, match="step nginx"):
        w.create("unrouted")
    _assert_create_rolled_back(w, "unrouted", "nginx")
    assert w.through_nginx(keeper) == (200, "ok")  # the last good map is still served
    broken.unlink()


def _assert_update_rolled_back(w: World, iid: int, old_container: str) -> None:
    row = w.row(iid)
    assert row is not None and row["status"] == "running"
    assert row["image"] == "localhost/pideploy-gateway:latest"
    assert row["container_id"] == old_container
    (only,) = w.containers(iid)
    assert only.id == old_container and only.running
    assert only.name == runtime.container_name(w.rt.config, iid)
    assert w.through_nginx(iid) == (200, "ok")
    assert w.through_nginx(iid, "version")[1] == "v1"
    assert w.events(iid)[-1] == "update_rolled_back"


def test_update_whose_new_container_crashes_restores_the_old_one(real_world: World) -> None:
    w = real_world
    iid = w.create("upd1")["instance_id"]
    old = w.row(iid)["container_id"]  # type: ignore[index]
    with pytest.raises(RolledBack, match="restored"):
        tools.instance_update(
            w.rt,
            w.ctx(),
            iid,
            image="localhost/pideploy-gateway:v2",
            config={"env": {"GATEWAY_CRASH_AT_START": "1"}},
        )
    _assert_update_rolled_back(w, iid, old)
    config_file = Path(w.row(iid)["storage_path"]) / runtime.CONFIG_FILE  # type: ignore[index]
    assert "GATEWAY_CRASH_AT_START" not in config_file.read_text()


def test_update_whose_health_check_never_passes_restores_the_old_one(real_world: World) -> None:
    w = real_world
    iid = w.create("upd2")["instance_id"]
    old = w.row(iid)["container_id"]  # type: ignore[index]
    w.rt = tools.Runtime(make_config_like(w, health_timeout=1), w.rt.db, w.rt.engine, w.rt.proxy)
    with pytest.raises(RolledBack, match="step health"):
        tools.instance_update(w.rt, w.ctx(), iid, config={"env": {"GATEWAY_HEALTHZ_DELAY": "600"}})
    _assert_update_rolled_back(w, iid, old)


def test_update_to_a_missing_image_changes_nothing(real_world: World) -> None:
    w = real_world
    iid = w.create("upd3")["instance_id"]
    before = w.row(iid)
    with pytest.raises(ImageNotFound, match="never pulls"):
        tools.instance_update(w.rt, w.ctx(), iid, image="localhost/no-such-image:9")
    assert w.row(iid) == before
    assert w.through_nginx(iid) == (200, "ok")


def test_two_concurrent_updates_never_rebuild_at_once(real_world: World) -> None:
    w = real_world
    iid = w.create("upd4")["instance_id"]
    results: list[str] = []

    def update(image: str) -> None:
        try:
            tools.instance_update(w.rt, w.ctx(), iid, image=image)
            results.append("ok")
        except ToolError as error:
            results.append(error.message)

    threads = [
        threading.Thread(target=update, args=(image,))
        for image in ("localhost/pideploy-gateway:v2", "localhost/pideploy-gateway:v1")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["ok", "ok"] or any("in progress" in r for r in results)
    kinds = [k for k in w.events(iid) if k in ("update_started", "updated", "update_rolled_back")]
    # Each rebuild finishes before the next starts: started/ended pairs never interleave.
    assert kinds in (["update_started", "updated"], ["update_started", "updated"] * 2)
    (only,) = w.containers(iid)
    assert only.running and w.row(iid)["container_id"] == only.id  # type: ignore[index]
    assert w.through_nginx(iid) == (200, "ok")


# ---------------------------------------------------------------------------
# Recovery paths the heartbeat and retried tasks rely on
# ---------------------------------------------------------------------------


def test_start_recreates_a_container_removed_by_hand(real_world: World) -> None:
    w = real_world
    iid = w.create("gone")["instance_id"]
    w.rt.engine.remove(w.row(iid)["container_id"])  # type: ignore[index]
    tools.instance_start(w.rt, w.ctx(None, allowed_instances=frozenset({iid})), iid)
    assert w.through_nginx(iid) == (200, "ok")
    assert "container_recreated" in w.events(iid)
    assert len(w.containers(iid)) == 1


def test_a_heartbeat_never_starts_what_a_user_stopped(any_world: World) -> None:
    w = any_world
    iid = w.create("paused")["instance_id"]
    tools.instance_stop(w.rt, w.ctx(), iid)
    with pytest.raises(ToolRefused, match="does not start it"):
        tools.instance_start(w.rt, w.ctx(None, allowed_instances=frozenset({iid})), iid)
    assert not w.containers(iid)[0].running


def test_bash_runs_read_only_commands_and_refuses_the_rest(any_world: World) -> None:
    w = any_world
    iid = w.create("diag")["instance_id"]
    port = w.row(iid)["port"]  # type: ignore[index]
    out = tools.bash(w.rt, w.ctx(), f"curl -s http://127.0.0.1:{port}/healthz")
    assert out["exit_code"] == 0 and out["stdout"] == "ok"
    with pytest.raises(ToolRefused):
        tools.bash(w.rt, w.ctx(), "rm -rf /")
    with pytest.raises(ToolRefused, match="not one of this user's containers"):
        tools.bash(w.rt, w.ctx("mallory"), f"docker logs {runtime.container_name(w.rt.config, iid)}")
    # Another user's gateway, piDeploy's API (whose X-User-Id curl could set), nginx's routes to
    # everyone: a user's task reaches none of them, only its own instances' ports.
    mallory = w.create("m-diag", user="mallory")["instance_id"]
    for url in (
        f"http://127.0.0.1:{port}/healthz",
        "http://localhost:8700/api/instances",
        "'http://[::1]/i/1/'",  # quoted, as the gate asks of a bracket
        "localhost:8700/api/instances",  # no scheme: still port 8700
        "--url 127.0.0.1:8700",
        '"http"://localhost:8700/',  # quoting does not hide it: the gate checks the parsed words
    ):
        with pytest.raises(ToolRefused, match="is not one of this task's instance ports"):
            tools.bash(w.rt, w.ctx("mallory"), f"curl -s {url}")
    for operator_only in ("nginx -t", "pg_isready -h 127.0.0.1"):
        with pytest.raises(ToolRefused, match="not a user's task"):
            tools.bash(w.rt, w.ctx("mallory"), operator_only)
    theirs = w.row(mallory)["port"]  # type: ignore[index]
    assert tools.bash(w.rt, w.ctx("mallory"), f"curl -s http://127.0.0.1:{theirs}/healthz")["stdout"] == "ok"
    assert tools.bash(w.rt, w.ctx(None), f"curl -s http://127.0.0.1:{port}/healthz")["stdout"] == "ok"


def test_a_users_bash_reaches_only_its_own_containers_by_any_spelling(real_world: World) -> None:
    w = real_world
    secret = f"mallory-secret-{uuid.uuid4().hex}"
    mine = w.create("diag")["instance_id"]
    theirs = w.create("m-diag", user="mallory", env={"MALLORY_API_KEY": secret})["instance_id"]
    own_name, their_name = (runtime.container_name(w.rt.config, iid) for iid in (mine, theirs))
    own_id, their_id = (w.row(iid)["container_id"] for iid in (mine, theirs))  # type: ignore[index]
    prefix, number = their_name.rsplit("-", 1)
    spellings = [
        their_name,
        f"'{prefix}-'{number}",  # quoted
        f'"{prefix}-"{number}',
        f"{prefix}-\\{number}",  # escaped
        f"/{their_name}",
        their_id,
        their_id[:12],
        their_id[:8],  # a short id prefix
        f"{their_id[:4]}''{their_id[4:8]}",  # an id split by ''
        f"'{their_id[:3]}'{their_id[3:9]}",
    ]
    alice = w.ctx()
    for spelling in spellings:
        for command in (
            f"docker inspect -f '{{{{json .Config}}}}' {spelling}",
            f"docker inspect {spelling}",
            f"docker container inspect {spelling}",
            f"docker logs --tail 5 {spelling}",
            f"docker top {spelling}",
            f"docker port {spelling}",
            f"docker stats --no-stream {spelling}",
            f"docker logs {own_name} {spelling}",
            f"docker inspect -f '{{{{.Name}}}}' {own_name}; docker inspect {spelling}",
        ):
            with pytest.raises(ToolRefused, match="not one of this user's containers"):
                tools.bash(w.rt, alice, command)
    listings = (
        "docker ps",
        "docker ps -a",
        "docker 'ps' -a",
        "d'ocker' p\\s -a",
        "docker container ls -a",
        f"docker ps -a --filter name={their_name} --format '{{{{json .}}}}'",
        "docker ps -l",
        "docker ps -n 5",
        "docker stats --no-stream",
        f"docker stats --no-stream -a {own_name}",
        "docker info",
        "podman ps -a",
        f"podman inspect {own_name}",
        f"docker inspect --type volume {own_name}",
        "docker inspect localhost/pideploy-gateway:latest",  # not a container of the user's
        # host-wide views name every container too: df by its shm mount, ps by conmon's arguments
        "df -a",
        "ps -eo args --cols 1000",
        "ss -tlnp",
    )
    for command in listings:
        with pytest.raises(ToolRefused):
            tools.bash(w.rt, alice, command)
    # The user's own container, by name, by id or a unique id prefix, still answers.
    for spelling in (own_name, own_id, own_id[:12]):
        out = tools.bash(w.rt, alice, f"docker inspect -f '{{{{.State.Status}}}} {{{{.Name}}}}' {spelling}")
        assert (out["exit_code"], out["stdout"].strip()) == (0, f"running /{own_name}"), out
    port = w.row(mine)["port"]  # type: ignore[index]
    assert (
        tools.bash(w.rt, alice, f"docker port {own_name} 8080/tcp")["stdout"].strip() == f"127.0.0.1:{port}"
    )
    assert tools.bash(w.rt, alice, f"docker logs --tail 5 {own_name}")["exit_code"] == 0
    assert (
        tools.bash(w.rt, alice, f"docker stats --no-stream --format '{{{{.Name}}}}' {own_name}")["exit_code"]
        == 0
    )
    # A heartbeat keeps its view of every container.
    listed = tools.bash(w.rt, w.ctx(None), "docker ps -a --format '{{.Names}}'")["stdout"].split()
    assert own_name in listed and their_name in listed


def test_nginx_runs_only_against_piDeploys_own_configuration(real_world: World) -> None:
    w = real_world
    assert isinstance(w.rt.proxy, NginxProxy) and w.rt.proxy.prefix is not None
    prefix = w.rt.proxy.prefix
    heartbeat = w.ctx(None)
    tested = tools.bash(w.rt, heartbeat, f"nginx -t -p {prefix}/ -c {prefix}/nginx.conf")
    assert tested["exit_code"] == 0 and "test is successful" in tested["stderr"], tested
    # A configuration an instance writes into its own storage loads any module, as root.
    iid = w.create("web")["instance_id"]
    storage = Path(w.row(iid)["storage_path"])  # type: ignore[index]
    (storage / "evil.conf").write_text(f"load_module {storage}/evil.so;\nevents {{}}\n")
    for command in (
        f"nginx -t -c {storage}/evil.conf",
        f"nginx -t -p {storage}/ -c {prefix}/nginx.conf",
        f"nginx -T -c {prefix}/../nginx/nginx.conf",
        f"nginx -t -c {w.rt.config.home}/nginx/nginx.conf",  # not where this world's nginx lives
        f"nginx -t -g 'load_module {storage}/evil.so;'",
    ):
        with pytest.raises(ToolRefused):
            tools.bash(w.rt, heartbeat, command)
    with pytest.raises(ToolRefused, match="not a user's task"):
        tools.bash(w.rt, w.ctx(), f"nginx -t -p {prefix}/ -c {prefix}/nginx.conf")


def test_a_users_task_cannot_read_the_route_map(real_world: World) -> None:
    # The map holds every instance's route token; a user's bash reads only that user's folders,
    # and a symlink its instance plants in its storage leads nowhere (the gate and Landlock).
    w = real_world
    iid = w.create("tokened")["instance_id"]
    assert isinstance(w.rt.proxy, NginxProxy)
    token = w.row(iid)["route_token"]  # type: ignore[index]
    assert token in w.rt.proxy.map_path.read_text()
    storage = Path(w.row(iid)["storage_path"])  # type: ignore[index]
    (storage / "routes").symlink_to(w.rt.proxy.map_path)
    (storage / "nginx").symlink_to(w.rt.proxy.map_path.parent)
    for command in (
        f"cat {w.rt.proxy.map_path}",
        f"cat {storage}/routes",
        f"grep -r . {storage}/nginx/",
        f"ls -la {w.rt.proxy.map_path.parent}",
    ):
        try:
            out = tools.bash(w.rt, w.ctx(), command)
        except ToolRefused:
            continue
        assert token not in out["stdout"] + out["stderr"], command


def test_a_port_whose_server_just_stopped_is_free_and_a_listened_one_is_not() -> None:
    # A stopped gateway leaves its served connections in TIME_WAIT on its port: that port is
    # free for the next server, so instance_start must not rebuild the container elsewhere.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not runtime.port_is_free(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    assert runtime.port_is_free(port)


@contextlib.contextmanager
def forwarded(port: int, to: str) -> Iterator[None]:
    """127.0.0.1:port DNATed to `to`, as a rootful Podman publishes a port: a firewall rule, no socket."""
    require_stack(
        "nft as root", os.geteuid() == 0 and shutil.which("nft") is not None, "apt-get install nftables"
    )
    table = f"pideploy_test_{uuid.uuid4().hex[:8]}"

    def nft(*args: str) -> None:
        subprocess.run(["nft", *args], check=True, capture_output=True, text=True)

    nft("add", "table", "ip", table)
    try:
        nft("add", "chain", "ip", table, "out", "{ type nat hook output priority -100 ; }")
        nft(
            "add",
            "rule",
            "ip",
            table,
            "out",
            "ip",
            "daddr",
            "127.0.0.1",
            "tcp",
            "dport",
            str(port),
            "dnat",
            "to",
            to,
        )
        yield
    finally:
        nft("delete", "table", "ip", table)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_port_forwarded_by_a_firewall_rule_is_not_free() -> None:
    # Nothing listens on the port, so it binds; but a rule routes it to a live server, or
    # (a rule the engine leaked when its container died) to an address nobody has.
    port = _unused_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with forwarded(port, f"127.0.0.1:{server.getsockname()[1]}"):
            assert not runtime.port_is_free(port)
    with forwarded(port, "10.255.255.1:8080"):
        assert not runtime.port_is_free(port)
    assert runtime.port_is_free(port)


def test_create_skips_a_port_a_leaked_firewall_rule_still_forwards(real_world: World) -> None:
    # Seen in CI: a leaked Podman DNAT rule on the one port allocation picked, and the create
    # then waited out its health check on "no route to host" and rolled back.
    w = real_world
    port = _unused_port()
    w.rt = tools.Runtime(make_config_like(w, port_range=f"{port}-{port}"), w.rt.db, w.rt.engine, w.rt.proxy)
    with forwarded(port, "10.255.255.1:8080"), pytest.raises(RolledBack, match="step port"):
        w.create("leaked")
    _assert_create_rolled_back(w, "leaked", "port")
    assert w.create("after")["port"] == port  # the rule gone, the port is usable again


def test_stop_then_start_keeps_the_container(any_world: World) -> None:
    w = any_world
    iid = w.create("again")["instance_id"]
    before = w.row(iid)["container_id"]  # type: ignore[index]
    assert w.through_nginx(iid) == (200, "ok")  # served connections, as in production
    tools.instance_stop(w.rt, w.ctx(), iid)
    tools.instance_start(w.rt, w.ctx(), iid)
    assert w.row(iid)["container_id"] == before  # type: ignore[index]
    assert "container_recreated" not in w.events(iid)
    assert w.through_nginx(iid) == (200, "ok")


def test_a_proxy_in_the_environment_does_not_reach_loopback_checks(
    memory_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator's HTTP_PROXY (here a dead one) must not carry health checks of 127.0.0.1.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    created = memory_world.create("proxied")
    assert memory_world.row(created["instance_id"])["status"] == "running"  # type: ignore[index]
    assert runtime.healthz(created["port"]) == (True, "HTTP 200")


# ---------------------------------------------------------------------------
# The update's file lock, held from outside
# ---------------------------------------------------------------------------


def test_an_update_waits_on_the_file_lock_in_the_configured_lock_dir(
    real_world: World, tmp_path: Path
) -> None:
    w = real_world
    assert make_config(tmp_path).locks == make_config(tmp_path).home / "locks"  # the default: the data dir
    locks = tmp_path / "elsewhere" / "locks"
    configured = make_config(
        tmp_path, namespace=w.rt.config.namespace, health_timeout=30, stop_timeout=3, lock_dir=locks
    )  # PIDEPLOY_LOCK_DIR
    w.rt = tools.Runtime(configured, w.rt.db, w.rt.engine, w.rt.proxy)
    iid = w.create("locked")["instance_id"]
    tools.instance_update(w.rt, w.ctx(), iid, config={"env": {"GATEWAY_LOG_MESSAGE": "first"}})
    (lock_file,) = locks.iterdir()  # the lock lives in the configured folder, and only there
    assert not (configured.home / "locks").exists()
    before, history = w.row(iid), w.events(iid)
    assert before is not None

    def unchanged() -> None:
        assert w.row(iid) == before and w.events(iid) == history
        assert [c.id for c in w.containers(iid)] == [before["container_id"]]

    outcome: list[str] = []

    def update() -> None:
        try:
            outcome.append(tools.instance_update(w.rt, w.ctx(), iid, image=V2)["image"])
        except ToolError as error:
            outcome.append(error.message)

    with open(lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's rebuild, as far as the tool can tell
        hurried = w.ctx()
        hurried.deadline = time.monotonic() + 1
        with pytest.raises(ToolError, match=f"another update of instance {iid} is in progress") as busy:
            tools.instance_update(w.rt, hurried, iid, image=V2)
        assert busy.value.data["lock"] == str(lock_file)
        unchanged()
        waiting = threading.Thread(target=update)
        waiting.start()
        time.sleep(1.5)
        assert waiting.is_alive() and outcome == []  # it waits, and rebuilds nothing meanwhile
        unchanged()
    waiting.join(30)
    assert outcome == [V2]
    assert w.events(iid)[len(history) :] == ["update_started", "updated"]
    assert w.through_nginx(iid, "version")[1] == "v2"


# ---------------------------------------------------------------------------
# Tracing: every engine call runs inside a step span of its own
# ---------------------------------------------------------------------------

_ENGINE_CALLS = ("image_exists", "tag_image", "create", "start", "stop", "kill", "remove", "rename")
_ENGINE_READS = ("inspect", "list", "logs")
_WAIT_SPANS = ("health.wait", "engine.wait_stopped")  # polls of the engine inside one waiting step


def record_engine_calls(
    w: World, ctx: tools.ToolContext, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str]]:
    """(engine method, the innermost span open when it was called) for each call made from now on."""
    calls: list[tuple[str, str]] = []
    for method in _ENGINE_CALLS + _ENGINE_READS:
        real = getattr(w.rt.engine, method)

        def spy(*args: Any, _method: str = method, _real: Any = real, **kwargs: Any) -> Any:
            open_spans = [s for s in ctx.trace.spans() if s.end is None]
            calls.append((_method, open_spans[-1].name))
            return _real(*args, **kwargs)

        monkeypatch.setattr(w.rt.engine, method, spy)
    return calls


def outside_step_spans(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, s) for m, s in calls if not s.startswith("engine.") and s not in _WAIT_SPANS]


def test_every_engine_call_of_stop_and_start_runs_in_a_step_span(
    real_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = real_world
    iid = w.create("spans")["instance_id"]
    ctx = w.ctx()
    calls = record_engine_calls(w, ctx, monkeypatch)
    tools.instance_stop(w.rt, ctx, iid)
    tools.instance_start(w.rt, ctx, iid)
    assert ("inspect", "engine.inspect") in calls and ("stop", "engine.stop") in calls
    assert outside_step_spans(calls) == []


def test_the_spans_of_an_update_that_rolls_back(real_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = real_world
    iid = w.create("traced")["instance_id"]
    old = w.row(iid)["container_id"]  # type: ignore[index]
    ctx = w.ctx()
    calls = record_engine_calls(w, ctx, monkeypatch)
    with pytest.raises(RolledBack, match="step health"):
        tools.instance_update(w.rt, ctx, iid, image=V2, config={"env": {"GATEWAY_CRASH_AT_START": "1"}})
    assert outside_step_spans(calls) == []
    steps = [s.name for s in ctx.trace.root.children]
    assert steps == [
        "engine.image_check",
        "db.update",  # updating
        "engine.inspect",
        "engine.stop",
        "engine.wait_stopped",
        "engine.rename",  # the old container kept aside
        "engine.create",
        "engine.start",
        "health.wait",
        "rollback",
    ]
    (health,) = [s for s in ctx.trace.root.children if s.name == "health.wait"]
    assert health.status == "error" and "exited with code 3" in health.attributes["error.message"]
    (rollback,) = [s for s in ctx.trace.root.children if s.name == "rollback"]
    assert rollback.attributes["pideploy.failed_step"] == "health"
    failed = [(s.name, s.attributes.get("error.message")) for s in rollback.walk() if s.status != "ok"]
    assert failed == []
    assert [s.name for s in rollback.children] == [
        "engine.remove",  # the new container
        "engine.rename",  # the old one, back to its name
        "engine.start",
        "health.wait",
        "db.update",  # update_rolled_back
        "nginx.sync",
        "nginx.verify",
    ]
    restore = {s.name: s.attributes.get("container.id") for s in rollback.children[1:3]}
    assert restore == {"engine.rename": old, "engine.start": old}
    assert all(s.end is not None for s in ctx.trace.spans()[1:])
    _assert_update_rolled_back(w, iid, old)


# ---------------------------------------------------------------------------
# Update while nginx's configuration is broken
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def nginx_config_broken(w: World) -> Iterator[None]:
    """An include nginx.conf reads that makes `nginx -t` fail (nginx itself keeps serving)."""
    assert isinstance(w.rt.proxy, NginxProxy) and w.rt.proxy.prefix is not None
    broken = w.rt.proxy.prefix / "conf.d" / "broken.conf"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text("this_is_not_a_directive on;\n")
    try:
        yield
    finally:
        broken.unlink()


def test_update_of_a_running_instance_while_nginx_config_is_invalid_keeps_its_route(
    real_world: World,
) -> None:
    # The instance keeps its host port through an update, so its route does not change: the
    # live map stays as it is, no reload is needed, and the rebuilt container answers on it.
    w = real_world
    iid = w.create("upd5")["instance_id"]
    old = w.row(iid)
    assert old is not None
    with nginx_config_broken(w):
        updated = tools.instance_update(w.rt, w.ctx(), iid, image=V2)
        assert updated["routed"]
        row = w.row(iid)
        assert row is not None and row["status"] == "running" and row["image"] == V2
        assert row["port"] == old["port"]
        (only,) = w.containers(iid)
        assert only.running and only.id == row["container_id"] != old["container_id"]
        assert w.rt.proxy.routes() == {w.route(iid): old["port"]}
        assert w.through_nginx(iid, "version")[1] == "v2"
        assert w.events(iid)[-2:] == ["update_started", "updated"]


def test_an_update_that_fails_with_a_foreign_error_is_still_rolled_back(
    any_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not every failure is one of ours: a disk-full OSError while routing must undo the update
    # like a ProxyError would, not leave the row on the new container and the old one behind.
    w = any_world
    iid = w.create("upd-oserror")["instance_id"]
    tools.instance_stop(w.rt, w.ctx(), iid)  # the update brings it back: its route must change
    before = w.row(iid)
    assert before is not None

    def disk_full(routes: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w.rt.proxy, "apply", disk_full)
    with pytest.raises(RolledBack, match=r"step nginx.*No space left on device"):
        tools.instance_update(w.rt, w.ctx(), iid, image=V2)
    monkeypatch.undo()
    row = w.row(iid)
    assert row is not None and (row["status"], row["container_id"]) == ("stopped", before["container_id"])
    (only,) = w.containers(iid)
    assert only.id == before["container_id"] and only.name == runtime.container_name(w.rt.config, iid)


def test_update_whose_route_nginx_rejects_restores_the_old_container(real_world: World) -> None:
    # A stopped instance comes back running from an update, so it needs a route; nginx -t
    # rejects the new map. The update is undone: the old container stopped again, the DB
    # `stopped`, and nginx serves the last good map (the other instances' routes).
    w = real_world
    keeper = w.create("keeper")["instance_id"]
    iid = w.create("upd6")["instance_id"]
    tools.instance_stop(w.rt, w.ctx(), iid)
    before = w.row(iid)
    assert before is not None
    with nginx_config_broken(w), pytest.raises(RolledBack, match="step nginx") as caught:
        tools.instance_update(w.rt, w.ctx(), iid, image=V2)
    assert caught.value.data["cause_class"] == ProxyError.error_class
    row = w.row(iid)
    assert row is not None and row["status"] == "stopped" and row["last_error"] is None
    assert (row["image"], row["container_id"], row["port"]) == (
        before["image"],
        before["container_id"],
        before["port"],
    )
    (only,) = w.containers(iid)
    assert only.id == before["container_id"] and not only.running
    assert only.name == runtime.container_name(w.rt.config, iid)
    assert w.rt.proxy.routes() == {w.route(keeper): w.row(keeper)["port"]}  # type: ignore[index]
    assert w.through_nginx(iid)[0] == 404
    assert w.through_nginx(keeper) == (200, "ok")
    assert w.events(iid)[-1] == "update_rolled_back"
    tools.instance_start(w.rt, w.ctx(), iid)  # nginx fixed: the restored container serves v1
    assert w.through_nginx(iid, "version")[1] == "v1"


# ---------------------------------------------------------------------------
# Faults: a route kept through an update, a database restart mid-create, the
# heartbeat's own tools
# ---------------------------------------------------------------------------


def test_another_task_s_route_sync_keeps_the_route_of_an_instance_being_updated(
    docker_engine: DockerEngine, nginx: NginxProxy, database: db.Database, tmp_path: Path
) -> None:
    # Any task syncs the whole route map: one that runs while another instance is mid-update
    # must not drop that instance's route (its port does not change in an update).
    low = random.randrange(30_000, 32_500)  # ports of its own: the update frees and retakes one
    w = make_world(docker_engine, nginx, database, tmp_path, port_range=f"{low}-{low + 99}")
    try:
        busy = w.create("busy")["instance_id"]
        port = w.row(busy)["port"]  # type: ignore[index]
        outcome: dict[str, Any] = {}

        def update() -> None:
            slow = {"env": {"GATEWAY_HEALTHZ_DELAY": "3"}}
            try:
                outcome["result"] = tools.instance_update(w.rt, w.ctx(), busy, image=V2, config=slow)
            except ToolError as error:
                outcome["error"] = error.message

        updater = threading.Thread(target=update)
        updater.start()
        limit = time.monotonic() + 15
        while len(w.containers(busy)) < 2 and time.monotonic() < limit:
            time.sleep(0.05)
        assert w.row(busy)["status"] == "updating"  # type: ignore[index]
        other = w.create("other")["instance_id"]  # its create syncs every route
        assert w.rt.proxy.routes() == {w.route(busy): port, w.route(other): w.row(other)["port"]}  # type: ignore[index]
        updater.join(30)
        assert "error" not in outcome, outcome
        assert w.through_nginx(busy, "version") == (200, "v2")
    finally:
        _cleanup(w)


def test_a_create_across_a_database_restart_succeeds(
    docker_engine: DockerEngine, nginx: NginxProxy, tmp_path: Path, pg_home: Path
) -> None:
    # The instance lock is a session lock on a pooled connection: the restart ends that session
    # (and every pooled one) while the create waits for its health check. The create's own
    # writes go on fresh connections, and releasing the lock the server already dropped is no
    # error: the create succeeds.
    require_stack("PostgreSQL", db.find_server_bindir() is not None, db.INSTALL_HINT)
    postgres = db.Postgres(make_config(tmp_path, home=pg_home))
    assert postgres.embedded is not None
    low = random.randrange(30_000, 32_500)
    w = make_world(docker_engine, nginx, postgres.db, tmp_path, port_range=f"{low}-{low + 99}")
    outcome: dict[str, Any] = {}

    def create() -> None:
        try:
            outcome["result"] = w.create("across", env={"GATEWAY_HEALTHZ_DELAY": "3"})
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    try:
        creator = threading.Thread(target=create)
        creator.start()
        limit = time.monotonic() + 15
        while not w.containers() and time.monotonic() < limit:
            time.sleep(0.05)
        restart_cluster(postgres.embedded)
        creator.join(30)
        assert "error" not in outcome, outcome
        iid = outcome["result"]["instance_id"]
        assert w.row(iid)["status"] == "running"  # type: ignore[index]
        assert w.through_nginx(iid) == (200, "ok")
    finally:
        _cleanup(w)
        postgres.close()


def test_the_heartbeat_s_own_tools_refuse_what_is_not_theirs(any_world: World) -> None:
    w = any_world
    iid = w.create("mine")["instance_id"]
    own = w.row(iid)["container_id"]  # type: ignore[index]
    system = w.ctx(None, allowed_instances=frozenset({iid}))
    with pytest.raises(ToolRefused, match="only a heartbeat round"):
        tools.remove_stray_container(w.rt, w.ctx(), own)
    with pytest.raises(ToolRefused, match="only a heartbeat round"):
        tools.instance_rollback(w.rt, w.ctx(), iid)
    with pytest.raises(ToolRefused, match=f"belongs to instance {iid}"):
        tools.remove_stray_container(w.rt, system, own)  # an instance's own container
    with pytest.raises(ToolRefused, match="nothing was interrupted"):
        tools.instance_rollback(w.rt, system, iid)
    tasks.Queue(w.rt.db).submit_action("alice", "instance_stop", iid)
    calls: list[Callable[[], object]] = [
        lambda: tools.instance_stop(w.rt, system, iid),
        lambda: tools.instance_start(w.rt, system, iid),
        lambda: tools.mark_error(w.rt, system, iid, "no"),
    ]
    for call in calls:
        with pytest.raises(ToolRefused, match="busy with task"):
            call()
    assert w.row(iid)["status"] == "running" and [c.id for c in w.containers(iid)] == [own]  # type: ignore[index]
