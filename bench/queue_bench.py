"""The queue's own figures, in one run:

1. tasks/s for no-op tasks with 1, 2 and 4 workers: claim, lease thread,
   record; nothing else (the queue's own overhead, on the embedded Postgres
   or DATABASE_URL).
2. submit-to-running latency of instance_create: through the queue and the
   agent loop driven by the replayed model (evals/llm_server.py), against the
   tool called directly (the agent loop's and the queue's overhead). On the
   real engine and nginx when DOCKER_HOST answers and has the gateway image,
   else in memory (said in the output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agent
import config as config_module
import db
import models
import pideploy
import tasks
import tools
from engine import LABEL_NAMESPACE, DockerEngine, Engine, MemoryEngine
from errors import PiDeployError
from evals.llm_server import ReplayServer
from localio import free_port
from observability import Outcome
from proxy import MemoryProxy, NginxProxy, Proxy

NOOP_TASKS = 300
LATENCY_RUNS = 5
NOOP = Outcome("succeeded", {}, None, None, 0, 0.0, 0, "")

REPLAY_SCRIPT = {
    "conversations": [
        {
            "id": "create",
            "match": '"type": "instance_create"',
            "turns": [
                {"tool_calls": [{"name": "instance_create", "arguments": {"name": "{{task.params.name}}"}}]},
                {
                    "tool_calls": [
                        {
                            "name": "report_result",
                            "arguments": {
                                "success": True,
                                "action": "created",
                                "data": {"instance_id": "{{last_result.instance_id}}"},
                            },
                        }
                    ]
                },
            ],
        }
    ]
}


@contextlib.contextmanager
def _site() -> Iterator[tuple[Path, config_module.Config]]:
    """A private home (short, under /tmp: the embedded cluster's socket lives there)."""
    home = Path(tempfile.mkdtemp(prefix="pdb-", dir="/tmp"))
    replay_toml = home / "pideploy.toml"
    replay_toml.write_text("models = []\n")
    env = {
        "PIDEPLOY_HOME": str(home),
        "PIDEPLOY_CONFIG": str(replay_toml),
        "PIDEPLOY_NAMESPACE": f"bench{uuid.uuid4().hex[:8]}",
        "PIDEPLOY_NGINX_LISTEN": f"127.0.0.1:{free_port()}",
    }
    for name in ("DATABASE_URL", "DOCKER_HOST"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    try:
        yield home, config_module.load(env=env, cwd=home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _unfinished(database: db.Database) -> int:
    return sum(int(r["n"]) for r in database.all("metrics_tasks") if r["status"] in ("queued", "running"))


def throughput(database: db.Database) -> None:
    queue = tasks.Queue(database)
    where = "DATABASE_URL" if database.conninfo.startswith(("postgres", "postgresql")) else "embedded"
    print(f"queue throughput, no-op tasks ({NOOP_TASKS} per run, Postgres: {where}):")
    for workers in (1, 2, 4):
        started = time.monotonic()
        for _ in range(NOOP_TASKS):
            queue.submit("heartbeat", tasks.SYSTEM_USER)
        submit_s = time.monotonic() - started
        pool = tasks.WorkerPool(queue, lambda: lambda task, cancelled: NOOP, workers, poll_interval=0.5)
        started = time.monotonic()
        pool.start()
        while _unfinished(database):
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        pool.shutdown(1)
        print(
            f"  {workers} worker{'s' if workers > 1 else ' '}: {NOOP_TASKS / elapsed:7.0f} tasks/s"
            f"   (submit: {NOOP_TASKS / submit_s:.0f} tasks/s)"
        )


def _world(config: config_module.Config) -> tuple[Engine, Proxy, str]:
    try:
        real = DockerEngine(config.docker_host or None, timeout=10)
        real.version()
        if real.image_exists(config.image):
            proxy = NginxProxy.embedded(
                config.home / "nginx", config.nginx_listen, config.nginx_bin, base_url=config.routes_url
            )
            proxy.ensure_running()
            return real, proxy, f"real engine at {real.where}, embedded nginx"
        why = f"image {config.image} missing"
    except PiDeployError as error:
        why = error.message
    return MemoryEngine(), MemoryProxy(), f"in memory ({why}; run `make bench` for the real stack)"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s  [{min(values):.3f}-{max(values):.3f}]"


def latency(database: db.Database, base: config_module.Config) -> None:
    engine, proxy, world = _world(base)
    names: list[str] = []
    try:
        with ReplayServer(REPLAY_SCRIPT) as replay:
            model = config_module.ModelConfig(
                name="replay", base_url=replay.url, model="replay", api_key_env="X", api_key="bench"
            )
            config = dataclasses.replace(base, agent="on", models=(model,))
            rt = tools.Runtime(config, database, engine, proxy)
            direct: list[tuple[float, float]] = []
            for i in range(LATENCY_RUNS):
                names.append(f"direct-{i}")
                direct.append(_direct_create(rt, names[-1]))
            queue = tasks.Queue(database)
            pool = tasks.WorkerPool(queue, lambda: pideploy.task_runner(rt, config), 1, poll_interval=0.5)
            pool.start()
            queued: list[tuple[float, float]] = []
            pickup: list[float] = []
            for i in range(LATENCY_RUNS):
                names.append(f"queued-{i}")
                row, submitted = queue.submit_create("bench", names[-1], None, config.image, None)
                task = _wait(queue, submitted.task["id"])
                if task["status"] != "succeeded":
                    raise RuntimeError(f"queued create {names[-1]} failed: {task['last_error']}")
                submitted_at = task["created_at"].timestamp()
                queued.append(
                    (
                        _running_at(database, row["id"]) - submitted_at,
                        task["finished_at"].timestamp() - submitted_at,
                    )
                )
                pickup.append((task["started_at"] - task["created_at"]).total_seconds())
            pool.shutdown(5)
            served = len(replay.requests)
        if served < 2 * LATENCY_RUNS:  # else the figure would be the playbook's, not the loop's
            raise RuntimeError(f"the replayed model served {served} calls for {LATENCY_RUNS} queued creates")
        print(f"instance_create latency ({world}; {LATENCY_RUNS} runs each, median [min-max]):")
        print(
            "  'running' = the instance row turns running; 'done' = the call returns / the task is recorded"
        )
        for label, runs in (("tool called directly", direct), ("queue + agent loop, replayed model", queued)):
            print(
                f"  {label:<35} running {_median([r for r, _ in runs])}   done {_median([d for _, d in runs])}"
            )
        print(f"  {'of which submit-to-claim':<35}         {_median(pickup)}")
        overhead = statistics.median(d for _, d in queued) - statistics.median(d for _, d in direct)
        print(
            f"  queue + loop overhead to done (median): {overhead * 1000:+.0f} ms ({served} model calls served)"
        )
    finally:
        _clean(database, engine, proxy, base, names)


def _running_at(database: db.Database, instance_id: int) -> float:
    """When the instance turned running: its `created` event, stamped by the database."""
    events = database.all("event_list_for_instance", instance_id=instance_id, limit=50)
    return float(min(e["created_at"].timestamp() for e in events if e["kind"] == "created"))


def _context(rt: tools.Runtime, name: str) -> tools.ToolContext:
    spec = agent.TaskSpec("instance_create", "bench", {"name": name})
    chain = models.Chain([], models.MemoryCooldowns(), agent.Limits())
    return tools.ToolContext(agent.new_trace(spec, rt.config, chain), "bench")


def _direct_create(rt: tools.Runtime, name: str) -> tuple[float, float]:
    """(to running, to done) in seconds; wall clock and the database's clock are the same host's."""
    started = time.time()
    result = tools.instance_create(rt, _context(rt, name), name=name)
    done = time.time() - started
    return _running_at(rt.db, result["instance_id"]) - started, done


def _wait(queue: tasks.Queue, task_id: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = queue.get(task_id)
        if task["finished_at"] is not None:
            return task
        time.sleep(0.02)
    raise RuntimeError(f"task {task_id} did not finish within {timeout}s")


def _clean(
    database: db.Database, engine: Engine, proxy: Proxy, config: config_module.Config, names: list[str]
) -> None:
    rt = tools.Runtime(config, database, engine, proxy)
    for name in names:
        row = database.one("instance_by_name", user_id="bench", name=name)
        if row is not None:
            with contextlib.suppress(PiDeployError):
                tools.instance_delete(rt, _context(rt, name), row["id"])
    for container in engine.list({LABEL_NAMESPACE: config.namespace}):
        with contextlib.suppress(PiDeployError):
            engine.remove(container.id)
    if isinstance(proxy, NginxProxy):
        proxy.close(stop=True)
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def main() -> None:
    with _site() as (_, config):
        postgres = db.Postgres(config, max_size=16)
        try:
            throughput(postgres.db)
            latency(postgres.db, config)
        finally:
            postgres.close()


if __name__ == "__main__":
    main()
