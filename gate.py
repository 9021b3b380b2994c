"""The read-only bash gate: every command of the agent's `bash` tool passes `check()` first.

Why an allowlist over a parsed command: a blocklist of strings loses to quoting
(`'r''m'`, `\\rm`, `"do"cker rm`), to look-alike characters and to the next
program nobody thought of. So the command is parsed with bashlex, every node
kind, program, subcommand, option and file argument must be one the gate
names, and anything else is refused with a short reason the model can act on.
Any parser failure is a refusal ("cannot parse").

The gate is three files: this one parses the command and walks its tree
and applies the rules that depend on who runs it (check, run, cli);
allowlist.py holds the per-program rules (which programs, options and
arguments); sandbox.py starts the command in a kernel sandbox and bounds it in
time and output.

Word values come from our own quote removal over the exact source text of each
word (bashlex's own is lossy: `'r''m'` comes back as `r''m`), and every
character of the command must be covered by a node we accepted (or be blank or
a comment), so bashlex and bash cannot silently disagree about what runs.

Policy decisions (the per-program ones are in allowlist.py):
- Pipelines (`|`, and `|&`, which is `2>&1 |`) and sequences (`;`, `&&`, `||`,
  newlines) of allowed commands are allowed: each command passes the same check
  on its own, so sequencing only saves the model a tool call. At most
  MAX_COMMANDS simple commands. Background `&`, `!`, subshells, groups,
  functions, if/for/while/case are refused.
- Programs must be bare names (`cat`, not `/usr/bin/cat` or `./cat`): PATH comes
  from piDeploy's own environment, and a path could name any binary.
- No redirection except `2>&1`, which only merges stderr into stdout.
- No `$` outside single quotes (no variables, `$(...)`, `$'...'`), no backticks,
  no unquoted `~`, glob characters (`* ? [`) or braces: the agent quotes them.
  `$` inside single quotes is literal (`grep 'error$'`). `run()` also starts
  bash with globbing off, as a second line.
- File arguments must lie under a read root: those passed in plus
  DEFAULT_READ_ROOTS. That check reads the paths before the command runs, so a
  symlink swapped in between (an instance can write its own storage folder)
  would get past it: run() therefore also starts the command inside a kernel
  sandbox (sandbox.py).
- Only ASCII printable text, tabs and newlines, at most MAX_COMMAND_CHARS.
- nginx runs only with piDeploy's own -p/-c (NginxPin, from its test command)
  or with none: a configuration can load_module any .so, and nginx -t runs as
  root.

Who runs the command adds rules (check()/run() arguments): a user's task gets
connect_ports (its instances' ports: curl to no other, no nginx or pg_isready)
and containers (Containers, from the engine's list: each docker word naming a
container must resolve, as the engine would resolve it, to exactly one of the
user's own; no listing; no podman, which reads its own store; none of the
host-wide views that enumerate containers too: ps, df, ss, systemctl,
journalctl). A heartbeat or an operator keeps the rest.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bashlex

import allowlist
import sandbox
from allowlist import Refused
from errors import ToolRefused
from sandbox import BashResult, landlock_abi, sandbox_status

# The gate's public names, some of them defined in allowlist.py and sandbox.py.
__all__ = [
    "DEFAULT_READ_ROOTS",
    "MAX_COMMANDS",
    "MAX_COMMAND_CHARS",
    "BashResult",
    "Containers",
    "NginxPin",
    "Verdict",
    "check",
    "cli",
    "landlock_abi",
    "run",
    "sandbox_status",
]

MAX_COMMAND_CHARS = 2000
MAX_COMMANDS = 8

DEFAULT_READ_ROOTS: tuple[Path, ...] = (
    Path("/proc/loadavg"),
    Path("/proc/meminfo"),
    Path("/etc/os-release"),
)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # "" when allowed; a short human reason when refused


_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Containers:
    """Every container the engine has, and which of them a user's task may name.

    The caller lists the engine (the gate imports no engine); the gate resolves each word of
    a docker command the way the engine would and checks the resolved ids."""

    own: frozenset[str]  # full ids of the task's user's containers
    every: Mapping[str, str]  # full id -> name, of every container the engine has

    def resolve(self, ref: str) -> frozenset[str]:
        """Every container the engine could take `ref` for. Docker and Podman try an exact id,
        then an exact name (Docker also with a leading /), then a unique id prefix: any of
        them may be what runs, so all count, and the word must be one of these spellings
        exactly (the engine also forgives a trailing / or blank, which is not let through)."""
        if ref in self.every:
            return frozenset({ref})
        found = {cid for cid, name in self.every.items() if ref in (name, "/" + name)}
        if _HEX.fullmatch(ref):
            found |= {cid for cid in self.every if cid.startswith(ref)}
        return frozenset(found)


@dataclass(frozen=True)
class NginxPin:
    """The only -p and -c nginx may be run with: those of piDeploy's own nginx test command
    (its embedded nginx.conf, or the operator's PIDEPLOY_NGINX_TEST_CMD). nginx loads the
    modules its configuration names, as root: a configuration a caller chooses runs code."""

    prefix: str | None = None
    conf: str | None = None

    @classmethod
    def from_command(cls, argv: Sequence[str]) -> NginxPin:
        """The -p and -c values of a command that runs nginx (`sudo nginx -t -c F` too); none
        when the command is not nginx (an operator's `docker exec proxy nginx -t`)."""
        start = next((i for i, word in enumerate(argv) if os.path.basename(word) == "nginx"), None)
        if start is None:
            return cls()
        values: dict[str, str] = {}
        args = list(argv[start + 1 :])
        for i, arg in enumerate(args):
            for option in ("-p", "-c"):
                if arg == option and i + 1 < len(args):
                    values[option] = args[i + 1]
                elif arg.startswith(option) and len(arg) > 2:
                    values[option] = arg[2:]
        return cls(values.get("-p"), values.get("-c"))

    def describe(self) -> str:
        parts = ["nginx -t"]
        if self.prefix:
            parts.append(f"-p {self.prefix}")
        if self.conf:
            parts.append(f"-c {self.conf}")
        return " ".join(parts)


# ---------------------------------------------------------------------------
# check(): parse, walk the tree, check each simple command
# ---------------------------------------------------------------------------


def check(
    command: str,
    read_roots: Sequence[Path] = (),
    *,
    nginx: NginxPin = NginxPin(),
    connect_ports: Collection[int] | None = None,
    containers: Callable[[], Containers] | None = None,
) -> Verdict:
    """Allowed, or refused with a reason. Never raises (but for what `containers` raises).

    The defaults are an operator's or a heartbeat's scope. A user's task passes
    connect_ports (its instances' ports) and containers (called once, when a docker command
    needs names resolved): see run()."""
    try:
        _check_scope(_check(command, _roots(read_roots)), nginx, connect_ports, containers)
    except Refused as refused:
        return Verdict(False, refused.reason)
    return Verdict(True, "")


def _check_scope(
    commands: list[list[str]],
    nginx: NginxPin,
    connect_ports: Collection[int] | None,
    containers: Callable[[], Containers] | None,
) -> None:
    """The rules that depend on who runs the command, over the already checked commands."""
    _check_nginx(commands, nginx)
    if connect_ports is not None:
        _check_ports(commands, connect_ports)
    if containers is not None:
        _check_containers(commands, containers)


# ---------------------------------------------------------------------------
# who runs the command: nginx's pin, a user's ports and containers
# ---------------------------------------------------------------------------


def _check_nginx(commands: list[list[str]], pin: NginxPin) -> None:
    """nginx runs against piDeploy's own configuration or the compiled-in default, never a file
    a caller names: a configuration can `load_module` any .so, and nginx -t loads it as root
    (an instance writes its own storage folder, which is a read root of the CLI)."""
    for words in commands:
        if words[0] != "nginx":
            continue
        for name, value in allowlist.parse("nginx", words[1:], allowlist.PROGRAMS["nginx"]).options:
            if name not in ("-p", "-c"):
                continue
            pinned = pin.prefix if name == "-p" else pin.conf
            # The exact text: a path that merely resolves to the same file today (../, a link in a
            # folder an instance writes) could resolve elsewhere by the time nginx opens it.
            same = pinned is not None and (
                value == pinned if name == "-c" else value.rstrip("/") == pinned.rstrip("/")
            )
            if not same:
                what = "prefix" if name == "-p" else "configuration"
                raise Refused(
                    f"nginx {name} {value}: nginx only runs with piDeploy's own {what} "
                    f"({pin.describe()}), or with none"
                )


def _check_ports(commands: list[list[str]], allowed: Collection[int]) -> None:
    """A run limited to some TCP ports (a user's task: its own instances): every curl URL must
    name one of them, and nothing else that opens TCP connections or loads code from a
    config file may run."""
    for words in commands:
        program, args = words[0], words[1:]
        if program in ("nginx", "pg_isready"):
            # nginx -c loads the modules its config names (code, as root) from wherever it says.
            raise Refused(f"{program} is for operators and the heartbeat, not a user's task")
        if program != "curl":
            continue
        for port in allowlist.curl_ports(args):
            if port not in allowed:
                mine = ", ".join(str(p) for p in sorted(allowed)) or "none"
                raise Refused(f"port {port} is not one of this task's instance ports ({mine})", ports=[port])


def _check_containers(commands: list[list[str]], containers: Callable[[], Containers]) -> None:
    """A user's task names only its own containers, as the engine resolves the words it gives
    (an id, an id prefix, a name), and lists nothing: every listing shows other users'
    containers, their names, labels and commands."""
    resolved: Containers | None = None
    for words in commands:
        program, args = words[0], words[1:]
        if program in _HOST_WIDE:
            raise Refused(f"{program} {_HOST_WIDE[program]}: for operators; {_YOUR_CONTAINER}")
        if program == "podman":
            # The podman program reads its own container store, not the engine piDeploy resolves
            # names through (and not its own sandbox either): nothing here could vouch for a name.
            raise Refused("podman is for operators; use docker, which talks to piDeploy's engine")
        if program != "docker":
            continue
        for ref in allowlist.container_refs(program, args):
            resolved = resolved or containers()
            found = resolved.resolve(ref)
            if not found or not found <= resolved.own:
                raise Refused(f"{ref} is not one of this user's containers", containers=found - resolved.own)
            if len(found) > 1:
                raise Refused(f"{ref} is ambiguous (an id prefix of several containers); use the name")


_YOUR_CONTAINER = "use docker top/stats/port/logs with your container's name, or instance_status"
# Host-wide views that enumerate every user's containers, outside docker's own words.
_HOST_WIDE = {
    "ps": "shows every container's processes (and the engine's, with container ids and names)",
    "df": "shows every container's mounts (named by container id)",
    "ss": "shows every instance's ports and connections",
    "systemctl": "shows every service's processes (the engine's, with container ids)",
    "journalctl": "reads the whole machine's journal (the engine's events, containers' logs)",
}


# ---------------------------------------------------------------------------
# the parse walk
# ---------------------------------------------------------------------------


def _roots(read_roots: Sequence[Path]) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(root)) for root in (*read_roots, *DEFAULT_READ_ROOTS))


_PRINTABLE = re.compile(r"[\x20-\x7e\t\n]*")


def _check(command: str, roots: tuple[Path, ...]) -> list[list[str]]:
    """The simple commands, as word lists; raises Refused."""
    if len(command) > MAX_COMMAND_CHARS:
        raise Refused(f"command too long ({len(command)} > {MAX_COMMAND_CHARS} characters)")
    if not _PRINTABLE.fullmatch(command):
        bad = next(c for c in command if not _PRINTABLE.fullmatch(c))
        raise Refused(f"non-ASCII or control character {bad!r} (U+{ord(bad):04X})")
    if all(not line.strip() or line.strip().startswith("#") for line in command.splitlines()):
        raise Refused("empty command")
    walker = _Walker(command)
    try:
        for tree in bashlex.parse(command):
            walker.walk(tree)
    except Refused:
        raise
    # bashlex fails on untrusted input in many ways (ParsingError, NotImplementedError,
    # AttributeError...), and a tree of a shape the walker does not expect is no better:
    # the gate fails closed, with the message as the reason.
    except Exception as exc:
        raise Refused(f"cannot parse: {type(exc).__name__}: {exc}") from None
    walker.check_coverage()
    if len(walker.commands) > MAX_COMMANDS:
        raise Refused(f"too many commands ({len(walker.commands)} > {MAX_COMMANDS})")
    if len(walker.commands) > 1 and any(words[0] == "nginx" for words in walker.commands):
        # nginx -t opens nginx's pid and log files, so its sandbox lets it write those: no
        # other program may share that run.
        raise Refused("nginx must run on its own, not in a pipeline or sequence")
    for words in walker.commands:
        allowlist.check_simple(words, roots)
    for pipeline in walker.pipelines:
        allowlist.check_pipeline([walker.commands[i] for i in pipeline])
    return walker.commands


_COMPOUND_REASONS = {
    "(": "subshell ( ) is not allowed",
    "{": "group { } is not allowed",
    "if": "if/for/while/case is not allowed",
    "for": "if/for/while/case is not allowed",
    "while": "if/for/while/case is not allowed",
    "until": "if/for/while/case is not allowed",
}


class _Walker:
    """Accepts only commands, pipelines and lists; records simple commands as word lists."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.covered = bytearray(len(source))
        self.commands: list[list[str]] = []
        self.pipelines: list[range] = []  # indexes into commands, of the commands piped together

    def cover(self, node: Any) -> None:
        start, end = node.pos
        self.covered[start:end] = b"\x01" * (end - start)

    def walk(self, node: Any) -> None:
        kind = node.kind
        if kind == "command":
            self.command(node)
        elif kind == "pipeline":
            first = len(self.commands)
            for part in node.parts:
                if part.kind == "pipe":
                    self.cover(part)
                elif part.kind == "reservedword":
                    raise Refused(f"reserved word {part.word!r} is not allowed")
                else:
                    self.walk(part)
            self.pipelines.append(range(first, len(self.commands)))
        elif kind == "list":
            for part in node.parts:
                if part.kind == "operator":
                    if part.op == "&":
                        raise Refused("background & is not allowed")
                    if part.op not in (";", "&&", "||", "\n"):
                        raise Refused(f"operator {part.op!r} is not allowed")
                    self.cover(part)
                else:
                    self.walk(part)
        elif kind == "compound":
            first = node.list[0]
            word = first.word if first.kind == "reservedword" else getattr(first, "kind", "")
            raise Refused(_COMPOUND_REASONS.get(word, "compound commands are not allowed"))
        elif kind == "function":
            raise Refused("function definitions are not allowed")
        elif kind in ("if", "for", "while", "until"):
            raise Refused("if/for/while/case is not allowed")
        else:
            raise Refused(f"{kind} is not allowed")

    def command(self, node: Any) -> None:
        words: list[str] = []
        for part in node.parts:
            if part.kind == "assignment":
                raise Refused("environment prefixes (NAME=value cmd) are not allowed")
            if part.kind == "redirect":
                text = self.source[part.pos[0] : part.pos[1]]
                if text != "2>&1":
                    raise Refused(f"redirection ({part.type}) is not allowed; only 2>&1")
                self.cover(part)
                continue
            if part.kind != "word":
                raise Refused(f"{part.kind} is not allowed")
            inner = getattr(part, "parts", [])
            if inner:  # bashlex saw an expansion; our own quote removal would refuse it too
                raise Refused(_EXPANSION_REASONS.get(inner[0].kind, f"{inner[0].kind} is not allowed"))
            words.append(_unquote(self.source[part.pos[0] : part.pos[1]]))
            self.cover(part)
        if not words:
            raise Refused("empty command")
        self.commands.append(words)

    def check_coverage(self) -> None:
        """Everything bashlex did not turn into an accepted node must be blank or a comment."""
        i, text = 0, self.source
        while i < len(text):
            char = text[i]
            if self.covered[i] or char in " \t\n":
                i += 1
            elif char == "\\" and text[i + 1 : i + 2] == "\n":
                i += 2  # a line continuation between words
            elif char == "#":
                end = text.find("\n", i)
                end = len(text) if end < 0 else end
                if any(self.covered[i:end]):
                    raise Refused("cannot parse: comment and command overlap")
                i = end
            else:
                raise Refused(f"cannot parse: unexpected {char!r} at position {i}")


_EXPANSION_REASONS = {
    "commandsubstitution": "command substitution $(...) or `...` is not allowed",
    "processsubstitution": "process substitution <(...) or >(...) is not allowed",
    "parameter": "variable expansion ($NAME) is not allowed",
    "tilde": "tilde expansion (~) is not allowed; use an absolute path",
}


def _unquote(raw: str) -> str:
    """Bash quote removal for one word, refusing anything bash would expand."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "'":
            end = raw.find("'", i + 1)
            if end < 0:
                raise Refused("cannot parse: unterminated single quote")
            out.append(raw[i + 1 : end])
            i = end + 1
        elif char == '"':
            i = _unquote_double(raw, i + 1, out)
        elif char == "\\":
            if i + 1 >= len(raw) or raw[i + 1] == "\n":
                raise Refused("line continuation inside a word is not allowed")
            out.append(raw[i + 1])
            i += 2
        else:
            _refuse_unquoted(char)
            out.append(char)
            i += 1
    return "".join(out)


def _unquote_double(raw: str, i: int, out: list[str]) -> int:
    while i < len(raw):
        char = raw[i]
        if char == '"':
            return i + 1
        if char == "$":
            raise Refused(_dollar_reason(raw[i + 1 : i + 2]))
        if char == "`":
            raise Refused(_EXPANSION_REASONS["commandsubstitution"])
        if char == "\\" and raw[i + 1 : i + 2] in ("$", "`", '"', "\\"):
            out.append(raw[i + 1])
            i += 2
        elif char == "\\" and raw[i + 1 : i + 2] == "\n":
            raise Refused("line continuation inside a word is not allowed")
        else:
            out.append(char)
            i += 1
    raise Refused("cannot parse: unterminated double quote")


def _dollar_reason(after: str) -> str:
    if after == "(":
        return _EXPANSION_REASONS["commandsubstitution"]
    if after in ("'", '"'):
        return "$'...' and $\"...\" quoting is not allowed"
    return _EXPANSION_REASONS["parameter"]


def _refuse_unquoted(char: str) -> None:
    if char == "$":
        raise Refused(_EXPANSION_REASONS["parameter"])
    if char == "`":
        raise Refused(_EXPANSION_REASONS["commandsubstitution"])
    if char == "~":
        raise Refused(_EXPANSION_REASONS["tilde"])
    if char in "*?[]":
        raise Refused(f"unquoted glob character {char!r}; quote it")
    if char in "{}":
        raise Refused(f"unquoted brace {char!r} (brace expansion); quote it")
    if char in "<>()|;&\n":
        raise Refused(f"cannot parse: {char!r} inside a word")


# ---------------------------------------------------------------------------
# run(): check, then bash -c in the sandbox (sandbox.run_bash)
# ---------------------------------------------------------------------------


def run(
    command: str,
    *,
    read_roots: Sequence[Path] = (),
    timeout: float = 20.0,
    output_cap: int = 16_000,
    env: Mapping[str, str] | None = None,
    connect_ports: Collection[int] | None = None,
    containers: Callable[[], Containers] | None = None,
    nginx: NginxPin = NginxPin(),
) -> BashResult:
    """check() first (raise errors.ToolRefused(reason, command=command) if refused), then run the
    command with bash -c in a NEW PROCESS GROUP (start_new_session=True), stdin from /dev/null,
    capture stdout/stderr capped at output_cap bytes each (read incrementally; don't buffer unbounded
    output), and on timeout kill the whole process group (SIGKILL via os.killpg) and return timed_out=True.

    The child works in `/` with `env` (default: PATH and LC_ALL=C only, so none of piDeploy's
    secrets), minus variables that make bash run code first (BASH_ENV, BASH_FUNC_*, LD_*).
    A timeout <= 0 (no time left) returns timed_out=True without starting anything.
    connect_ports: the only TCP ports the command may connect to: every curl URL must name one
    (ToolRefused), nginx and pg_isready are refused, and the kernel refuses any other TCP connect
    (Landlock ABI 4+). None: any port.
    containers: a user's task's view of the engine (see Containers): docker may name only its own
    containers and list none, podman is refused. None: any container.
    nginx: the -p/-c nginx may be given (piDeploy's own configuration); any other is refused."""
    roots = _roots(read_roots)
    try:
        commands = _check(command, roots)
        _check_scope(commands, nginx, connect_ports, containers)
    except Refused as refused:
        named = {"container_ids": refused.containers, "ports": refused.ports}
        raise ToolRefused(refused.reason, command=command, **{k: v for k, v in named.items() if v}) from None
    nginx_only = commands[0][0] == "nginx"  # then it is the only command
    if nginx_only:  # its own configuration's folder, wherever the proxy keeps it
        pinned = [Path(nginx.prefix)] if nginx.prefix else []
        pinned += [Path(nginx.conf).parent] if nginx.conf else []
        roots = (*roots, *_roots(pinned))
    return sandbox.run_bash(
        command,
        roots,
        timeout=timeout,
        output_cap=output_cap,
        env=env,
        nginx_files=nginx_only,
        connect_ports=None if connect_ports is None else frozenset(connect_ports),
    )


def cli(command: str, read_roots: Sequence[Path] = (), nginx: NginxPin = NginxPin()) -> int:
    """For `python pideploy.py gate 'COMMAND'`: prints `allowed` or `refused: REASON` to stdout;
    returns 0 when allowed, 1 when refused. The scope is an operator's."""
    verdict = check(command, read_roots, nginx=nginx)
    print("allowed" if verdict.allowed else f"refused: {verdict.reason}", file=sys.stdout)
    return 0 if verdict.allowed else 1
