"""An agent.Environment in memory: instances as dicts, for loop tests with no Postgres or HTTP.

The tool specs, tool sets, argument validation and the outcome check are the real ones
(tools.TOOLS, tools.TOOLSETS, tools.validate, agent.outcome_problem); the lifecycle tools
the loop tests use are simulated on the dicts with the state rules of tools.py: scope (a
user's own instances, the task's instance, a heartbeat's drift report), transitional states
refused, a heartbeat that never creates, deletes or updates, and converges only to what the
row says. Anything else is a ToolError. `override` replaces a tool's behaviour for a test
(a tool that hangs, crashes or loses the database).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import agent
import tools
from config import Config
from errors import ImageNotFound, PiDeployError, ToolArgumentError, ToolError, ToolRefused

Row = dict[str, Any]
TRANSITIONAL = ("creating", "updating", "deleting")


class MemoryEnvironment:
    def __init__(
        self,
        config: Config,
        instances: Iterable[Row] = (),
        *,
        images: Iterable[str] = ("localhost/pideploy-gateway:latest", "localhost/pideploy-gateway:v2"),
        secrets: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.instances: dict[int, Row] = {}
        self.images = set(images)
        self.secrets = set(secrets)
        self.secrets_error: PiDeployError | None = None  # set: secret_values raises it
        self.override: dict[str, Callable[..., dict[str, Any]]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []  # every validated call, in order
        for row in instances:
            self.add(**row)

    def add(self, name: str, user_id: str = "alice", status: str = "running", **fields: Any) -> int:
        """An instance in the world; returns its id."""
        iid = int(fields.pop("id", max(self.instances, default=0) + 1))
        self.instances[iid] = {
            "id": iid,
            "user_id": user_id,
            "name": name,
            "status": status,
            "image": fields.pop("image", self.config.image),
            "port": fields.pop("port", 20_000 + iid),
            "config": fields.pop("config", {}),
            "last_error": fields.pop("last_error", None),
            **fields,
        }
        return iid

    # -- the Environment ---------------------------------------------------------

    def toolset(self, task_type: str) -> tuple[str, ...]:
        return tools.TOOLSETS[task_type]

    def specs(self, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
        return [tools.TOOLS[name].spec() for name in allowed]

    def call(
        self, ctx: tools.ToolContext, name: str, arguments: object, allowed: tuple[str, ...]
    ) -> dict[str, Any]:
        tool = tools.TOOLS.get(name) if name in allowed else None
        if tool is None:
            raise ToolArgumentError(f"unknown tool {name!r}; available: {', '.join(allowed)}", tool=name)
        checked = tools.validate(tool, arguments)
        self.calls.append((name, checked))
        handler = self.override.get(name) or getattr(self, name, None)
        if handler is None:
            raise ToolError(f"{name} is not simulated in memory")
        return handler(ctx, **checked)

    def snapshot(self, ctx: tools.ToolContext) -> dict[str, Any]:
        ids = set(ctx.allowed_instances or ()) | ({ctx.instance_id} if ctx.instance_id is not None else set())
        found: list[dict[str, Any]] = []
        for iid in sorted(ids):
            row = self.instances.get(iid)
            found.append(
                {**public(row), "user_id": row["user_id"]} if row else {"instance_id": iid, "exists": False}
            )
        return {"instances": found}

    def verify(self, task: agent.TaskSpec) -> str:
        if task.type == "instance_create" and task.instance_id is None:
            row = self.by_name(task.user_id, task.params.get("name", ""))
        else:
            row = self.instances.get(task.instance_id) if task.instance_id is not None else None
        return agent.outcome_problem(task, row)

    def secret_values(self) -> set[str]:
        if self.secrets_error is not None:
            raise self.secrets_error
        return set(self.secrets)

    # -- the tools ---------------------------------------------------------------

    def by_name(self, user_id: str | None, name: str) -> Row | None:
        return next(
            (r for r in self.instances.values() if r["user_id"] == user_id and r["name"] == name), None
        )

    def scoped(self, ctx: tools.ToolContext, iid: int, tool: str) -> Row | None:
        row = self.instances.get(iid)
        if ctx.system:
            if ctx.allowed_instances is not None and iid not in ctx.allowed_instances:
                raise ToolRefused(
                    f"instance {iid} is not part of this heartbeat round's drift report", tool=tool
                )
        elif row is not None and row["user_id"] != ctx.user_id:
            raise ToolRefused(f"instance {iid} does not belong to user {ctx.user_id}", tool=tool)
        elif ctx.instance_id is not None and iid != ctx.instance_id:
            raise ToolRefused(f"this task is about instance {ctx.instance_id}, not instance {iid}", tool=tool)
        if row is None and not ctx.system and ctx.instance_id != iid:
            raise ToolError(f"no instance {iid}", instance_id=iid)
        return row

    def existing(self, ctx: tools.ToolContext, iid: int, tool: str) -> Row:
        row = self.scoped(ctx, iid, tool)
        if row is None:
            raise ToolError(f"no instance {iid}")
        return row

    def instance_create(
        self, ctx: tools.ToolContext, name: str, config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if ctx.system:
            raise ToolRefused("instance_create acts for a user; a heartbeat round cannot create instances")
        row = self.by_name(ctx.user_id, name)
        if row is None:
            row = self.instances[self.add(name, str(ctx.user_id), "running", config=config or {})]
            return public(row)
        if row["status"] == "running":
            return {**public(row), "note": "already created"}
        raise ToolRefused(
            f"instance {row['id']} is {row['status']}; instance_create only builds new instances"
        )

    def instance_start(self, ctx: tools.ToolContext, instance_id: int) -> dict[str, Any]:
        row = self.existing(ctx, instance_id, "instance_start")
        if row["status"] in TRANSITIONAL:
            raise ToolRefused(f"instance {instance_id} is {row['status']}; wait for that to finish")
        if ctx.system and row["status"] != "running":
            raise ToolRefused(f"instance {instance_id} is {row['status']}; a heartbeat does not start it")
        row.update(status="running", last_error=None)
        return {**public(row), "routed": True}

    def instance_stop(self, ctx: tools.ToolContext, instance_id: int) -> dict[str, Any]:
        row = self.existing(ctx, instance_id, "instance_stop")
        if ctx.system and row["status"] != "stopped":
            raise ToolRefused(f"instance {instance_id} is {row['status']}; a heartbeat does not stop it")
        if row["status"] in TRANSITIONAL:
            raise ToolRefused(f"instance {instance_id} is {row['status']}; wait for that to finish")
        if row["status"] == "stopped":
            return {**public(row), "note": "already stopped"}
        row.update(status="stopped", last_error=None)
        return {**public(row), "routes": {}}

    def instance_delete(self, ctx: tools.ToolContext, instance_id: int) -> dict[str, Any]:
        row = self.scoped(ctx, instance_id, "instance_delete")
        if ctx.system:
            raise ToolRefused("a heartbeat round never deletes instances")
        if row is None:
            return {"instance_id": instance_id, "deleted": True, "note": "already deleted"}
        del self.instances[instance_id]
        return {"instance_id": instance_id, "name": row["name"], "deleted": True}

    def instance_update(
        self,
        ctx: tools.ToolContext,
        instance_id: int,
        image: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        row = self.existing(ctx, instance_id, "instance_update")
        if ctx.system:
            raise ToolRefused("a heartbeat round never updates instances")
        if row["status"] not in ("running", "stopped", "error"):
            raise ToolRefused(f"instance {instance_id} is {row['status']}; it cannot be updated now")
        target = image or row["image"]
        if target not in self.images:
            raise ImageNotFound(f"image {target} is not in the engine's store (piDeploy never pulls)")
        row.update(status="running", image=target, config=config if config is not None else row["config"])
        return public(row)

    def instance_status(self, ctx: tools.ToolContext, instance_id: int) -> dict[str, Any]:
        row = self.scoped(ctx, instance_id, "instance_status")
        return public(row) if row else {"instance_id": instance_id, "exists": False}

    def nginx_sync(self, ctx: tools.ToolContext) -> dict[str, Any]:
        running = sorted(iid for iid, r in self.instances.items() if r["status"] == "running")
        return {"routes": {str(iid): self.instances[iid]["port"] for iid in running}, "reachable": running}

    def report_result(
        self,
        ctx: tools.ToolContext,
        success: bool,
        action: str,
        data: dict[str, Any] | None = None,
        errors: list[str] | None = None,
    ) -> dict[str, Any]:
        return {"success": success, "action": action, "data": data or {}, "errors": errors or []}


def public(row: Row) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "status", "image", "port", "last_error")} | {"instance_id": row["id"]}
