"""The eval case file format: its schema, validation, loading, and the world placeholders.

A case (evals/cases/<id>.json; the README's "Evals" section has the format)
holds a starting world, the task(s) or heartbeat round(s) to run, the model
turns recorded from a run, and the expectations. This module owns what a case
file may say (`CASE_SCHEMA` and the cross-field rules of `validate_case`),
reading the dataset (`load_cases`), the expectations for replay or live mode
(`expectations`), and filling `{{world.<name>.<key>}}` placeholders
(`fill_world`). It builds nothing and runs nothing: evals/world.py builds a
case's world, evals/run.py runs and scores it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import agent
import tools
from config import Config
from evals.replay_script import validate_script

CASES_DIR = Path(__file__).resolve().parent / "cases"


class CaseError(ValueError):
    """A case file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------
# The case format
# ---------------------------------------------------------------------------

_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}
_NAMES = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
_OUTCOME = {
    "type": "object",
    "additionalProperties": False,
    "required": ["status"],
    "properties": {
        "status": {"enum": ["succeeded", "failed", "ok", "unrepaired"]},
        "error_class": {"type": ["string", "null"]},
        "reported": {"type": "boolean"},
    },
}
_INSTANCE_EXPECT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "exists": {"type": "boolean"},
        "row": {"type": "object"},
        "container": {"enum": ["running", "stopped", "absent"]},
        "same_container": {"type": "boolean"},
        "routed": {"type": "boolean"},
        "version": {"type": "string"},
        "storage": {"type": "boolean"},
        "last_error_contains": {"type": "string"},
        "events_include": _NAMES,
        "events_count": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    },
}
_TOOL_EXPECT = {
    "tools_required": _NAMES,
    "tools_forbidden": _NAMES,
    "tools_refused": _NAMES,
    "playbook": {"type": "boolean"},
    "models_answered": _NAMES,
}
_LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(agent.Limits)}
CASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "description", "tags", "world", "run", "recorded_turns", "expect"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
        "description": {"type": "string", "minLength": 1},
        "tags": {
            "type": "object",
            "additionalProperties": False,
            "required": ["task", "difficulty", "fault"],
            "properties": {
                "task": {"type": "string"},
                "difficulty": {"enum": ["easy", "medium", "hard", "unknown"]},
                "fault": {"type": "string"},
            },
        },
        "live": {"type": "boolean"},
        "needs_review": {"type": "boolean"},
        "source": {"type": "string"},
        "world": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "settings": {"type": "object"},
                "faults": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"port_taken": {"type": "boolean"}},
                },
                "instances": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "user", "state"],
                        "properties": {
                            "name": _NAME,
                            "user": {"type": "string", "minLength": 1},
                            "state": {"enum": ["requested", "running", "stopped", "crashed", "removed"]},
                            "config": {"type": "object"},
                            "files": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "models": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "input_usd_per_mtok": {"type": "number", "minimum": 0},
                    "output_usd_per_mtok": {"type": "number", "minimum": 0},
                    # The model's compatibility settings (README, "The model chain").
                    "stream": {"type": "boolean"},
                    "tool_choice": {"enum": ["auto", "required", "none-sent"]},
                    "send_usage_request": {"type": "boolean"},
                    "tool_schema": {"enum": ["full", "plain"]},
                },
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {name: {"type": "number", "minimum": 0} for name in _LIMIT_FIELDS},
        },
        "run": {
            "type": "array",
            "minItems": 1,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["task"],
                        "properties": {
                            "task": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["type", "user"],
                                "properties": {
                                    "type": {"enum": sorted(t for t in tools.TOOLSETS if t != "heartbeat")},
                                    "user": {"type": "string", "minLength": 1},
                                    "instance": _NAME,
                                    "params": {"type": "object"},
                                },
                            }
                        },
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["heartbeat"],
                        "properties": {
                            "heartbeat": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"advance_s": {"type": "number", "minimum": 0}},
                            }
                        },
                    },
                ]
            },
        },
        "recorded_turns": {"type": "object"},
        "expect": {
            "type": "object",
            "additionalProperties": False,
            "required": ["outcomes", "max_turns", "max_cost_usd", "world"],
            "properties": {
                "outcomes": {"type": "array", "items": _OUTCOME},
                "max_turns": {"type": "integer", "minimum": 0},
                "max_cost_usd": {"type": "number", "minimum": 0},
                "max_repeats": {"type": "integer", "minimum": 1},
                **_TOOL_EXPECT,
                "world": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "instances": {"type": "object", "additionalProperties": _INSTANCE_EXPECT},
                        "instance_count": {"type": "integer", "minimum": 0},
                        "no_orphans": {"type": "boolean"},
                    },
                },
            },
        },
        # Expectations about the recorded model's own path, checked in replay mode only.
        "expect_replay": {"type": "object", "additionalProperties": False, "properties": _TOOL_EXPECT},
    },
}


def validate_case(case: Any, where: str) -> dict[str, Any]:
    """The case if it is usable; CaseError naming `where` and the first problem otherwise."""
    problems = sorted(tools.SchemaValidator(CASE_SCHEMA).iter_errors(case), key=lambda e: list(e.path))
    if problems:
        path = "/".join(str(p) for p in problems[0].path) or "(case)"
        raise CaseError(f"{where}: {path}: {problems[0].message}")
    try:
        validate_script(case["recorded_turns"])
    except ValueError as error:
        raise CaseError(f"{where}: recorded_turns: {error}") from None
    names = [i["name"] for i in case["world"].get("instances", [])]
    if len(set(names)) != len(names):
        raise CaseError(f"{where}: world.instances: names must be unique (they are the keys)")
    if len(case["expect"]["outcomes"]) != len(case["run"]):
        raise CaseError(f"{where}: expect.outcomes needs one entry per run step ({len(case['run'])})")
    for index, step in enumerate(case["run"]):
        status = case["expect"]["outcomes"][index]["status"]
        heartbeat = "heartbeat" in step
        if heartbeat != (status in ("ok", "unrepaired")):
            kind = "ok/unrepaired" if heartbeat else "succeeded/failed"
            raise CaseError(
                f"{where}: expect.outcomes[{index}]: a {'heartbeat' if heartbeat else 'task'} step is {kind}"
            )
        instance = step.get("task", {}).get("instance")
        if instance is not None and instance not in names:
            raise CaseError(f"{where}: run[{index}].task.instance {instance!r} is not in world.instances")
        if not heartbeat and step["task"]["type"] != "instance_create" and instance is None:
            raise CaseError(f"{where}: run[{index}]: a {step['task']['type']} task needs an instance")
    unknown = set(case["world"].get("settings", {})) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise CaseError(f"{where}: world.settings: unknown settings {sorted(unknown)}")
    valid: dict[str, Any] = case
    return valid


def load_cases(directory: Path = CASES_DIR, only: list[str] | None = None) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            case = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CaseError(f"{path}: not readable JSON: {error}") from None
        validate_case(case, str(path))
        if case["id"] != path.stem:
            raise CaseError(f"{path}: id {case['id']!r} must be the file name without .json")
        cases.append(case)
    if only:
        missing = sorted(set(only) - {c["id"] for c in cases})
        if missing:
            raise CaseError(f"no such case: {', '.join(missing)} (in {directory})")
        cases = [c for c in cases if c["id"] in only]
    return cases


def expectations(case: dict[str, Any], live: bool) -> dict[str, Any]:
    """The case's expectations for this mode: in replay, expect_replay adds to them; live runs
    must be the models' own (a missing API key must not pass as the playbook's success)."""
    expect: dict[str, Any] = copy.deepcopy(case["expect"])
    if live:  # the playbook standing in for the models would judge the playbook, not the chain
        expect.setdefault("playbook", False)
    else:
        for key, value in case.get("expect_replay", {}).items():
            if isinstance(value, list):
                expect[key] = sorted(set(expect.get(key, [])) | set(value))
            else:
                expect[key] = value
    return expect


# ---------------------------------------------------------------------------
# Placeholders: {{world.<instance name>.<instance_id|container|port|user>}}
# ---------------------------------------------------------------------------

_WORLD_PLACEHOLDER = re.compile(r"\{\{\s*world\.([a-z0-9-]+)\.([a-z_]+)\s*\}\}")


def fill_world(value: Any, known: dict[str, dict[str, Any]]) -> Any:
    """`value` with the world placeholders replaced; a whole-string placeholder keeps its type."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> Any:
            name, key = match.group(1), match.group(2)
            if name not in known or key not in known[name]:
                raise CaseError(f"placeholder {match.group(0)}: no such world value")
            return known[name][key]

        whole = _WORLD_PLACEHOLDER.fullmatch(value)
        if whole:
            return lookup(whole)
        return _WORLD_PLACEHOLDER.sub(lambda m: str(lookup(m)), value)
    if isinstance(value, dict):
        return {k: fill_world(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_world(v, known) for v in value]
    return value
