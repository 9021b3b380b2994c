"""The dashboard in a real browser, over a real `serve` on the real stack (`make e2e`).

Debian's Chromium (/usr/bin/chromium), driven by Playwright's Python package
(no browser download). The module starts, and stops again, two processes of
its own: the replay model server (`python -m evals.llm_server`, one script that
answers every task type by a `match` on the task JSON) and
`pideploy.py serve --no-heartbeat` with its own home, namespace and ports.
State is only ever waited for with Playwright's auto-waiting `expect(...)`.

Screenshots of each step go to artifacts/e2e/ (NN-step.png), with the serve
log and the step timings. The run can be repeated on one machine: a lock file
keeps two runs apart, and leftovers of an interrupted run (its serve and
replay processes, nginx, PostgreSQL, containers labelled with the namespace)
are removed before and after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import db
from engine import LABEL_NAMESPACE, DockerEngine
from errors import ContainerNotFound, EngineError
from localio import free_port
from proxy import NginxProxy
from tests.conftest import GATEWAY_IMAGE, ROOT, nginx_binary, require_stack

try:
    from playwright.sync_api import Browser, Dialog, Locator, Page, expect, sync_playwright
except ImportError:  # require_stack below says what to install (and fails under CI=true)
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root
    "--disable-gpu",
    "--disable-background-networking",  # no internet here: no calls home
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
HOME = Path("/tmp/pideploy-e2e")  # short: the embedded cluster's socket lives under it
LOCK = Path("/tmp/pideploy-e2e.lock")
NAMESPACE = "e2e"
USER = "e2e-user"
V2 = "localhost/pideploy-gateway:v2"
ARTIFACTS = ROOT / "artifacts" / "e2e"
STATE_MS = 30_000  # a task (replayed model, real engine) and the page's next poll
NOT_REFRESHED_MS = 6_000  # four of the page's 1.5 s polls
ACCEPTED_MS = 10_000  # a button's request answered (202 or an error): no task has to run
# The line of dashboard.html that schedules the next poll; the broken copy drops it.
POLL_LINE = "state.timer = setTimeout(tick, POLL_MS);"


# ---------------------------------------------------------------------------
# The replay script: one conversation per task type, picked by the task JSON
# ---------------------------------------------------------------------------


def _report(action: str, success: bool = True, **data: Any) -> dict[str, Any]:
    arguments = {"success": success, "action": action, "data": data}
    if not success:
        arguments["errors"] = [action]
    return {"tool_calls": [{"name": "report_result", "arguments": arguments}]}


def _conversation(
    name: str, match: str, tool: str, arguments: dict[str, Any], report: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": name,
        "match": match,
        "turns": [{"tool_calls": [{"name": tool, "arguments": arguments}]}, report],
    }


INSTANCE = {"instance_id": "{{task.instance_id}}"}
REPLAY_SCRIPT = {
    "conversations": [
        # First match wins: the specific cases come before their task type's general one.
        _conversation(
            "create-crashing",
            "GATEWAY_CRASH_AT_START",
            "instance_create",
            {"name": "{{task.params.name}}"},
            _report("the gateway crashed at start; the create was rolled back", success=False),
        ),
        _conversation(
            "create",
            '"type": "instance_create"',
            "instance_create",
            {"name": "{{task.params.name}}"},
            _report("created", instance_id="{{last_result.instance_id}}"),
        ),
        _conversation("start", '"type": "instance_start"', "instance_start", INSTANCE, _report("started")),
        _conversation("stop", '"type": "instance_stop"', "instance_stop", INSTANCE, _report("stopped")),
        _conversation("delete", '"type": "instance_delete"', "instance_delete", INSTANCE, _report("deleted")),
        _conversation(
            "update-image",
            '"image": "',
            "instance_update",
            {**INSTANCE, "image": "{{task.params.image}}"},
            _report("updated to a new image"),
        ),
        _conversation(
            "update", '"type": "instance_update"', "instance_update", INSTANCE, _report("redeployed")
        ),
    ]
}


# ---------------------------------------------------------------------------
# The site: replay server + serve, started and stopped by this module
# ---------------------------------------------------------------------------


@dataclass
class Site:
    env: dict[str, str]
    token: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return "http://" + self.env["PIDEPLOY_LISTEN"]

    @property
    def nginx(self) -> str:
        return "http://" + self.env["PIDEPLOY_NGINX_LISTEN"]

    @property
    def dashboard(self) -> str:
        """The ready-to-open URL serve printed when it started (token and user in the query)."""
        for line in (HOME / "serve.log").read_text().splitlines():
            if '"serve_ready"' in line:
                found = re.search(r"dashboard: (\S+)", json.loads(line)["message"])
                assert found, line
                return found.group(1)
        raise AssertionError(f"serve printed no dashboard URL:\n{log()}")

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (HOME / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, env=env, cwd=HOME, stdout=log, stderr=subprocess.STDOUT)
        (HOME / f"{name}.pid").write_text(str(process.pid))
        self.processes[name] = process
        return process

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.api + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "X-User-Id": USER,
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def instance_url(self, iid: int) -> str:
        """A running instance's URL as the API gives it to its owner (the route key has a token)."""
        status, instance = self.call("GET", f"/api/instances/{iid}")
        assert status == 200 and instance["url"], instance
        assert instance["url"].startswith(f"{self.nginx}/i/{iid}-"), instance["url"]
        return str(instance["url"])

    def submit(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        status, reply = self.call(method, path, body)
        assert status == 202, (method, path, status, reply)
        return dict(reply)

    def wait_task(self, task_id: int, timeout: float = STATE_MS / 1000) -> dict[str, Any]:
        """The task once it finished (the API polled, not the page: this is the ground truth)."""
        deadline = time.monotonic() + timeout
        while True:
            status, task = self.call("GET", f"/api/tasks/{task_id}")
            assert status == 200, task
            if task["finished_at"]:
                return dict(task)
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {task['status']} after {timeout:.0f}s:\n{log()}")
            time.sleep(0.2)

    def succeeded(self, task_id: int) -> dict[str, Any]:
        """The finished task, which must have succeeded; if not, why (its error and trace) and serve's log."""
        task = self.wait_task(task_id)
        if task["status"] != "succeeded":
            trace = HOME / "traces" / (task["trace_file"] or "none")
            detail = trace.read_text(errors="replace")[-4000:] if trace.is_file() else "(no trace file)"
            raise AssertionError(f"task {task_id} {task['status']}: {task.get('error')}\n{detail}\n{log()}")
        return task


def log(name: str = "serve", lines: int = 40) -> str:
    path = HOME / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def wait_until(what: str, probe: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log()}\n{log('replay')}")
        time.sleep(0.1)


# --- cleanup: the same code before a run (an interrupted one's leftovers) and after ---


def _ours(pid: int) -> bool:
    """A process this module started in an earlier run: runs in HOME, and is Python."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cwd == str(HOME) and (b"pideploy.py" in cmdline or b"evals.llm_server" in cmdline)


def _stop_leftover(pid: int, timeout: float = 30) -> None:
    """SIGTERM (serve then stops its cluster), SIGKILL if it lingers. Not our child: no reaping."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _ours(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _ours(pid):
            os.kill(pid, signal.SIGKILL)


def _remove_containers(engine: DockerEngine) -> None:
    for container in engine.list({LABEL_NAMESPACE: NAMESPACE}):
        with contextlib.suppress(ContainerNotFound):  # engine.remove retries Podman's transient refusals
            engine.remove(container.id)


def clean(engine: DockerEngine) -> None:
    """Nothing of ours left: processes, nginx, PostgreSQL, containers; HOME removed."""
    for pid_file in HOME.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            if _ours(pid):
                _stop_leftover(pid)
    if (HOME / "nginx").is_dir():
        NginxProxy.embedded(HOME / "nginx", nginx_bin=nginx_binary() or "nginx").close(stop=True)
    if (HOME / "pg" / "data" / "postmaster.pid").exists():  # a killed serve leaves its cluster up
        cluster = db.EmbeddedPostgres(HOME)
        cluster.start()
        cluster.release()  # the last one out stops it
    _remove_containers(engine)
    shutil.rmtree(HOME, ignore_errors=True)


@contextlib.contextmanager
def exclusive(timeout: float = 300) -> Iterator[None]:
    """One e2e run per machine at a time (they share HOME and the namespace)."""
    with LOCK.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another e2e run has held {LOCK} for {timeout:.0f}s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_stack("Chromium", CHROMIUM.exists(), "apt-get install chromium")
    require_stack("Playwright", sync_playwright is not None, "pip install playwright (a dev dependency)")
    require_stack("nginx", nginx_binary() is not None, "apt-get install nginx")
    require_stack("PostgreSQL", db.find_server_bindir() is not None, db.INSTALL_HINT)
    try:
        engine = DockerEngine(timeout=10)
        engine.version()
        why = (
            "" if engine.image_exists(GATEWAY_IMAGE) and engine.image_exists(V2) else "gateway images missing"
        )
    except EngineError as error:
        why = error.message
    require_stack("container engine", not why, why)

    started = time.monotonic()
    with exclusive():
        clean(engine)
        HOME.mkdir(mode=0o755)
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PIDEPLOY_") and k != "DATABASE_URL"}
        base.update(HOME=str(HOME), PYTHONUNBUFFERED="1")
        (HOME / "replay.json").write_text(json.dumps(REPLAY_SCRIPT, indent=1))
        replay_port = free_port()
        token = secrets.token_urlsafe(16)
        env = {
            **base,
            "PIDEPLOY_HOME": str(HOME),
            "PIDEPLOY_CONFIG": str(HOME / "pideploy.toml"),
            "PIDEPLOY_API_TOKEN": token,
            "PIDEPLOY_NAMESPACE": NAMESPACE,
            "PIDEPLOY_LISTEN": f"127.0.0.1:{free_port()}",
            "PIDEPLOY_NGINX_LISTEN": f"127.0.0.1:{free_port()}",
            "PIDEPLOY_AGENT": "on",
            "PIDEPLOY_POLL_INTERVAL": "0.3",
            "PIDEPLOY_HEALTH_TIMEOUT": "15",
            "PIDEPLOY_STOP_TIMEOUT": "3",
            "REPLAY_KEY": "e2e",
            "LOGNAME": USER,  # the user in the dashboard URL serve prints
        }
        (HOME / "pideploy.toml").write_text(
            "[[models]]\n"
            'name = "replay"\n'
            f'base_url = "http://127.0.0.1:{replay_port}/v1"\n'
            'model = "replay-model"\n'
            'api_key_env = "REPLAY_KEY"\n'
        )
        site = Site(env, token)
        try:
            replay_argv = ["-m", "evals.llm_server", "--port", str(replay_port), "--script", "replay.json"]
            replay = site.start("replay", [sys.executable, *replay_argv], {**base, "PYTHONPATH": str(ROOT)})
            wait_until(
                "the replay server",
                lambda: replay.poll() is None and get(f"http://127.0.0.1:{replay_port}/v1/models")[0] == 200,
            )
            serve = site.start(
                "serve", [sys.executable, str(ROOT / "pideploy.py"), "serve", "--no-heartbeat"], env
            )
            wait_until("serve", lambda: serve.poll() is None and '"serve_ready"' in log(lines=1000))
            assert get(site.api + "/healthz")[0] == 200
            assert site.dashboard == f"{site.api}/?" + urllib.parse.urlencode({"token": token, "user": USER})
            site.timings["start stack"] = round(time.monotonic() - started, 3)
            yield site
        finally:
            stopped = time.monotonic()
            for name in ("serve", "replay"):  # serve first: on SIGTERM it stops its cluster
                process = site.processes.get(name)
                if process is not None:
                    process.terminate()
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(10)
            for name in ("serve", "replay"):
                if (HOME / f"{name}.log").exists():
                    shutil.copy(HOME / f"{name}.log", ARTIFACTS / f"{name}.log")
            if (HOME / "traces").is_dir():  # every run's trace, for reading a failure afterwards
                shutil.rmtree(ARTIFACTS / "traces", ignore_errors=True)
                shutil.copytree(HOME / "traces", ARTIFACTS / "traces")
            clean(engine)
            site.timings["stop stack"] = round(time.monotonic() - stopped, 3)
            site.timings["total"] = round(time.monotonic() - started, 3)
            (ARTIFACTS / "timings.json").write_text(json.dumps(site.timings, indent=1) + "\n")
        assert all(p.poll() is not None for p in site.processes.values())
        assert engine.list({LABEL_NAMESPACE: NAMESPACE}) == []
        assert not HOME.exists()
    engine.close()


# ---------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        expect.set_options(timeout=STATE_MS)
        yield browser
        browser.close()


@dataclass
class Dialogs:
    """What the page asked (confirm, prompt) and how the next ones are answered."""

    seen: list[str] = field(default_factory=list)
    accept: bool = True
    answer: str = ""

    def __call__(self, dialog: Dialog) -> None:
        self.seen.append(f"{dialog.type}: {dialog.message}")
        if not self.accept:
            dialog.dismiss()
        elif dialog.type == "prompt":
            dialog.accept(self.answer)
        else:
            dialog.accept()


@dataclass
class Steps:
    """Screenshots (artifacts/e2e/NN-step.png) and how long each step took."""

    site: Site
    page: Page
    mark: float = field(default_factory=time.monotonic)

    def done(self, name: str, page: Page | None = None) -> None:
        (page or self.page).screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        now = time.monotonic()
        self.site.timings[name] = round(now - self.mark, 3)
        self.mark = now


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(STATE_MS)
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before or script_errors:  # keep what the page showed
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name}.png"), full_page=True)
    context.close()
    assert script_errors == [], "the page's script raised"


@pytest.fixture
def dialogs(page: Page) -> Dialogs:
    handler = Dialogs()
    page.on("dialog", handler)
    return handler


@pytest.fixture
def steps(site: Site, page: Page) -> Steps:
    return Steps(site, page)


# --- what the page shows ---


def instance_row(page: Page, *, iid: int | None = None, name: str | None = None) -> Locator:
    key = f'[data-instance-id="{iid}"]' if iid is not None else f'[data-name="{name}"]'
    return page.locator(f'[data-testid="instance"]{key}')


def expect_status(row: Locator, status: str, timeout: float = STATE_MS) -> None:
    """The row shows `status` (its badge's text and data-status), auto-waiting for the page to refresh."""
    expect(row).to_have_attribute("data-status", status, timeout=timeout)
    expect(row.get_by_test_id("status")).to_have_text(status, timeout=timeout)


def open_dashboard(page: Page, site: Site) -> None:
    page.goto(site.dashboard)
    expect(page).to_have_title("piDeploy")
    expect(page.get_by_test_id("identity")).to_have_text(f"signed in as {USER}")
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "ok")


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


def test_the_lifecycle_through_the_api_shows_on_the_page(site: Site, page: Page, steps: Steps) -> None:
    # 1. The dashboard loads, takes its identity from the URL, and takes the token out of the URL.
    open_dashboard(page, site)
    assert site.token not in page.url and "user=" not in page.url
    assert page.evaluate("sessionStorage.getItem('pideploy.token')") == site.token
    expect(page.get_by_test_id("instances")).to_be_visible()
    expect(page.get_by_test_id("tasks")).to_be_visible()
    steps.done("01-loaded")

    # 2. An instance created through the API shows up by itself.
    created = site.submit("POST", "/api/instances", {"name": "via-api"})
    iid = created["instance_id"]
    row = instance_row(page, iid=iid)
    expect(row.get_by_test_id("name")).to_have_text("via-api")
    expect(row.get_by_test_id("status")).to_have_text(re.compile(r"^(creating|running)$"))
    steps.done("02-created")

    # 3. Running, with its Dashboard URL, and that URL answers through nginx.
    expect_status(row, "running")
    url = row.get_by_test_id("url")
    expect(url).to_have_attribute("href", site.instance_url(iid))
    expect(url).to_have_text(site.instance_url(iid))
    href = url.get_attribute("href")
    assert href is not None
    status, body = get(href + "healthz")
    assert (status, body.strip()) == (200, "ok")
    site.succeeded(created["task_id"])
    [listed] = [i for i in site.call("GET", "/api/instances")[1] if i["id"] == iid]
    expect(row.get_by_test_id("last-event")).to_have_text(listed["last_event"]["kind"].replace("_", " "))
    task_row = page.locator(f'[data-testid="task"][data-task-id="{created["task_id"]}"]')
    expect(task_row).to_have_attribute("data-status", "succeeded")
    expect(task_row.get_by_test_id("turns")).to_have_text("2")  # instance_create, report_result
    expect(task_row.get_by_test_id("cost")).to_have_text(re.compile(r"^\$\d+\.\d{4}$"))
    expect(task_row.get_by_test_id("duration")).to_have_text(re.compile(r"^\d+\.\d\d s$"))
    steps.done("03-running")
    gateway = page.context.new_page()
    gateway.goto(href)  # what a user reaches by following the link
    expect(gateway.locator("body")).to_contain_text("piDeploy gateway stand-in")
    steps.done("03b-instance-through-nginx", gateway)
    gateway.close()

    # 4. Stopped through the API: the page follows, and the URL goes away.
    stop = site.submit("POST", f"/api/instances/{iid}/stop")
    expect_status(row, "stopped")
    expect(row.get_by_test_id("url")).to_be_hidden()
    expect(row.get_by_test_id("last-event")).to_have_text("stopped")
    site.succeeded(stop["task_id"])
    assert get(href + "healthz")[0] != 200
    steps.done("04-stopped")

    # 5. Deleted through the API: the row disappears.
    site.submit("DELETE", f"/api/instances/{iid}")
    expect(row).to_have_count(0)
    expect(page.get_by_test_id("no-instances")).to_be_visible()
    steps.done("05-deleted")


def test_the_lifecycle_through_the_page_buttons(
    site: Site, page: Page, dialogs: Dialogs, steps: Steps
) -> None:
    # 6. Create, update, stop, start, stop and delete with the page's own controls, following each task's progress.
    open_dashboard(page, site)
    page.get_by_label("Name").fill("via-page")
    page.get_by_role("button", name="Create").click()
    progress = page.get_by_test_id("task-progress").first
    expect(progress).to_contain_text("create via-page")
    row = instance_row(page, name="via-page")
    expect_status(row, "running")
    expect(progress).to_have_attribute("data-status", "succeeded")
    expect(row.get_by_test_id("url")).to_be_visible()
    steps.done("06-page-created")

    iid = int(row.get_attribute("data-instance-id") or 0)
    dialogs.answer = V2
    row.get_by_role("button", name="Update via-page").click()
    expect(progress).to_contain_text("update via-page")
    expect(progress).to_have_attribute("data-status", "succeeded")
    expect_status(row, "running")
    assert get(site.instance_url(iid) + "version")[1].strip() == "v2"
    assert dialogs.seen[-1].startswith("prompt: ")
    steps.done("07-page-updated")

    row.get_by_role("button", name="Stop via-page").click()
    expect(progress).to_contain_text("stop via-page")
    expect_status(row, "stopped")
    expect(progress).to_have_attribute("data-status", "succeeded")
    expect(row.get_by_role("button", name="Stop via-page")).to_be_disabled()
    expect(row.get_by_role("button", name="Start via-page")).to_be_enabled()
    steps.done("08-page-stopped")

    # The operator view: the stop task's trace, spans and transcript, readable in the page.
    stop_id = progress.get_attribute("data-task-id")
    task_row = page.locator(f'[data-testid="task"][data-task-id="{stop_id}"]')
    expect(task_row.get_by_test_id("type")).to_have_text("instance_stop")
    task_row.get_by_test_id("trace-link").click()
    trace = page.get_by_test_id("trace")
    expect(trace).to_be_visible()
    expect(trace.get_by_test_id("trace-summary")).to_contain_text("succeeded")
    expect(trace.get_by_test_id("trace-spans")).to_contain_text("instance_stop")
    expect(trace.get_by_test_id("trace-tool-call")).to_have_text(["instance_stop", "report_result"])
    expect(trace.locator('[data-testid="trace-message"][data-role="user"]').first).to_contain_text(
        '"type": "instance_stop"'
    )
    trace.scroll_into_view_if_needed()
    steps.done("09-trace")
    trace.get_by_test_id("trace-close").click()
    expect(trace).to_be_hidden()

    # Started again from the page: its task runs the scripted start, and the instance answers again.
    row.get_by_role("button", name="Start via-page").click()
    expect(progress).to_contain_text("start via-page")
    expect(progress, "the API refused the Start button's request").to_have_attribute(
        "data-status", re.compile(r"^(queued|running|succeeded)$"), timeout=ACCEPTED_MS
    )
    expect(progress).to_have_attribute("data-status", "succeeded")
    expect_status(row, "running")
    start_id = int(progress.get_attribute("data-task-id") or 0)
    site.succeeded(start_id)
    task_row = page.locator(f'[data-testid="task"][data-task-id="{start_id}"]')
    expect(task_row.get_by_test_id("type")).to_have_text("instance_start")
    expect(task_row.get_by_test_id("turns")).to_have_text("2")  # instance_start, report_result
    instance_url = site.instance_url(iid)
    expect(row.get_by_test_id("url")).to_have_attribute("href", instance_url)
    status, body = get(instance_url + "healthz")
    assert (status, body.strip()) == (200, "ok"), f"restarted instance {iid} through nginx: {status} {body!r}"
    expect(row.get_by_role("button", name="Start via-page")).to_be_disabled()
    steps.done("10-page-started")

    # Stopped again, so the delete below removes a stopped instance as before.
    row.get_by_role("button", name="Stop via-page").click()
    expect(progress).to_contain_text("stop via-page")
    expect_status(row, "stopped")
    expect(progress).to_have_attribute("data-status", "succeeded")
    assert get(instance_url + "healthz")[0] != 200
    steps.done("11-page-stopped-again")

    # Delete asks first: dismissed, nothing happens; accepted, the instance goes.
    tasks_before = len(site.call("GET", "/api/tasks")[1])
    dialogs.accept = False
    row.get_by_role("button", name="Delete via-page").click()
    assert dialogs.seen[-1].startswith("confirm: ") and "via-page" in dialogs.seen[-1]
    expect(progress).to_contain_text("stop via-page")
    assert len(site.call("GET", "/api/tasks")[1]) == tasks_before
    dialogs.accept = True
    row.get_by_role("button", name="Delete via-page").click()
    expect(progress).to_contain_text("delete via-page")
    expect(row).to_have_count(0)
    expect(progress).to_have_attribute("data-status", "succeeded")
    steps.done("12-page-deleted")


def test_an_instance_in_error_shows_its_reason(site: Site, page: Page, steps: Steps) -> None:
    open_dashboard(page, site)
    config = {"env": {"GATEWAY_CRASH_AT_START": "1"}}
    created = site.submit("POST", "/api/instances", {"name": "crashing", "config": config})
    row = instance_row(page, iid=created["instance_id"])
    expect_status(row, "error")
    expect(row.get_by_test_id("error")).to_contain_text("create failed")
    task_row = page.locator(f'[data-testid="task"][data-task-id="{created["task_id"]}"]')
    expect(task_row).to_have_attribute("data-status", "failed")
    expect(task_row.get_by_test_id("error-class")).not_to_be_empty()
    steps.done("13-error")
    site.submit("DELETE", f"/api/instances/{created['instance_id']}")
    expect(row).to_have_count(0)


def test_identity_sign_out_a_wrong_token_and_sign_in(site: Site, page: Page, steps: Steps) -> None:
    open_dashboard(page, site)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_test_id("login")).to_be_visible()
    expect(page.get_by_test_id("instances")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('pideploy.token')") is None

    page.get_by_label("User").fill(USER)
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Open dashboard").click()
    expect(page.get_by_test_id("login")).to_contain_text("missing or wrong bearer token")
    steps.done("14-wrong-token")

    page.get_by_label("API token").fill(site.token)
    page.get_by_role("button", name="Open dashboard").click()
    expect(page.get_by_test_id("identity")).to_have_text(f"signed in as {USER}")
    expect(page.get_by_test_id("connection")).to_have_attribute("data-state", "ok")
    expect(page.get_by_test_id("instances")).to_be_visible()


def test_a_page_that_stops_refreshing_fails_the_status_check(site: Site, page: Page, steps: Steps) -> None:
    # The proof that the checks above catch a broken page: the same page minus its poll timer.
    html = (ROOT / "dashboard.html").read_text()
    assert html.count(POLL_LINE) == 1, "dashboard.html changed: update POLL_LINE"
    broken = html.replace(POLL_LINE, "state.timer = null; // broken on purpose: no next poll")
    created = site.submit("POST", "/api/instances", {"name": "stale"})
    site.succeeded(created["task_id"])
    iid = created["instance_id"]

    page.route(
        lambda url: urllib.parse.urlsplit(url).path == "/",
        lambda route: route.fulfill(status=200, content_type="text/html; charset=utf-8", body=broken),
    )
    open_dashboard(page, site)
    row = instance_row(page, iid=iid)
    expect_status(row, "running")  # the first load works ...
    stop = site.submit("POST", f"/api/instances/{iid}/stop")
    site.succeeded(stop["task_id"])  # ... and the API says stopped ...
    with pytest.raises(AssertionError):
        expect_status(row, "stopped", timeout=NOT_REFRESHED_MS)  # ... but the page never shows it
    expect(row.get_by_test_id("status")).to_have_text("running")
    steps.done("15-broken-page-stale")

    page.unroute_all()
    page.reload()  # the real page, same session: identity from sessionStorage
    expect_status(row, "stopped")
    site.submit("DELETE", f"/api/instances/{iid}")
    expect(row).to_have_count(0)
