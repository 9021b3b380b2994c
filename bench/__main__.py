"""Run every benchmark module in this folder (`*_bench.py`, each with `main() -> None`) and print its figures.

    python -m bench              every module, in name order
    python -m bench queue tools  only bench/queue_bench.py and bench/tools_bench.py

One module failing does not stop the others; the exit code says whether all ran.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules(only: list[str]) -> list[str]:
    found = sorted(path.stem for path in HERE.glob("*_bench.py"))
    if only:
        wanted = {name.removesuffix("_bench") + "_bench" for name in only}
        missing = wanted - set(found)
        if missing:
            raise SystemExit(f"no such benchmark: {', '.join(sorted(missing))} (have: {', '.join(found)})")
        found = [name for name in found if name in wanted]
    return found


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE.parent))  # the project's modules, whatever the working directory
    failed = []
    for name in modules(argv):
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(f"bench.{name}").main()
        except Exception:  # report and go on: one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.monotonic() - started:.1f}s)\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
