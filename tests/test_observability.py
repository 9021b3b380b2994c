from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx2
import openai
import psycopg
import psycopg_pool
import pytest
import requests

import errors
import observability
from observability import JsonLogFormatter, Span, Trace, alert, classify, evaluate_alerts, setup_logging
from tests.conftest import make_config


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_trace(tmp_path: Path, clock: FakeClock | None = None, **overrides: Any) -> Trace:
    fields: dict[str, Any] = {
        "kind": "task",
        "task_id": 7,
        "task_type": "instance_create",
        "user_id": "u1",
        "instance_id": None,
        "prompt_version": "v1",
        "model_chain": ["m1", "playbook"],
        "trace_dir": tmp_path / "traces",
    }
    fields.update(overrides)
    return Trace(**fields, clock=clock or FakeClock())


def model_call(
    trace: Trace,
    clock: FakeClock,
    *,
    tokens: tuple[int, int],
    cost: float,
    ttft: float | None,
    seconds: float,
) -> Span:
    with trace.span("chat m1", **{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m1"}) as span:
        clock.advance(seconds)
        span.set(
            **{
                "gen_ai.usage.input_tokens": tokens[0],
                "gen_ai.usage.output_tokens": tokens[1],
                "pideploy.cost_usd": cost,
                "pideploy.ttft_s": ttft,
            }
        )
    return span


def tool_call(trace: Trace, clock: FakeClock, name: str, seconds: float, fail: bool = False) -> Span:
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": "c",
    }
    with trace.span(f"execute_tool {name}", **attributes) as span:
        with trace.span("engine.create", **{"pideploy.step": True}):
            clock.advance(seconds)
        if fail:
            span.fail(errors.ToolRefused("not yours"))
    return span


# ---------------------------------------------------------------------------
# spans
# ---------------------------------------------------------------------------


def test_spans_nest_under_the_span_open_in_this_thread(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    with trace.span("execute_tool a") as outer:
        with trace.span("engine.create", **{"pideploy.step": True}) as inner:
            inner.set(**observability.attrs({"container.id": "abc"}))
        with trace.span("nginx.sync"):
            pass
    with trace.span("chat m1"):
        pass
    assert [s.name for s in trace.root.children] == ["execute_tool a", "chat m1"]
    assert [s.name for s in outer.children] == ["engine.create", "nginx.sync"]
    assert inner.attributes == {"pideploy.step": True, "container.id": "abc"}
    assert inner.end is not None and inner.status == "ok"


def test_other_threads_nest_under_root_or_the_parent_they_are_given(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    barrier = threading.Barrier(4)

    def work(name: str, parent: Span | None) -> None:
        with trace.span(name, parent=parent):
            barrier.wait(timeout=5)  # all four open at once: each thread keeps its own stack
            with trace.span(name + ".step"):
                pass

    with trace.span("execute_tool fan_out") as fan_out:
        threads = [
            threading.Thread(target=work, args=(f"w{i}", fan_out if i % 2 else None)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with trace.span("after") as after:
            pass
    assert sorted(s.name for s in fan_out.children) == ["after", "w1", "w3"]
    assert sorted(s.name for s in trace.root.children) == ["execute_tool fan_out", "w0", "w2"]
    for span in trace.spans():
        if re.fullmatch(r"w\d", span.name):
            assert [c.name for c in span.children] == [span.name + ".step"]
    assert after.children == []


def test_an_escaping_exception_fails_the_span_and_propagates(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    with pytest.raises(errors.EngineError), trace.span("engine.create") as span:
        raise errors.EngineError("engine down")
    assert span.status == "error"
    assert span.attributes["error.type"] == "infra_unavailable"
    assert span.attributes["error.message"] == "engine down"
    assert span.end is not None
    with trace.span("after") as after:  # the stack was unwound
        pass
    assert after in trace.root.children


def test_duration_comes_from_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    trace = make_trace(tmp_path, clock)
    with trace.span("x") as span:
        assert span.duration_s is None
        clock.advance(2.5)
    assert span.duration_s == 2.5


# ---------------------------------------------------------------------------
# summary, finish, write
# ---------------------------------------------------------------------------


def run_example(tmp_path: Path) -> tuple[Trace, FakeClock]:
    clock = FakeClock()
    trace = make_trace(tmp_path, clock)
    trace.add_message({"role": "user", "content": "go"})
    model_call(trace, clock, tokens=(1000, 50), cost=0.01, ttft=0.4, seconds=1.0)
    create = tool_call(trace, clock, "instance_create", 3.0)
    model_call(trace, clock, tokens=(1200, 40), cost=0.02, ttft=0.3, seconds=1.0)
    create.set(**{"pideploy.cost_usd": 0.02})
    refused = tool_call(trace, clock, "instance_start", 0.5, fail=True)
    with pytest.raises(openai.APIConnectionError), trace.span("chat m1", **{"gen_ai.operation.name": "chat"}):
        raise openai.APIConnectionError(request=httpx2.Request("POST", "http://x"))
    model_call(trace, clock, tokens=(1300, 30), cost=0.03, ttft=None, seconds=1.0)
    refused.set(**{"pideploy.cost_usd": 0.03})
    tool_call(trace, clock, "instance_start", 0.25)
    trace.turns = 3
    return trace, clock


def test_summary_is_derived_from_the_spans(tmp_path: Path) -> None:
    trace, _ = run_example(tmp_path)
    trace.finish("succeeded", result={"success": True})
    summary = trace.summary()
    assert summary == {
        "wall_s": 6.75,
        "turns": 3,
        "model_calls": 4,
        "model_errors": 1,
        "input_tokens": 3500,
        "output_tokens": 120,
        "total_tokens": 3620,
        "tokens_estimated_calls": 0,
        "cost_usd": pytest.approx(0.06),
        "ttft_s": [0.4, 0.3],
        "tool_calls": 3,
        "tool_errors": 1,
        "tool_durations": {"instance_create": [3.0], "instance_start": [0.5, 0.25]},
        "tool_cost_usd": {"instance_create": 0.02, "instance_start": 0.03},
        "playbook": False,
        "error_class": None,
    }


def test_calls_with_estimated_tokens_are_counted_apart(tmp_path: Path) -> None:
    trace, _ = run_example(tmp_path)
    with trace.span("chat m2", **{"gen_ai.operation.name": "chat", "pideploy.usage_estimated": True}) as span:
        span.set(**{"gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 30})
    summary = trace.summary()
    assert summary["tokens_estimated_calls"] == 1 and summary["input_tokens"] == 4400


def test_finish_with_an_error_classifies_it(tmp_path: Path) -> None:
    trace, clock = run_example(tmp_path)
    clock.advance(1)
    trace.finish("failed", error=errors.CostCapExceeded(0.3, 0.25))
    assert (trace.outcome, trace.error_class) == ("failed", "cost_cap")
    assert trace.summary()["error_class"] == "cost_cap"
    assert trace.summary()["wall_s"] == 7.75
    assert trace.root.status == "error"


def test_write_is_one_named_json_file_rewritten_in_place(tmp_path: Path) -> None:
    trace, _ = run_example(tmp_path)
    path = trace.write()
    assert path == trace.path and path.parent == tmp_path / "traces"
    assert re.fullmatch(r"20231114T221320-task-7-[0-9a-f]{6}\.json", path.name)
    first = json.loads(path.read_text())
    assert first["outcome"] == "running"
    trace.finish("succeeded", result={"success": True, "data": {"instance_id": 3}})
    assert trace.write() == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    data = json.loads(path.read_text())
    assert data["outcome"] == "succeeded"
    assert data["result"] == {"success": True, "data": {"instance_id": 3}}
    assert data["kind"] == "task" and data["task_id"] == 7 and data["user_id"] == "u1"
    assert data["prompt_version"] == "v1" and data["model_chain"] == ["m1", "playbook"]
    assert data["summary"]["tool_calls"] == 3
    assert data["transcript"] == [{"role": "user", "content": "go"}]
    assert data["spans"]["name"] == "task instance_create"
    tool = data["spans"]["children"][1]
    assert tool["name"] == "execute_tool instance_create"
    assert tool["children"][0]["attributes"] == {"pideploy.step": True}
    assert data["started_at"] == "2023-11-14T22:13:20.000Z"


def test_write_survives_odd_data_and_an_unwritable_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trace = make_trace(tmp_path, task_id=None, kind="heartbeat", task_type="heartbeat")
    loop: dict[str, Any] = {}
    loop["self"] = loop
    trace.extra.update(
        cycle=loop, obj=object(), when={1, 2}, nan=float("nan"), raw=b"\xff", error=KeyError("k")
    )
    trace.add_message({"role": "tool", "content": threading.Lock()})
    with trace.span("x", weird=Path("/tmp")) as span:
        span.set(more=object())
    path = trace.write()
    assert "-heartbeat-none-" in path.name
    data = json.loads(path.read_text())
    assert data["extra"]["nan"] == "nan" and data["extra"]["error"] == "KeyError: 'k'"
    assert data["extra"]["when"] == [1, 2]

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    stuck = make_trace(blocked)
    with caplog.at_level(logging.ERROR):
        assert stuck.write() == stuck.path
    assert any(getattr(r, "action", "") == "trace_write_failed" for r in caplog.records)


def test_playbook_runs_show_in_the_summary(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    with trace.span("chat playbook", **{"gen_ai.operation.name": "chat", "pideploy.model_name": "playbook"}):
        pass
    assert trace.summary()["playbook"] is True


# ---------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------

REQUEST = httpx2.Request("POST", "http://model/v1/chat/completions")


def _status(cls: type[openai.APIStatusError], code: int) -> openai.APIStatusError:
    return cls("boom", response=httpx2.Response(code, request=REQUEST), body=None)


def _docker_api(code: int) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = code
    return docker.errors.APIError("engine said no", response=response)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.ToolRefused("no"), "tool_refused"),
        (errors.ToolArgumentError("bad json"), "llm_bad_output"),
        (errors.CostCapExceeded(1, 1), "cost_cap"),
        (errors.TokenCapExceeded(1, 1), "token_cap"),
        (errors.RunTimedOut(3), "timeout"),
        (errors.RunCancelled("x"), "cancelled"),
        (errors.TooManyTurns(12), "agent_stuck"),
        (errors.ModelRateLimited("x"), "llm_rate_limited"),
        (errors.ModelTimeout("x"), "llm_timeout"),
        (errors.ChainUnavailable("x"), "llm_api_error"),
        (errors.DatabaseError("x"), "infra_unavailable"),
        (errors.ConfigError("x"), "config_error"),
        (errors.NotFound("x"), "bad_request"),
        (_status(openai.RateLimitError, 429), "llm_rate_limited"),
        (openai.APITimeoutError(request=REQUEST), "llm_timeout"),
        (openai.APIConnectionError(request=REQUEST), "llm_api_error"),
        (_status(openai.InternalServerError, 500), "llm_api_error"),
        (_status(openai.APIStatusError, 418), "llm_api_error"),
        (_status(openai.BadRequestError, 400), "llm_api_error"),
        (openai.OpenAIError("other"), "llm_api_error"),
        (httpx2.ReadTimeout("stream stalled", request=REQUEST), "llm_timeout"),
        (httpx2.RemoteProtocolError("peer closed", request=REQUEST), "llm_api_error"),
        (TimeoutError("slow"), "timeout"),
        (psycopg.OperationalError("no server"), "infra_unavailable"),
        (psycopg_pool.PoolTimeout("no connection"), "infra_unavailable"),
        (requests.ConnectionError("refused"), "infra_unavailable"),
        (requests.ConnectTimeout("no route"), "infra_unavailable"),
        (requests.ReadTimeout("slow engine"), "timeout"),
        (ConnectionRefusedError("refused"), "infra_unavailable"),
        (docker.errors.DockerException("Error while fetching server API version"), "infra_unavailable"),
        (_docker_api(500), "infra_unavailable"),
        (_docker_api(409), "tool_execution_error"),
        (psycopg.errors.UniqueViolation("dup"), "tool_execution_error"),
        (ValueError("bug"), "tool_execution_error"),
        (KeyError("bug"), "tool_execution_error"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_classify(error: BaseException, expected: str) -> None:
    assert classify(error) == expected
    assert expected in errors.ERROR_CLASSES


def test_classify_honours_a_narrowed_instance_class() -> None:
    error = errors.PiDeployError("the model reported failure")
    error.error_class = "tool_refused"
    assert classify(error) == "tool_refused"
    error.error_class = "not-a-class"
    assert classify(error) == "tool_execution_error"


# ---------------------------------------------------------------------------
# alerts
# ---------------------------------------------------------------------------


def read_alerts(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quiet_run_fires_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    trace, _ = run_example(tmp_path)
    trace.finish("succeeded")
    assert evaluate_alerts(trace, config) == []
    assert not config.alerts.exists()


def test_each_rule_fires_one_line(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, alert_cost_usd=0.05, alert_turns=2, alert_tool_error_rate=0.3, alert_slow_seconds=3
    )
    trace, _ = run_example(tmp_path)  # cost 0.06, 3 turns, 1 of 3 tools failed, 6.75 s
    trace.finish("succeeded")
    fired = evaluate_alerts(trace, config)
    assert [a["rule"] for a in fired] == ["high_cost", "high_turn_count", "tool_error_rate", "slow_execution"]
    lines = read_alerts(config.alerts)
    assert [line["rule"] for line in lines] == [a["rule"] for a in fired]
    by_rule = {line["rule"]: line for line in lines}
    assert by_rule["high_cost"]["value"] == pytest.approx(0.06)
    assert by_rule["high_cost"]["threshold"] == 0.05
    assert by_rule["high_cost"]["severity"] == "warning"
    assert by_rule["slow_execution"]["severity"] == "critical"  # 6.75 s >= 2 x 3 s
    assert by_rule["tool_error_rate"]["value"] == pytest.approx(1 / 3)
    for line in lines:
        assert set(line) >= {"time", "rule", "severity", "message", "value", "threshold"}
        assert line["task_id"] == 7 and line["task_type"] == "instance_create"
        assert line["trace_file"] == str(trace.path)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert "task instance_create #7" in by_rule["high_turn_count"]["message"]


def test_tool_error_rate_needs_two_tool_calls(tmp_path: Path) -> None:
    config = make_config(tmp_path, alert_tool_error_rate=0.1)
    clock = FakeClock()
    trace = make_trace(tmp_path, clock)
    tool_call(trace, clock, "instance_start", 0.1, fail=True)
    trace.finish("failed")
    assert evaluate_alerts(trace, config) == []
    tool_call(trace, clock, "instance_start", 0.1, fail=True)
    assert [a["rule"] for a in evaluate_alerts(trace, config)] == ["tool_error_rate"]


def test_alert_for_other_code_carries_its_detail(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "alerts.jsonl"
    record = alert(path, "instance_error", "instance 4 gave up", severity="critical", instance_id=4)
    (line,) = read_alerts(path)
    assert line == record
    assert line["rule"] == "instance_error" and line["instance_id"] == 4 and line["severity"] == "critical"
    assert line["task_id"] is None and line["value"] is None


LONG = "x" * 20_000  # far beyond PIPE_BUF: only the lock keeps lines whole


def _append_many(path: str, writer: int, count: int) -> None:
    for i in range(count):
        alert(Path(path), "stress", f"{writer}-{i}", padding=LONG)


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    logging.getLogger("observability").disabled = True  # the log line per alert is noise here
    try:
        processes = [
            multiprocessing.get_context("fork").Process(target=_append_many, args=(str(path), w, 40))
            for w in range(3)
        ]
        threads = [threading.Thread(target=_append_many, args=(str(path), 10 + w, 40)) for w in range(3)]
        for process in processes:
            process.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        logging.getLogger("observability").disabled = False
    lines = read_alerts(path)
    assert len(lines) == 240
    assert {line["message"] for line in lines} == {
        f"{w}-{i}" for w in (0, 1, 2, 10, 11, 12) for i in range(40)
    }
    assert all(line["padding"] == LONG for line in lines)


# ---------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------


def _record(**extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("agent")
    return logger.makeRecord("agent", logging.INFO, __file__, 1, "tool %s crashed", ("x",), None, extra=extra)


def test_json_formatter_writes_one_object_per_line() -> None:
    formatter = JsonLogFormatter()
    line = formatter.format(_record(action="tool_crashed", task_id=5, instance_id=9, model="m1"))
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry)[:4] == ["time", "level", "logger", "action"]
    assert entry["level"] == "INFO" and entry["logger"] == "agent"
    assert entry["action"] == "tool_crashed" and entry["task_id"] == 5 and entry["instance_id"] == 9
    assert entry["message"] == "tool x crashed" and entry["model"] == "m1"
    assert "exc_info" not in entry
    assert json.loads(formatter.format(_record()))["action"] == ""


def test_json_formatter_includes_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.getLogger("x").makeRecord("x", logging.ERROR, "f", 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonLogFormatter().format(record))
    assert "RuntimeError: boom" in entry["exc_info"] and "Traceback" in entry["exc_info"]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_setup_logging_is_idempotent_and_writes_to_stderr(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    before = len(root_logger.handlers)
    setup_logging("json", "info")
    setup_logging("json", "DEBUG")
    assert len(root_logger.handlers) == before + 1
    assert root_logger.level == logging.DEBUG
    logging.getLogger("worker").debug("claimed %d", 3, extra={"action": "task_claimed", "task_id": 3})
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert (entry["action"], entry["task_id"], entry["message"]) == ("task_claimed", 3, "claimed 3")

    setup_logging("text", "INFO")
    assert len(root_logger.handlers) == before + 1
    logging.getLogger("worker").info("claimed %d", 4, extra={"action": "task_claimed", "task_id": 4})
    text = stream.getvalue().splitlines()[-1]
    assert re.fullmatch(r"\S+Z INFO +worker \[task_claimed\] claimed 4 task_id=4", text)
    with pytest.raises(ValueError):
        setup_logging("xml", "INFO")


def test_span_attributes_may_come_from_a_dict_and_parent_must_be_a_span(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    attributes: dict[str, object] = {"gen_ai.operation.name": "chat", "pideploy.attempt": 1}
    with trace.span("chat m1", **attributes) as span:
        pass
    assert span.attributes == attributes
    with pytest.raises(TypeError), trace.span("x", parent="root"):
        pass


def test_prune_traces_deletes_old_trace_files_only(tmp_path: Path) -> None:
    def file(name: str, age_s: float) -> Path:
        path = tmp_path / name
        path.write_text("{}")
        os.utime(path, (1_000_000 - age_s, 1_000_000 - age_s))
        return path

    old = file("20261101T000000-task-12-0a1b2c.json", 100)
    old_round = file("20261101T000000-heartbeat-none-0a1b2c.json", 100)
    half_written = file(".20261101T000000-task-13-0a1b2c.json.abc_123.tmp", 100)
    young = file("20261101T000000-task-14-0a1b2c.json", 10)
    foreign = [file(name, 100) for name in ("notes.json", "20261101T000000-task-15-0a1b2c.json.bak", "x.tmp")]
    (tmp_path / "20261101T000000-task-16-0a1b2c.json").mkdir()  # not a file

    assert observability.prune_traces(tmp_path, before=1_000_000 - 50) == 3
    assert not old.exists() and not old_round.exists() and not half_written.exists()
    assert young.exists() and all(f.exists() for f in foreign)
    assert observability.prune_traces(tmp_path / "missing", before=2_000_000) == 0


# ---------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------

INSPECT = json.dumps(
    [
        {
            "Id": "ab12",
            "Config": {"Env": ["PATH=/bin", "GATEWAY_PLAIN=not-a-secret-name", 'Q=a"b'], "Cmd": ["sh"]},
        }
    ],
    indent=4,
)


@pytest.mark.parametrize(
    ("text", "hidden", "kept"),
    [
        # known values, raw and as they show inside JSON output
        ("log: started with value-from-the-db here", ["value-from-the-db"], ["log: started with"]),
        ('{"msg": "quote\\"d-value"}', ['quote\\"d-value'], ['{"msg": ']),
        ('{"Labels": {"x": "a\\u0026b\\u003cc-tail"}}', ["a\\u0026b"], ['{"Labels": {"x": ']),
        # KEY=value, KEY: value, "key": "value" with a secret-like name, whatever the value
        ("GATEWAY_TOKEN=abc1 LEVEL=info", ["abc1"], ["GATEWAY_TOKEN=", "LEVEL=info"]),
        ('export API_KEY="two words" DB_PASSWORD=pw', ["two words", "=pw"], ["API_KEY="]),
        (
            '{"api_key": "k1", "client_secret": "s1", "input_tokens": 1371}',
            ['"k1"', '"s1"'],
            ['"input_tokens": 1371'],
        ),
        ("oauth_token: xyz12 author=bob auth=q9", ["xyz12", "auth=q9"], ["author=bob"]),
        # every value of an "Env" array, pretty or not, even cut short by the output cap
        (INSPECT, ["/bin", "not-a-secret-name", 'a\\"b'], ['"PATH=', '"GATEWAY_PLAIN=', '"Cmd"']),
        ('"Env": ["A=1", "B=2', ["=1", "=2"], ['"A=', '"B=']),
        # headers, URLs, token shapes
        ("Authorization: Bearer eyJhbGciOi.abc", ["eyJhbGciOi"], ["Authorization: "]),
        ("curl -H 'authorization: Basic dXNlcjpwYXNz'", ["dXNlcjpwYXNz"], ["curl -H"]),
        ("postgresql://pideploy:pw123@db:5432/app", ["pw123"], ["postgresql://pideploy:", "@db:5432/app"]),
        ("key sk-abcdefghijklmnopqrstuv and ghp_abcdefghijklmnopqrstuvwxyz", ["sk-abc", "ghp_abc"], ["key "]),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", ["MIIE"], []),
    ],
)
def test_the_redactor_hides_secrets(text: str, hidden: list[str], kept: list[str]) -> None:
    redacted = observability.Redactor(["value-from-the-db", 'quote"d-value', "a&b<c-tail"]).text(text)
    for secret in hidden:
        assert secret not in redacted, redacted
    for part in kept:
        assert part in redacted, redacted
    assert observability.REDACTED in redacted


def test_the_redactor_leaves_ordinary_output_alone() -> None:
    redactor = observability.Redactor(["1", "true", "abc"])  # too short to hunt for in free text
    text = "HTTP 200; token cap reached: spent 1 of 5; max_tokens=2048 true abc\ntest is successful"
    assert redactor.text(text) == text
    assert redactor({"ok": True, "exit_code": 1, "stdout": text, "n": [1, 2.5, None]}) == {
        "ok": True,
        "exit_code": 1,
        "stdout": text,
        "n": [1, 2.5, None],
    }


def test_a_redactors_values_only_grow() -> None:
    first = observability.Redactor(["first-secret"])
    both = first.including(["second-secret"])
    assert both.text("first-secret second-secret") == "[redacted] [redacted]"
    assert first.including(["first-secret"]) is first


def test_a_written_trace_is_redacted_everywhere(tmp_path: Path) -> None:
    trace = make_trace(tmp_path)
    trace.redactor = observability.Redactor(["env-value-42"])
    trace.add_message({"role": "user", "content": 'Task: {"env": {"K": "env-value-42"}}'})
    with pytest.raises(errors.HealthCheckFailed), trace.span("health.wait", **{"url.full": "x?token=t0k"}):
        raise errors.HealthCheckFailed("exited: env-value-42", logs="PASSWORD=pw")
    trace.extra["crashed"] = "Authorization: Bearer abcdefgh"
    trace.finish("failed", error=RuntimeError("env-value-42"))
    text = trace.write().read_text()
    for secret in ("env-value-42", "t0k", "abcdefgh"):
        assert secret not in text
    assert text.count(observability.REDACTED) >= 5
