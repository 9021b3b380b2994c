"""One errors story: a root PiDeployError, small subclasses that carry data.

Library exceptions (psycopg, docker, openai) are translated where they enter
piDeploy into one of these, and every class names its `error_class`, one of
the fixed classes the observability classifier reports (ERROR_CLASSES).
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_CLASSES = (
    "llm_api_error",
    "llm_rate_limited",
    "llm_timeout",
    "llm_bad_output",
    "llm_output_truncated",
    "tool_execution_error",
    "tool_refused",
    "agent_stuck",
    "cost_cap",
    "token_cap",
    "timeout",
    "infra_unavailable",
    "cancelled",
    "bad_request",
    "config_error",
)


class PiDeployError(Exception):
    """Root of every error piDeploy raises on purpose."""

    error_class: str = "infra_unavailable"  # an instance may narrow it (see agent.finish)

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return {"error_class": self.error_class, "message": self.message, **self.data}


# --- configuration and infrastructure ------------------------------------


class ConfigError(PiDeployError):
    """Invalid configuration: names the key and the file it came from."""

    error_class = "config_error"

    def __init__(self, message: str, *, key: str = "", source: str = "") -> None:
        super().__init__(message, key=key, source=source)
        self.key = key
        self.source = source


class InfraUnavailable(PiDeployError):
    """A system piDeploy depends on (Postgres, engine, nginx) cannot be used."""

    error_class = "infra_unavailable"


class DatabaseError(InfraUnavailable):
    """A psycopg error, translated where it entered."""


class EngineError(InfraUnavailable):
    """A container engine error, translated where it entered."""


class EngineUnreachable(EngineError):
    """The engine did not answer (no socket, a cut connection, a timeout): an outage, not a refusal."""


class ProxyError(InfraUnavailable):
    """nginx could not be configured or reloaded."""


class BadRequest(PiDeployError):
    """Input from a client (HTTP, CLI) is invalid; nothing was changed."""

    error_class = "bad_request"


class NotFound(BadRequest):
    """The thing asked for does not exist (or is not the caller's)."""


class Conflict(BadRequest):
    """The action is not valid in the current state."""


# --- tools ---------------------------------------------------------------


class ToolError(PiDeployError):
    """A tool failed; the loop hands the message back to the model."""

    error_class = "tool_execution_error"


class ToolArgumentError(ToolError):
    """The model's arguments do not match the tool's JSON Schema."""

    error_class = "llm_bad_output"


class ToolRefused(ToolError):
    """A safety rule (ownership, the bash gate, a state check) refused the call."""

    error_class = "tool_refused"


class SandboxFailed(ToolError):
    """The kernel has Landlock but the bash gate's sandbox could not be set up: nothing ran."""


class HealthCheckFailed(ToolError):
    """An instance did not answer its health check within the bounded wait."""


class RolledBack(ToolError):
    """A step failed and what had been done was undone; carries the cause."""


# --- the agent loop ------------------------------------------------------


class RunEnded(PiDeployError):
    """Base of every way a run ends other than report_result."""


class RunCrashed(PiDeployError):
    """A run ended in an unexpected exception (its __cause__), not a limit: its trace was written
    all the same, and the task row keeps the trace's name."""

    def __init__(self, cause: Exception, error_class: str, trace_file: str) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}", trace_file=trace_file)
        self.error_class = error_class


class AgentStuck(RunEnded):
    error_class = "agent_stuck"


class CostCapExceeded(RunEnded):
    error_class = "cost_cap"

    def __init__(self, spent_usd: float, cap_usd: float, needed_usd: float = 0.0) -> None:
        super().__init__(
            f"cost cap reached: spent ${spent_usd:.6f}, next call needs ${needed_usd:.6f}, "
            f"cap ${cap_usd:.6f}",
            spent_usd=spent_usd,
            cap_usd=cap_usd,
            needed_usd=needed_usd,
        )


class TokenCapExceeded(RunEnded):
    error_class = "token_cap"

    def __init__(self, spent_tokens: int, cap_tokens: int, needed_tokens: int = 0) -> None:
        super().__init__(
            f"token cap reached: spent {spent_tokens}, next call needs {needed_tokens}, cap {cap_tokens}",
            spent_tokens=spent_tokens,
            cap_tokens=cap_tokens,
            needed_tokens=needed_tokens,
        )


class RunTimedOut(RunEnded):
    error_class = "timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"run timed out after {seconds:.1f}s", seconds=seconds)


class RunCancelled(RunEnded):
    error_class = "cancelled"


class TooManyTurns(RunEnded):
    error_class = "agent_stuck"

    def __init__(self, turns: int) -> None:
        super().__init__(f"no report_result after {turns} turns", turns=turns)


class BadModelOutput(RunEnded):
    """The model kept answering with something unusable."""

    error_class = "llm_bad_output"


# --- models --------------------------------------------------------------


class ModelError(PiDeployError):
    """A chat-completions call failed; `retryable` says whether to try again."""

    error_class = "llm_api_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        retry_after: float | None = None,
        consumed: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__(message, model=model)
        self.model = model
        self.retry_after = retry_after
        # (input, output) tokens the server spent before the call failed (a cut stream, a
        # timeout while it generated): charged against the caps like an answer's, estimated.
        self.consumed = consumed


class ModelRateLimited(ModelError):
    error_class = "llm_rate_limited"
    retryable = True


class ModelTimeout(ModelError):
    error_class = "llm_timeout"
    retryable = True


class ModelServerError(ModelError):
    """5xx or a dropped connection: worth retrying."""

    retryable = True


class ModelRejected(ModelError):
    """Auth, model not found, a bad request: move to the next model."""


class ModelContextOverflow(ModelRejected):
    """The prompt is longer than the model's context (a 400, or llama.cpp's empty stream): the
    next model may have a longer one; no cool-down, the model itself is fine."""


class ModelOutputTruncated(ModelRejected):
    """The answer was cut at max_tokens (finish_reason "length"): half a tool call is no answer.
    The next link may be terser; no cool-down."""

    error_class = "llm_output_truncated"


class ChainUnavailable(RunEnded):
    """Every model of the chain failed and no playbook may run."""

    error_class = "llm_api_error"


class ContainerNotFound(EngineError):
    """The engine has no such container (already removed, or never created)."""


class ImageNotFound(EngineError):
    """The image is not in the engine's store (and nothing can be pulled here)."""
