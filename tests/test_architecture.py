"""The map in ARCHITECTURE.md holds: imports go down its layers, and modules stay small.

The layers are read from the map itself, so the document and this check cannot drift apart.
Every import counts, at module level or inside a function (a deferred import is still a
dependency), and so do imports under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("evals", "bench")  # folders of modules; tests/ may import anything
MAX_LINES = 850  # "no module over about 800 lines"


def modules() -> dict[str, Path]:
    """Every module of piDeploy by its dotted name (package __init__ files hold no code)."""
    found = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            if path.stem != "__init__":
                found[f"{package}.{path.stem}"] = path
    return found


def layers(text: str) -> list[list[str]]:
    """The layers block of the map, lowest first."""
    block = re.search(r"<!-- layers: highest first -->\s*```text\n(.*?)```", text, re.S)
    assert block is not None, "ARCHITECTURE.md has lost its layers block"
    return [line.split() for line in reversed(block.group(1).splitlines()) if line.strip()]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The piDeploy modules `name` imports anywhere in its file."""
    package = name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def test_every_module_has_one_place_on_the_map() -> None:
    placed = [module for layer in layers((ROOT / "ARCHITECTURE.md").read_text()) for module in layer]
    assert len(placed) == len(set(placed)), "a module is on the map twice"
    assert sorted(placed) == sorted(modules())


def test_imports_only_go_down_the_layers() -> None:
    order = {
        module: rank
        for rank, layer in enumerate(layers((ROOT / "ARCHITECTURE.md").read_text()))
        for module in layer
    }
    found = modules()
    upward = [
        f"{name} (layer {order[name]}) imports {target} (layer {order[target]})"
        for name, path in sorted(found.items())
        for target in sorted(imports(name, path, set(found)))
        if order[target] >= order[name]
    ]
    assert upward == []


def test_the_check_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "run.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import gate\n"
        "def later() -> None:\n    import heartbeat\n"
        "from . import record\nfrom .llm_server import Server\n"
    )
    known = {"gate", "heartbeat", "tools", "evals.record", "evals.llm_server"}
    assert imports("evals.run", source, known) == {"gate", "heartbeat", "evals.record", "evals.llm_server"}


def test_the_layers_block_is_read_lowest_first() -> None:
    text = "<!-- layers: highest first -->\n```text\nagent\ntools\n```\n"
    assert layers(text) == [["tools"], ["agent"]]


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_about_800_lines(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by concern (ARCHITECTURE.md)"
