"""How long the command line takes to answer, in one run: `python -c pass` (the interpreter
alone), `pideploy.py --help`, `instances --format json` and `tasks`, each the median of
several runs, and each as a multiple of `python -c pass`.

The listings run against the database a serve would use: DATABASE_URL when set, else an
embedded cluster this benchmark starts in a private home and holds for the whole run (so
each command attaches to it, as it does to a running serve's, instead of starting one).
Targets (issue 14): --help under 0.3 s, instances and tasks under 0.5 s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import db
from bench.queue_bench import _site

RUNS = 7
ROOT = Path(__file__).resolve().parent.parent
COMMANDS: list[tuple[str, list[str], float | None]] = [
    ("python -c pass", ["-c", "pass"], None),
    ("pideploy.py --help", ["pideploy.py", "--help"], 0.3),
    ("pideploy.py instances --format json", ["pideploy.py", "instances", "--format", "json"], 0.5),
    ("pideploy.py tasks", ["pideploy.py", "tasks"], 0.5),
]


def _time(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    return time.monotonic() - started


def main() -> None:
    with _site() as (home, config):
        env = {**os.environ, "PIDEPLOY_HOME": str(home), "PIDEPLOY_CONFIG": str(home / "pideploy.toml")}
        cluster = None
        if not config.database_url:
            cluster = db.EmbeddedPostgres(home)
            cluster.start()
        try:
            where = "DATABASE_URL" if config.database_url else "embedded, held by the bench"
            print(f"command line, median of {RUNS} runs (Postgres: {where}):")
            base = 0.0
            for label, args, target in COMMANDS:
                _time(args, env)  # warm: the first run pays for reading the files from disk
                median = statistics.median(_time(args, env) for _ in range(RUNS))
                base = base or median
                verdict = (
                    ""
                    if target is None
                    else f"   target < {target} s: {'ok' if median < target else 'MISSED'}"
                )
                print(f"  {label:38} {median:6.3f} s  {median / base:5.1f}x python -c pass{verdict}")
        finally:
            if cluster is not None:
                cluster.release()
