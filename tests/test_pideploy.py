"""pideploy.py, the wiring and the command line: what a quick command loads.

`--help`, `tasks` and `instances` are what an operator types most; they must not pay for
the agent loop (openai), the engine (docker), the heartbeat or the eval harness. Each
command runs in a fresh interpreter, which then lists the heavy modules it loaded.
(`make bench` measures how long the commands take; this only checks what they import.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db import Database

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("openai", "docker", "evals", "agent", "heartbeat")

# Runs pideploy.py as `python pideploy.py ARGS` would, then says which heavy modules it loaded.
PROBE = """
import json, runpy, sys
sys.argv = ["pideploy.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path("pideploy.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted({name.partition(".")[0] for name in sys.modules} & set(HEAVY))
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*args: str, env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + PROBE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stdout + done.stderr
    result: dict[str, object] = json.loads(lines[-1].removeprefix("PROBE "))
    return result


def test_help_loads_nothing_heavy(tmp_path: Path) -> None:
    env = {**os.environ, "PIDEPLOY_HOME": str(tmp_path / "pideploy")}
    assert probe("--help", env=env) == {"code": 0, "heavy": []}


@pytest.mark.stack  # a real PostgreSQL (the `database` fixture)
@pytest.mark.parametrize(
    "args", [("tasks",), ("tasks", "--format", "json"), ("instances", "--format", "json")]
)
def test_listings_load_nothing_heavy(
    args: tuple[str, ...], database: Database, database_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PIDEPLOY_HOME": str(tmp_path / "pideploy"), "DATABASE_URL": database_url}
    assert probe(*args, env=env) == {"code": 0, "heavy": []}


def test_importing_pideploy_loads_nothing_heavy() -> None:
    # One level down: what pideploy.py imports at the top.
    loaded = "{m.partition('.')[0] for m in sys.modules}"
    code = f"import sys, pideploy; print(sorted({loaded} & set({HEAVY!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
