"""dashboard.html without a browser: served at /, self-contained, text-only rendering, test hooks present.

The page in a real browser, over a real serve, is tests/e2e/test_dashboard.py (make e2e).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

import pytest

import api
import pideploy
from tests.conftest import ROOT, make_config

PAGE = ROOT / "dashboard.html"


class Tags(HTMLParser):
    """Every start tag with its attributes, and the inline script and style text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.script = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.script += data

    def find(self, tag: str | None = None, **attributes: str) -> list[dict[str, str]]:
        return [
            attrs
            for name, attrs in self.tags
            if (tag is None or name == tag)
            and all(attrs.get(k.replace("_", "-")) == v for k, v in attributes.items())
        ]


@pytest.fixture(scope="module")
def page() -> Tags:
    tags = Tags()
    tags.feed(PAGE.read_text())
    return tags


def test_serve_answers_the_page_at_the_root(tmp_path: Path) -> None:
    # The page itself needs no identity (it holds no data); every /api/ call it makes does.
    config = make_config(tmp_path, api_token="s3cret")
    service = api.Api(config, cast(Any, None), cast(Any, None), root=ROOT)
    response = service.handle("GET", "/?token=s3cret&user=alice", {}, b"")
    assert response.status == 200
    assert response.content_type == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.body == PAGE.read_bytes()
    assert service.handle("GET", "/api/instances", {}, b"").status == 401


def test_nothing_is_loaded_from_elsewhere(page: Tags) -> None:
    # No internet here, and none needed: no external URL, script, style sheet, font or frame.
    text = PAGE.read_text()
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), "an external URL"
    assert all("src" not in attrs for tag, attrs in page.tags if tag == "script")
    assert not [a for tag, a in page.tags if tag in ("link", "iframe", "img", "object", "embed")]
    assert "@import" not in text and "url(" not in text
    assert re.findall(r"fetch\(([^)]*)\)", page.script) == ["path, options"]  # same-origin API paths only


def test_data_is_rendered_as_text_never_as_html(page: Tags) -> None:
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in page.script, sink
    assert "textContent" in page.script
    # A URL from the API becomes a link only if it is http(s): never javascript: or data:.
    assert 'parsed.protocol === "http:" || parsed.protocol === "https:"' in page.script


def test_the_token_is_taken_out_of_the_address_bar(page: Tags) -> None:
    script = page.script
    assert 'sessionStorage.setItem("pideploy.token"' in script
    assert "localStorage" not in script  # the token lives only as long as the tab
    assert 'params.delete("token")' in script and "history.replaceState" in script


def test_controls_are_real_labelled_elements_with_test_hooks(page: Tags) -> None:
    for testid in ("identity", "connection", "create-form", "create-name", "create-button", "instances",
                   "progress", "tasks", "trace", "trace-close", "no-instances"):  # fmt: skip
        assert page.find(data_testid=testid), testid
    inputs = page.find("input")
    labelled = {a["for"] for a in page.find("label")}
    assert inputs and all(a["id"] in labelled for a in inputs)
    assert all(a.get("type") in ("button", "submit") for a in page.find("button"))
    # Rows, badges and buttons are built by the script: their hooks are there.
    for hook in ('"data-testid": "instance"', '"data-testid": "task"', '"data-action": action',
                 '"data-testid": "url"', '"data-testid": "error"', '"data-testid": "last-event"',
                 '"data-testid": "trace-link"', "dataset: { status: shown }"):  # fmt: skip
        assert hook in page.script, hook
    assert "confirm(" in page.script  # Delete asks first
    assert re.search(r"const POLL_MS = \d+;", page.script)  # statuses refresh by themselves


def test_serve_prints_a_ready_to_open_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "ops.person")
    config = make_config(tmp_path, api_token="s3cret")
    assert pideploy._dashboard_url(config, "127.0.0.1", 8700) == (
        "http://127.0.0.1:8700/?token=s3cret&user=ops.person"
    )
    # Not loopback: the URL may end up in shared logs, so the token stays out of it.
    shown = pideploy._dashboard_url(config, "10.0.0.5", 8700)
    assert "s3cret" not in shown and shown.startswith("http://10.0.0.5:8700/?token=")
