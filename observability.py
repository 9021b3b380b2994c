"""Traces for runs, alerts for operators, JSON lines for logs.

Every agent run (a task, or one heartbeat round) builds one `Trace`: a tree of
`Span`s, the transcript (every message in and out) and the verdict. `write()`
leaves it as one JSON file in `config.traces`; `evaluate_alerts()` then checks
the run against the alert thresholds and appends one JSON line per fired rule
to `config.alerts`.

Span conventions (OpenTelemetry GenAI attribute names where they exist):

- the root span, named `{kind} {task_type}` (e.g. `task instance_create`),
  opened when the Trace is made and closed by `finish()`; its duration is the
  run's wall time.
- a model call: name `chat {model}`; attributes `gen_ai.operation.name="chat"`,
  `gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.input_tokens`,
  `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons` (a list),
  `server.address`, and `pideploy.cost_usd`, `pideploy.ttft_s`,
  `pideploy.attempt`, `pideploy.model_name` (the chain entry's name;
  "playbook" for the deterministic last link), `pideploy.usage_estimated=True`
  when the token figures are ours (the server sent no usage, or the call
  broke after the server began: it is charged all the same); `error.type` on
  failure.
- a tool execution: name `execute_tool {tool}`; attributes
  `gen_ai.operation.name="execute_tool"`, `gen_ai.tool.name`,
  `gen_ai.tool.call.id`, `pideploy.cost_usd` (the cost of the model call that
  consumed this tool's result: the loop sets it after the next call);
  `error.type` on failure.
- a step inside a tool: any name (`engine.create`, `nginx.sync`, `db.update`)
  with `pideploy.step=True`.
- a failed span has status "error", `error.type` (one of errors.ERROR_CLASSES,
  from `classify`) and `error.message`.

`Trace.summary()` derives every figure from those attributes: model spans are
the spans whose `gen_ai.operation.name` is "chat", tool spans those whose is
"execute_tool". Cost is the sum over model spans only (a tool span's cost is
an attribution of a model call's cost, not more spending).

Spans nest under the span open in the same thread for the same trace (a
thread-local stack); work fanned out to threads passes `parent=` explicitly.

Alert lines (`alerts.jsonl`, one JSON object per line): `time` (ISO 8601 UTC),
`rule`, `severity` ("warning", or "critical" at twice the threshold or more),
`message`, `value`, `threshold`, `task_id`, `task_type`, `trace_file`, plus any
detail. Writers in many threads and processes append whole lines: O_APPEND,
one os.write per line, under fcntl.flock.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config import Config
from errors import ERROR_CLASSES, PiDeployError
from localio import write_atomic

logger = logging.getLogger(__name__)

TRACE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Classifying errors
# ---------------------------------------------------------------------------


def classify(error: BaseException) -> str:
    """The error class (one of errors.ERROR_CLASSES) a failure is counted under."""
    if isinstance(error, PiDeployError):
        return error.error_class if error.error_class in ERROR_CLASSES else "tool_execution_error"
    # Imported here, not at the top: the CLI's listings load this module and none of these.
    import docker.errors
    import httpx2
    import openai
    import psycopg
    import requests.exceptions

    if isinstance(error, openai.RateLimitError):
        return "llm_rate_limited"
    if isinstance(error, (openai.APITimeoutError, httpx2.TimeoutException)):
        return "llm_timeout"
    if isinstance(error, (openai.OpenAIError, httpx2.TransportError)):
        # httpx2 is the openai client's transport: its errors escape while a stream is read.
        return "llm_api_error"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, psycopg.OperationalError):
        return "infra_unavailable"
    if isinstance(error, (requests.exceptions.ConnectionError, ConnectionError)):
        return "infra_unavailable"  # includes requests' ConnectTimeout: the engine is not there
    if isinstance(error, requests.exceptions.Timeout):
        return "timeout"
    if isinstance(error, docker.errors.APIError):
        return "infra_unavailable" if error.is_server_error() else "tool_execution_error"
    if type(error) is docker.errors.DockerException:
        return "infra_unavailable"  # what the SDK raises when it cannot reach the engine at all
    return "tool_execution_error"


# ---------------------------------------------------------------------------
# Redaction: what neither a model nor a trace may see
# ---------------------------------------------------------------------------

REDACTED = "[redacted]"
# A known value shorter than this is not hunted for in free text (it would blank out every
# "1" or "true" of a command's output); in KEY=value and "Env" arrays it is redacted all the same.
MIN_SECRET_CHARS = 6

_NAME = r"[A-Za-z0-9_.-]"
_CONFIDENTIAL_NAMES = (
    r"secret|token(?!s)|passw(?:or)?d|passphrase|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|credential|auth(?![a-z])"
)
_VALUE = r"""(?P<value>\[redacted\]|"(?:[^"\\\n]|\\.)*"?|'[^'\n]*'?|[^\s"',;&}\]]+)"""
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # Authorization headers, whatever their scheme: the rest of the line
        (r"""(?i)(authori[sz]ation["']?\s*[:=]\s*)[^\r\n"]+""", rf"\g<1>{REDACTED}"),
        (r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+", rf"\g<1>{REDACTED}"),
        # KEY=value, KEY: value, "key": "value" where the key names a secret
        (
            rf"(?i)(?<!{_NAME})(?P<key>{_NAME}*?(?:{_CONFIDENTIAL_NAMES}){_NAME}*)(?P<sep>[\"']?\s*[:=]\s*){_VALUE}",
            "",  # see _secret_pair
        ),
        # user:password@ in URLs (a DATABASE_URL, a proxy)
        (r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(@)", rf"\g<1>{REDACTED}\g<2>"),
        # well-known token shapes
        (r"\bsk-[A-Za-z0-9_-]{16,}", REDACTED),
        (r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", REDACTED),
        (r"\bxox[abposr]-[A-Za-z0-9-]{10,}", REDACTED),
        (r"\bAKIA[0-9A-Z]{16}\b", REDACTED),
        (r"\bAIza[0-9A-Za-z_-]{30,}", REDACTED),
        (r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", REDACTED),
        (r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", REDACTED),
    )
)
# A container's environment in inspect output: "Env": ["K=V", ...], pretty or not, possibly cut
# short by the output cap. Every value goes, whatever its name.
_ENV_ARRAY = re.compile(r"""(?i)(["']?env["']?\s*:\s*)\[""")
_ENV_ITEM = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)("|\Z)|null)\s*,?""")


def _secret_pair(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match['key']}{match['sep']}{quote}{REDACTED}{quote}"


def _redact_env_arrays(text: str) -> str:
    out: list[str] = []
    i = 0
    while (found := _ENV_ARRAY.search(text, i)) is not None:
        out.append(text[i : found.end()])
        i = found.end()
        while (item := _ENV_ITEM.match(text, i)) is not None and item.end() > i:
            if item.group(1) is None:  # null
                out.append(item.group())
            else:
                name = item.group(1).partition("=")[0]
                out.append(item.group().replace(item.group(1), f"{name}={REDACTED}", 1))
            i = item.end()
    out.append(text[i:])
    return "".join(out)


class Redactor:
    """Replaces secrets in any value (strings inside dicts and lists, keys kept) with [redacted]:
    the values it is given (every instance's environment, API keys) and anything that looks like
    a secret (KEY=value with a secret-like name, "Env" arrays, bearer tokens, known key shapes).

    The one function every tool result goes through before a model sees it (agent.execute), and
    every trace through before it is written (Trace.to_dict)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = frozenset(v for v in values if isinstance(v, str) and v)
        searched = set()
        for value in self.values:
            if len(value) >= MIN_SECRET_CHARS:
                searched.add(value)
                quoted = json.dumps(value)[1:-1]  # as it shows inside JSON output
                searched.add(quoted)
                # ... and inside Go's (docker's), which also escapes <, > and &
                searched.add(quoted.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
        ordered = sorted(searched, key=len, reverse=True)  # a value containing another goes whole
        self._known = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def including(self, values: Iterable[str]) -> Redactor:
        """A redactor for these values too (a run's only ever grow: what was secret stays so)."""
        more = frozenset(values) - self.values
        return self if not more else Redactor(self.values | more)

    def text(self, text: str) -> str:
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        text = _redact_env_arrays(text)
        for pattern, replacement in _SECRET_PATTERNS:
            text = pattern.sub(replacement or _secret_pair, text)
        return text

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(item) for item in value]
        return value


# ---------------------------------------------------------------------------
# Spans and traces
# ---------------------------------------------------------------------------


def attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    """Dotted attribute names as keyword arguments: span.set(**attrs({"gen_ai.tool.name": t}))."""
    return dict(attributes)


class Span:
    """One timed piece of a run. Times are epoch seconds from the trace's clock."""

    def __init__(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        *,
        start: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.attributes: dict[str, Any] = dict(attributes or {})
        self.start = start
        self.end: float | None = None
        self.status = "ok"
        self.children: list[Span] = []
        self._clock = clock

    def set(self, **attributes: Any) -> None:
        self.attributes.update(attributes)

    def fail(self, error: BaseException) -> None:
        self.status = "error"
        self.attributes["error.type"] = classify(error)
        self.attributes["error.message"] = str(error) or type(error).__name__

    def close(self) -> None:
        if self.end is None:
            self.end = self._clock()

    @property
    def duration_s(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def walk(self) -> Iterator[Span]:
        """This span and every span under it, depth first."""
        yield self
        for child in list(self.children):
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        duration = self.duration_s
        return {
            "name": self.name,
            "start": self.start,
            "end": self.end,
            "duration_s": None if duration is None else round(duration, 6),
            "status": self.status,
            "attributes": dict(self.attributes),
            "children": [child.to_dict() for child in list(self.children)],
        }

    def __repr__(self) -> str:
        return f"Span({self.name!r}, status={self.status!r}, duration_s={self.duration_s!r})"


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Trace:
    """Everything about one run: spans, transcript, verdict; written as one JSON file."""

    def __init__(
        self,
        *,
        kind: str,
        task_id: int | None,
        task_type: str,
        user_id: str | None,
        instance_id: int | None,
        prompt_version: str,
        model_chain: list[str],
        trace_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self.task_id = task_id
        self.task_type = task_type
        self.user_id = user_id
        self.instance_id = instance_id
        self.prompt_version = prompt_version
        self.model_chain = list(model_chain)
        self.trace_dir = Path(trace_dir)
        self.clock = clock
        self.turns = 0
        self.outcome = "running"
        self.error_class: str | None = None
        self.error: str | None = None
        self.result: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self.transcript: list[dict[str, Any]] = []
        self.redactor = Redactor()  # the run sets one that knows its secret values
        self.root = Span(f"{kind} {task_type}", {"pideploy.kind": kind}, start=clock(), clock=clock)
        self._lock = threading.Lock()
        self._local = threading.local()
        stamp = datetime.fromtimestamp(self.root.start, UTC)
        self.id = secrets.token_hex(3)
        self._path = self.trace_dir / f"{stamp:%Y%m%dT%H%M%S}-{kind}-{task_id or 'none'}-{self.id}.json"

    @property
    def path(self) -> Path:
        return self._path

    def _stack(self) -> list[Span]:
        stack: list[Span] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextlib.contextmanager
    def span(self, name: str, parent: object = None, **attributes: Any) -> Iterator[Span]:
        """Open a span under `parent`, else under this thread's open span, else the root.

        `parent` is typed `object` (a Span or None) so that callers may pass attributes as
        `**some_dict` without mypy objecting that the dict could fill `parent`.
        """
        if parent is not None and not isinstance(parent, Span):
            raise TypeError(f"parent must be a Span, not {type(parent).__name__}")
        stack = self._stack()
        parent = parent or (stack[-1] if stack else self.root)
        span = Span(name, attributes, start=self.clock(), clock=self.clock)
        with self._lock:
            parent.children.append(span)
        stack.append(span)
        try:
            yield span
        except BaseException as error:
            span.fail(error)
            raise
        finally:
            span.close()
            stack.remove(span)

    def add_message(self, message: dict[str, Any]) -> None:
        try:
            entry = copy.deepcopy(message)
        except Exception:  # an uncopyable value: keep the references; write() copes with odd data
            entry = dict(message)
        with self._lock:
            self.transcript.append(entry)

    def spans(self) -> list[Span]:
        """Every span of the run, the root first."""
        with self._lock:
            return list(self.root.walk())

    def finish(
        self, outcome: str, *, error: BaseException | None = None, result: dict[str, Any] | None = None
    ) -> None:
        self.outcome = outcome
        self.result = result
        if error is not None:
            self.error_class = classify(error)
            self.error = str(error) or type(error).__name__
            self.root.fail(error)
        elif outcome == "failed":
            self.root.status = "error"
        self.root.close()

    def summary(self) -> dict[str, Any]:
        spans = self.spans()
        models = [s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"]
        tools = [s for s in spans if s.attributes.get("gen_ai.operation.name") == "execute_tool"]
        wall = self.root.duration_s if self.root.end is not None else self.clock() - self.root.start
        input_tokens = sum(_number(s.attributes.get("gen_ai.usage.input_tokens")) for s in models)
        output_tokens = sum(_number(s.attributes.get("gen_ai.usage.output_tokens")) for s in models)
        durations: dict[str, list[float]] = {}
        tool_cost: dict[str, float] = {}
        for s in tools:
            name = str(s.attributes.get("gen_ai.tool.name", s.name.removeprefix("execute_tool ")))
            durations.setdefault(name, []).append(round(s.duration_s or 0.0, 6))
            tool_cost[name] = tool_cost.get(name, 0.0) + _number(s.attributes.get("pideploy.cost_usd"))
        return {
            "wall_s": round(wall or 0.0, 6),
            "turns": self.turns,
            "model_calls": len(models),
            "model_errors": sum(1 for s in models if s.status == "error"),
            "input_tokens": int(input_tokens),
            "output_tokens": int(output_tokens),
            "total_tokens": int(input_tokens + output_tokens),
            # Calls whose tokens are our estimate (the server sent no usage), not a measurement.
            "tokens_estimated_calls": sum(1 for s in models if s.attributes.get("pideploy.usage_estimated")),
            "cost_usd": round(sum(_number(s.attributes.get("pideploy.cost_usd")) for s in models), 10),
            "ttft_s": [
                float(s.attributes["pideploy.ttft_s"])
                for s in models
                if isinstance(s.attributes.get("pideploy.ttft_s"), (int, float))
            ],
            "tool_calls": len(tools),
            "tool_errors": sum(1 for s in tools if s.status == "error"),
            "tool_durations": durations,
            "tool_cost_usd": {name: round(usd, 10) for name, usd in tool_cost.items()},
            "playbook": any(s.attributes.get("pideploy.model_name") == "playbook" for s in models),
            "error_class": self.error_class,
        }

    def to_dict(self) -> dict[str, Any]:
        """The trace as written: plain JSON values (cycles cut, odd objects as text), every
        message, span attribute and error redacted."""
        with self._lock:
            transcript = list(self.transcript)
            spans = self.root.to_dict()
        document: dict[str, Any] = self.redactor(_plain(self._document(transcript, spans)))
        return document

    def _document(self, transcript: list[dict[str, Any]], spans: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": TRACE_FORMAT_VERSION,
            "id": self.id,
            "kind": self.kind,
            "task_id": self.task_id,
            "task_type": self.task_type,
            "user_id": self.user_id,
            "instance_id": self.instance_id,
            "prompt_version": self.prompt_version,
            "model_chain": self.model_chain,
            "started_at": _utc(self.root.start),
            "finished_at": None if self.root.end is None else _utc(self.root.end),
            "outcome": self.outcome,
            "error_class": self.error_class,
            "error": self.error,
            "result": self.result,
            "summary": self.summary(),
            "spans": spans,
            "transcript": transcript,
            "extra": dict(self.extra),
        }

    def write(self) -> Path:
        """Write (or rewrite) the trace file atomically. Never raises: a failure is logged."""
        try:
            text = json.dumps(self.to_dict(), indent=1, default=str)
            write_atomic(self._path, text.encode(), mode=0o600)
        except Exception:  # called from a `finally`: the run's own outcome must survive a bad trace
            logger.exception(
                "cannot write trace %s",
                self._path,
                extra={"action": "trace_write_failed", "task_id": self.task_id},
            )
        return self._path


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return 0.0
    return float(value)


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: odd objects become strings, cycles and deep nesting are cut."""
    if depth > 64:
        return "<too deep>"
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in list(value.items())}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in list(value)]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


# Names Trace gives its files (and its temp files): what prune_traces may delete, and nothing else
# that an operator keeps in the same folder.
_TRACE_NAME = re.compile(r"\.?[0-9]{8}T[0-9]{6}-[a-z_]+-[a-z0-9]+-[0-9a-f]{6}\.json(\.[A-Za-z0-9_]+\.tmp)?")


def prune_traces(trace_dir: Path, before: float) -> int:
    """Delete trace files last written before `before` (epoch seconds); how many went.

    A trace is written when its run ends, so an old file is a finished run's; a task row
    keeps the name, and the API answers 404 for a trace retention removed."""
    removed = 0
    try:
        entries = list(os.scandir(trace_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not _TRACE_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            if entry.stat(follow_symlinks=False).st_mtime < before:
                os.unlink(entry.path)
                removed += 1
    return removed


# ---------------------------------------------------------------------------
# How a run ended (an agent run or a heartbeat round as a task): what the queue records
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # "succeeded" | "failed"
    result: dict[str, Any] | None
    error_class: str | None
    error: str | None
    turns: int
    cost_usd: float
    tokens: int
    trace_file: str
    playbook: bool = False


# ---------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------


def alert(
    path: Path,
    rule: str,
    message: str,
    *,
    severity: str = "warning",
    value: Any = None,
    threshold: Any = None,
    task_id: int | None = None,
    task_type: str | None = None,
    trace_file: str | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """Append one alert line to `path` (whole, even with concurrent writers) and log it."""
    record: dict[str, Any] = {
        "time": _utc(time.time()),
        "rule": rule,
        "severity": severity,
        "message": message,
        "value": value,
        "threshold": threshold,
        "task_id": task_id,
        "task_type": task_type,
        "trace_file": trace_file,
        **detail,
    }
    logger.warning("alert %s: %s", rule, message, extra={"action": "alert", "rule": rule, "task_id": task_id})
    line = (json.dumps(_plain(record), default=str) + "\n").encode()
    try:
        append_line(path, line)
    except OSError:
        logger.exception("cannot append alert to %s", path, extra={"action": "alert_write_failed"})
    return record


def append_line(path: Path, line: bytes) -> None:
    """Append bytes with O_APPEND in one write, holding an exclusive flock meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        while written < len(line):  # a short write (disk nearly full); still under the lock
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)  # closing releases the lock


def _severity(value: float, threshold: float) -> str:
    return "critical" if threshold > 0 and value >= 2 * threshold else "warning"


def evaluate_alerts(trace: Trace, config: Config) -> list[dict[str, Any]]:
    """Check a finished run against the alert thresholds; append one line per fired rule."""
    summary = trace.summary()
    calls, errors = summary["tool_calls"], summary["tool_errors"]
    rate = errors / calls if calls else 0.0
    checks: list[tuple[str, float, float, str]] = [
        ("high_cost", summary["cost_usd"], config.alert_cost_usd, f"cost ${summary['cost_usd']:.4f}"),
        ("high_turn_count", trace.turns, config.alert_turns, f"{trace.turns} turns"),
        ("tool_error_rate", rate, config.alert_tool_error_rate, f"{errors} of {calls} tool calls failed"),
        ("slow_execution", summary["wall_s"], config.alert_slow_seconds, f"took {summary['wall_s']:.1f}s"),
    ]
    label = f"{trace.kind} {trace.task_type}" + (f" #{trace.task_id}" if trace.task_id is not None else "")
    fired = []
    for rule, value, threshold, what in checks:
        if value <= threshold or (rule == "tool_error_rate" and calls < 2):
            continue
        fired.append(
            alert(
                config.alerts,
                rule,
                f"{label}: {what} (threshold {threshold:g})",
                severity=_severity(value, threshold),
                value=round(value, 6) if isinstance(value, float) else value,
                threshold=threshold,
                task_id=trace.task_id,
                task_type=trace.task_type,
                trace_file=str(trace.path),
                outcome=trace.outcome,
            )
        )
    return fired


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_CONTEXT_FIELDS = ("task_id", "instance_id")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed in `extra=` (besides action), in a stable order."""
    found = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and k != "action"}
    ordered = {k: found.pop(k) for k in _CONTEXT_FIELDS if k in found}
    return {**ordered, **dict(sorted(found.items()))}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, action, task_id/instance_id, message, ..."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "action": str(getattr(record, "action", "") or ""),
        }
        entry.update(_extras(record))
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(_plain(entry), default=str)


class TextLogFormatter(logging.Formatter):
    """A readable one-liner: `time LEVEL logger [action] message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        action = getattr(record, "action", "")
        parts = [_utc(record.created), f"{record.levelname:<7}", record.name]
        if action:
            parts.append(f"[{action}]")
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in _extras(record).items())
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def setup_logging(fmt: str, level: str) -> None:
    """Point the root logger at stderr in `fmt` ("json" or "text"). Calling it again replaces the setup."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pideploy", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else TextLogFormatter())
    handler._pideploy = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The pool warns at every reconnection attempt; db.Health says once that the database is
    # down and once that it is back.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, root.level))
