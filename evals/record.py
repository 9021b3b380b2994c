"""`pideploy.py eval record TRACE_FILE`: turn a real run's trace into a draft eval case.

From the trace JSON (observability.Trace.to_dict) it takes:
- the task: the JSON the loop put in the first user message;
- the starting world: `extra.world_before` (tools.snapshot: the task's instances,
  their owners, statuses and container states);
- the recorded turns: every assistant message a model produced (content, tool
  calls with their arguments, token usage from its chat span), with instance ids
  and container names turned into placeholders so the turns replay against a
  freshly built world; turns the playbook answered become HTTP 500s, so the
  replay reaches the playbook too;
- draft expectations from the run's own end: its outcome, the tools it used,
  its turns and cost, and the last status each instance was seen in.

What a trace cannot know is left for a person: faults inside the world (a
config env, a file in the instance's storage, a taken port), other users'
instances, model prices, forbidden tools. The case is marked
`"needs_review": true`, which `make eval` reports as a failure until someone
has checked the expectations and removed the flag.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from evals.casefile import CASES_DIR, CaseError, validate_case

_FENCED_JSON = re.compile(r"```json[ \t]*\n(.*?)```", re.DOTALL)


class RecordError(Exception):
    """The trace cannot become a case; the message says why."""


def task_of(trace: dict[str, Any]) -> dict[str, Any]:
    """The task JSON of the run's first user message."""
    for message in trace.get("transcript", []):
        if message.get("role") == "user":
            for block in _FENCED_JSON.findall(str(message.get("content") or "")):
                try:
                    value = json.loads(block)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value
            break
    raise RecordError("the trace's transcript has no task (a user message with a ```json block)")


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    found, stack = [], [trace["spans"]]
    while stack:
        span = stack.pop()
        found.append(span)
        stack.extend(span.get("children", []))
    return sorted(found, key=lambda s: s["start"])


def _state(instance: dict[str, Any]) -> str | None:
    container = instance.get("container") or {}
    match instance.get("status"):
        case "creating":
            return "requested"
        case "stopped":
            return "stopped"
        case "running" if not container:
            return "removed"
        case "running":
            return "running" if container.get("state") == "running" else "crashed"
    return None


class _Placeholders:
    """Literal ids and container names of the recorded run -> placeholders of the replay."""

    def __init__(self, task: dict[str, Any], world: list[dict[str, Any]]) -> None:
        self.ids: dict[int, str] = {}
        self.names: dict[str, str] = {}
        for index, step in enumerate(task.get("params", {}).get("plan") or []):
            iid = (step.get("arguments") or {}).get("instance_id")
            if isinstance(iid, int):
                self.ids.setdefault(iid, f"{{{{task.params.plan.{index}.arguments.instance_id}}}}")
        for instance in world:
            self.ids.setdefault(instance["instance_id"], f"{{{{world.{instance['name']}.instance_id}}}}")
            if (instance.get("container") or {}).get("name"):
                self.names[instance["container"]["name"]] = f"{{{{world.{instance['name']}.container}}}}"
        if isinstance(task.get("instance_id"), int):
            self.ids[task["instance_id"]] = "{{task.instance_id}}"
        self.unknown: set[int] = set()  # ids the recorded world does not know: left literal

    def fill(self, value: Any, last_result: dict[str, Any], key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self.fill(v, last_result, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v, last_result) for v in value]
        if key == "instance_id" and isinstance(value, int) and not isinstance(value, bool):
            if value in self.ids:
                return self.ids[value]
            if last_result.get("instance_id") == value:
                return "{{last_result.instance_id}}"
            self.unknown.add(value)
        if isinstance(value, str):
            for name, placeholder in self.names.items():
                value = value.replace(name, placeholder)
        return value


def recorded_turns(
    trace: dict[str, Any], places: _Placeholders
) -> tuple[list[dict[str, Any]], str | None, bool]:
    """(turns, the model that answered first, whether the playbook answered)."""
    chats = [
        s
        for s in _spans(trace)
        if s["attributes"].get("gen_ai.operation.name") == "chat" and s["status"] == "ok"
    ]
    turns: list[dict[str, Any]] = []
    model: str | None = None
    last_result: dict[str, Any] = {}
    answered = 0
    for message in trace.get("transcript", []):
        if message.get("role") == "tool":
            try:
                content = json.loads(message.get("content") or "{}")
            except ValueError:
                content = {}
            last_result = content if isinstance(content, dict) else {}
            continue
        if message.get("role") != "assistant":
            continue
        span = chats[answered] if answered < len(chats) else None
        answered += 1
        if span is None or span["attributes"].get("pideploy.model_name") == "playbook":
            turns.append({"repeat": {"fault": "http_500", "message": "recorded: the chain was unavailable"}})
            return turns, model, True
        model = model or str(span["attributes"].get("pideploy.model_name"))
        turn: dict[str, Any] = {}
        if message.get("content"):
            turn["content"] = places.fill(message["content"], last_result)
        calls = []
        for call in message.get("tool_calls") or []:
            raw = call["function"]["arguments"]
            try:
                arguments: Any = places.fill(json.loads(raw or "{}"), last_result)
            except ValueError:
                arguments = raw  # malformed JSON replays verbatim
            calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": arguments})
        turn["tool_calls"] = calls
        turn["usage"] = {
            "prompt_tokens": int(span["attributes"].get("gen_ai.usage.input_tokens") or 0),
            "completion_tokens": int(span["attributes"].get("gen_ai.usage.output_tokens") or 0),
        }
        turns.append(turn)
    return turns, model, False


def _last_statuses(trace: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The last thing each instance's tool results said about it (status, deleted)."""
    seen: dict[int, dict[str, Any]] = {}
    for message in trace.get("transcript", []):
        if message.get("role") != "tool":
            continue
        try:
            content = json.loads(message.get("content") or "{}")
        except ValueError:
            continue
        if isinstance(content, dict) and content.get("ok") and isinstance(content.get("instance_id"), int):
            entry = seen.setdefault(content["instance_id"], {})
            entry.update({k: content[k] for k in ("status", "deleted", "name") if k in content})
    return seen


def case_from_trace(trace: dict[str, Any], source: str) -> dict[str, Any]:
    """A draft case (needs_review) for the run in `trace`."""
    if trace.get("task_type") == "round":
        raise RecordError(
            "this is a heartbeat round's trace; the model worked in its agent runs: record one of "
            "extra.agent_runs[].trace_file instead"
        )
    task = task_of(trace)
    before = trace.get("extra", {}).get("world_before") or {}
    notes: list[str] = []
    if not before:
        notes.append("the trace has no world_before (an older trace): build the world by hand")
    world: list[dict[str, Any]] = []
    for instance in before.get("instances", []):
        state = _state(instance)
        if instance.get("exists") is False:
            continue
        if state is None:
            notes.append(
                f"instance {instance['name']} was {instance.get('status')} at the start: no world state for that"
            )
            state = "running"
        world.append({**instance, "state": state})
    places = _Placeholders(task, world)
    turns, model, playbook = recorded_turns(trace, places)
    if playbook:
        notes.append("the playbook answered some turns: the replay serves HTTP 500 from there on")
    if places.unknown:
        ids = ", ".join(str(i) for i in sorted(places.unknown))
        notes.append(
            f"tool calls name instance ids the recorded world does not know ({ids}), left literal: "
            "add those instances to the world and use {{world.NAME.instance_id}}, or a fresh world's "
            "ids will point at other instances"
        )

    heartbeat = task.get("type") == "heartbeat"
    names = {i["instance_id"]: i["name"] for i in world}
    if heartbeat:
        step: dict[str, Any] = {"heartbeat": {}}
    else:
        spec: dict[str, Any] = {"type": task["type"], "user": task.get("user_id") or trace.get("user_id")}
        if task.get("instance_id") in names:
            spec["instance"] = names[task["instance_id"]]
        if task.get("params"):
            spec["params"] = task["params"]
        step = {"task": spec}

    summary = trace.get("summary", {})
    tool_spans = [s for s in _spans(trace) if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    used = sorted({str(s["attributes"].get("gen_ai.tool.name")) for s in tool_spans if s["status"] == "ok"})
    refused = sorted(
        {
            str(s["attributes"].get("gen_ai.tool.name"))
            for s in tool_spans
            if s["attributes"].get("error.type") == "tool_refused"
        }
    )
    outcome: dict[str, Any]
    if heartbeat:
        outcome = {"status": "ok" if trace.get("outcome") == "succeeded" else "unrepaired"}
    else:
        outcome = {"status": trace.get("outcome", "failed")}
        if trace.get("error_class"):
            outcome["error_class"] = trace["error_class"]
    if trace.get("result") is None:
        outcome["reported"] = False
    expected_world: dict[str, Any] = {}
    last = _last_statuses(trace)
    created = task.get("params", {}).get("name") if task.get("type") == "instance_create" else None
    for iid, seen in last.items():
        name = names.get(iid) or seen.get("name") or created
        if not name:
            continue
        if seen.get("deleted"):
            expected_world[name] = {"exists": False}
        elif "status" in seen:
            expected_world[name] = {"row": {"status": seen["status"]}, "routed": seen["status"] == "running"}

    ident = f"{str(task.get('type', 'run')).replace('_', '-')}-{trace.get('id', 'trace')}"
    started = trace.get("started_at", "?")
    description = (
        f"Recorded from {source} ({started}, prompt {trace.get('prompt_version')}, chain "
        f"{', '.join(trace.get('model_chain', []))}): the run {trace.get('outcome')}"
        f"{' with ' + trace['error_class'] if trace.get('error_class') else ''}. DRAFT: check the world "
        "(faults such as config env, storage files or taken ports are not in traces), add other "
        "users' instances if they matter, review every expectation, then remove needs_review."
    )
    if notes:
        description += " Notes: " + "; ".join(notes) + "."
    conversation: dict[str, Any] = {
        "id": "recorded",
        "match": f'"type": "{task.get("type")}"',
        "turns": turns,
    }
    if not turns:
        conversation["turns"] = [{"fault": "http_500", "message": "recorded: the run made no model call"}]
    case: dict[str, Any] = {
        "id": ident,
        "description": description,
        "tags": {"task": str(task.get("type")), "difficulty": "unknown", "fault": "unknown"},
        "needs_review": True,
        "source": source,
        "world": {
            "instances": [{"name": i["name"], "user": i["user_id"], "state": i["state"]} for i in world]
        },
        "models": [{"name": model or "recorded-model"}],
        "run": [step],
        "recorded_turns": {"conversations": [conversation]},
        "expect": {
            "outcomes": [outcome],
            "max_turns": int(summary.get("turns", len(turns))),
            "max_cost_usd": round(max(float(summary.get("cost_usd", 0.0)) * 1.5, 0.01), 4),
            "tools_required": used,
            "tools_forbidden": [],
            "world": {"instances": expected_world},
        },
    }
    if refused:
        case["expect_replay"] = {"tools_refused": refused}
    return validate_case(case, f"the case recorded from {source}")


def record(trace_file: Path, out: Path | None = None) -> Path:
    """Write the draft case for `trace_file`; its path. Never overwrites a case."""
    try:
        trace = json.loads(trace_file.read_text())
    except (OSError, ValueError) as error:
        raise RecordError(f"cannot read the trace {trace_file}: {error}") from None
    if not isinstance(trace, dict) or "transcript" not in trace or "spans" not in trace:
        raise RecordError(f"{trace_file} is not a piDeploy trace (no transcript or spans)")
    try:
        case = case_from_trace(trace, str(trace_file))
    except CaseError as error:
        raise RecordError(str(error)) from None
    path = out or CASES_DIR / f"{case['id']}.json"
    if path.exists():
        raise RecordError(f"{path} exists; pass --out to write the case somewhere else")
    case["id"] = path.stem  # the runner wants the id to be the file's name
    try:
        validate_case(case, str(path))
    except CaseError as error:
        raise RecordError(f"{error} (name the file like the case ids: lowercase, digits, dashes)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(case, indent=2) + "\n")
    return path
