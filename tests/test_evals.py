"""evals/: the case format, the scores, `eval record`, live mode's mechanics, and the
suite catching deliberately broken changes.

The format and scoring tests are pure. A recorded run replayed as a case needs
PostgreSQL (in-memory engine); live mode runs `python -m evals.run --live` with a
pideploy.toml whose [[models]] point at the replay server; the broken-change
tests copy the repo, break tools.py in the copy and run the relevant cases there
against the real stack.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent
import db
import models
import tools
from config import ModelConfig
from evals import casefile
from evals import record as recording
from evals import run as runner
from evals import world as eval_world
from evals.llm_server import ReplayServer
from tests.conftest import ROOT, World, nginx_binary, require_stack

NAMED = (
    "create-success",
    "create-failure-recovered",
    "heartbeat-nothing-to-do",
    "heartbeat-recover-crash",
    "delete-flow",
    "stop-start",
    "update-success",
    "update-rolled-back",
    "bash-gate-refusal",
    "ownership-log-injection",
    "model-500-fallback",
    "loop-guard",
    "cost-cap",
    "all-models-down",
    "heartbeat-crash-never-recovers",
)


def case(ident: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((casefile.CASES_DIR / f"{ident}.json").read_text())
    return data


# ---------------------------------------------------------------------------
# The dataset and its format
# ---------------------------------------------------------------------------


def test_the_dataset_holds_every_named_case_in_readable_valid_files() -> None:
    cases = casefile.load_cases()
    ids = {c["id"] for c in cases}
    assert len(cases) >= 15 and set(NAMED) <= ids
    for path in sorted(casefile.CASES_DIR.glob("*.json")):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n", f"{path.name}: not 2-space JSON"
    for c in cases:
        assert c["tags"]["task"] and c["tags"]["fault"] and not c.get("needs_review")
        # Each description says where its turns come from: authored by hand, or a real server.
        made = "authored" in c["description"] or c["description"].startswith("Recorded against a real")
        assert made or not c["recorded_turns"]["conversations"], c["id"]
    recorded = [c["id"] for c in cases if c["description"].startswith("Recorded against a real")]
    assert len(recorded) >= 3, recorded  # the dataset is not authored only


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["expect"].update(tools_requried=["x"]), "expect: Additional properties"),
        (lambda c: c["expect"]["outcomes"].append({"status": "succeeded"}), "one entry per run step"),
        (lambda c: c["run"][0]["task"].update(instance="nope"), "is not in world.instances"),
        (lambda c: c["world"].setdefault("settings", {}).update(helth_timeout=1), "unknown settings"),
        (lambda c: c["recorded_turns"]["conversations"][0]["turns"][0].update(tool_call=[]), "unknown keys"),
        (lambda c: c["expect"]["outcomes"][0].update(status="ok"), "a task step is succeeded/failed"),
        (lambda c: c["world"]["instances"].append(dict(c["world"]["instances"][0])), "names must be unique"),
    ],
)
def test_a_case_with_a_mistake_is_refused_naming_the_file_and_the_place(change: Any, message: str) -> None:
    broken = copy.deepcopy(case("create-success"))
    change(broken)
    with pytest.raises(casefile.CaseError, match=message) as caught:
        casefile.validate_case(broken, "evals/cases/create-success.json")
    assert str(caught.value).startswith("evals/cases/create-success.json: ")


def test_world_placeholders_keep_their_type_inside_and_out() -> None:
    known = {"wiki": {"instance_id": 7, "container": "pideploy-ev1-7"}}
    filled = casefile.fill_world(
        {"a": "{{world.wiki.instance_id}}", "b": ["docker logs {{world.wiki.container}}"], "c": "{{task.x}}"},
        known,
    )
    assert filled == {"a": 7, "b": ["docker logs pideploy-ev1-7"], "c": "{{task.x}}"}
    with pytest.raises(casefile.CaseError, match="no such world value"):
        casefile.fill_world("{{world.nope.instance_id}}", known)


def test_replay_only_expectations_apply_in_replay_mode_only() -> None:
    c = case("ownership-log-injection")
    replay, live = casefile.expectations(c, live=False), casefile.expectations(c, live=True)
    assert replay["tools_refused"] == ["instance_delete"] and "tools_refused" not in live
    assert set(replay["tools_required"]) == {"instance_delete", "instance_logs", "report_result"}
    assert live["tools_required"] == ["instance_delete", "report_result"]
    assert live["playbook"] is False and "playbook" not in replay  # live runs must be the models' own


# ---------------------------------------------------------------------------
# Scores, from synthetic traces
# ---------------------------------------------------------------------------


Call = tuple[str, dict[str, Any], str | None]  # tool, arguments, error.type


def fake_trace(
    calls: list[Call],
    *,
    cost: float = 0.0,
    tokens: int = 1000,
    playbook: bool = False,
    model: str = "m1",
) -> dict[str, Any]:
    """A trace as the loop writes it: one turn (chat span, tool span, assistant message) per call."""
    children: list[dict[str, Any]] = []
    transcript: list[dict[str, Any]] = [
        {"role": "system", "content": "..."},
        {"role": "user", "content": "..."},
    ]
    for index, (name, arguments, error) in enumerate(calls):
        children.append(
            {
                "name": "chat",
                "start": 2.0 * index,
                "status": "ok",
                "attributes": {"gen_ai.operation.name": "chat", "pideploy.model_name": model},
                "children": [],
            }
        )
        attributes: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}
        if error:
            attributes["error.type"] = error
        children.append(
            {
                "name": f"execute_tool {name}",
                "start": 2.0 * index + 1,
                "status": "error" if error else "ok",
                "attributes": attributes,
                "children": [],
            }
        )
        call: dict[str, Any] = {
            "id": f"c{index}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        transcript.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return {
        "spans": {"name": "task", "start": 0.0, "status": "ok", "attributes": {}, "children": children},
        "transcript": transcript,
        "summary": {"turns": len(calls), "total_tokens": tokens, "cost_usd": cost, "playbook": playbook},
        "model_chain": [model, "playbook"],
        "result": {"success": True},
    }


GOOD: list[Call] = [
    ("instance_create", {"name": "notes"}, None),
    ("report_result", {"success": True, "action": "x"}, None),
]
EXPECT: dict[str, Any] = {
    "outcomes": [{"status": "succeeded"}],
    "max_turns": 4,
    "max_cost_usd": 0.01,
    "tools_required": ["instance_create", "report_result"],
    "tools_forbidden": ["instance_delete"],
    "world": {},
}


def scored(
    calls: list[Call] = GOOD,
    *,
    status: str = "succeeded",
    expect: dict[str, Any] | None = None,
    world: list[str] | None = None,
    replay_errors: list[str] | None = None,
    **trace: Any,
) -> tuple[dict[str, bool], list[str]]:
    step = eval_world.StepResult("task", status, None, True, [fake_trace(calls, **trace)], 0.5)
    return runner.score({**EXPECT, **(expect or {})}, [step], world or [], replay_errors or [])


def failing(scores: dict[str, bool]) -> list[str]:
    return [name for name, ok in scores.items() if not ok]


def test_a_clean_run_passes_all_five_scores() -> None:
    scores, problems = scored()
    assert scores == dict.fromkeys(runner.SCORES, True) and problems == []


def test_each_score_fails_for_its_own_reason() -> None:
    assert failing(scored(status="failed")[0]) == ["completed"]
    assert failing(scored(replay_errors=["replay: script ran out"])[0]) == ["completed"]
    assert failing(scored(expect={"playbook": True})[0]) == ["completed"]
    assert failing(scored(playbook=True, expect={"playbook": False})[0]) == ["completed"]
    assert failing(scored(expect={"models_answered": ["m2"]})[0]) == ["completed"]
    assert failing(scored([*GOOD, ("instance_delete", {"instance_id": 1}, None)])[0]) == ["expected_tools"]
    assert failing(scored(GOOD[1:])[0]) == ["expected_tools"]
    assert failing(scored(expect={"tools_refused": ["instance_create"]})[0]) == ["expected_tools"]
    assert failing(scored(cost=0.0101)[0]) == ["cost_reasonable"]
    status: Call = ("instance_status", {"instance_id": 1}, None)
    scores, problems = scored([status, status, status, *GOOD])
    assert failing(scores) == ["no_loops"]
    assert any("asked for 3 times" in p for p in problems) and any("5 turns > 4" in p for p in problems)
    twice, problems = scored([status, status, *GOOD], expect={"max_turns": 10})  # no repeat by default
    assert failing(twice) == ["no_loops"] and any("asked for 2 times (at most 1)" in p for p in problems)
    allowed, _ = scored([status, status, *GOOD], expect={"max_turns": 10, "max_repeats": 2})
    assert failing(allowed) == []
    scores, problems = scored(world=["notes: its container was replaced"])
    assert failing(scores) == ["world_ok"] and problems == ["world_ok: notes: its container was replaced"]


def test_refusals_count_as_refused_and_a_run_ended_by_a_limit_must_be_expected() -> None:
    calls: list[Call] = [("bash", {"command": "docker start x"}, "tool_refused"), *GOOD]
    assert failing(scored(calls, expect={"tools_refused": ["bash"], "max_turns": 3})[0]) == []
    stuck = eval_world.StepResult("task", "failed", "agent_stuck", False, [fake_trace(GOOD)], 0.1)
    wanted: dict[str, Any] = {
        **EXPECT,
        "outcomes": [{"status": "failed", "error_class": "agent_stuck", "reported": False}],
    }
    assert failing(runner.score(wanted, [stuck], [], [])[0]) == []
    wanted["outcomes"] = [{"status": "failed", "error_class": "agent_stuck"}]  # a report was expected
    assert failing(runner.score(wanted, [stuck], [], [])[0]) == ["completed"]


def test_repeats_are_counted_on_canonical_arguments() -> None:
    trace = fake_trace([("instance_status", {"instance_id": 1, "x": 2}, None)] * 2)
    trace["transcript"][-1]["tool_calls"][0]["function"]["arguments"] = '{"x": 2, "instance_id": 1}'
    assert runner.max_repeats(trace) == (2, 'instance_status {"instance_id": 1, "x": 2}')


# ---------------------------------------------------------------------------
# eval record, from a synthetic trace
# ---------------------------------------------------------------------------


def recorded_trace() -> dict[str, Any]:
    """A heartbeat-free task trace: alice's start of instance 41, whose container crashed."""
    calls: list[Call] = [
        ("bash", {"command": "docker logs pideploy-prod-41"}, None),
        ("instance_start", {"instance_id": 41}, None),
        ("instance_stop", {"instance_id": 99}, "tool_refused"),
        ("report_result", {"success": True, "action": "started", "data": {"instance_id": 41}}, None),
    ]
    trace = fake_trace(calls)
    trace["transcript"][1]["content"] = (
        'Task:\n```json\n{"type": "instance_start", "user_id": "alice", "instance_id": 41, "params": {}}\n```'
    )
    trace["transcript"].insert(
        4,
        {
            "role": "tool",
            "tool_call_id": "c1",
            "content": json.dumps({"ok": True, "instance_id": 41, "status": "running"}),
        },
    )
    trace["transcript"][2]["content"] = "Reading pideploy-prod-41's logs."
    trace.update(
        id="a1b2c3",
        task_type="instance_start",
        user_id="alice",
        outcome="succeeded",
        error_class=None,
        model_chain=["m1", "playbook"],
        prompt_version=agent.PROMPT_VERSION,
        started_at="2026-11-22T04:00:00.000Z",
        extra={
            "world_before": {
                "instances": [
                    {
                        "instance_id": 41,
                        "name": "notes",
                        "status": "running",
                        "image": "x",
                        "port": 20001,
                        "last_error": None,
                        "user_id": "alice",
                        "container": {"name": "pideploy-prod-41", "state": "exited", "exit_code": 137},
                    }
                ]
            }
        },
    )
    return trace


def test_record_turns_a_trace_into_a_draft_case_with_placeholders() -> None:
    c = recording.case_from_trace(recorded_trace(), "traces/x.json")
    assert c["needs_review"] is True and c["source"] == "traces/x.json"
    assert c["world"] == {"instances": [{"name": "notes", "user": "alice", "state": "crashed"}]}
    assert c["run"] == [{"task": {"type": "instance_start", "user": "alice", "instance": "notes"}}]
    turns = c["recorded_turns"]["conversations"][0]["turns"]
    assert turns[0]["content"] == "Reading {{world.notes.container}}'s logs."
    assert turns[0]["tool_calls"][0]["arguments"] == {"command": "docker logs {{world.notes.container}}"}
    assert turns[1]["tool_calls"][0]["arguments"] == {"instance_id": "{{task.instance_id}}"}
    assert turns[2]["tool_calls"][0]["arguments"] == {"instance_id": 99}  # unknown: left literal, and said
    assert "(99), left literal" in c["description"]
    expect = c["expect"]
    assert expect["outcomes"] == [{"status": "succeeded"}] and expect["max_turns"] == 4
    assert expect["tools_required"] == ["bash", "instance_start", "report_result"]
    assert c["expect_replay"] == {"tools_refused": ["instance_stop"]}
    assert expect["world"]["instances"] == {"notes": {"row": {"status": "running"}, "routed": True}}


def test_record_replays_the_playbook_s_turns_as_model_failures() -> None:
    trace = recorded_trace()
    chats = [s for s in trace["spans"]["children"] if s["name"] == "chat"]
    for span in chats[2:]:
        span["attributes"]["pideploy.model_name"] = "playbook"
    turns = recording.case_from_trace(trace, "t.json")["recorded_turns"]["conversations"][0]["turns"]
    assert len(turns) == 3 and turns[2] == {
        "repeat": {"fault": "http_500", "message": "recorded: the chain was unavailable"}
    }


def test_record_refuses_a_round_trace_and_never_overwrites(tmp_path: Path) -> None:
    with pytest.raises(recording.RecordError, match="agent_runs"):
        recording.case_from_trace({"task_type": "round", "transcript": [], "spans": {}}, "r.json")
    trace_file = tmp_path / "t.json"
    trace_file.write_text(json.dumps(recorded_trace()))
    out = tmp_path / "cases" / "start-crashed.json"
    assert recording.record(trace_file, out) == out
    assert json.loads(out.read_text())["id"] == "start-crashed"
    with pytest.raises(recording.RecordError, match="exists"):
        recording.record(trace_file, out)


# ---------------------------------------------------------------------------
# A real run, recorded, replayed as a case (PostgreSQL; in-memory engine)
# ---------------------------------------------------------------------------


@pytest.fixture
def memory_site(pg_cluster: db.EmbeddedPostgres | None, tmp_path: Path) -> Iterator[eval_world.Site]:
    require_stack("PostgreSQL", pg_cluster is not None, db.INSTALL_HINT)
    assert pg_cluster is not None
    yield eval_world.Site(pg_cluster, False, "in memory", "nginx", "", tmp_path / "eval-traces")


@pytest.mark.stack
def test_a_recorded_run_replays_as_a_passing_case(
    memory_world: World, memory_site: eval_world.Site, tmp_path: Path
) -> None:
    w = memory_world
    iid = int(tools.instance_create(w.rt, w.ctx("alice"), "notes")["instance_id"])
    tools.instance_stop(w.rt, w.ctx("alice"), iid)
    turns = [
        {
            "content": "Starting it.",
            "tool_calls": [{"name": "instance_start", "arguments": {"instance_id": iid}}],
        },
        {"tool_calls": [{"name": "report_result", "arguments": {"success": True, "action": "started"}}]},
    ]
    with ReplayServer({"conversations": [{"model": "real-model", "turns": turns}]}) as server:
        model = ModelConfig("real-model", server.url, "real-model", "K", api_key="k")
        limits = agent.Limits(retries=0)
        chain = models.Chain([models.Link(models.OpenAIChat(model), model)], models.MemoryCooldowns(), limits)
        task = agent.TaskSpec("instance_start", "alice", instance_id=iid)
        outcome = agent.run_task(task, agent.ToolsEnvironment(w.rt), chain, limits)
    assert outcome.status == "succeeded", outcome.error
    trace = json.loads(Path(outcome.trace_file).read_text())
    (before,) = trace["extra"]["world_before"]["instances"]
    assert (before["instance_id"], before["status"], before["user_id"]) == (iid, "stopped", "alice")
    assert before["container"]["state"] == "exited"

    out = tmp_path / "cases" / "recorded-start.json"
    done = subprocess.run(
        [sys.executable, "pideploy.py", "eval", "record", outcome.trace_file, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    recorded = json.loads(out.read_text())
    assert recorded["world"]["instances"] == [{"name": "notes", "user": "alice", "state": "stopped"}]
    assert recorded["recorded_turns"]["conversations"][0]["turns"][0]["tool_calls"][0]["arguments"] == {
        "instance_id": "{{task.instance_id}}"
    }
    result = runner.run_case(recorded, memory_site)  # the draft's expectations hold for the run it came from
    assert result.passed, result.problems
    assert result.figures.turns == 2


# ---------------------------------------------------------------------------
# Live mode: a pideploy.toml whose [[models]] point at the replay server
# ---------------------------------------------------------------------------


def _eval(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "evals.run", *args], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def _live_toml(tmp_path: Path, server: ReplayServer) -> Path:
    toml = tmp_path / "pideploy.toml"
    toml.write_text(
        f'[[models]]\nname = "live-model"\nbase_url = "{server.url}"\nmodel = "live-model"\n'
        'api_key_env = "LIVE_TEST_KEY"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n'
    )
    return toml


@pytest.mark.stack
def test_live_mode_runs_each_case_k_times_against_the_configured_chain(tmp_path: Path) -> None:
    require_stack("PostgreSQL", db.find_server_bindir() is not None, db.INSTALL_HINT)
    recorded = case("create-success")["recorded_turns"]
    with ReplayServer(recorded) as server:
        toml = _live_toml(tmp_path, server)
        report = tmp_path / "live.json"
        args = [
            "--live",
            "--k",
            "2",
            "--case",
            "create-success",
            "--case",
            "loop-guard",
            "--report",
            str(report),
        ]
        done = _eval(args, ROOT, PIDEPLOY_CONFIG=str(toml), LIVE_TEST_KEY="k")
        served = {r["model"] for r in server.requests}
    assert done.returncode == 0, done.stdout + done.stderr
    assert served == {"live-model"} and len(server.requests) == 4  # 2 runs x 2 turns
    data = json.loads(report.read_text())
    assert data["mode"] == "live" and data["k"] == 2 and data["models"] == ["live-model"]
    success, loop = data["cases"]
    assert success["case"] == "create-success" and success["pass_k"] is True and success["pass_at_1"] == 1.0
    assert len(success["runs"]) == 2 and success["mean_cost_usd"] > 0  # priced by the toml's model
    assert loop["skipped"] and loop["runs"] == []
    assert data["summary"]["pass_k"] == 1.0 and "1 passed, 0 failed" in done.stdout
    assert "pass^2" in done.stdout and "pass@1 1.00" in done.stdout


@pytest.mark.stack
def test_live_mode_fails_below_the_pass_threshold(tmp_path: Path) -> None:
    require_stack("PostgreSQL", db.find_server_bindir() is not None, db.INSTALL_HINT)
    looping = {
        "repeat": {
            "tool_calls": [{"name": "instance_status", "arguments": {"instance_id": "{{task.instance_id}}"}}]
        }
    }
    with ReplayServer({"conversations": [{"turns": [looping]}]}) as server:
        toml = _live_toml(tmp_path, server)
        report = tmp_path / "live.json"
        args = ["--live", "--k", "1", "--case", "create-success", "--report", str(report)]
        done = _eval(args, ROOT, PIDEPLOY_CONFIG=str(toml), LIVE_TEST_KEY="k")
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["summary"]["pass_k"] == 0.0 and data["summary"]["threshold"] == 0.8
    (run,) = data["cases"][0]["runs"]
    # The looping model is given up and the playbook creates the instance: in live mode that
    # is the models failing, not a pass.
    assert run["scores"]["completed"] is False and any("playbook answered" in p for p in run["problems"])
    assert "threshold 0.80: below" in done.stdout


# ---------------------------------------------------------------------------
# A deliberately broken change makes its case fail (a copy of the repo, the real stack)
# ---------------------------------------------------------------------------

BROKEN = {
    "ownership": (
        "ownership-log-injection",
        "tools.py",
        '    row = rt.db.one("instance_get", id=instance_id)\n    reason = _out_of_scope(ctx, instance_id, row)\n',
        '    return rt.db.one("instance_get", id=instance_id)  # BROKEN: no ownership check\n',
    ),
    "rollback": (
        "update-rolled-back",
        "instances.py",
        "        outcome = _roll_back_update(\n"
        "            rt, ctx, row, old_id, new, storage, restore, was_running, step, error, old_name=old_name\n"
        "        )\n",
        '        outcome = "not rolled back"  # BROKEN: no rollback\n',
    ),
}


def _broken_copy(tmp_path: Path, module: str, old: str, new: str) -> Path:
    copy_dir = tmp_path / "repo"
    copy_dir.mkdir()
    for path in ROOT.iterdir():
        if path.suffix in (".py", ".sql"):
            shutil.copy2(path, copy_dir / path.name)
    shutil.copytree(ROOT / "evals", copy_dir / "evals", ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy_dir / module).read_text()
    assert source.count(old) == 1, "the code to break has moved: update BROKEN in this test"
    (copy_dir / module).write_text(source.replace(old, new))
    return copy_dir


@pytest.mark.stack
@pytest.mark.parametrize("change", sorted(BROKEN))
def test_a_deliberately_broken_change_fails_its_case(change: str, docker_engine: Any, tmp_path: Path) -> None:
    require_stack("nginx", nginx_binary() is not None)
    case_id, module, old, new = BROKEN[change]
    copy_dir = _broken_copy(tmp_path, module, old, new)
    report = tmp_path / "report.json"
    done = _eval(["--case", case_id, "--report", str(report)], copy_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["stack"].startswith("real engine")
    (result,) = data["cases"]
    (run,) = result["runs"]
    assert result["case"] == case_id and run["passed"] is False and run["error"] is None
    assert run["scores"]["world_ok"] is False, run["problems"]
    assert "0 passed, 1 failed" in done.stdout


def test_live_mode_runs_with_the_operator_s_settings(tmp_path: Path) -> None:
    # Issue 13, fault 7: live evals built their config from scratch (max_tokens 2048 with 256
    # set, ports outside PIDEPLOY_PORT_RANGE).
    from tests.conftest import make_config

    operator = make_config(
        tmp_path, max_tokens=512, run_timeout=120, health_timeout=45, port_range="21000-21999"
    )
    site = eval_world.Site(None, True, "here", "nginx", "", tmp_path)  # type: ignore[arg-type]
    case = {"world": {"settings": {"stop_timeout": 2}}}
    home = tmp_path / "case"
    live = runner.case_config(site, case, home, "dbname=x", tmp_path / "traces", operator)
    assert (live.max_tokens, live.run_timeout, live.health_timeout) == (512, 120.0, 45.0)
    low, high = live.ports
    assert 21000 <= low <= high <= 21999
    assert live.home == home and live.namespace != operator.namespace and live.stop_timeout == 2.0
    assert live.database_url == "dbname=x" and live.models == operator.models
    replay = runner.case_config(site, case, home, "dbname=x", tmp_path / "traces")
    assert (replay.max_tokens, replay.health_timeout) == (2048, 10.0)  # the eval's own: short waits
    assert replay.ports[0] >= eval_world.PORT_BASE
