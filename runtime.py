"""The world the tools and the lifecycle act on, and the parts of an instance on the host.

`Runtime` (config, database, engine, proxy: real parts or in-memory fakes) and
`ToolContext` (who acts, for which task and instance, until when) are what
every tool and lifecycle operation takes. The rest is what an instance is made
of outside its database row, none of it a status change (instances.py owns
those): host ports, the /healthz probe, the storage folder and its config
file, the container spec and the container calls every operation shares, and
the nginx route map. Every container carries the labels
pideploy.instance / pideploy.user / pideploy.namespace, so the engine alone
can tell what piDeploy owns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from config import Config
from db import Database
from engine import LABEL_INSTANCE, LABEL_NAMESPACE, LABEL_USER, Container, ContainerSpec, Engine
from errors import (
    ContainerNotFound,
    EngineError,
    HealthCheckFailed,
    PiDeployError,
    ProxyError,
    ToolError,
    ToolRefused,
)
from localio import LOOPBACK, write_atomic
from observability import Span, Trace
from proxy import Proxy, route_key

logger = logging.getLogger(__name__)

# An instance's status (schema.sql's CHECK says the same); instances.py is the one writer.
Status = Literal["creating", "running", "stopped", "updating", "deleting", "error"]
TRANSITIONAL: tuple[Status, ...] = ("creating", "updating", "deleting")
# A task's status (schema.sql); tasks.py writes them.
TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class InstanceRow(TypedDict):
    """An `instance` row as the lifecycle reads it (schema.sql; the heartbeat's counters aside)."""

    id: int
    user_id: str
    name: str
    status: Status
    image: str
    config: dict[str, Any]
    container_id: str | None
    port: int | None
    storage_path: str | None
    last_error: str | None


Result = dict[str, Any]

# A connection to an unforwarded loopback port is refused at once; waiting longer only
# delays the verdict on a forwarded one.
PORT_PROBE_TIMEOUT = 0.3
ROUTE_LOCK = 8_700_002  # advisory lock: one read-then-apply of the route map at a time
CONFIG_FILE = "openclaw.json"


@dataclass(frozen=True)
class Runtime:
    """The world the tools act on, passed in (real parts or in-memory fakes)."""

    config: Config
    db: Database
    engine: Engine
    proxy: Proxy


@dataclass
class ToolContext:
    """Bound by the loop from the task row, never from model-supplied arguments."""

    trace: Trace
    user_id: str | None  # None: the system (a heartbeat round)
    task_id: int | None = None
    instance_id: int | None = None  # the instance the task is about (create may fill it in)
    allowed_instances: frozenset[int] | None = None  # system runs: only these instances
    deadline: float = field(default_factory=lambda: time.monotonic() + 300)

    @classmethod
    def direct(
        cls, trace_dir: Path, user_id: str | None, purpose: str, instance_id: int | None = None, **scope: Any
    ) -> ToolContext:
        """A context for calling tools outside an agent run (world building in evals and
        tests, benchmarks): the same rules, with a trace of its own (written only if asked)."""
        trace = Trace(
            kind="task",
            task_id=None,
            task_type=purpose,
            user_id=user_id,
            instance_id=instance_id,
            prompt_version="direct",
            model_chain=[],
            trace_dir=trace_dir,
        )
        return cls(trace, user_id, None, instance_id, **scope)

    @property
    def system(self) -> bool:
        return self.user_id is None

    def remaining(self, cap: float | None = None) -> float:
        left = self.deadline - time.monotonic()
        return max(0.0, left if cap is None else min(left, cap))


def container_name(config: Config, instance_id: int) -> str:
    return f"pideploy-{config.namespace}-{instance_id}"


def step_span(ctx: ToolContext, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span]:
    return ctx.trace.span(name, **{"pideploy.step": True, **attributes})


def port_is_free(port: int) -> bool:
    """Whether a new instance could be reached on 127.0.0.1:port: nothing listens there and
    nothing intercepts it.

    Bind with SO_REUSEADDR, as servers do: without it, connections of a server that just
    stopped (TIME_WAIT) make the port look taken. Binding is not enough: a rootful Podman (or
    Docker without its userland proxy) publishes a port with a firewall DNAT rule and holds
    no socket, so a running container's port, or a rule its engine leaked when it died, binds
    fine and yet routes elsewhere. An unforwarded port refuses a connection at once; a
    forwarded one connects, or hangs, or says "no route to host"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PORT_PROBE_TIMEOUT):
            outcome = "a connection was accepted"
    except ConnectionRefusedError:
        return True
    except OSError as error:  # a timeout, EHOSTUNREACH: forwarded to an address nobody has
        outcome = str(error) or type(error).__name__
    logger.warning(
        "port %d binds but is forwarded elsewhere (%s): skipped; a firewall rule the container "
        "engine left behind would explain it",
        port,
        outcome,
        extra={"action": "port_intercepted", "port": port},
    )
    return False


# The top-level keys of the config file that piDeploy writes itself: a user's config may not set them.
OWN_CONFIG_KEYS = ("gateway", "instance")


def render_config(rt: Runtime, row: Mapping[str, Any], config: Mapping[str, Any], storage: Path) -> Path:
    """Write the instance's config file atomically into its storage folder.

    piDeploy's own fields come last, so they win even over a row whose config was stored
    before such keys were refused at submit."""
    own = {
        "instance": {"id": row["id"], "name": row["name"], "user": row["user_id"]},
        "gateway": {"port": rt.config.container_port},
    }
    document = {**{k: v for k, v in config.items() if k != "env"}, **own}
    path = storage / CONFIG_FILE
    write_atomic(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def storage_for(rt: Runtime, instance_id: int) -> Path:
    return rt.config.storage / str(instance_id)


def remove_storage(rt: Runtime, path: str | None) -> None:
    """Delete an instance folder, but only one inside piDeploy's storage root."""
    if not path:
        return
    target = Path(path).resolve()
    root = rt.config.storage.resolve()
    if target == root or root not in target.parents:
        raise ToolRefused(f"refusing to delete {target}: outside {root}", path=str(target))
    shutil.rmtree(target, ignore_errors=True)


def container_spec(
    rt: Runtime, row: Mapping[str, Any], image: str, port: int, config: Mapping[str, Any]
) -> ContainerSpec:
    env = {str(k): str(v) for k, v in dict(config.get("env") or {}).items()}
    return ContainerSpec(
        name=container_name(rt.config, row["id"]),
        image=image,
        host_port=port,
        container_port=rt.config.container_port,
        labels={
            LABEL_INSTANCE: str(row["id"]),
            LABEL_USER: row["user_id"],
            LABEL_NAMESPACE: rt.config.namespace,
        },
        mounts={row["storage_path"]: "/data"},
        env=env,
    )


def healthz(port: int, timeout: float = 1.0) -> tuple[bool, str]:
    """One GET http://127.0.0.1:<port>/healthz: (answered 200, what happened)."""
    try:
        with LOOPBACK.open(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code}"
    except urllib.error.URLError as error:
        return False, str(error.reason)
    except OSError as error:  # a timeout while reading, a reset connection
        return False, str(error) or type(error).__name__


def healthy_now(port: int | None) -> bool:
    return port is not None and port > 0 and healthz(port)[0]


def wait_healthy(rt: Runtime, ctx: ToolContext, container_id: str, port: int) -> float:
    """GET /healthz until 200, within the bounded wait; fail fast if the container exits."""
    started = time.monotonic()
    limit = started + ctx.remaining(rt.config.health_timeout)
    url = f"http://127.0.0.1:{port}/healthz"
    next_state_check = started + 0.5
    engine_trouble = ""
    with step_span(ctx, "health.wait", **{"url.full": url}) as span:
        while True:
            healthy, last_probe = healthz(port)
            if healthy:
                waited = time.monotonic() - started
                span.set(**{"pideploy.waited_s": round(waited, 3)})
                return waited
            now = time.monotonic()
            if now >= next_state_check:
                next_state_check = now + 0.5
                try:
                    state = rt.engine.inspect(container_id)
                    gone = state is None or state.state in ("exited", "dead")
                except EngineError as error:
                    # The check only makes a dead container fail fast; the probe is the verdict,
                    # and a container that answers is healthy whether or not the engine does.
                    engine_trouble, state, gone = error.message, None, False
                if gone:
                    logs = tail_logs(rt, container_id)
                    code = state.exit_code if state else None
                    raise HealthCheckFailed(
                        f"container exited with code {code} before answering /healthz",
                        exit_code=code,
                        logs=logs,
                    )
            if now >= limit:
                engine_note = f"; the engine did not answer: {engine_trouble}" if engine_trouble else ""
                raise HealthCheckFailed(
                    f"/healthz did not answer 200 within {rt.config.health_timeout:.0f}s "
                    f"(last probe: {last_probe}){engine_note}",
                    last_probe=last_probe,
                    logs=tail_logs(rt, container_id),
                )
            time.sleep(0.05)


def tail_logs(rt: Runtime, container_id: str) -> str:
    try:
        return rt.engine.logs(container_id, 20)[-2000:]
    except EngineError:
        return ""


def instance_containers(rt: Runtime, instance_id: int) -> list[Container]:
    return rt.engine.list({LABEL_NAMESPACE: rt.config.namespace, LABEL_INSTANCE: str(instance_id)})


def inspect_container(rt: Runtime, ctx: ToolContext, container_id: str | None) -> Container | None:
    if not container_id:
        return None
    with step_span(ctx, "engine.inspect", **{"container.id": container_id}):
        return rt.engine.inspect(container_id)


def remove_quietly(rt: Runtime, ctx: ToolContext, container_id: str) -> None:
    with (
        step_span(ctx, "engine.remove", **{"container.id": container_id}),
        contextlib.suppress(ContainerNotFound),
    ):
        rt.engine.remove(container_id)


def clear_name(rt: Runtime, ctx: ToolContext, row: Mapping[str, Any], keep: str | None) -> None:
    """Remove this instance's leftover containers (from a crashed attempt), except `keep`."""
    for container in instance_containers(rt, row["id"]):
        if container.id != keep:
            remove_quietly(rt, ctx, container.id)


def recorded_container(row: Mapping[str, Any] | None, containers: Iterable[Container]) -> Container | None:
    """The container the row records (engines may report ids in full or short form)."""
    wanted = row["container_id"] if row is not None else None
    if not wanted:
        return None
    for container in containers:
        if container.id == wanted or container.id.startswith(wanted) or wanted.startswith(container.id):
            return container
    return None


def stray_reason(row: Mapping[str, Any] | None, container: Container) -> str:
    """Why a labelled container of this namespace is not wanted ("" when it is, or when that is
    not for this rule to say). The rule the heartbeat and remove_stray_container share:

    - no row: its instance was deleted (or never finished being made);
    - the row does not record it: a leftover of a create or update that died half-way, or of
      a task that gave up (an `error` row whose create failed records no container);
    - a row in a transition (creating/updating/deleting) is its task's, or instance_rollback's,
      to settle; the recorded container of an `error` row is kept for the operator to inspect."""
    if row is None:
        return "its instance has no row"
    if row["status"] in TRANSITIONAL or recorded_container(row, [container]) is not None:
        return ""
    recorded = f"container {row['container_id'][:12]}" if row["container_id"] else "no container"
    return f"instance {row['id']} is {row['status']} and records {recorded}"


def wanted_routes(
    rows: Iterable[Mapping[str, Any]], keys: Mapping[int, str], live: Mapping[str, int]
) -> dict[str, int]:
    """The route map the rows call for: every running instance with a port, and an updating
    instance's route kept as it is live (its port does not change; removing it mid-update
    would only make it flap). `keys`: each row's route key (proxy.route_key)."""
    routes: dict[str, int] = {}
    for row in rows:
        key, port = keys[row["id"]], row["port"]
        if not port:
            continue
        if row["status"] == "running" or (row["status"] == "updating" and live.get(key) == int(port)):
            routes[key] = int(port)
    return routes


def create_and_start(rt: Runtime, ctx: ToolContext, spec: ContainerSpec) -> Container:
    with step_span(ctx, "engine.create", **{"container.image.name": spec.image}):
        container = rt.engine.create(spec)
    try:
        with step_span(ctx, "engine.start", **{"container.id": container.id}):
            rt.engine.start(container.id)
    except PiDeployError:
        remove_quietly(rt, ctx, container.id)
        raise
    return container


def public_row(row: Mapping[str, Any]) -> Result:
    """What a model (or an API client) may see of an instance row."""
    return {
        "instance_id": row["id"],
        "name": row["name"],
        "status": row["status"],
        "image": row["image"],
        "port": row["port"],
        "last_error": row["last_error"],
    }


def sync_routes(rt: Runtime, ctx: ToolContext) -> Result:
    """Routes for the running instances (an updating one keeps its live route: wanted_routes);
    verify the running ones this context owns."""
    with step_span(ctx, "nginx.sync") as span, rt.db.transaction() as conn:
        # Read and apply under one lock so two syncs cannot apply stale reads in the wrong order.
        rt.db.one("routes_lock", conn, key=ROUTE_LOCK)
        rows = rt.db.all("instance_list_routable", conn)
        running = [r for r in rows if r["status"] == "running"]
        keys = {r["id"]: route_key(r, rt.config) for r in rows}
        routes = wanted_routes(rows, keys, rt.proxy.routes())
        try:
            rt.proxy.apply(routes)
        except OSError as error:  # writing the map (disk full, permissions): nginx's trouble, say so
            raise ProxyError(f"cannot write the nginx route map: {error}") from error
        span.set(**{"pideploy.routes": len(routes)})
    mine = [
        r["id"]
        for r in running
        if (ctx.system and (ctx.allowed_instances is None or r["id"] in ctx.allowed_instances))
        or (not ctx.system and r["user_id"] == ctx.user_id)
    ]
    with step_span(ctx, "nginx.verify"):
        reachable = rt.proxy.check([keys[i] for i in mine], timeout=2.0) if mine else {}
    return {
        "routes": len(routes),
        "reachable": sorted(i for i in mine if reachable.get(keys[i])),
        "unreachable": sorted(i for i in mine if not reachable.get(keys[i])),
    }


def wait_stopped(rt: Runtime, ctx: ToolContext, container_id: str) -> None:
    limit = time.monotonic() + ctx.remaining(rt.config.stop_timeout + 10)
    with step_span(ctx, "engine.wait_stopped", **{"container.id": container_id}):
        while time.monotonic() < limit:
            state = rt.engine.inspect(container_id)
            if state is None or not state.running:
                return
            time.sleep(0.1)
    raise ToolError(f"container {container_id[:12]} still running after stop")
