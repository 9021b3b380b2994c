"""Instance lifecycle: the state machine, its locks, and the operations with their rollbacks.

This module is the one writer of `instance.status`. Every change goes through
`_transition` (or, for a create that never got to run, `settle_unbuilt_create`),
which writes the row and its event in one transaction. The operations assume
the caller checked who may act (tools.py's scope checks); they take the
per-instance Postgres advisory lock (across processes: a heartbeat round and a
task never act on one instance at once), re-read the row under it, and on a
failure undo what they built (a create) or put the previous container back (an
update). instance_update also holds a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from config import Config
from db import Database, Row
from engine import Container
from errors import (
    Conflict,
    DatabaseError,
    EngineUnreachable,
    ImageNotFound,
    PiDeployError,
    ProxyError,
    RolledBack,
    ToolError,
    ToolRefused,
)
from localio import write_atomic
from proxy import route_key
from runtime import (
    CONFIG_FILE,
    InstanceRow,
    Result,
    Runtime,
    Status,
    ToolContext,
    clear_name,
    container_name,
    container_spec,
    create_and_start,
    healthy_now,
    inspect_container,
    instance_containers,
    port_is_free,
    public_row,
    remove_quietly,
    remove_storage,
    render_config,
    step_span,
    storage_for,
    stray_reason,
    sync_routes,
    wait_healthy,
    wait_stopped,
)

logger = logging.getLogger(__name__)

INSTANCE_LOCK_SPACE = 8_700_100  # advisory lock space for per-instance locks
_SYSTEM_LOCK_WAIT = 2.0  # a heartbeat finding an instance locked leaves it to whoever holds it


def _event(
    rt: Runtime,
    conn: Any,
    ctx: ToolContext,
    instance_id: int | None,
    kind: str,
    user_id: str | None,
    **detail: Any,
) -> None:
    rt.db.one(
        "event_insert",
        conn,
        instance_id=instance_id,
        user_id=user_id,
        task_id=ctx.task_id,
        kind=kind,
        detail={**detail, "actor": ctx.user_id or "system"},
    )


def record_event(rt: Runtime, ctx: ToolContext, instance_id: int | None, kind: str, **detail: Any) -> None:
    """An event outside any status change (its own transaction). instance_id None: about no
    instance piDeploy knows (a stray nginx route), kept in the history all the same."""
    with rt.db.transaction() as conn:
        row = rt.db.one("instance_get", conn, id=instance_id) if instance_id is not None else None
        _event(rt, conn, ctx, instance_id, kind, row["user_id"] if row else ctx.user_id, **detail)


def get(db: Database, instance_id: int, conn: Any = None) -> InstanceRow | None:
    """The instance row, typed (None: no such instance)."""
    return cast(InstanceRow | None, db.one("instance_get", conn, id=instance_id))


def _transition(
    rt: Runtime,
    ctx: ToolContext,
    row: InstanceRow,
    kind: str,
    detail: Mapping[str, Any] | None = None,
    *,
    status: Status | None = None,
    **changes: Any,
) -> InstanceRow:
    """Change an instance's status (and runtime columns) and append its event, in one transaction."""
    values = {
        "status": status or row["status"],
        "container_id": row["container_id"],
        "port": row["port"],
        "storage_path": row["storage_path"],
        "image": row["image"],
        "config": row["config"],
        "last_error": None,
    }
    values.update(changes)
    attributes = {"pideploy.status": values["status"], "pideploy.event": kind}
    with step_span(ctx, "db.update", **attributes), rt.db.transaction() as conn:
        updated = rt.db.one("instance_set_runtime", conn, id=row["id"], **values)
        if updated is None:
            raise ToolError(f"instance {row['id']} no longer exists", instance_id=row["id"])
        _event(rt, conn, ctx, row["id"], kind, row["user_id"], status=values["status"], **(detail or {}))
    return cast(InstanceRow, updated)


def request_create(
    db: Database, conn: Any, user_id: str, name: str, image: str, config: dict[str, Any] | None
) -> InstanceRow:
    """The row of an instance to create (`creating`, nothing built yet) and its
    `create_requested` event, in the caller's transaction. The one place a row is made:
    tasks.Queue.submit_create puts its task beside it; the create task builds it."""
    row = db.one("instance_insert", conn, user_id=user_id, name=name, image=image, config=config or {})
    assert row is not None
    db.one(
        "event_insert",
        conn,
        instance_id=row["id"],
        user_id=user_id,
        task_id=None,
        kind="create_requested",
        detail={"name": name, "actor": user_id},
    )
    return cast(InstanceRow, row)


def settle_unbuilt_create(db: Database, conn: Any, task: Row, reason: str, *, note: bool) -> None:
    """An instance_create task that ended without success while its instance is still
    `creating` never built anything (the tool undoes what it built and says `error` itself):
    the row says error too, with `reason`, instead of waiting for the heartbeat's stuck
    timeout. In the caller's transaction, the one that ends the task. `note`: also record the
    `create_failed` event (a run's end does; a cancel or an exhausted lease does not)."""
    if task["type"] != "instance_create" or task["status"] == "succeeded" or task["instance_id"] is None:
        return
    row = db.one("instance_settle_unbuilt_create", conn, id=task["instance_id"], last_error=reason)
    if row is not None and note:
        db.one(
            "event_insert",
            conn,
            instance_id=row["id"],
            user_id=row["user_id"],
            task_id=task["id"],
            kind="create_failed",
            detail={"status": "error", "reason": row["last_error"], "actor": "system"},
        )


def failed_create(db: Database, row: Mapping[str, Any], action: str, conn: Any = None) -> str:
    """What to tell someone who asks to `action` an instance whose create failed, or "".

    A failed create leaves the instance `error` with nothing built (or half of it): start,
    stop and update have nothing to act on, and acting would only replace the failure's
    status and reason. Only a delete is left. "Failed" is judged by history, not by columns
    (a create cut short may leave a storage path): its create never finished."""
    if row["status"] != "error":
        return ""
    found = db.one("instance_was_created", conn, id=row["id"])
    if found is not None and found["created"]:
        return ""
    reason = row["last_error"] or "no reason recorded"
    return (
        f"instance {row['id']} has nothing to {action}: its create failed ({reason}); "
        "delete it, then create it again"
    )


def _refuse_failed_create(rt: Runtime, row: InstanceRow, tool: str) -> None:
    problem = failed_create(rt.db, row, tool.removeprefix("instance_"))
    if problem:
        raise ToolRefused(problem, tool=tool, instance_id=row["id"], status=row["status"])


@contextlib.contextmanager
def instance_lock(rt: Runtime, ctx: ToolContext, instance_id: int, wait: float = 60.0) -> Iterator[None]:
    """A per-instance lock across threads and processes (a session advisory lock)."""
    limit = time.monotonic() + ctx.remaining(wait)
    with rt.db.connection() as conn:
        while not rt.db.one("instance_try_lock", conn, space=INSTANCE_LOCK_SPACE, id=instance_id)["ok"]:  # type: ignore[index]
            if time.monotonic() >= limit:
                raise ToolError(
                    f"instance {instance_id} is busy with another operation", instance_id=instance_id
                )
            time.sleep(0.1)
        try:
            yield
        finally:
            rt.db.unlock("instance_unlock", conn, space=INSTANCE_LOCK_SPACE, id=instance_id)


@contextlib.contextmanager
def update_lock(config: Config, instance_id: int, ctx: ToolContext, wait: float = 30.0) -> Iterator[None]:
    """The exclusive lock against concurrent rebuilds of one instance (a file lock)."""
    config.locks.mkdir(parents=True, exist_ok=True)
    path = config.locks / f"update-{config.namespace}-{instance_id}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        limit = time.monotonic() + ctx.remaining(wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= limit:
                    raise ToolError(
                        f"another update of instance {instance_id} is in progress", lock=str(path)
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def allocate_port(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> InstanceRow:
    """Reserve a host port: free in the DB (unique index) and actually free on the host."""
    low, high = rt.config.ports
    taken = {r["port"] for r in rt.db.all("instance_ports_taken")}
    # Start at a place derived from the id so concurrent creates rarely collide.
    span = high - low + 1
    for offset in range(span):
        port = low + (row["id"] * 7 + offset) % span
        if port in taken or not port_is_free(port):
            continue
        try:
            return _transition(rt, ctx, row, "port_reserved", {"port": port}, port=port)
        except Conflict:
            continue  # another instance took it between our read and our write
    raise ToolError(f"no free host port in {rt.config.port_range}", port_range=rt.config.port_range)


def _port(row: InstanceRow) -> int:
    """The host port of an instance past its create's port step (allocate_port set it)."""
    return cast(int, row["port"])


def _refuse_if_busy(rt: Runtime, ctx: ToolContext, instance_id: int) -> None:
    """A heartbeat leaves an instance to the task working on it (checked under its lock)."""
    if not ctx.system:
        return
    pending = rt.db.all("task_unfinished_for_instance", instance_id=instance_id)
    if pending:
        raise ToolRefused(
            f"instance {instance_id} is busy with task {pending[0]['id']} ({pending[0]['type']}); "
            "a heartbeat leaves it to its task",
            instance_id=instance_id,
        )


def create(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> Result:
    """Build a requested instance (request_create made its row): storage, config file, port,
    container, health, route; on any failure everything built is undone and the row says
    error. Again on a running instance: reported as already created."""
    if row["status"] == "creating":
        with instance_lock(rt, ctx, row["id"]):
            # Read again under the lock: another task may have built, failed or deleted it meanwhile.
            current = get(rt.db, row["id"])
            if current is None:
                raise ToolError(
                    f"instance {row['id']} was deleted before it was built", instance_id=row["id"]
                )
            row = current
            if row["status"] == "creating":
                return _create(rt, ctx, row)
    if row["status"] == "running":
        return {
            **public_row(row),
            "url": rt.proxy.url_for(route_key(row, rt.config)),
            "note": "already created",
        }
    raise ToolRefused(
        f"instance {row['id']} is {row['status']}; instance_create only builds new instances",
        instance_id=row["id"],
    )


def _create(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> Result:
    step = "storage"
    container: Container | None = None
    storage = storage_for(rt, row["id"])
    try:
        clear_name(rt, ctx, row, keep=None)  # leftovers of an attempt that crashed half-way
        with step_span(ctx, "storage.prepare", **{"pideploy.path": str(storage)}):
            storage.mkdir(parents=True, exist_ok=True)
            render_config(rt, row, row["config"], storage)
        row = _transition(rt, ctx, row, "create_started", storage_path=str(storage))
        step = "port"
        row = allocate_port(rt, ctx, row)
        step = "container"
        spec = container_spec(rt, row, row["image"], _port(row), row["config"])
        container = create_and_start(rt, ctx, spec)
        step = "health"
        waited = wait_healthy(rt, ctx, container.id, _port(row))
        row = _transition(
            rt,
            ctx,
            row,
            "created",
            {"health_wait_s": round(waited, 3)},
            status="running",
            container_id=container.id,
        )
        step = "nginx"
        routes = sync_routes(rt, ctx)
        if row["id"] in routes["unreachable"]:
            raise ProxyError(f"instance {row['id']} is not reachable through nginx")
    except Exception as raised:  # not only ours: a disk-full OSError must not skip the undo
        error = _as_tool_error(raised)
        not_undone = _undo_create(rt, ctx, row, container, storage, step, error)
        undone = "undone: container, port and storage"
        if not_undone:
            undone = f"not undone: {'; '.join(not_undone)} (a heartbeat round removes it)"
        raise RolledBack(
            f"create failed at step {step}: {error.message}; {undone}",
            step=step,
            cause=error.message,
            cause_class=error.error_class,
            not_undone=not_undone,
        ) from error
    url = rt.proxy.url_for(route_key(row, rt.config))
    return {**public_row(row), "url": url, "health_wait_s": round(waited, 3)}


def _undo_create(
    rt: Runtime,
    ctx: ToolContext,
    row: InstanceRow,
    container: Container | None,
    storage: Path,
    step: str,
    error: PiDeployError,
) -> list[str]:
    """Undo a create and mark the instance error. Every step is tried whatever failed before it;
    what could not be undone (an engine that does not answer) is returned and recorded, and the
    heartbeat removes the container left behind (an `error` row records no container)."""
    not_undone: list[str] = []
    with step_span(ctx, "rollback", **{"pideploy.failed_step": step}):
        if container is not None:
            _attempt(
                not_undone, f"remove container {container.id[:12]}", remove_quietly, rt, ctx, container.id
            )
        else:  # the engine may have made one without telling us (a cut connection): by its name
            _attempt(not_undone, "remove leftover containers", clear_name, rt, ctx, row, None)
        remove_storage(rt, str(storage))
        current = get(rt.db, row["id"]) or row
        last_error = f"create failed at {step}: {error.message}"
        detail: dict[str, Any] = {"step": step, "reason": error.message}
        if not_undone:
            last_error += f"; not undone: {'; '.join(not_undone)} (a heartbeat round removes it)"
            detail["not_undone"] = not_undone
        _transition(
            rt,
            ctx,
            current,
            "create_failed",
            detail,
            status="error",
            container_id=None,
            port=None,
            storage_path=None,
            last_error=last_error,
        )
        if current["status"] == "running":
            with contextlib.suppress(PiDeployError):
                sync_routes(rt, ctx)
    return not_undone


def _attempt(failed: list[str], what: str, action: Callable[..., object], *args: Any) -> bool:
    """One step of an undo: a failure is written down and the undo goes on with its next step."""
    try:
        action(*args)
    except Exception as raised:  # an undo must reach its last step whatever one step raised
        message = _as_tool_error(raised).message
        failed.append(f"{what}: {message}")
        logger.warning(
            "undo step failed: %s: %s",
            what,
            message,
            exc_info=not isinstance(raised, PiDeployError),  # a bug: keep its traceback
            extra={"action": "undo_step_failed"},
        )
        return False
    return True


def _reread(rt: Runtime, instance_id: int) -> InstanceRow:
    """The row as it is now that we hold its lock: one deleted meanwhile is not acted on (a
    stale copy would rebuild a container no row owns)."""
    row = get(rt.db, instance_id)
    if row is None:
        raise ToolError(f"instance {instance_id} no longer exists", instance_id=instance_id)
    return row


def start(rt: Runtime, ctx: ToolContext, instance_id: int) -> Result:
    """Start a stopped or crashed instance (recreating a removed container), wait for its health
    check, route it; a running, healthy one is left as it is. A heartbeat only brings back what
    should be running."""
    with instance_lock(rt, ctx, instance_id):
        row = _reread(rt, instance_id)
        _refuse_if_busy(rt, ctx, instance_id)
        _refuse_failed_create(rt, row, "instance_start")
        return _start(rt, ctx, row)


def _start(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> Result:
    status = row["status"]
    if status in ("creating", "updating", "deleting"):
        raise ToolRefused(f"instance {row['id']} is {status}; wait for that to finish", instance_id=row["id"])
    if ctx.system and status != "running":
        # A heartbeat only brings back what should be running: a user's stop is respected.
        raise ToolRefused(
            f"instance {row['id']} is {status}; a heartbeat does not start it", instance_id=row["id"]
        )
    current = inspect_container(rt, ctx, row["container_id"])
    if status == "running" and current is not None and current.running and healthy_now(row["port"]):
        routes = sync_routes(rt, ctx)
        return {**public_row(row), "note": "already running", "routed": row["id"] in routes["reachable"]}
    try:
        if current is None or (not current.running and row["port"] and not port_is_free(row["port"])):
            # Removed by hand (or never finished), or its host port was taken while it was down:
            # build it again, on a new port if need be (and go on with the row as it is now).
            container = _recreate(rt, ctx, row)
            row = get(rt.db, row["id"]) or row
        else:
            container = current
            if current.running:  # running but not answering: restart it
                with step_span(ctx, "engine.stop", **{"container.id": container.id}):
                    rt.engine.stop(container.id, rt.config.stop_timeout)
                wait_stopped(rt, ctx, container.id)
            with step_span(ctx, "engine.start", **{"container.id": container.id}):
                rt.engine.start(container.id)
        waited = wait_healthy(rt, ctx, container.id, _port(row))
    except PiDeployError as error:
        detail = {"reason": error.message, **{k: v for k, v in error.data.items() if k in ("exit_code",)}}
        if ctx.system:
            record_event(rt, ctx, row["id"], "start_failed", **detail)
        else:
            _transition(rt, ctx, row, "start_failed", detail, status="error", last_error=error.message)
        raise
    row = _transition(
        rt,
        ctx,
        row,
        "started",
        {"health_wait_s": round(waited, 3)},
        status="running",
        container_id=container.id,
    )
    routes = sync_routes(rt, ctx)
    return {**public_row(row), "routed": row["id"] in routes["reachable"], "health_wait_s": round(waited, 3)}


def _recreate(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> Container:
    """The row's container is gone: create it again from the row (same image, port and storage)."""
    if not row["storage_path"] or not row["port"]:
        raise ToolError(f"instance {row['id']} has no storage or port to recreate its container from")
    storage = Path(row["storage_path"])
    storage.mkdir(parents=True, exist_ok=True)
    if not (storage / CONFIG_FILE).exists():
        render_config(rt, row, row["config"], storage)
    clear_name(rt, ctx, row, keep=None)
    if not port_is_free(row["port"]):
        row = allocate_port(rt, ctx, {**row, "port": None})
    container = create_and_start(rt, ctx, container_spec(rt, row, row["image"], _port(row), row["config"]))
    record_event(rt, ctx, row["id"], "container_recreated", container_id=container.id)
    return container


def stop(rt: Runtime, ctx: ToolContext, instance_id: int) -> Result:
    """Stop an instance and remove its route. A heartbeat only stops what is recorded stopped."""
    with instance_lock(rt, ctx, instance_id):
        row = _reread(rt, instance_id)
        _refuse_if_busy(rt, ctx, instance_id)
        _refuse_failed_create(rt, row, "instance_stop")  # a stop queued behind its create, which failed
        if ctx.system and row["status"] != "stopped":
            # A heartbeat only converges to the user's wish: it stops what the DB says is stopped.
            raise ToolRefused(f"instance {instance_id} is {row['status']}; a heartbeat does not stop it")
        if row["status"] in ("creating", "updating", "deleting"):
            raise ToolRefused(f"instance {instance_id} is {row['status']}; wait for that to finish")
        current = inspect_container(rt, ctx, row["container_id"])
        if row["status"] == "stopped" and (current is None or not current.running):
            return {**public_row(row), "note": "already stopped"}
        if current is not None and current.running:
            with step_span(ctx, "engine.stop", **{"container.id": current.id}):
                rt.engine.stop(current.id, rt.config.stop_timeout)
            wait_stopped(rt, ctx, current.id)
        row = _transition(rt, ctx, row, "stopped", status="stopped")
    routes = sync_routes(rt, ctx)
    return {**public_row(row), "routes": routes["routes"]}


def delete(rt: Runtime, ctx: ToolContext, instance_id: int, row: InstanceRow | None) -> Result:
    """Delete an instance: containers, storage, row (its events stay), then its route. `row`: as
    read before the lock; None: already gone, and what the engine still has of it is swept."""
    if row is None:
        # Already gone (a retried task): sweep leftovers the engine may still have.
        for container in instance_containers(rt, instance_id):
            remove_quietly(rt, ctx, container.id)
        remove_storage(rt, str(storage_for(rt, instance_id)))
        return {"instance_id": instance_id, "deleted": True, "note": "already deleted"}
    with instance_lock(rt, ctx, instance_id):
        row = get(rt.db, instance_id) or row
        if row["status"] != "deleting":
            row = _transition(rt, ctx, row, "delete_started", status="deleting")
        removed = 0
        for container in instance_containers(rt, instance_id):
            remove_quietly(rt, ctx, container.id)
            removed += 1
        if row["container_id"]:
            remove_quietly(rt, ctx, row["container_id"])
        with step_span(ctx, "storage.remove"):
            remove_storage(rt, row["storage_path"] or str(storage_for(rt, instance_id)))
        with step_span(ctx, "db.delete"), rt.db.transaction() as conn:
            rt.db.one("instance_delete", conn, id=instance_id)
            _event(rt, conn, ctx, instance_id, "deleted", row["user_id"], containers_removed=removed)
    sync_routes(rt, ctx)
    return {"instance_id": instance_id, "name": row["name"], "deleted": True}


def update(
    rt: Runtime, ctx: ToolContext, row: InstanceRow, image: str | None, config: dict[str, Any] | None
) -> Result:
    """Rebuild the instance's container with a new image and/or config, keeping the old one
    until the new one is healthy; on any failure the old one is put back (_roll_back_update)."""
    instance_id = row["id"]
    with update_lock(rt.config, instance_id, ctx), instance_lock(rt, ctx, instance_id):
        row = get(rt.db, instance_id) or row
        _refuse_failed_create(rt, row, "instance_update")
        if row["status"] == "updating":  # an earlier attempt of this task died half-way
            finish_interrupted_update(rt, ctx, row)
            row = get(rt.db, instance_id) or row
        if row["status"] not in ("running", "stopped", "error"):
            raise ToolRefused(f"instance {instance_id} is {row['status']}; it cannot be updated now")
        target_image = image or row["image"]
        target_config = config if config is not None else row["config"]
        # piDeploy never pulls: a missing image fails here, before anything is stopped.
        with step_span(ctx, "engine.image_check", **{"container.image.name": target_image}):
            if not rt.engine.image_exists(target_image):
                raise ImageNotFound(
                    f"image {target_image} is not in the engine's store (piDeploy never pulls)"
                )
        return _update(rt, ctx, row, target_image, target_config)


def finish_interrupted_update(rt: Runtime, ctx: ToolContext, row: InstanceRow) -> str:
    """An update whose task died half-way (a crash, an outage) left the instance `updating`:
    roll it back from what the database and the engine say now. The row still records the
    previous container, image and config (an update writes them only once it succeeded);
    whether the instance ran before is in its update_started event."""
    started = rt.db.one("event_last_of_kind", instance_id=row["id"], kind="update_started")
    was_running = bool(started["detail"].get("was_running", True)) if started else True
    storage = Path(row["storage_path"]) if row["storage_path"] else storage_for(rt, row["id"])
    old = inspect_container(rt, ctx, row["container_id"])
    return _roll_back_update(
        rt,
        ctx,
        row,
        old.id if old else None,
        None,
        storage,
        lambda: render_config(rt, row, row["config"], storage),  # the config file may hold the new one
        was_running,
        "interrupted",
        ToolError("the update's task ended before the update finished"),
        old_name=old.name if old else None,
    )


def _update(rt: Runtime, ctx: ToolContext, row: InstanceRow, image: str, config: dict[str, Any]) -> Result:
    was_running = row["status"] == "running"
    old_id: str | None = row["container_id"]
    old_image = row["image"]
    storage = Path(row["storage_path"]) if row["storage_path"] else storage_for(rt, row["id"])
    config_file = storage / CONFIG_FILE
    previous_config = config_file.read_text() if config_file.exists() else None
    # was_running lets whoever finishes an interrupted update put the instance back as it was.
    row = _transition(
        rt,
        ctx,
        row,
        "update_started",
        {"from_image": old_image, "to_image": image, "was_running": was_running},
        status="updating",
    )
    step = "stop"
    new: Container | None = None
    old_name: str | None = container_name(rt.config, row["id"])
    try:
        if old_id is not None:
            old = inspect_container(rt, ctx, old_id)
            if old is not None and old.running:
                with step_span(ctx, "engine.stop", **{"container.id": old_id}):
                    rt.engine.stop(old_id, rt.config.stop_timeout)
                wait_stopped(rt, ctx, old_id)
            if old is not None:
                step = "keep_old"
                with step_span(ctx, "engine.rename", **{"container.id": old_id}):
                    rt.engine.rename(old_id, f"{container_name(rt.config, row['id'])}-old")
                old_name = f"{container_name(rt.config, row['id'])}-old"
            else:
                old_id = None
        step = "config"
        storage.mkdir(parents=True, exist_ok=True)
        render_config(rt, row, config, storage)
        step = "container"
        new = create_and_start(rt, ctx, container_spec(rt, row, image, _port(row), config))
        step = "health"
        waited = wait_healthy(rt, ctx, new.id, _port(row))
        step = "record"
        updated = _transition(
            rt,
            ctx,
            row,
            "updated",
            {"from_image": old_image, "to_image": image, "health_wait_s": round(waited, 3)},
            status="running",
            container_id=new.id,
            image=image,
            config=config,
        )
        # Routed while the old container is still kept: nginx rejecting the map (a stopped
        # instance the update brings back needs a new route) is a failed step like any other.
        step = "nginx"
        routes = sync_routes(rt, ctx)
    except Exception as raised:  # not only ours: a disk-full OSError must not skip the rollback
        error = _as_tool_error(raised)
        restore = (
            None if previous_config is None else functools.partial(write_atomic, config_file, previous_config)
        )
        if step == "keep_old":  # the rename failed: whether the engine did it is unknown
            old_name = None
        outcome = _roll_back_update(
            rt, ctx, row, old_id, new, storage, restore, was_running, step, error, old_name=old_name
        )
        raise RolledBack(
            f"update failed at step {step}: {error.message}; {outcome}",
            step=step,
            cause=error.message,
            cause_class=error.error_class,
        ) from error
    result = {**public_row(updated), "previous_image": old_image, "routed": row["id"] in routes["reachable"]}
    # Only now, with the new one healthy, recorded and routed. The update is done either way: an
    # old container the engine would not remove is a stray the next heartbeat round removes.
    left: list[str] = []
    if old_id is not None and not _attempt(
        left, "remove the previous container", remove_quietly, rt, ctx, old_id
    ):
        record_event(rt, ctx, row["id"], "previous_container_left", container_id=old_id, reason=left[0])
        result["note"] = f"{left[0]} (a heartbeat round removes it)"
    return result


def _as_tool_error(raised: Exception) -> PiDeployError:
    return raised if isinstance(raised, PiDeployError) else ToolError(f"{type(raised).__name__}: {raised}")


def _roll_back_update(
    rt: Runtime,
    ctx: ToolContext,
    row: InstanceRow,
    old_id: str | None,
    new: Container | None,
    storage: Path,
    restore_config: Callable[[], object] | None,
    was_running: bool,
    step: str,
    error: PiDeployError,
    *,
    old_name: str | None,
) -> str:
    """Put the previous container back (under its name, started if it ran) and record the
    outcome; returns it in words for the task's error. Every step is tried whatever failed
    before it. When the previous container could not be brought back because a system failed
    (the engine unreachable, say), the instance stays `updating` with what is left to do in its
    last_error: no task works on it any more, so the next heartbeat round finishes the rollback
    (instance_rollback). A previous container that no longer comes up healthy is an error."""
    name = container_name(rt.config, row["id"])
    not_undone: list[str] = []
    with step_span(ctx, "rollback", **{"pideploy.failed_step": step}):
        if new is not None:
            _attempt(not_undone, f"remove the new container {new.id[:12]}", remove_quietly, rt, ctx, new.id)
        else:  # a failed create may still have left a container with the name
            _attempt(not_undone, "remove leftover containers", clear_name, rt, ctx, row, old_id)
        if restore_config is not None:
            _attempt(not_undone, "restore the config file", restore_config)
        status: Status = "running" if was_running else "stopped"
        last_error: str | None = None
        outcome = "the previous container was restored"
        if old_id is not None:
            try:
                if old_name is None:  # unknown (Docker refuses a rename to the current name)
                    found = inspect_container(rt, ctx, old_id)
                    old_name = found.name if found else None
                if old_name != name:
                    with step_span(ctx, "engine.rename", **{"container.id": old_id}):
                        rt.engine.rename(old_id, name)
                if was_running:
                    with step_span(ctx, "engine.start", **{"container.id": old_id}):
                        rt.engine.start(old_id)
                    wait_healthy(rt, ctx, old_id, _port(row))
            except PiDeployError as restore_error:
                if isinstance(restore_error, EngineUnreachable | DatabaseError):  # an outage: try again later
                    status = "updating"
                    not_undone.append(f"restore the previous container: {restore_error.message}")
                else:
                    status, last_error = "error", f"update rollback failed: {restore_error.message}"
                    outcome = f"the previous container could not be restored: {restore_error.message}"
        elif was_running:
            status, last_error = "error", "update failed and there was no previous container to restore"
            outcome = "there was no previous container to restore"
        detail: dict[str, Any] = {"step": step, "reason": error.message}
        if not_undone:
            left = "; ".join(not_undone)
            detail["not_undone"] = not_undone
            finisher = (
                "a heartbeat round finishes the rollback"
                if status == "updating"
                else "a heartbeat round removes what is left"
            )
            outcome = f"rollback incomplete, not undone: {left} ({finisher})"
            last_error = "; ".join(
                filter(None, [last_error, f"update failed at {step}: {error.message}; {outcome}"])
            )
        kind = "update_rollback_incomplete" if status == "updating" else "update_rolled_back"
        _transition(rt, ctx, row, kind, detail, status=status, container_id=old_id, last_error=last_error)
        with contextlib.suppress(PiDeployError):
            sync_routes(rt, ctx)
    return outcome


def mark_error(rt: Runtime, ctx: ToolContext, instance_id: int, reason: str) -> Result:
    """A heartbeat gives up on an instance that should be running or is stuck."""
    with instance_lock(rt, ctx, instance_id):
        row = _reread(rt, instance_id)
        _refuse_if_busy(rt, ctx, instance_id)
        # The round's plan was made from an earlier look: a user's stop since then stands, and
        # an instance already in error keeps the reason it has (a failed create's, say).
        if row["status"] in ("stopped", "error"):
            raise ToolRefused(
                f"instance {instance_id} is {row['status']}"
                + (f" ({row['last_error']})" if row["last_error"] else "")
                + "; a heartbeat marks error only an instance that should be running or is stuck",
                instance_id=instance_id,
                status=row["status"],
            )
        row = _transition(rt, ctx, row, "marked_error", {"reason": reason}, status="error", last_error=reason)
    with contextlib.suppress(PiDeployError):
        sync_routes(rt, ctx)
    return public_row(row)


def rollback(rt: Runtime, ctx: ToolContext, instance_id: int) -> Result:
    """Settle a create or an update whose task ended half-way. A create is undone (error, as
    its task reported); an update is rolled back to the previous container."""
    with instance_lock(rt, ctx, instance_id, wait=_SYSTEM_LOCK_WAIT):
        row = _reread(rt, instance_id)
        _refuse_if_busy(rt, ctx, instance_id)
        if row["status"] == "creating":
            storage = Path(row["storage_path"]) if row["storage_path"] else storage_for(rt, instance_id)
            reason = ToolError("the create's task ended before the create finished")
            not_undone = _undo_create(rt, ctx, row, None, storage, "interrupted", reason)
            outcome = f"not undone: {'; '.join(not_undone)}" if not_undone else "the create was undone"
        elif row["status"] == "updating":
            outcome = finish_interrupted_update(rt, ctx, row)
        else:
            raise ToolRefused(f"instance {instance_id} is {row['status']}: nothing was interrupted")
        return {**public_row(_reread(rt, instance_id)), "outcome": outcome}


def remove_stray_container(rt: Runtime, ctx: ToolContext, found: Container, instance_id: int) -> Result:
    """Remove a container of this namespace (labelled with `instance_id`) that no instance
    expects (stray_reason), re-checked under the instance's lock with no task working on it."""
    with instance_lock(rt, ctx, instance_id, wait=_SYSTEM_LOCK_WAIT):
        _refuse_if_busy(rt, ctx, instance_id)
        row = get(rt.db, instance_id)
        reason = stray_reason(row, found)
        if not reason:
            raise ToolRefused(
                f"container {found.name} belongs to instance {instance_id} ({row['status'] if row else '?'})",
                container_id=found.id,
                instance_id=instance_id,
            )
        remove_quietly(rt, ctx, found.id)
    detail = {"container_id": found.id, "name": found.name, "state": found.state, "reason": reason}
    record_event(rt, ctx, instance_id, "stray_container_removed", **detail)
    return {"instance_id": instance_id, "removed": True, **detail}
