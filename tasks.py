"""The task queue on Postgres, and the worker threads that work it.

Submitting inserts a `task` row (`queued`) and returns at once; a dedupe key
makes a repeated submission find the unfinished task instead of adding one.
Workers claim with FOR UPDATE SKIP LOCKED (queries.sql, task_claim), hold a
lease that a small thread renews while the run goes on, and record the outcome.
A worker that dies stops renewing: its lease runs out and another worker, in
this process or another, reclaims the task; `attempts` counts claims and
task_fail_exhausted ends a task that has none left.

Tasks of one instance run one at a time, in submission order: the claim skips
a task while an older unfinished task of its instance exists. For that to be
exact, task ids of one instance must be handed out in commit order, so every
submission for an existing instance locks the instance row first (`submit`).

LISTEN/NOTIFY on `pideploy_task` wakes idle workers at once; polling every
`poll_interval` is the backstop (and what notices dead leases).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

import instances
import tools
from db import Database, Row
from errors import BadRequest, Conflict, DatabaseError, NotFound, PiDeployError, RunCrashed
from observability import Outcome
from runtime import InstanceRow

logger = logging.getLogger(__name__)

CHANNEL = "pideploy_task"
TYPES = (
    "instance_create",
    "instance_start",
    "instance_stop",
    "instance_delete",
    "instance_update",
    "heartbeat",
)
SYSTEM_USER = "system"  # the user_id of heartbeat tasks
NAME_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"
USER_PATTERN = "^[A-Za-z0-9_.@-]{1,128}$"


# ---------------------------------------------------------------------------
# What a task may carry: the tools' own schemas, minus what the row binds
# ---------------------------------------------------------------------------


def _params_schema(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_UPDATE = tools.TOOLS["instance_update"].parameters["properties"]
PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "instance_create": tools.TOOLS["instance_create"].parameters,
    "instance_update": _params_schema({"image": _UPDATE["image"], "config": _UPDATE["config"]}),
    "instance_start": _params_schema({}),
    "instance_stop": _params_schema({}),
    "instance_delete": _params_schema({}),
    "heartbeat": {"type": "object"},  # the heartbeat round decides what it needs
}


def check_params(task_type: str, params: object) -> dict[str, Any]:
    """A task's params, checked like the tool will check them; BadRequest if not."""
    if task_type not in PARAM_SCHEMAS:
        raise BadRequest(f"unknown task type {task_type!r} (one of {', '.join(TYPES)})", field="type")
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object", field="params")
    problem = tools.schema_problem(PARAM_SCHEMAS[task_type], params)
    if problem:
        where = "/".join(problem[0]) or "(body)"
        raise BadRequest(f"invalid {task_type} request: {where}: {problem[1]}", field=where)
    return params


# ---------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------


def check_user(user_id: str) -> None:
    """The same rule as the database's CHECK, said in words before anything is written."""
    if not re.fullmatch(USER_PATTERN, user_id or ""):
        raise BadRequest(f"invalid user {user_id!r}: 1-128 characters of A-Z a-z 0-9 _ . @ -", field="user")


@dataclass(frozen=True)
class Submitted:
    task: Row
    created: bool  # False: a repeated submission, answered with the unfinished task


class Queue:
    """Named queries of the queue, with the rules that decide what may be submitted."""

    def __init__(self, db: Database, max_attempts: int = 3, sweep_every: float = 1.0) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.sweep_every = sweep_every  # how often claim() looks for dead leases out of attempts
        self._next_sweep = 0.0

    # --- submitting -------------------------------------------------------

    def submit(
        self,
        task_type: str,
        user_id: str,
        params: dict[str, Any] | None = None,
        instance_id: int | None = None,
        dedupe_key: str | None = None,
        conn: psycopg.Connection[Row] | None = None,
    ) -> Submitted:
        """Insert a queued task, or find the unfinished one holding `dedupe_key`."""
        check_user(user_id)
        if conn is None:
            with self.db.transaction() as own:
                return self.submit(task_type, user_id, params, instance_id, dedupe_key, own)
        # Locking the instance row serialises submissions per instance, so their ids follow commit order.
        if instance_id is not None and self.db.one("instance_get_for_update", conn, id=instance_id) is None:
            raise NotFound(f"no instance {instance_id}", instance_id=instance_id)
        for _ in range(3):
            row = self.db.one(
                "task_insert",
                conn,
                type=task_type,
                params=params or {},
                instance_id=instance_id,
                user_id=user_id,
                dedupe_key=dedupe_key,
                max_attempts=self.max_attempts,
            )
            if row is not None:
                return Submitted(row, True)
            existing = self.db.one("task_unfinished_by_dedupe_key", conn, dedupe_key=dedupe_key)
            if existing is not None:
                return Submitted(existing, False)
            # The holder of the key finished between our insert and our look-up: insert again.
        raise Conflict(f"dedupe key {dedupe_key!r} keeps changing hands; submit again", dedupe_key=dedupe_key)

    def submit_create(
        self, user_id: str, name: str, config: dict[str, Any] | None, image: str, idempotency_key: str | None
    ) -> tuple[InstanceRow, Submitted]:
        """The instance row (`creating`) and its instance_create task, in one transaction.

        The one way a create is submitted (API and CLI). A repeat is the same name and config
        while the first create is unfinished: it returns that task. A name that exists
        otherwise, or an idempotency key held by a different request, is refused (409)."""
        check_user(user_id)
        params: dict[str, Any] = {"name": name}
        if config is not None:
            params["config"] = config
        check_params("instance_create", params)
        idempotency = idem_key(user_id, idempotency_key)
        key = idempotency or create_key(user_id, name)
        for attempt in range(2):
            try:
                with self.db.transaction() as conn:
                    held = self.db.one("task_unfinished_by_dedupe_key", conn, dedupe_key=key)
                    if held is not None and _same_create(held, name, config):
                        found = instances.get(self.db, held["instance_id"], conn)
                        if found is not None and found["user_id"] == user_id:
                            return found, Submitted(held, False)
                    if held is not None and idempotency is not None:
                        raise _held_by_another_request(held, idempotency_key)
                    if self.db.one("instance_by_name", conn, user_id=user_id, name=name) is not None:
                        # Maybe a twin committed between our two reads: the second pass tells.
                        raise Conflict(
                            f"an instance named {name!r} already exists",
                            field="name",
                            constraint="instance_user_id_name_key",
                        )
                    instance = instances.request_create(self.db, conn, user_id, name, image, config)
                    submitted = self.submit("instance_create", user_id, params, instance["id"], key, conn)
                    if not submitted.created:
                        # The key was taken meanwhile by a request for another name (a twin of this
                        # one would have met our row first): raising rolls our row back.
                        raise _held_by_another_request(submitted.task, idempotency_key)
                    return instance, submitted
            except Conflict as error:
                # A concurrent twin inserted the same name first: the second pass finds its task.
                if attempt or error.data.get("constraint") != "instance_user_id_name_key":
                    raise
        raise AssertionError("unreachable: the second pass returns or raises")

    def submit_heartbeat(self, params: dict[str, Any], idempotency_key: str | None = None) -> Submitted:
        """A heartbeat round as a task; one unfinished at a time (or one per idempotency key)."""
        key = idem_key(SYSTEM_USER, idempotency_key) or HEARTBEAT_KEY
        submitted = self.submit("heartbeat", SYSTEM_USER, params, None, key)
        if not submitted.created and idempotency_key is not None:
            _refuse_another_request(submitted.task, "heartbeat", None, params, idempotency_key)
        return submitted

    def submit_action(
        self,
        user_id: str,
        task_type: str,
        instance_id: int,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """start/stop/update/delete of a user's instance; 404 for others', 409 while it is deleted
        or when its create failed (only a delete is left to do).

        A repeat is the same action with the same params as the instance's newest unfinished task
        (a double click): it returns that task. stop, start, stop are three tasks, run in order.
        An idempotency key returns the unfinished task holding it, if that task is this same
        request; a different request under a key in use is refused (409)."""
        params = check_params(task_type, params or {})
        idempotency = idem_key(user_id, idempotency_key)
        with self.db.transaction() as conn:
            instance = self.db.one("instance_get_for_update", conn, id=instance_id)
            if instance is None or instance["user_id"] != user_id:
                raise NotFound(f"no instance {instance_id}", instance_id=instance_id)
            pending = self.db.all("task_unfinished_for_instance", conn, instance_id=instance_id)
            newest = pending[-1] if pending else None
            # A repeat is answered before the state rules.
            if idempotency is not None:
                held = self.db.one("task_unfinished_by_dedupe_key", conn, dedupe_key=idempotency)
                if held is not None:
                    _refuse_another_request(held, task_type, instance_id, params, idempotency_key)
                    return Submitted(held, False)
            elif newest is not None and (newest["type"], newest["params"]) == (task_type, params):
                return Submitted(newest, False)
            if instance["status"] == "deleting" or any(t["type"] == "instance_delete" for t in pending):
                raise Conflict(f"instance {instance_id} is being deleted", instance_id=instance_id)
            if task_type != "instance_delete" and not pending:  # else the create may still succeed
                failed = instances.failed_create(self.db, instance, task_type.removeprefix("instance_"), conn)
                if failed:
                    raise Conflict(failed, instance_id=instance_id, status=instance["status"])
            # The key only keeps concurrent twins apart (the row lock above already does).
            key = idempotency or action_key(task_type, instance_id, newest["id"] if newest else 0)
            submitted = self.submit(task_type, user_id, params, instance_id, key, conn)
            if not submitted.created:  # the key, taken meanwhile for another instance (no shared row lock)
                _refuse_another_request(submitted.task, task_type, instance_id, params, idempotency_key)
            return submitted

    # --- working ----------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> Row | None:
        """The next task this worker may run (now `running`, leased to it), or None."""
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.sweep_every
            self.sweep()
        while True:
            task = self.db.one("task_claim", worker=worker, lease_s=lease_s)
            if task is None or task["type"] != "instance_create" or task["instance_id"] is not None:
                return task
            self._refuse_unsubmitted_create(task, worker)

    def _refuse_unsubmitted_create(self, task: Row, worker: str) -> None:
        """A create task with no instance row (inserted by hand): every create is submitted with
        its row (submit_create), so this one is refused, not guessed at."""
        message = (
            f"instance_create task {task['id']} has no instance row: a create is submitted with its "
            "row (POST /api/instances or `pideploy.py submit`), not inserted by hand"
        )
        self._finish_row(
            id=task["id"], worker=worker, status="failed", result=None, error_class="bad_request",
            last_error=message, trace_file=None, turns=None, cost_usd=None, duration_s=0.0,
        )  # fmt: skip
        logger.warning(
            "task %s refused: %s",
            task["id"],
            message,
            extra={"action": "task_refused", "task_id": task["id"]},
        )

    def _finish_row(self, **values: Any) -> Row | None:
        """task_finish; in the same transaction, the instance of a create that ended unbuilt
        says error (instances.settle_unbuilt_create)."""
        with self.db.transaction() as conn:
            row = self.db.one("task_finish", conn, **values)
            if row is not None:
                reason = f"instance_create {row['status']}: {row['last_error'] or 'no reason recorded'}"
                instances.settle_unbuilt_create(self.db, conn, row, reason, note=True)
        return row

    def sweep(self) -> None:
        """End, as failed, the tasks whose lease ran out with no attempts left."""
        with self.db.transaction() as conn:
            exhausted = self.db.all("task_fail_exhausted", conn)
            for failed in exhausted:  # an instance they were creating goes to error
                reason = f"instance_create failed: {failed['last_error']}"
                instances.settle_unbuilt_create(self.db, conn, failed, reason, note=False)
        for failed in exhausted:
            logger.warning(
                "task %s failed: no attempts left (%s)",
                failed["id"],
                failed["last_error"],
                extra={
                    "action": "task_exhausted",
                    "task_id": failed["id"],
                    "instance_id": failed["instance_id"],
                },
            )

    def renew(self, task_id: int, worker: str, lease_s: float) -> bool | None:
        """Extend the lease: None if the task is no longer ours, else whether a cancel was asked for."""
        row = self.db.one("task_renew", id=task_id, worker=worker, lease_s=lease_s)
        return None if row is None else bool(row["cancel_requested"])

    def finish(
        self, task_id: int, worker: str, status: str, outcome: Outcome | None, duration_s: float
    ) -> Row | None:
        """Record the end of a run; None if the task was no longer ours (the result is dropped)."""
        return self._finish_row(
            id=task_id,
            worker=worker,
            status=status,
            result=outcome.result if outcome else None,
            error_class=outcome.error_class if outcome else None,
            last_error=outcome.error if outcome else None,
            trace_file=outcome.trace_file if outcome else None,
            turns=outcome.turns if outcome else None,
            cost_usd=outcome.cost_usd if outcome else None,
            duration_s=round(duration_s, 6),
        )

    def fail(
        self, task: Row, worker: str, error: BaseException, duration_s: float, retry_in: float
    ) -> Row | None:
        """A run that raised: try again after `retry_in` seconds if attempts are left, else failed."""
        error_class = error.error_class if isinstance(error, PiDeployError) else "tool_execution_error"
        crash = error if isinstance(error, RunCrashed) else None  # its message names the cause
        message = crash.message if crash else f"{type(error).__name__}: {error}"
        if task["attempts"] < task["max_attempts"]:
            return self.db.one(
                "task_retry_later",
                id=task["id"],
                worker=worker,
                error_class=error_class,
                last_error=message,
                delay_s=retry_in,
            )
        return self._finish_row(
            id=task["id"],
            worker=worker,
            status="failed",
            result=None,
            error_class=error_class,
            last_error=f"{message} (attempt {task['attempts']} of {task['max_attempts']})",
            trace_file=crash.data["trace_file"] if crash else None,
            turns=None,
            cost_usd=None,
            duration_s=round(duration_s, 6),
        )

    def release(self, task_id: int, worker: str) -> Row | None:
        return self.db.one("task_release", id=task_id, worker=worker)

    # --- reading and cancelling ------------------------------------------

    def get(self, task_id: int, user_id: str | None = None) -> Row:
        row = (
            self.db.one("task_get", id=task_id)
            if user_id is None
            else self.db.one("task_get_owned", id=task_id, user_id=user_id)
        )
        if row is None:
            raise NotFound(f"no task {task_id}", task_id=task_id)
        return row

    def list(
        self,
        user_id: str | None = None,
        status: str | None = None,
        instance_id: int | None = None,
        limit: int = 50,
    ) -> list[Row]:
        return self.db.all("task_list", user_id=user_id, status=status, instance_id=instance_id, limit=limit)

    def cancel(self, task_id: int, user_id: str | None = None) -> Row:
        """Queued: cancelled now. Running: its worker stops it at the next lease renewal."""
        task = self.get(task_id, user_id)
        with self.db.transaction() as conn:
            row = self.db.one("task_cancel", conn, id=task_id)
            if row is not None and row["status"] == "cancelled":  # never ran: nothing was built
                reason = "instance_create was cancelled before it ran"
                instances.settle_unbuilt_create(self.db, conn, row, reason, note=False)
        if row is None:
            raise Conflict(f"task {task_id} already ended ({task['status']})", task_id=task_id)
        return row


def _refuse_another_request(
    held: Row, task_type: str, instance_id: int | None, params: dict[str, Any], idempotency_key: str | None
) -> None:
    """The unfinished task holding a key answers only the request it was made for."""
    if (held["type"], held["instance_id"], held["params"]) != (task_type, instance_id, params):
        raise _held_by_another_request(held, idempotency_key)


def _held_by_another_request(held: Row, idempotency_key: str | None) -> Conflict:
    about = f" of instance {held['instance_id']}" if held["instance_id"] is not None else ""
    if idempotency_key is None:  # the name's own key: an unfinished create of that name
        return Conflict(
            f"an instance named {held['params'].get('name')!r} is being created by task {held['id']}",
            field="name",
            task_id=held["id"],
        )
    return Conflict(
        f"idempotency key {idempotency_key!r} is held by task {held['id']}, "
        f"a different request ({held['type']}{about})",
        task_id=held["id"],
    )


def _same_create(held: Row, name: str, config: dict[str, Any] | None) -> bool:
    """Whether an unfinished task is this create request: no config is the empty config."""
    params = held["params"] or {}
    return (
        held["type"] == "instance_create"
        and held["instance_id"] is not None
        and params.get("name") == name
        and (params.get("config") or {}) == (config or {})
    )


# ---------------------------------------------------------------------------
# Dedupe keys: every format in one place (task.dedupe_key, unique while unfinished)
# ---------------------------------------------------------------------------

HEARTBEAT_KEY = "heartbeat"  # one unfinished heartbeat task at a time


def idem_key(user_id: str, key: str | None) -> str | None:
    """A client's Idempotency-Key, scoped by user: one user's key never answers with another
    user's task."""
    return f"idem:{user_id}:{key}" if key else None


def create_key(user_id: str, name: str) -> str:
    """An unkeyed create: one unfinished create per user and name."""
    return f"instance_create:{user_id}:{name}"


def action_key(task_type: str, instance_id: int, after_task: int) -> str:
    """An unkeyed action: it follows the instance's newest unfinished task (0: none), so only
    concurrent twins share it (the instance's row lock already serialises them)."""
    return f"{task_type}:{instance_id}:after:{after_task}"


# ---------------------------------------------------------------------------
# Running a task: the queue is handed a runner (pideploy.task_runner: the agent loop, or a
# heartbeat round), so it knows neither
# ---------------------------------------------------------------------------

Cancelled = Callable[[], bool]
Runner = Callable[[Row, Cancelled], Outcome]


# ---------------------------------------------------------------------------
# Waking workers: NOTIFY when a task is queued, polling as the backstop
# ---------------------------------------------------------------------------


class Wakeup:
    """A generation counter under a condition: a wake between a worker's claim and its wait is not lost."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def token(self) -> int:
        with self._cond:
            return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, token: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._generation != token, timeout)


class Listener(threading.Thread):
    """LISTENs on the queue's channel and wakes the workers; reconnects with backoff after errors.

    A lost connection is logged once, and its return once: an outage of minutes is two lines,
    and the database's watchdog is told at once (the workers poll meanwhile)."""

    def __init__(
        self,
        db: Database,
        wakeup: Wakeup,
        stop: threading.Event,
        retry_s: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        super().__init__(name="task-listener", daemon=True)
        self.db, self.wakeup, self.stop, self.retry_s, self.retry_max = db, wakeup, stop, retry_s, retry_max

    def run(self) -> None:
        pause, lost_since = self.retry_s, None
        while not self.stop.is_set():
            try:
                with self.db.listen_connection(CHANNEL) as conn:
                    if lost_since is not None:
                        logger.info(
                            "task listener connected again after %.1fs",
                            time.monotonic() - lost_since,
                            extra={"action": "listener_back"},
                        )
                    pause, lost_since = self.retry_s, None
                    self.wakeup.notify()  # whatever was queued while we were not listening
                    while not self.stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.wakeup.notify()
            except (PiDeployError, psycopg.Error) as error:
                self.db.health.suspect()
                if lost_since is None:
                    lost_since = time.monotonic()
                    logger.warning(
                        "task listener lost its connection (%s); polling until it is back",
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                        extra={"action": "listener_error"},
                    )
                self.stop.wait(pause)
                pause = min(self.retry_max, pause * 2)


# ---------------------------------------------------------------------------
# The lease and the worker
# ---------------------------------------------------------------------------


class Lease:
    """Renews one claimed task's lease every lease/3 seconds while it runs.

    It is also where the run learns it must stop: a cancel request read at
    renewal, a lease found taken by another worker, or the shutdown's `abort`.
    """

    def __init__(self, queue: Queue, task: Row, worker: str, lease_s: float, abort: threading.Event) -> None:
        self.queue, self.task_id, self.worker, self.lease_s, self.abort = (
            queue,
            task["id"],
            worker,
            lease_s,
            abort,
        )
        self.cancel_requested = bool(task["cancel_requested"])
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.task_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def cancelled(self) -> bool:
        return self.lost or self.cancel_requested or self.abort.is_set()

    def _renew(self) -> None:
        failing = False
        while not self._done.wait(self.lease_s / 3):
            try:
                state = self.queue.renew(self.task_id, self.worker, self.lease_s)
            except PiDeployError as error:  # the next renewal may work; the lease is still running
                if not failing:  # once per outage, not at every renewal
                    logger.warning(
                        "cannot renew the lease of task %s: %s",
                        self.task_id,
                        error.message,
                        extra={"action": "lease_renew_failed", "task_id": self.task_id},
                    )
                failing = True
                continue
            failing = False
            if state is None:
                self.lost = True
                logger.warning(
                    "task %s is no longer leased to %s; stopping its run",
                    self.task_id,
                    self.worker,
                    extra={"action": "lease_lost", "task_id": self.task_id},
                )
                return
            if state and not self.cancel_requested:
                logger.info(
                    "cancel requested for task %s",
                    self.task_id,
                    extra={"action": "task_cancel_seen", "task_id": self.task_id},
                )
            self.cancel_requested = state


CANCELLED_BEFORE_RUN = Outcome("failed", None, "cancelled", "cancelled before it ran", 0, 0.0, 0, "")


class Worker(threading.Thread):
    """One task at a time: claim, run under a lease, record, log and back off on errors."""

    def __init__(
        self,
        queue: Queue,
        runner: Runner,
        worker_id: str,
        *,
        wakeup: Wakeup,
        stop: threading.Event,
        abort: threading.Event,
        lease_s: float = 30.0,
        poll_interval: float = 2.0,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"worker-{worker_id}", daemon=True)
        self.queue, self.runner, self.worker_id = queue, runner, worker_id
        self.wakeup, self.stop, self.abort = wakeup, stop, abort
        self.lease_s, self.poll_interval, self.backoff_max, self.clock = (
            lease_s,
            poll_interval,
            backoff_max,
            clock,
        )
        self.current: int | None = None  # the task id being run, for the shutdown's release
        self.released: list[int] = []  # tasks given back to the queue at shutdown

    def run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            token = self.wakeup.token()
            try:
                worked = self.step()
                failures = 0
            except DatabaseError as error:  # an outage: said once per streak, not at every retry
                failures += 1
                if failures == 1:
                    logger.warning(
                        "worker %s: %s; retrying with backoff",
                        self.worker_id,
                        error.message,
                        extra={"action": "worker_db_unavailable"},
                    )
                self.stop.wait(min(self.backoff_max, 0.5 * 2**failures))
                continue
            except Exception:  # the loop must outlive any one task or a database outage
                failures += 1
                logger.exception("worker %s failed", self.worker_id, extra={"action": "worker_error"})
                self.stop.wait(min(self.backoff_max, 0.5 * 2**failures))
                continue
            if not worked:
                self.wakeup.wait(token, self.poll_interval)

    def step(self) -> bool:
        """Claim and work one task; False when there was none."""
        task = self.queue.claim(self.worker_id, self.lease_s)
        if task is None:
            return False
        self.current = task["id"]
        try:
            self.work(task)
        finally:
            self.current = None
        return True

    def work(self, task: Row) -> None:
        ids = {"task_id": task["id"], "instance_id": task["instance_id"]}
        again = f" (attempt {task['attempts']} of {task['max_attempts']})" if task["attempts"] > 1 else ""
        logger.info(
            "running %s task %s%s", task["type"], task["id"], again, extra={"action": "task_claimed", **ids}
        )
        started = self.clock()
        outcome = CANCELLED_BEFORE_RUN
        with Lease(self.queue, task, self.worker_id, self.lease_s, self.abort) as lease:
            try:
                if not lease.cancel_requested:
                    outcome = self.runner(task, lease.cancelled)
            except Exception as error:
                duration = self.clock() - started
                logger.exception("task %s raised", task["id"], extra={"action": "task_error", **ids})
                if not lease.lost:
                    self.queue.fail(
                        task,
                        self.worker_id,
                        error,
                        duration,
                        retry_in=min(self.lease_s, 2.0 ** task["attempts"]),
                    )
                return
        duration = self.clock() - started
        if lease.lost:
            logger.warning(
                "task %s: result dropped, another worker holds it",
                task["id"],
                extra={"action": "task_result_dropped", **ids},
            )
            return
        if outcome.error_class == "cancelled" and lease.cancel_requested:
            status = "cancelled"
        elif outcome.error_class == "cancelled" and self.abort.is_set():
            if self.queue.release(task["id"], self.worker_id) is not None:
                self.released.append(task["id"])
            logger.info(
                "task %s released for another worker (shutdown)",
                task["id"],
                extra={"action": "task_released", **ids},
            )
            return
        else:
            status = outcome.status
        row = self.queue.finish(task["id"], self.worker_id, status, outcome, duration)
        if row is None:
            logger.warning(
                "task %s: result dropped, another worker holds it",
                task["id"],
                extra={"action": "task_result_dropped", **ids},
            )
            return
        level = logging.INFO if status == "succeeded" else logging.WARNING
        logger.log(
            level,
            "task %s %s in %.2fs%s",
            task["id"],
            status,
            duration,
            f": {row['error_class']}: {row['last_error']}" if row["last_error"] else "",
            extra={
                "action": f"task_{status}",
                **{**ids, "instance_id": row["instance_id"]},
                "trace_file": row["trace_file"],
            },
        )


class WorkerPool:
    """N workers and the listener; `shutdown` is the graceful stop that serve runs on SIGTERM."""

    def __init__(
        self,
        queue: Queue,
        runners: Callable[[], Runner],
        count: int,
        *,
        lease_s: float = 30.0,
        poll_interval: float = 2.0,
        listen: bool = True,
    ) -> None:
        self.queue = queue
        self.stop, self.abort, self.wakeup = threading.Event(), threading.Event(), Wakeup()
        prefix = f"{socket.gethostname()}:{os.getpid()}"
        self.workers = [
            Worker(
                queue,
                runners(),
                f"{prefix}:w{i}",
                wakeup=self.wakeup,
                stop=self.stop,
                abort=self.abort,
                lease_s=lease_s,
                poll_interval=poll_interval,
            )
            for i in range(count)
        ]
        self.listener = Listener(queue.db, self.wakeup, self.stop) if listen else None

    def start(self) -> None:
        if self.listener:
            self.listener.start()
        for worker in self.workers:
            worker.start()

    def shutdown(self, grace_s: float, release_wait_s: float = 5.0) -> list[int]:
        """Stop claiming; give running tasks `grace_s`; then cancel them and release their leases.

        Returns the ids of the tasks given back to the queue.
        """
        self.stop.set()
        self.wakeup.notify()
        running = sorted(w.current for w in self.workers if w.current is not None)
        if running:
            logger.info(
                "shutting down: waiting up to %.0fs for %d running task(s)",
                grace_s,
                len(running),
                extra={"action": "shutdown_wait", "tasks": running},
            )
        _join_all(self.workers, grace_s)
        if any(w.is_alive() for w in self.workers):
            # Past the grace period: the runs see cancelled() at their next turn and give their task back.
            self.abort.set()
            _join_all(self.workers, release_wait_s)
            for worker in self.workers:
                task_id = worker.current
                # Still inside a tool call: give the task back from here; the thread dies with us.
                alive = worker.is_alive() and task_id is not None
                if (
                    alive
                    and task_id is not None
                    and self.queue.release(task_id, worker.worker_id) is not None
                ):
                    worker.released.append(task_id)
                    logger.info(
                        "task %s released for another worker (shutdown)",
                        task_id,
                        extra={"action": "task_released", "task_id": task_id},
                    )
        if self.listener:
            self.listener.join(2.0)
        return sorted(t for w in self.workers for t in w.released)


def _join_all(threads: Sequence[threading.Thread], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
