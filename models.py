"""The models the agent loop asks, and the chain that walks them.

`Chain` walks the model fallback chain (retries with backoff, cool-downs across runs, the
deterministic `Playbook` as the last link); `Budget` reserves cost and tokens before each call,
so no call can cross a cap. `OpenAIChat` is the one real client: openai's errors become ours
there. `ScriptedModel` answers from a list, for tests of the loop that need no HTTP.

This module knows nothing of the loop or the tools: the playbook plans from the task's plain
data, and the chain's limits are anything with the fields of `agent.Limits`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import openai

from config import Config, ModelConfig
from db import Database
from errors import (
    ChainUnavailable,
    CostCapExceeded,
    ModelContextOverflow,
    ModelError,
    ModelOutputTruncated,
    ModelRateLimited,
    ModelRejected,
    ModelServerError,
    ModelTimeout,
    PiDeployError,
    RunEnded,
    RunTimedOut,
    TokenCapExceeded,
)
from observability import Trace

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, as the model wrote it


@dataclass(frozen=True)
class Completion:
    content: str
    tool_calls: tuple[ToolCall, ...]
    input_tokens: int
    output_tokens: int
    finish_reason: str
    response_model: str
    ttft_s: float | None = None
    cost_usd: float = 0.0  # filled in by the chain from the model's prices
    usage_estimated: bool = False  # the server sent no usage: the token figures are ours
    link: str = ""  # the chain link that answered (filled in by the chain)

    def message(self) -> dict[str, Any]:
        # Always a string, "" when the model wrote no text: llama.cpp's server rejects
        # `"content": null` (500, "Input should be a valid string"), and its
        # chatml-function-calling template fails on an assistant message without the key
        # (500, "'dict object' has no attribute 'content'"). OpenAI, vLLM and the others
        # take "" beside tool calls.
        message: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return message


class ChatModel(Protocol):
    name: str

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> Completion: ...


# JSON Schema keywords a "plain" tool spec leaves out. The tools validate every argument against
# the full schema anyway; some servers turn the spec into a grammar, and llama.cpp's dies on the
# one a `maxLength` of 4096 makes (every character one more nested optional).
_LIMIT_KEYWORDS = frozenset(
    ("maxLength", "minLength", "pattern", "propertyNames", "maxProperties", "minProperties",
     "maxItems", "minItems", "minimum", "maximum")
)  # fmt: skip


def plain_schema(schema: Any) -> Any:
    """`schema` without the limit keywords, at every depth (property names are kept)."""
    if isinstance(schema, list):
        return [plain_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    plain: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _LIMIT_KEYWORDS:
            continue
        if key == "properties" and isinstance(value, dict):
            plain[key] = {name: plain_schema(sub) for name, sub in value.items()}
        else:
            plain[key] = plain_schema(value)
    return plain


def approx_tokens(text: str) -> int:
    """Tokens a server would count for `text`, roughly (4 bytes a token): used only when the
    server sends no usage, and then marked as estimated in the trace."""
    return math.ceil(len(text.encode()) / 4)


class _Calls:
    """Tool calls assembled from streamed deltas, by `index`, whatever the server's style:
    OpenAI and vLLM send the id and name once, then argument pieces; llama.cpp repeats the id
    and the whole name in every delta; Ollama-style gateways send each call whole at once."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, position: int, piece: Any) -> None:
        index = piece.index if isinstance(piece.index, int) else position
        call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        call["id"] = call["id"] or (piece.id or "")
        function = piece.function
        if function is None:
            return
        name = function.name or ""
        if name and not call["name"].endswith(name):
            # A repeated name (llama.cpp) is the same name again, never a second half of it.
            call["name"] = name if name.startswith(call["name"]) else call["name"] + name
        call["arguments"] += function.arguments or ""

    def done(self) -> tuple[ToolCall, ...]:
        return tuple(
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"])
            for i, c in sorted(self.calls.items())
        )


class OpenAIChat:
    """One OpenAI-compatible endpoint; openai errors become ModelError here.

    Streamed by default. What real servers do that OpenAI does not is handled here, so the
    loop only ever sees a whole answer or a classified error: a stream that ends without a
    finish_reason (llama.cpp cuts a stream when another request arrives) is a retryable
    server error; an empty 200 stream, or one whose body broke before its first event
    (llama.cpp's answer to a prompt over its context, and to a streamed tool_choice "auto" when
    its model picks a tool), is asked again once without streaming, whose answer says why or
    is the answer; an answer cut at max_tokens is ModelOutputTruncated."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.name = model.name
        self.client = self._client()

    def _client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.model.base_url,
            api_key=self.model.api_key or "unset",
            max_retries=0,
            timeout=self.model.timeout,
        )

    def _reconnect(self) -> None:
        """A fresh connection pool: after a stream the server broke, the kept-alive connection
        is dead, and the next request on it would be reset (seen with llama.cpp)."""
        old, self.client = self.client, self._client()
        old.close()

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> Completion:
        if self.model.tool_schema == "plain":
            tools = [
                {**t, "function": {**t["function"], "parameters": plain_schema(t["function"]["parameters"])}}
                for t in tools
            ]
        # Sent as the openai client would send it; a key set to `omit` is left out of the body.
        request: dict[str, Any] = {
            "model": self.model.model,
            "messages": messages,  # plain dicts in the wire format
            "tools": tools,
            "max_tokens": max_tokens,
            "tool_choice": openai.omit if self.model.tool_choice == "none-sent" else self.model.tool_choice,
        }
        prompt = json.dumps(messages) + json.dumps(tools)
        started = time.monotonic()
        try:
            if self.model.stream:
                completion = self._stream(request, prompt, started, timeout)
                if completion is None:  # an empty 200 stream: ask the same without streaming
                    self._reconnect()
                    completion = self._whole(request, prompt, started, started + timeout - time.monotonic())
            else:
                completion = self._whole(request, prompt, started, timeout)
        except openai.APIError as error:
            raise translate_openai_error(error, self.name) from error
        except ValueError as error:  # a 200 whose body is not the JSON of an answer (empty, cut)
            raise ModelServerError(
                f"{self.name}: an answer that is not JSON: {type(error).__name__}: {error}", model=self.name
            ) from error
        if completion.finish_reason == "length":
            raise ModelOutputTruncated(
                f"{self.name}: the answer was cut at max_tokens={max_tokens} (finish_reason length)",
                model=self.name,
                consumed=(completion.input_tokens, completion.output_tokens),
            )
        return completion

    def _stream(
        self, request: dict[str, Any], prompt: str, started: float, timeout: float
    ) -> Completion | None:
        """The streamed answer; None when the server sent a 200 with no event at all."""
        ttft: float | None = None
        content: list[str] = []
        calls = _Calls()
        usage: tuple[int, int] | None = None
        finish, response_model, chunks = "", self.model.model, 0
        usage_request: Any = {"include_usage": True} if self.model.send_usage_request else openai.omit
        stream = self.client.chat.completions.create(
            **request, stream=True, stream_options=usage_request, timeout=timeout
        )

        def consumed() -> tuple[int, int]:  # the server read the prompt and wrote this much
            written = "".join(content) + "".join(c["name"] + c["arguments"] for c in calls.calls.values())
            return approx_tokens(prompt), approx_tokens(written)

        try:
            with stream:  # leaving it closes the connection, also when we cut it short
                for chunk in stream:
                    chunks += 1
                    # The client's timeout is per read: a stream that trickles never trips it.
                    if time.monotonic() - started > timeout:
                        raise ModelTimeout(
                            f"{self.name}: still streaming after {timeout:g}s",
                            model=self.name,
                            consumed=consumed(),
                        )
                    response_model = chunk.model or response_model
                    if chunk.usage is not None and chunk.usage.prompt_tokens:
                        usage = (chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
                    for choice in chunk.choices:
                        delta = choice.delta
                        if ttft is None and (delta.content or delta.tool_calls):
                            ttft = time.monotonic() - started
                        if delta.content:
                            content.append(delta.content)
                        for position, piece in enumerate(delta.tool_calls or []):
                            calls.add(position, piece)
                        finish = choice.finish_reason or finish
        except openai.APIError as error:  # the stream broke (or carried an error) after a 200
            if not chunks and isinstance(error, openai.APIConnectionError):
                return None  # a 200 whose body broke before any event: like an empty one
            translated = translate_openai_error(error, self.name)
            translated.consumed = consumed()
            raise translated from error
        except (OSError, ValueError) as error:  # transport errors while iterating
            raise ModelServerError(
                f"{self.name}: stream broke: {type(error).__name__}: {error}",
                model=self.name,
                consumed=consumed(),
            ) from error
        if not chunks:
            return None
        if not finish:
            raise ModelServerError(
                f"{self.name}: the stream ended without a finish_reason (cut short by the server)",
                model=self.name,
                consumed=consumed(),
            )
        return self._completion("".join(content), calls.done(), usage, finish, response_model, ttft, prompt)

    def _whole(self, request: dict[str, Any], prompt: str, started: float, timeout: float) -> Completion:
        if timeout <= 0:
            raise ModelTimeout(f"{self.name}: no time left for the call", model=self.name)
        response = self.client.chat.completions.create(**request, stream=False, timeout=timeout)
        if not response.choices:
            raise ModelServerError(f"{self.name}: an answer with no choices", model=self.name)
        choice = response.choices[0]
        message = choice.message
        tool_calls = tuple(
            ToolCall(id=c.id or f"call_{i}", name=c.function.name, arguments=c.function.arguments or "")
            for i, c in enumerate(message.tool_calls or [])
            if c.type == "function"
        )
        usage = (response.usage.prompt_tokens, response.usage.completion_tokens) if response.usage else None
        ttft = time.monotonic() - started  # the whole answer arrives at once: its first token too
        finish = choice.finish_reason or ""
        return self._completion(
            message.content or "", tool_calls, usage, finish, response.model or self.model.model, ttft, prompt
        )

    def _completion(
        self, text: str, tool_calls: tuple[ToolCall, ...], usage: tuple[int, int] | None, finish: str,
        response_model: str, ttft: float | None, prompt: str,
    ) -> Completion:  # fmt: skip
        if usage is None:  # llama.cpp sends none: count as the server roughly would, and say so
            written = text + "".join(c.name + c.arguments for c in tool_calls)
            return Completion(
                text, tool_calls, approx_tokens(prompt), approx_tokens(written), finish, response_model, ttft,
                usage_estimated=True,
            )  # fmt: skip
        return Completion(text, tool_calls, usage[0], usage[1], finish, response_model, ttft)


def translate_openai_error(error: openai.APIError, model: str) -> ModelError:
    message = f"{model}: {type(error).__name__}: {error.message}"
    if isinstance(error, openai.RateLimitError):
        header = error.response.headers.get("retry-after", "")
        retry_after = float(header) if re.fullmatch(r"\d+(\.\d+)?", header) else None
        return ModelRateLimited(message, model=model, retry_after=retry_after)
    if isinstance(error, openai.APITimeoutError):
        return ModelTimeout(message, model=model)
    if isinstance(error, openai.APIConnectionError):
        return ModelServerError(message, model=model)
    if isinstance(error, openai.APIStatusError) and error.status_code >= 500:
        return ModelServerError(message, model=model)
    code = getattr(error, "code", None) or ""
    if (
        code == "context_length_exceeded"
        or "context length" in message.lower()
        or "context_length" in message
    ):
        return ModelContextOverflow(message, model=model)
    return ModelRejected(message, model=model)  # auth, not found, a request the server refuses


class Playbook:
    """The last link of the chain: the calls a good model makes on the happy path.

    It plans from the task's type, params and instance alone (a heartbeat round follows its deterministic repair plan,
    params["plan"]) and keeps count by its OWN calls in the transcript, whose ids carry
    PLAYBOOK_CALL_PREFIX: it often takes over from a model that already answered, and that
    model's turns are neither steps the playbook took nor results it may report on. Every tool
    is idempotent, so a step the model already did is simply done again and found done.
    """

    name = "playbook"

    def __init__(self, task_type: str, params: Mapping[str, Any], instance_id: int | None) -> None:
        self.task_type, self.params, self.instance_id = task_type, params, instance_id

    def plan(self) -> list[tuple[str, dict[str, Any]]]:
        params, iid = self.params, self.instance_id
        match self.task_type:
            case "instance_create":
                args: dict[str, Any] = {"name": params.get("name")}
                if params.get("config") is not None:
                    args["config"] = params["config"]
                return [("instance_create", args)]
            case "instance_update":
                extra = {k: params[k] for k in ("image", "config") if params.get(k) is not None}
                return [("instance_update", {"instance_id": iid, **extra})]
            case "heartbeat":
                return [(str(step["tool"]), dict(step["arguments"])) for step in params.get("plan", [])]
            case _:
                return [(self.task_type, {"instance_id": iid})]

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> Completion:
        steps = self.plan()
        mine = {
            call["id"]
            for m in messages
            if m["role"] == "assistant"
            for call in m.get("tool_calls") or []
            if str(call.get("id", "")).startswith(PLAYBOOK_CALL_PREFIX)
        }
        done = len(mine)
        if done < len(steps):
            name, arguments = steps[done]
            call = ToolCall(f"{PLAYBOOK_CALL_PREFIX}{done}", name, json.dumps(arguments))
            return Completion("", (call,), 0, 0, "tool_calls", self.name)
        results = [
            json.loads(m["content"]) for m in messages if m["role"] == "tool" and m["tool_call_id"] in mine
        ]
        failures = [r.get("error", "") for r in results if not r.get("ok")]
        data = {"instance_id": self.instance_id}
        for result in results:
            if isinstance(result.get("instance_id"), int):
                data["instance_id"] = result["instance_id"]
        report = {
            "success": not failures,
            "action": f"playbook {self.task_type}",
            "data": data,
            "errors": failures,
        }
        call = ToolCall(f"{PLAYBOOK_CALL_PREFIX}{done}", "report_result", json.dumps(report))
        return Completion("", (call,), 0, 0, "tool_calls", self.name)


PLAYBOOK_CALL_PREFIX = "playbook_"


class ScriptedModel:
    """A ChatModel that answers from a script, in order, for tests of the loop (no HTTP).

    Each output is a Completion to return or an exception to raise (a ModelError to exercise
    the chain's retries and fallbacks). Every request is kept in `requests`. Asked once more
    than the script has outputs, it raises RuntimeError: the run crashes, loudly, rather than
    falling back as if the model had failed."""

    def __init__(self, outputs: Sequence[Completion | Exception], name: str = "scripted") -> None:
        self.name = name
        self.outputs = list(outputs)
        self.requests: list[dict[str, Any]] = []

    def complete(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int, timeout: float
    ) -> Completion:
        self.requests.append(
            {
                "messages": [dict(m) for m in messages],
                "tools": tools,
                "max_tokens": max_tokens,
                "timeout": timeout,
            }
        )
        if len(self.requests) > len(self.outputs):
            raise RuntimeError(f"{self.name}: asked {len(self.requests)} times, scripted {len(self.outputs)}")
        output = self.outputs[len(self.requests) - 1]
        if isinstance(output, Exception):
            raise output
        return output


# ---------------------------------------------------------------------------
# Budget, cool-downs, the chain
# ---------------------------------------------------------------------------


class Budget:
    """Cost and tokens: reserved before each call from the prompt size and max_tokens."""

    def __init__(self, cost_cap_usd: float, token_cap: int, min_output_tokens: int) -> None:
        self.cost_cap, self.token_cap, self.min_output = cost_cap_usd, token_cap, min_output_tokens
        self.spent_usd = 0.0
        self.spent_tokens = 0

    @staticmethod
    def estimate_prompt_tokens(messages: list[dict[str, Any]], tool_specs: list[dict[str, Any]]) -> int:
        # An upper bound, not a guess: a token is at least one byte of UTF-8, plus a little
        # framing per message. Over-reserving only stops a run early; under-reserving could
        # let a call cross the cap.
        size = len(json.dumps(messages, default=str).encode()) + len(json.dumps(tool_specs).encode())
        return size + 8 * len(messages) + 16

    def reserve(self, model: ModelConfig | None, prompt_tokens: int, max_tokens: int) -> int:
        """The max_tokens this call may use (maybe trimmed); raises when even the minimum won't fit."""
        if model is None:  # the playbook costs nothing and uses no tokens
            return max_tokens
        minimum = min(self.min_output, max_tokens)
        tokens_left = self.token_cap - self.spent_tokens - prompt_tokens
        if tokens_left < minimum:
            raise TokenCapExceeded(self.spent_tokens, self.token_cap, prompt_tokens + minimum)
        allowed = min(max_tokens, tokens_left)
        out_price = model.output_usd_per_mtok / 1_000_000
        money_left = self.cost_cap - self.spent_usd - model.cost_usd(prompt_tokens, 0)
        if out_price > 0:
            allowed = min(allowed, math.floor(money_left / out_price)) if money_left > 0 else 0
        if allowed < minimum or money_left < 0:
            needed = model.cost_usd(prompt_tokens, minimum)
            raise CostCapExceeded(self.spent_usd, self.cost_cap, needed)
        return allowed

    def commit(self, model: ModelConfig | None, input_tokens: int, output_tokens: int) -> float:
        cost = model.cost_usd(input_tokens, output_tokens) if model else 0.0
        self.spent_usd += cost
        self.spent_tokens += input_tokens + output_tokens
        return cost


class Cooldowns(Protocol):
    def active(self) -> set[str]: ...
    def start(self, model: str, seconds: float, reason: str) -> None: ...
    def clear(self, model: str) -> None: ...


class MemoryCooldowns:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until: dict[str, float] = {}

    def active(self) -> set[str]:
        now = self.clock()
        return {m for m, t in self.until.items() if t > now}

    def start(self, model: str, seconds: float, reason: str) -> None:
        self.until[model] = self.clock() + seconds

    def clear(self, model: str) -> None:
        self.until.pop(model, None)


class DatabaseCooldowns:
    """Cool-downs in Postgres, so they hold across runs and processes (cron included)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def active(self) -> set[str]:
        return {r["model"] for r in self.db.all("model_cooldown_active")}

    def start(self, model: str, seconds: float, reason: str) -> None:
        self.db.execute("model_cooldown_set", model=model, seconds=seconds, reason=reason[:500])

    def clear(self, model: str) -> None:
        self.db.execute("model_cooldown_clear", model=model)


class ChainLimits(Protocol):
    """What the chain reads of the run's limits (agent.Limits has these fields)."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def retries(self) -> int: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...
    @property
    def cooldown_s(self) -> float: ...


@dataclass
class Link:
    model: ChatModel
    config: ModelConfig | None  # None for the playbook


class Chain:
    """The fallback chain: each model in order (retrying the retryable), then the playbook."""

    def __init__(
        self,
        links: Sequence[Link],
        cooldowns: Cooldowns,
        limits: ChainLimits,
        *,
        use_playbook: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.links, self.cooldowns, self.limits = list(links), cooldowns, limits
        self.use_playbook, self.sleep = use_playbook, sleep
        self.unconfigured: list[str] = []

    @classmethod
    def from_config(cls, config: Config, cooldowns: Cooldowns, limits: ChainLimits) -> Chain:
        models = [] if config.agent == "off" else list(config.models)
        # A model whose key is not configured would only fail (after retries): leave it out,
        # and say so in every trace. A keyless local endpoint needs its variable set to anything.
        chain = cls([Link(OpenAIChat(m), m) for m in models if m.api_key], cooldowns, limits)
        chain.unconfigured = [
            f"{m.name}: no API key ({m.api_key_env} unset)" for m in models if not m.api_key
        ]
        return chain

    @property
    def names(self) -> list[str]:
        return [link.model.name for link in self.links] + (["playbook"] if self.use_playbook else [])

    def complete(
        self, playbook: Playbook, messages: list[dict[str, Any]], specs: list[dict[str, Any]], budget: Budget,
        trace: Trace, deadline: float, unusable: dict[str, PiDeployError] | None = None,
    ) -> Completion:  # fmt: skip
        """The first link that answers, or the run's `playbook` when none does. `unusable`: the
        links this run gave up on, with why (answered unusably, see agent.LoopGuard; or a prompt
        or an answer too long for it, which only grow as the run goes on): skipped like a
        failing model, and added to here."""
        cooling = self.cooldowns.active() if self.links else set()
        failures: list[str] = list(self.unconfigured)
        for link in self.links:
            if unusable and link.model.name in unusable:
                failures.append(f"{link.model.name}: {unusable[link.model.name].message}")
                continue
            if link.model.name in cooling:
                failures.append(f"{link.model.name}: cooling down")
                continue
            try:
                return self._attempts(link, messages, specs, budget, trace, deadline)
            except ModelError as error:
                failures.append(error.message)
                if not isinstance(error, ModelContextOverflow | ModelOutputTruncated):
                    self.cool_down(link.model.name, error.message)
                elif unusable is not None:  # the model is fine, but not for this run
                    unusable[link.model.name] = error
        if not self.use_playbook:
            given_up = [e for e in (unusable or {}).values() if isinstance(e, RunEnded)]
            if self.links and len(given_up) == len(self.links):  # each answered badly: say how
                raise given_up[-1]
            raise ChainUnavailable(
                "every model of the chain failed: " + "; ".join(failures), failures=failures
            )
        trace.extra["playbook"] = True
        trace.extra.setdefault("chain_failures", failures)
        return self._call(Link(playbook, None), messages, specs, budget, trace, deadline, attempt=1)

    def cool_down(self, model: str, reason: str) -> None:
        """Skip `model` in every run, here and in other processes, for the cool-down period."""
        self.cooldowns.start(model, self.limits.cooldown_s, reason)

    def _attempts(
        self, link: Link, messages: list[dict[str, Any]], specs: list[dict[str, Any]], budget: Budget,
        trace: Trace, deadline: float,
    ) -> Completion:  # fmt: skip
        for attempt in range(1, self.limits.retries + 2):
            try:
                completion = self._call(link, messages, specs, budget, trace, deadline, attempt)
            except ModelError as error:
                if not error.retryable or attempt > self.limits.retries:
                    raise
                pause = min(self.limits.backoff_max_s, self.limits.backoff_s * 2 ** (attempt - 1))
                pause = max(pause * random.uniform(0.8, 1.2), error.retry_after or 0.0)  # noqa: S311
                if time.monotonic() + pause >= deadline:
                    # Waiting would outlast the run: this model's retries are spent, and the
                    # next model (or the playbook) may still finish in the time left.
                    raise
                self.sleep(pause)
                continue
            return completion
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _call(
        self, link: Link, messages: list[dict[str, Any]], specs: list[dict[str, Any]], budget: Budget,
        trace: Trace, deadline: float, attempt: int,
    ) -> Completion:  # fmt: skip
        prompt_tokens = budget.estimate_prompt_tokens(messages, specs)
        max_tokens = budget.reserve(link.config, prompt_tokens, self.limits.max_tokens)
        model_id = link.config.model if link.config else "playbook"
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model_id,
            "gen_ai.request.max_tokens": max_tokens,
            "pideploy.model_name": link.model.name,
            "pideploy.attempt": attempt,
        }
        if link.config:
            attributes["server.address"] = link.config.base_url
        with trace.span(f"chat {model_id}", **attributes) as span:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunTimedOut(self.limits.timeout_s)
            timeout = min(link.config.timeout if link.config else remaining, remaining)
            try:
                completion = _with_deadline(
                    lambda: link.model.complete(messages, specs, max_tokens, timeout), remaining
                )
            except ModelError as error:
                if error.consumed != (0, 0):  # the server worked before failing: that counts too
                    cost = budget.commit(link.config, *error.consumed)
                    span.set(**_usage(error.consumed, estimated=True, cost=cost))
                raise
            if link.config is not None:
                completion = _own_ids(completion)
            cost = budget.commit(link.config, completion.input_tokens, completion.output_tokens)
            span.set(
                **_usage(
                    (completion.input_tokens, completion.output_tokens), completion.usage_estimated, cost
                ),
                **{
                    "gen_ai.response.model": completion.response_model,
                    "gen_ai.response.finish_reasons": [completion.finish_reason],
                    "pideploy.ttft_s": completion.ttft_s,
                },
            )
            return dataclasses.replace(completion, cost_usd=cost, link=link.model.name)


def _usage(tokens: tuple[int, int], estimated: bool, cost: float) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": tokens[0],
        "gen_ai.usage.output_tokens": tokens[1],
        "pideploy.cost_usd": cost,
    }
    if estimated:  # never passed off as the server's own count
        attributes["pideploy.usage_estimated"] = True
    return attributes


def _own_ids(completion: Completion) -> Completion:
    """A model's tool call ids never pass for the playbook's (it counts its steps by them)."""
    calls = tuple(
        dataclasses.replace(c, id="model_" + c.id) if c.id.startswith(PLAYBOOK_CALL_PREFIX) else c
        for c in completion.tool_calls
    )
    return dataclasses.replace(completion, tool_calls=calls)


def _with_deadline(call: Callable[[], Completion], seconds: float) -> Completion:
    """Run a model call, but give up on it at the run's deadline (the thread is abandoned
    to its own read timeout; the loop does not wait for it)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as error:  # handed to the loop's thread below
            box["error"] = error

    worker = threading.Thread(target=target, name="model-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise RunTimedOut(seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
