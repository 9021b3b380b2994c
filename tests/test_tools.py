"""tools.py on the real stack (Podman engine, real nginx, real Postgres) and in memory.

The lifecycle suite runs against both worlds; the failure-injection tests need
the real parts (a real nginx to break, a real engine to refuse).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import tools
from errors import ImageNotFound, RolledBack, ToolArgumentError, ToolError, ToolRefused
from proxy import NginxProxy
from tests.conftest import World, make_config_like, require_stack

pytestmark = pytest.mark.stack


# ---------------------------------------------------------------------------
# The whole lifecycle, with the world checked after each step
# ---------------------------------------------------------------------------


def test_full_lifecycle(any_world: World) -> None:
    w = any_world
    created = w.create("alpha", env={"GATEWAY_LOG_MESSAGE": "hello"})
    iid = created["instance_id"]
    row = w.row(iid)
    assert row is not None and row["status"] == "running" and row["port"]
    (container,) = w.containers(iid)
    assert container.running and container.labels["pideploy.user"] == "alice"
    assert w.through_nginx(iid) == (200, "ok")
    assert w.through_nginx(iid, "version")[1] == "v1"
    config_file = Path(row["storage_path"]) / tools.CONFIG_FILE
    assert json.loads(config_file.read_text())["instance"] == {"id": iid, "name": "alpha", "user": "alice"}
    assert w.events(iid) == ["create_requested", "create_started", "port_reserved", "created"]

    tools.instance_stop(w.rt, w.ctx(), iid)
    assert w.row(iid)["status"] == "stopped"  # type: ignore[index]
    assert not w.containers(iid)[0].running
    assert w.through_nginx(iid)[0] == 404
    assert str(iid) not in w.rt.proxy.routes()

    tools.instance_start(w.rt, w.ctx(), iid)
    assert w.row(iid)["status"] == "running"  # type: ignore[index]
    assert w.through_nginx(iid) == (200, "ok")

    updated = tools.instance_update(w.rt, w.ctx(), iid, image="localhost/pideploy-gateway:v2")
    assert updated["image"] == "localhost/pideploy-gateway:v2" and updated["routed"]
    assert w.through_nginx(iid, "version")[1] == "v2"
    (after,) = w.containers(iid)  # the old container is gone once the new one is healthy
    assert after.id != container.id and w.row(iid)["container_id"] == after.id  # type: ignore[index]

    tools.instance_delete(w.rt, w.ctx(), iid)
    assert w.row(iid) is None
    assert w.containers(iid) == []
    assert not config_file.parent.exists()
    assert w.through_nginx(iid)[0] == 404
    assert w.events(iid)[4:] == [
        "stopped",
        "started",
        "update_started",
        "updated",
        "delete_started",
        "deleted",
    ]


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


def test_arguments_are_validated_against_the_schema(any_world: World) -> None:
    w = any_world
    allowed = tools.TOOLSETS["instance_create"]
    for name, arguments in [
        ("instance_create", {"name": "Bad Name"}),
        ("instance_create", {"name": "ok", "extra": 1}),
        ("instance_create", {"name": "ok", "config": {"env": {"lower": "x"}}}),
        ("instance_create", {}),
        ("instance_create", ["not", "an", "object"]),
        ("instance_delete", {"instance_id": 1}),  # not in this task type's tool set
        ("no_such_tool", {}),
    ]:
        with pytest.raises(ToolArgumentError):
            tools.call(w.rt, w.ctx(), name, arguments, allowed)
    assert w.rt.db.all("instance_list_all") == []


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
    assert only.name == tools.container_name(w.rt.config, iid)
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
    config_file = Path(w.row(iid)["storage_path"]) / tools.CONFIG_FILE  # type: ignore[index]
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
        tools.bash(w.rt, w.ctx("mallory"), f"docker logs {tools.container_name(w.rt.config, iid)}")


def test_a_port_whose_server_just_stopped_is_free_and_a_listened_one_is_not() -> None:
    # A stopped gateway leaves its served connections in TIME_WAIT on its port: that port is
    # free for the next server, so instance_start must not rebuild the container elsewhere.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not tools.port_is_free(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    assert tools.port_is_free(port)


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
            assert not tools.port_is_free(port)
    with forwarded(port, "10.255.255.1:8080"):
        assert not tools.port_is_free(port)
    assert tools.port_is_free(port)


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
    assert tools.healthz(created["port"]) == (True, "HTTP 200")
