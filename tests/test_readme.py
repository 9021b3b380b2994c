"""The README is a contract operators copy from: keep its settings table true."""

from __future__ import annotations

import re

import config
from tests.conftest import ROOT


def _table() -> dict[str, str]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \| .+ \|$", (ROOT / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    table = _table()
    for variable, default, _ in config.describe():
        assert variable in table, f"{variable} is missing from the README's configuration table"
        if variable == "PIDEPLOY_HOME":
            continue  # depends on who runs it; the row says so
        shown = table[variable]
        expected = f"`{default}`" if default else "(empty)"
        assert shown == expected, f"{variable}: README says {shown}, config.py says {expected}"


def test_the_readme_names_no_setting_that_does_not_exist() -> None:
    known = {variable for variable, _, _ in config.describe()}
    assert set(_table()) <= known


def test_the_systemd_unit_leaves_room_for_open_connections() -> None:
    limit = re.search(r"^LimitNOFILE=(\d+)$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert limit is not None and int(limit.group(1)) >= 65536
