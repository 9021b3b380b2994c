"""`make eval`: replay (or run live) every case of the dataset and score each run.

A case (evals/cases/<id>.json; the README's "Evals" section has the format)
holds a starting world, the task(s) or heartbeat round(s) to run, the model
turns recorded from a run, and the expectations. For each case this module:

1. builds the starting world for real: a fresh database on one embedded
   PostgreSQL cluster, its own namespace, an embedded nginx on a free port,
   instances made with the real tools and then stopped, killed or removed,
   fault files written into their storage, ports held by another process;
2. serves the recorded turns from the local OpenAI-compatible replay server
   (evals/llm_server.py) to the case's model chain, or, with --live, uses the
   configured real chain (pideploy.toml [[models]]);
3. runs the real loop and tools (`agent.run_task`, `Heartbeat.round`);
4. scores the run from its traces and the world it left: `completed`,
   `expected_tools`, `cost_reasonable`, `no_loops`, `world_ok` (a run passes
   when all five hold);
5. tears everything down (containers, nginx, database).

On a machine without the container engine or nginx it falls back to the
in-memory engine and proxy, unless CI is set: then a missing stack is an error.
Replay mode exits 1 if any case fails; live mode runs each case k times and
exits 1 if the share of cases passing all k runs (pass^k) is below
`eval_pass_threshold`. Exit 2: a bad case file or a missing stack.

This module runs and scores the cases and writes the report; the case format
is evals/casefile.py's, the stack and each case's world evals/world.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agent
import config as config_module
import db
import models
import tools
from config import Config, ModelConfig
from errors import PiDeployError
from evals.casefile import CASES_DIR, CaseError, expectations, fill_world, load_cases
from evals.llm_server import ReplayServer
from evals.world import Clock, Site, StepResult, World, check_world
from localio import free_port, write_atomic
from proxy import MemoryProxy, NginxProxy, Proxy

logger = logging.getLogger(__name__)

DEFAULT_REPORT = Path("artifacts/eval-report.json")
SCORES = ("completed", "expected_tools", "cost_reasonable", "no_loops", "world_ok")
DEFAULT_MODEL = {"name": "minimax-m2.5-free", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}
# Settings every case starts from (a case's world.settings override them).
BASE_SETTINGS = {"health_timeout": 10, "stop_timeout": 3}


# ---------------------------------------------------------------------------
# Scoring: pure functions of the step results, the expectations and the world check
# ---------------------------------------------------------------------------


def spans(trace: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [trace["spans"]]
    while stack:
        span = stack.pop()
        yield span
        stack.extend(span.get("children", []))


def tool_spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    found = [s for s in spans(trace) if s["attributes"].get("gen_ai.operation.name") == "execute_tool"]
    return sorted(found, key=lambda s: s["start"])


def max_repeats(trace: dict[str, Any]) -> tuple[int, str]:
    """The most times one tool was asked for with the same arguments in a run, and which."""
    counts: dict[tuple[str, str], int] = {}
    for message in trace.get("transcript", []):
        for call in message.get("tool_calls") or [] if message.get("role") == "assistant" else []:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            with contextlib.suppress(ValueError):
                arguments = json.dumps(json.loads(arguments or "{}"), sort_keys=True)
            counts[(name, arguments)] = counts.get((name, arguments), 0) + 1
    if not counts:
        return 0, ""
    (name, arguments), most = max(counts.items(), key=lambda item: item[1])
    return most, f"{name} {arguments}"


@dataclass
class Figures:
    turns: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


def figures(steps: list[StepResult]) -> Figures:
    traces = [t for s in steps for t in s.traces]
    return Figures(
        turns=sum(int(t["summary"]["turns"]) for t in traces),
        tokens=sum(int(t["summary"]["total_tokens"]) for t in traces),
        cost_usd=round(sum(float(t["summary"]["cost_usd"]) for t in traces), 8),
        seconds=round(sum(s.seconds for s in steps), 3),
    )


def score(
    expect: dict[str, Any], steps: list[StepResult], world_problems: list[str], replay_errors: list[str]
) -> tuple[dict[str, bool], list[str]]:
    """The five scores and, for each one that fails, why."""
    problems: dict[str, list[str]] = {name: [] for name in SCORES}
    traces = [t for s in steps for t in s.traces]

    for index, (step, wanted) in enumerate(zip(steps, expect["outcomes"], strict=True)):
        where = f"step {index + 1} ({step.kind})"
        if step.status != wanted["status"]:
            problems["completed"].append(
                f"{where} ended {step.status} ({step.error_class}), expected {wanted['status']}"
            )
        elif "error_class" in wanted and step.error_class != wanted["error_class"]:
            problems["completed"].append(
                f"{where} failed with {step.error_class}, expected {wanted['error_class']}"
            )
        if step.reported != wanted.get("reported", True):
            ended = "with report_result" if step.reported else f"without report_result ({step.error_class})"
            problems["completed"].append(f"{where} ended {ended}")
    # The playbook standing in for failed models (not a heartbeat's deliberate playbook-only run).
    playbook = any(
        t["summary"].get("playbook") and any(m != "playbook" for m in t.get("model_chain", []))
        for t in traces
    )
    if "playbook" in expect and playbook != expect["playbook"]:
        problems["completed"].append("the playbook " + ("answered" if playbook else "did not answer"))
    if "models_answered" in expect:
        answered = sorted(
            {
                str(s["attributes"].get("pideploy.model_name"))
                for t in traces
                for s in spans(t)
                if s["attributes"].get("gen_ai.operation.name") == "chat"
                and s["status"] == "ok"
                and s["attributes"].get("pideploy.model_name") != "playbook"
            }
        )
        if answered != sorted(expect["models_answered"]):
            problems["completed"].append(
                f"models that answered: {answered}, expected {sorted(expect['models_answered'])}"
            )
    problems["completed"] += [f"the run left the recorded turns: {e}" for e in replay_errors[:3]]

    called = {s["attributes"].get("gen_ai.tool.name") for t in traces for s in tool_spans(t)}
    refused = {
        s["attributes"].get("gen_ai.tool.name")
        for t in traces
        for s in tool_spans(t)
        if s["attributes"].get("error.type") == "tool_refused"
    }
    for tool in expect.get("tools_required", []):
        if tool not in called:
            problems["expected_tools"].append(f"{tool} was not called")
    for tool in expect.get("tools_forbidden", []):
        if tool in called:
            problems["expected_tools"].append(f"{tool} was called")
    for tool in expect.get("tools_refused", []):
        if tool not in refused:
            problems["expected_tools"].append(f"{tool} was not refused")

    total = figures(steps)
    if total.cost_usd > expect["max_cost_usd"]:
        problems["cost_reasonable"].append(f"cost ${total.cost_usd:.4f} > cap ${expect['max_cost_usd']:.4f}")

    if total.turns > expect["max_turns"]:
        problems["no_loops"].append(f"{total.turns} turns > {expect['max_turns']}")
    limit = expect.get("max_repeats", 1)
    for trace in traces:
        most, what = max_repeats(trace)
        if most > limit:
            problems["no_loops"].append(f"{what} asked for {most} times (at most {limit})")

    problems["world_ok"] = list(world_problems)
    scores = {name: not problems[name] for name in SCORES}
    return scores, [f"{name}: {p}" for name in SCORES for p in problems[name]]


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------


@dataclass
class RunRecord:
    case: str
    attempt: int
    scores: dict[str, bool]
    problems: list[str]
    figures: Figures
    trace_files: list[str]
    setup_s: float = 0.0
    error: str | None = None  # the runner itself failed (world build, teardown)

    @property
    def passed(self) -> bool:
        return self.error is None and all(self.scores.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "passed": self.passed,
            "scores": self.scores,
            "problems": self.problems,
            "turns": self.figures.turns,
            "tokens": self.figures.tokens,
            "cost_usd": self.figures.cost_usd,
            "run_s": self.figures.seconds,
            "setup_s": round(self.setup_s, 3),
            "trace_files": self.trace_files,
            "error": self.error,
        }


# What a case's run owns whatever the mode: its own data dir, namespace, nginx and database.
_CASE_OWNED = ("home", "namespace", "nginx_listen", "nginx_bin", "nginx_map", "trace_dir", "database_url",
               "docker_host", "port_range", "alerts_file", "lock_dir")  # fmt: skip


def case_config(
    site: Site, case: dict[str, Any], home: Path, conninfo: str, traces: Path, operator: Config | None = None
) -> Config:
    """The settings of one case's run. Replay: the eval's own (short health waits). Live
    (`operator`, the operator's loaded settings): the operator's max_tokens, timeouts, caps and
    port range, with only what the run must own and the case's own settings changed."""
    case_settings = case["world"].get("settings", {})
    settings = case_settings if operator is not None else {**BASE_SETTINGS, **case_settings}
    env = {
        "PIDEPLOY_HOME": str(home),
        "PIDEPLOY_NAMESPACE": f"ev{uuid.uuid4().hex[:8]}",
        "PIDEPLOY_NGINX_LISTEN": f"127.0.0.1:{free_port()}",
        "PIDEPLOY_NGINX_BIN": site.nginx_bin,
        "PIDEPLOY_PORT_RANGE": site.port_range(operator.ports if operator is not None else None),
        "PIDEPLOY_TRACE_DIR": str(traces),
        "DATABASE_URL": conninfo,
        **{"PIDEPLOY_" + key.upper(): str(value) for key, value in settings.items()},
    }
    if site.docker_host:
        env["DOCKER_HOST"] = site.docker_host
    own = config_module.load(env=env, cwd=home, auth_path=home / "no-auth.json")
    if operator is None:
        return own
    changed = {key: getattr(own, key) for key in (*_CASE_OWNED, *case_settings)}
    return dataclasses.replace(operator, **changed)


_COMPAT = ("stream", "tool_choice", "send_usage_request", "tool_schema")


def replay_models(case: dict[str, Any], url: str) -> list[ModelConfig]:
    return [
        ModelConfig(
            name=m["name"],
            base_url=url,
            model=m["name"],
            api_key_env="EVAL_REPLAY_KEY",
            input_usd_per_mtok=float(m.get("input_usd_per_mtok", 0.0)),
            output_usd_per_mtok=float(m.get("output_usd_per_mtok", 0.0)),
            timeout=15.0,
            api_key="replay",
            **{key: m[key] for key in _COMPAT if key in m},
        )
        for m in case.get("models") or [DEFAULT_MODEL]
    ]


def run_case(case: dict[str, Any], site: Site, attempt: int = 1, operator: Config | None = None) -> RunRecord:
    """Build the case's world, run its steps, score them, tear it all down. `operator`: live
    mode, with the operator's settings and model chain."""
    live = operator is not None
    traces = site.trace_root / case["id"] / f"run-{attempt}"
    shutil.rmtree(traces, ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="pdc-", dir="/tmp"))
    started = time.monotonic()
    empty = Figures()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, home, True)
        try:
            conninfo = cleanup.enter_context(site.database())
            config = case_config(site, case, home, conninfo, traces, operator)
            database = db.Database(conninfo)
            cleanup.callback(database.close)
            database.apply_schema()
            proxy: Proxy = (
                NginxProxy.embedded(home / "nginx", config.nginx_listen, config.nginx_bin)
                if site.real
                else MemoryProxy()
            )
            if isinstance(proxy, NginxProxy):
                cleanup.callback(proxy.close, True)
            proxy.ensure_running()
            engine = site.engine()
            world = World(tools.Runtime(config, database, engine, proxy))
            cleanup.callback(world.close)
            world.build(case["world"])
            replay = None
            if operator is not None:
                configs = list(operator.models if operator.agent == "on" else ())
            else:
                script = fill_world(case["recorded_turns"], world.values)
                replay = cleanup.enter_context(ReplayServer(script))
                configs = replay_models(case, replay.url)
            config = dataclasses.replace(config, models=tuple(configs))
            world.rt = dataclasses.replace(world.rt, config=config)
            limits = dataclasses.replace(agent.Limits.from_config(config), **case.get("limits", {}))
            links = [models.Link(models.OpenAIChat(m), m) for m in configs]
            sleep = time.sleep if live else (lambda _: None)  # replayed backoff is not worth waiting for
            chain = models.Chain(links, models.MemoryCooldowns(), limits, sleep=sleep)
            setup_s = time.monotonic() - started
            steps = _run_steps(case, world, chain, limits)
            world_problems = check_world(world, case["expect"]["world"])
            errors = replay.recorded()[1] if replay else []
            scores, problems = score(expectations(case, live), steps, world_problems, errors)
            trace_files = sorted(str(p) for p in traces.glob("*.json"))
            return RunRecord(case["id"], attempt, scores, problems, figures(steps), trace_files, setup_s)
        except Exception as error:  # one case's runner failure must not hide the others' results
            logger.exception("eval case %s failed to run", case["id"], extra={"action": "eval_case_error"})
            message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            failed = {name: False for name in SCORES}
            return RunRecord(case["id"], attempt, failed, [f"runner: {message}"], empty, [], error=message)
    raise AssertionError("unreachable")


def _run_steps(
    case: dict[str, Any], world: World, chain: models.Chain, limits: agent.Limits
) -> list[StepResult]:
    import heartbeat  # here: a replay of task cases needs nothing of it

    clock = Clock()
    beat = heartbeat.Heartbeat(world.rt, world.rt.config, chain=chain, clock=clock)
    results = []
    for step in case["run"]:
        if "heartbeat" in step:
            results.append(world.run_heartbeat(step, beat, clock))
        else:
            results.append(world.run_task(step, chain, limits))
    return results


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def replay_table(records: list[RunRecord]) -> str:
    width = max([len("case"), *(len(r.case) for r in records)])
    head = (
        f"{'case':<{width}}  completed  tools  cost  loops  world  turns  tokens      cost$   time  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        s, f = r.scores, r.figures
        verdict = "ERROR" if r.error else ("pass" if r.passed else "FAIL")
        lines.append(
            f"{r.case:<{width}}  {_mark(s['completed']):<9}  {_mark(s['expected_tools']):<5}  "
            f"{_mark(s['cost_reasonable']):<4}  {_mark(s['no_loops']):<5}  {_mark(s['world_ok']):<5}  "
            f"{f.turns:>5}  {f.tokens:>6}  {f.cost_usd:>9.5f}  {f.seconds:>5.1f}s  {verdict}"
        )
    return "\n".join(lines)


@dataclass
class CaseSummary:
    case: str
    runs: list[RunRecord]
    skipped: str = ""

    @property
    def pass_k(self) -> bool:
        return bool(self.runs) and all(r.passed for r in self.runs)

    @property
    def pass_at_1(self) -> float:
        return sum(r.passed for r in self.runs) / len(self.runs) if self.runs else 0.0

    def mean(self, value: str) -> float:
        numbers = [float(getattr(r.figures, value)) for r in self.runs]
        return sum(numbers) / len(numbers) if numbers else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "skipped": self.skipped or None,
            "pass_k": self.pass_k,
            "pass_at_1": round(self.pass_at_1, 4),
            "mean_turns": round(self.mean("turns"), 2),
            "mean_tokens": round(self.mean("tokens"), 1),
            "mean_cost_usd": round(self.mean("cost_usd"), 8),
            "mean_run_s": round(self.mean("seconds"), 3),
            "runs": [r.to_dict() for r in self.runs],
        }


def live_table(summaries: list[CaseSummary], k: int) -> str:
    width = max([len("case"), *(len(s.case) for s in summaries)])
    head = (
        f"{'case':<{width}}  pass^{k:<3} pass@1  completed  tools  cost  loops  world  "
        "turns   tokens      cost$    time"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        if s.skipped:
            lines.append(f"{s.case:<{width}}  skipped: {s.skipped}")
            continue
        counts = "  ".join(
            f"{sum(r.scores[name] for r in s.runs)}/{len(s.runs)}".ljust(w)
            for name, w in zip(SCORES, (9, 5, 4, 5, 5), strict=True)
        )
        lines.append(
            f"{s.case:<{width}}  {'yes' if s.pass_k else 'no':<8} {s.pass_at_1:>6.2f}  {counts}  "
            f"{s.mean('turns'):>5.1f}  {s.mean('tokens'):>7.0f}  {s.mean('cost_usd'):>9.5f}  {s.mean('seconds'):>5.1f}s"
        )
    return "\n".join(lines)


def problems_text(records: list[RunRecord]) -> str:
    lines = []
    for r in records:
        if not r.passed:
            lines.append(f"{r.case} (run {r.attempt}):")
            lines += [f"  {p}" for p in r.problems]
            lines += [f"  trace {t}" for t in r.trace_files[-3:]]
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--live", action="store_true", help="the configured real model chain instead of the recorded turns"
    )
    parser.add_argument("--k", type=int, default=3, help="live mode: runs per case (default 3)")
    parser.add_argument(
        "--case", action="append", dest="cases", metavar="ID", help="only this case (repeatable)"
    )
    parser.add_argument(
        "--report", type=Path, default=DEFAULT_REPORT, help=f"JSON report (default {DEFAULT_REPORT})"
    )
    parser.add_argument("--cases-dir", type=Path, default=CASES_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    # The terminal gets the table; the loop's and the tools' own logs go to a file beside the report.
    handler = logging.FileHandler(args.report.with_suffix(".log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return _main(args)
    finally:
        root.removeHandler(handler)
        handler.close()


def _main(args: argparse.Namespace) -> int:
    try:
        cases = load_cases(args.cases_dir, args.cases)
        operator = config_module.load() if args.live else None
    except (CaseError, PiDeployError) as error:
        print(f"eval: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 2
    trace_root = args.report.parent / "eval-traces"
    started = time.monotonic()
    try:
        with Site.open(trace_root) as site:
            print(
                f"eval: {len(cases)} case(s), {'live' if operator else 'replay'} mode, {site.where}",
                flush=True,
            )
            if operator is not None:
                return _live(cases, site, operator, args, started)
            return _replay(cases, site, args, started)
    except PiDeployError as error:
        print(f"eval: {error.message}", file=sys.stderr)
        return 2


def _replay(cases: list[dict[str, Any]], site: Site, args: argparse.Namespace, started: float) -> int:
    records = []
    for case in cases:
        record = run_case(case, site)
        if case.get("needs_review"):
            record.scores["completed"] = False
            record.problems.insert(
                0, "completed: the expectations were drafted by `eval record` and need review"
            )
        records.append(record)
        print(
            f"  {case['id']}: {'pass' if record.passed else 'FAIL'} ({record.figures.seconds + record.setup_s:.1f}s)",
            flush=True,
        )
    passed = sum(r.passed for r in records)
    wall = time.monotonic() - started
    print()
    print(replay_table(records))
    if passed < len(records):
        print()
        print(problems_text(records))
    summary = f"{passed} passed, {len(records) - passed} failed"
    print()
    print(f"{summary} in {wall:.1f}s (report: {args.report})")
    write_report(
        args.report,
        {
            "mode": "replay",
            "stack": site.where,
            "wall_s": round(wall, 2),
            "summary": {"passed": passed, "failed": len(records) - passed, "line": summary},
            "cases": [CaseSummary(r.case, [r]).to_dict() for r in records],
        },
    )
    return 0 if passed == len(records) else 1


def _live(
    cases: list[dict[str, Any]], site: Site, operator: Config, args: argparse.Namespace, started: float
) -> int:
    models = operator.models if operator.agent == "on" else ()
    for model in models:
        if not model.api_key:
            print(
                f"eval: warning: model {model.name} has no API key (set {model.api_key_env})", file=sys.stderr
            )
    summaries: list[CaseSummary] = []
    for case in cases:
        if not case.get("live", True):
            summaries.append(
                CaseSummary(case["id"], [], skipped="replay only (its fault is in the recorded model)")
            )
            continue
        runs = [run_case(case, site, attempt, operator) for attempt in range(1, args.k + 1)]
        summaries.append(CaseSummary(case["id"], runs))
        print(f"  {case['id']}: pass^{args.k} {'yes' if summaries[-1].pass_k else 'no'}", flush=True)
    ran = [s for s in summaries if not s.skipped]
    if not ran:
        print(
            "eval: none of these cases runs in live mode (their faults are in the recorded model)",
            file=sys.stderr,
        )
        return 2
    pass_k = sum(s.pass_k for s in ran) / len(ran) if ran else 0.0
    pass_1 = sum(s.pass_at_1 for s in ran) / len(ran) if ran else 0.0
    wall = time.monotonic() - started
    print()
    print(live_table(summaries, args.k))
    failing = [r for s in ran for r in s.runs if not r.passed]
    if failing:
        print()
        print(problems_text(failing))
    passed = sum(s.pass_k for s in ran)
    summary = f"{passed} passed, {len(ran) - passed} failed"
    verdict = "ok" if pass_k >= operator.eval_pass_threshold else "below"
    print()
    print(
        f"{summary}, {len(summaries) - len(ran)} skipped (a case passes when all {args.k} runs pass): "
        f"pass^{args.k} {pass_k:.2f}, "
        f"pass@1 {pass_1:.2f}; threshold {operator.eval_pass_threshold:.2f}: {verdict}; "
        f"chain {', '.join(m.name for m in models) or 'playbook only'}; {wall:.1f}s (report: {args.report})"
    )
    write_report(
        args.report,
        {
            "mode": "live",
            "k": args.k,
            "stack": site.where,
            "models": [m.name for m in models],
            "wall_s": round(wall, 2),
            "summary": {
                "passed": passed,
                "failed": len(ran) - passed,
                "skipped": len(summaries) - len(ran),
                "pass_k": round(pass_k, 4),
                "pass_at_1": round(pass_1, 4),
                "threshold": operator.eval_pass_threshold,
                "line": summary,
            },
            "cases": [s.to_dict() for s in summaries],
        },
    )
    return 0 if pass_k >= operator.eval_pass_threshold else 1


if __name__ == "__main__":
    sys.exit(main())
