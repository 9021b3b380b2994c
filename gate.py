"""The read-only bash gate: every command of the agent's `bash` tool passes `check()` first.

Why an allowlist over a parsed command: a blocklist of strings loses to quoting
(`'r''m'`, `\\rm`, `"do"cker rm`), to look-alike characters and to the next
program nobody thought of. So the command is parsed with bashlex, every node
kind, program, subcommand, option and file argument must be one this module
names, and anything else is refused with a short reason the model can act on.
Any parser failure is a refusal ("cannot parse").

Word values come from our own quote removal over the exact source text of each
word (bashlex's own is lossy: `'r''m'` comes back as `r''m`), and every
character of the command must be covered by a node we accepted (or be blank or
a comment), so bashlex and bash cannot silently disagree about what runs.

Policy decisions:
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
- `find` is refused entirely (it can exec and delete); `ls -R`, `du` and
  `grep -r` cover its read-only uses.
- File arguments must be absolute and, after os.path.realpath (`..` and
  symlinks), lie under a read root: those passed in plus DEFAULT_READ_ROOTS.
  Relative paths are refused (`run()` works in `/`), and programs that would
  default to the working directory (`ls`, `du`, `grep -r`) need a path.
  That check reads the paths before the command runs, so a symlink swapped in
  between (an instance can write its own storage folder) would get past it:
  run() therefore also starts the command inside a kernel sandbox (below).
- Only ASCII printable text, tabs and newlines, at most MAX_COMMAND_CHARS.
- Options are allowlisted per program too (unknown option: refused), so a
  follow flag, an output file or a file-reading option is never let through
  by accident. Notable: `docker logs -n` is refused (it means --tail in docker
  but --names in podman); `docker top` takes no ps options; `ps e` (process
  environments) is refused; curl may not use --unix-socket (the engine socket
  would expose every container), -L (a redirect leaves loopback), `@file`
  header or write-out values, or the Docker Engine TCP ports 2375/2376.
- docker --format templates are read action by action (_check_template): they
  may print fields but never a container's Env, nor re-encode what they print.
  docker's output is piped on only into filters that keep lines whole (grep,
  head/tail -n, sort, uniq, wc): the tool redacts secrets from the final
  output, and cut, head -c, grep -o, tr or jq could first cut one in pieces.
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

The sandbox, a second line that does not depend on the parser: the command is
started from a short-lived thread that first restricts itself with Landlock
(Linux 5.13+) and drops every capability but the two that let root read files
it does not own. The kernel then checks each open, after symlinks, against the
read roots plus the system files programs need to start (SANDBOX_SYSTEM_PATHS,
never /etc as a whole); nothing may be written, created, removed or renamed
anywhere, and Landlock also keeps the command out of other processes' memory
and environment under /proc. Sockets are not covered: the engine, nginx and
loopback HTTP stay reachable, which is what the allowlist above is for. On a
kernel without Landlock, run() logs a warning once (`gate_sandbox_unavailable`)
and relies on check() alone; `sandbox_status()` says which (see `doctor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bashlex

from errors import SandboxFailed, ToolRefused

MAX_COMMAND_CHARS = 2000
MAX_COMMANDS = 8
MAX_CURL_URLS = 3

DEFAULT_READ_ROOTS: tuple[Path, ...] = (
    Path("/proc/loadavg"),
    Path("/proc/meminfo"),
    Path("/etc/os-release"),
)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # "" when allowed; a short human reason when refused


@dataclass(frozen=True)
class BashResult:
    exit_code: int | None  # None if killed on timeout
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_s: float


class _Refused(Exception):
    """Internal: unwinds the checker to check(), which turns it into a Verdict. `containers`
    and `ports`: what the refused command named that is someone else's (the tool records the
    refusal on those instances)."""

    def __init__(self, reason: str, *, containers: Iterable[str] = (), ports: Iterable[int] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.containers = sorted(containers)
        self.ports = sorted(ports)


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
    except _Refused as refused:
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


def _roots(read_roots: Sequence[Path]) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(root)) for root in (*read_roots, *DEFAULT_READ_ROOTS))


_PRINTABLE = re.compile(r"[\x20-\x7e\t\n]*")


def _check(command: str, roots: tuple[Path, ...]) -> list[list[str]]:
    """The simple commands, as word lists; raises _Refused."""
    if len(command) > MAX_COMMAND_CHARS:
        raise _Refused(f"command too long ({len(command)} > {MAX_COMMAND_CHARS} characters)")
    if not _PRINTABLE.fullmatch(command):
        bad = next(c for c in command if not _PRINTABLE.fullmatch(c))
        raise _Refused(f"non-ASCII or control character {bad!r} (U+{ord(bad):04X})")
    if all(not line.strip() or line.strip().startswith("#") for line in command.splitlines()):
        raise _Refused("empty command")
    walker = _Walker(command)
    try:
        for tree in bashlex.parse(command):
            walker.walk(tree)
    except _Refused:
        raise
    # bashlex fails on untrusted input in many ways (ParsingError, NotImplementedError,
    # AttributeError...), and a tree of a shape the walker does not expect is no better:
    # the gate fails closed, with the message as the reason.
    except Exception as exc:
        raise _Refused(f"cannot parse: {type(exc).__name__}: {exc}") from None
    walker.check_coverage()
    if len(walker.commands) > MAX_COMMANDS:
        raise _Refused(f"too many commands ({len(walker.commands)} > {MAX_COMMANDS})")
    if len(walker.commands) > 1 and any(words[0] == "nginx" for words in walker.commands):
        # nginx -t opens nginx's pid and log files, so its sandbox lets it write those: no
        # other program may share that run.
        raise _Refused("nginx must run on its own, not in a pipeline or sequence")
    for words in walker.commands:
        _check_simple(words, roots)
    for pipeline in walker.pipelines:
        _check_pipeline([walker.commands[i] for i in pipeline])
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
                    raise _Refused(f"reserved word {part.word!r} is not allowed")
                else:
                    self.walk(part)
            self.pipelines.append(range(first, len(self.commands)))
        elif kind == "list":
            for part in node.parts:
                if part.kind == "operator":
                    if part.op == "&":
                        raise _Refused("background & is not allowed")
                    if part.op not in (";", "&&", "||", "\n"):
                        raise _Refused(f"operator {part.op!r} is not allowed")
                    self.cover(part)
                else:
                    self.walk(part)
        elif kind == "compound":
            first = node.list[0]
            word = first.word if first.kind == "reservedword" else getattr(first, "kind", "")
            raise _Refused(_COMPOUND_REASONS.get(word, "compound commands are not allowed"))
        elif kind == "function":
            raise _Refused("function definitions are not allowed")
        elif kind in ("if", "for", "while", "until"):
            raise _Refused("if/for/while/case is not allowed")
        else:
            raise _Refused(f"{kind} is not allowed")

    def command(self, node: Any) -> None:
        words: list[str] = []
        for part in node.parts:
            if part.kind == "assignment":
                raise _Refused("environment prefixes (NAME=value cmd) are not allowed")
            if part.kind == "redirect":
                text = self.source[part.pos[0] : part.pos[1]]
                if text != "2>&1":
                    raise _Refused(f"redirection ({part.type}) is not allowed; only 2>&1")
                self.cover(part)
                continue
            if part.kind != "word":
                raise _Refused(f"{part.kind} is not allowed")
            inner = getattr(part, "parts", [])
            if inner:  # bashlex saw an expansion; our own quote removal would refuse it too
                raise _Refused(_EXPANSION_REASONS.get(inner[0].kind, f"{inner[0].kind} is not allowed"))
            words.append(_unquote(self.source[part.pos[0] : part.pos[1]]))
            self.cover(part)
        if not words:
            raise _Refused("empty command")
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
                    raise _Refused("cannot parse: comment and command overlap")
                i = end
            else:
                raise _Refused(f"cannot parse: unexpected {char!r} at position {i}")


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
                raise _Refused("cannot parse: unterminated single quote")
            out.append(raw[i + 1 : end])
            i = end + 1
        elif char == '"':
            i = _unquote_double(raw, i + 1, out)
        elif char == "\\":
            if i + 1 >= len(raw) or raw[i + 1] == "\n":
                raise _Refused("line continuation inside a word is not allowed")
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
            raise _Refused(_dollar_reason(raw[i + 1 : i + 2]))
        if char == "`":
            raise _Refused(_EXPANSION_REASONS["commandsubstitution"])
        if char == "\\" and raw[i + 1 : i + 2] in ("$", "`", '"', "\\"):
            out.append(raw[i + 1])
            i += 2
        elif char == "\\" and raw[i + 1 : i + 2] == "\n":
            raise _Refused("line continuation inside a word is not allowed")
        else:
            out.append(char)
            i += 1
    raise _Refused("cannot parse: unterminated double quote")


def _dollar_reason(after: str) -> str:
    if after == "(":
        return _EXPANSION_REASONS["commandsubstitution"]
    if after in ("'", '"'):
        return "$'...' and $\"...\" quoting is not allowed"
    return _EXPANSION_REASONS["parameter"]


def _refuse_unquoted(char: str) -> None:
    if char == "$":
        raise _Refused(_EXPANSION_REASONS["parameter"])
    if char == "`":
        raise _Refused(_EXPANSION_REASONS["commandsubstitution"])
    if char == "~":
        raise _Refused(_EXPANSION_REASONS["tilde"])
    if char in "*?[]":
        raise _Refused(f"unquoted glob character {char!r}; quote it")
    if char in "{}":
        raise _Refused(f"unquoted brace {char!r} (brace expansion); quote it")
    if char in "<>()|;&\n":
        raise _Refused(f"cannot parse: {char!r} inside a word")


# ---------------------------------------------------------------------------
# options: a small getopt that only knows the options we allow
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    flags: frozenset[str] = frozenset()  # "-a", "--all": no value
    valued: Mapping[str, str] = field(default_factory=dict)  # option -> "text" | "path"
    optional: frozenset[str] = frozenset()  # long options whose value must be attached with "="
    refused: Mapping[str, str] = field(default_factory=dict)  # option -> why (a clearer refusal)
    dash_number: bool = False  # head/tail -20


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _opts(
    flags: str = "",
    valued: Mapping[str, str] | None = None,
    optional: str = "",
    refused: Mapping[str, str] | None = None,
    dash_number: bool = False,
) -> _Options:
    return _Options(
        frozenset(flags.split()),
        dict(valued or {}),
        frozenset(optional.split()),
        dict(refused or {}),
        dash_number,
    )


@dataclass
class _Parsed:
    options: list[tuple[str, str]]  # (name, value or "")
    positionals: list[str]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.options}

    def option_paths(self, spec: _Options) -> list[str]:
        """Values of options that name a file (grep -f, nginx -c): checked like file arguments."""
        return [value for name, value in self.options if spec.valued.get(name) == "path"]


def _parse(program: str, args: Sequence[str], spec: _Options) -> _Parsed:
    """Options (known to spec, else refused) and positionals. Options may follow positionals (GNU)."""
    options: list[tuple[str, str]] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positionals.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in spec.valued:
                if not eq:
                    if i >= len(args):
                        raise _Refused(f"{program} {name} needs a value")
                    value, i = args[i], i + 1
                options.append((name, value))
            elif name in spec.flags and not eq:
                options.append((name, ""))
            elif name in spec.optional:
                options.append((name, value))
            else:
                raise _Refused(_option_reason(program, name, spec))
        elif arg.startswith("-") and len(arg) > 1:
            if spec.dash_number and arg[1:].isdigit():
                options.append(("-n", arg[1:]))
                continue
            for k in range(1, len(arg)):
                name = "-" + arg[k]
                if name in spec.valued:
                    value = arg[k + 1 :]
                    if not value:
                        if i >= len(args):
                            raise _Refused(f"{program} {name} needs a value")
                        value, i = args[i], i + 1
                    options.append((name, value))
                    break
                if name not in spec.flags:
                    raise _Refused(_option_reason(program, name, spec))
                options.append((name, ""))
        else:
            positionals.append(arg)
    return _Parsed(options, positionals)


def _option_reason(program: str, name: str, spec: _Options) -> str:
    why = spec.refused.get(name)
    if why:
        return f"{program} {name} is not allowed: {why}"
    return f"{program} option {name} is not allowed"


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


def _check_path(program: str, path: str, roots: tuple[Path, ...]) -> None:
    if path == "-":
        return  # stdin
    if not path.startswith("/"):
        raise _Refused(f"{program}: {path!r} is a relative path; use an absolute path under the read roots")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        raise _Refused(f"{program}: {path} is outside the read roots")


# ---------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------

_REFUSED_PROGRAMS: dict[str, str] = {
    name: why
    for names, why in (
        ("sudo su doas pkexec runuser", "changes privileges"),
        ("eval exec source . command builtin enable hash trap alias", "runs arbitrary code"),
        ("sh bash dash zsh ksh mksh fish csh tcsh busybox rbash", "is a shell"),
        (
            "xargs find timeout nohup nice ionice watch setsid chroot unshare nsenter strace time",
            "runs other programs",
        ),
        ("env printenv set export declare typeset unset", "exposes or changes the environment"),
        ("awk gawk mawk nawk sed perl python python3 ruby node php lua tclsh", "is a scripting language"),
        ("tee", "writes files"),
        (
            "rm rmdir mv cp dd chmod chown chgrp truncate ln touch mkdir install shred mknod mkfifo fallocate",
            "modifies files",
        ),
        ("kill pkill killall reboot shutdown halt poweroff init telinit", "affects processes or the machine"),
        ("nc ncat netcat socat wget ssh scp sftp rsync telnet ftp", "opens network connections"),
        ("mount umount losetup fdisk parted", "changes filesystems"),
    )
    for name in names.split()
}


def _check_simple(words: list[str], roots: tuple[Path, ...]) -> None:
    program, args = words[0], words[1:]
    if "/" in program:
        raise _Refused(f"program must be a bare name, not a path: {program}")
    if program.startswith("mkfs"):
        raise _Refused(f"'{program}' is not allowed: changes filesystems")
    if program in _REFUSED_PROGRAMS:
        raise _Refused(f"'{program}' is not allowed: {_REFUSED_PROGRAMS[program]}")
    checker = _CHECKERS.get(program)
    if checker is None:
        raise _Refused(f"'{program}' is not on the allowlist")
    for path in checker(program, args):
        _check_path(program, path, roots)


# A checker refuses (raises _Refused) or returns every file its command would read,
# from positionals and from option values alike; _check_simple checks them against the roots.
_Checker = Callable[[str, list[str]], list[str]]


def _files_reader(spec: _Options, *, needs_path: bool = False, max_files: int | None = None) -> _Checker:
    """A program whose positionals are all files (no file: stdin, unless needs_path)."""

    def checker(program: str, args: list[str]) -> list[str]:
        parsed = _parse(program, args, spec)
        positionals = parsed.positionals
        if needs_path and not positionals:
            raise _Refused(f"{program} needs an absolute path under the read roots")
        if max_files is not None and len(positionals) > max_files:
            raise _Refused(f"{program} takes at most {max_files} file (a second one would be written)")
        return parsed.option_paths(spec) + positionals

    return checker


def _no_files(spec: _Options, *, max_args: int | None = None) -> _Checker:
    """A program whose positionals are plain words, never files."""

    def checker(program: str, args: list[str]) -> list[str]:
        positionals = _parse(program, args, spec).positionals
        if max_args == 0 and positionals:
            raise _Refused(f"{program} takes no arguments, got {positionals[0]!r}")
        if max_args is not None and len(positionals) > max_args:
            raise _Refused(f"{program} takes at most {max_args} arguments")
        return []

    return checker


_FOLLOW = "follows forever"
_CAT = _opts("-n -b -A -E -T -v -s -e -t --number --number-nonblank --show-all --squeeze-blank")
_HEAD = _opts(
    "-q -v -z --quiet --silent --verbose",
    {"-n": "text", "-c": "text", "--lines": "text", "--bytes": "text"},
    dash_number=True,
)
_TAIL = _opts(
    "-q -v -z --quiet --silent --verbose",
    {"-n": "text", "-c": "text", "--lines": "text", "--bytes": "text"},
    refused={"-f": _FOLLOW, "-F": _FOLLOW, "--follow": _FOLLOW, "--retry": _FOLLOW, "--pid": _FOLLOW},
    dash_number=True,
)
_WC = _opts("-l -w -c -m -L --lines --words --bytes --chars --max-line-length")
_LS = _opts(
    "-l -a -A -h -t -r -S -d -1 -R -i -n -F -s -c -u -U --all --almost-all --human-readable --recursive "
    "--directory --full-time --numeric-uid-gid --inode --size",
    optional="--color --time-style",
)
_STAT = _opts("-t -f --terse --file-system", {"-c": "text", "--format": "text", "--printf": "text"})
_DU = _opts(
    "-s -h -a -c -x -k -m -b --summarize --human-readable --all --total --one-file-system --apparent-size",
    {"-d": "text", "--max-depth": "text", "--exclude": "text"},
)
_SORT = _opts(
    "-n -r -u -h -V -f -b -s -M -g -R -z --numeric-sort --reverse --unique --human-numeric-sort "
    "--version-sort --ignore-case --ignore-leading-blanks --stable --month-sort --general-numeric-sort",
    {"-k": "text", "-t": "text", "--key": "text", "--field-separator": "text"},
    refused={
        "-o": "writes a file",
        "--output": "writes a file",
        "-T": "writes temporary files",
        "--compress-program": "runs a program",
        "--files0-from": "reads a file list",
    },
)
_UNIQ = _opts(
    "-c -d -u -i -z --count --repeated --unique --ignore-case",
    {"-f": "text", "-s": "text", "-w": "text", "--skip-fields": "text", "--skip-chars": "text"},
)
_CUT = _opts(
    "-s -z --complement --only-delimited",
    {"-d": "text", "-f": "text", "-c": "text", "-b": "text", "--delimiter": "text", "--fields": "text"},
)
_TR = _opts("-d -s -c -C -t --delete --squeeze-repeats --complement --truncate-set1")
_GREP_VALUED = {
    "-e": "text",
    "-f": "path",
    "-A": "text",
    "-B": "text",
    "-C": "text",
    "-m": "text",
    "--regexp": "text",
    "--file": "path",
    "--after-context": "text",
    "--before-context": "text",
    "--context": "text",
    "--max-count": "text",
    "--include": "text",
    "--exclude": "text",
    "--exclude-dir": "text",
}
_GREP = _opts(
    "-i -v -n -c -l -L -h -H -o -q -s -w -x -E -F -G -P -r -a -I -z -b "
    "--ignore-case --invert-match --line-number --count --files-with-matches --files-without-match "
    "--no-filename --with-filename --only-matching --quiet --silent --no-messages --word-regexp "
    "--line-regexp --extended-regexp --fixed-strings --basic-regexp --perl-regexp --recursive --text",
    _GREP_VALUED,
    optional="--color --colour",
    refused={
        "-R": "follows symlinks out of the read roots; use -r",
        "--dereference-recursive": "follows symlinks out of the read roots; use -r",
    },
)


def _grep(program: str, args: list[str]) -> list[str]:
    parsed = _parse(program, args, _GREP)
    names, positionals = parsed.names, parsed.positionals
    if not names & {"-e", "-f", "--regexp", "--file"}:
        if not positionals:
            raise _Refused(f"{program} needs a pattern")
        positionals = positionals[1:]
    if names & {"-r", "--recursive"} and not positionals:
        raise _Refused(f"{program} -r needs an absolute path under the read roots")
    return parsed.option_paths(_GREP) + positionals


_JQ = _opts(
    "-r -j -c -n -s -e -S -C -M -a --raw-output --join-output --compact-output --null-input --slurp "
    "--exit-status --sort-keys --color-output --monochrome-output --ascii-output --tab --raw-input -R",
    {"-f": "path", "--from-file": "path", "--indent": "text"},
    refused={
        "-L": "loads modules",
        "--library-path": "loads modules",
        # what follows --args is strings, what precedes it files: not worth the order-tracking
        "--args": "use --arg NAME VALUE",
        "--jsonargs": "use --argjson NAME VALUE",
    },
)


def _jq(program: str, args: list[str]) -> list[str]:
    # --arg/--argjson/--slurpfile/--rawfile take two values; handled before the generic parser.
    rest: list[str] = []
    files: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("--arg", "--argjson", "--slurpfile", "--rawfile"):
            if i + 2 >= len(args):
                raise _Refused(f"jq {args[i]} needs a name and a value")
            if args[i] in ("--slurpfile", "--rawfile"):
                files.append(args[i + 2])
            i += 3
        else:
            rest.append(args[i])
            i += 1
    parsed = _parse(program, rest, _JQ)
    names, positionals = parsed.names, parsed.positionals
    files += parsed.option_paths(_JQ)
    if not names & {"-f", "--from-file"}:
        if not positionals:
            return files  # `jq` alone is `jq .` on stdin
        if re.search(r"\b(import|include|modulemeta)\b", positionals[0]):
            raise _Refused("jq modules (import/include) are not allowed")
        positionals = positionals[1:]
    return files + positionals


def _echo(program: str, args: list[str]) -> list[str]:
    return []  # prints its arguments; they were already checked for expansions


_SS = _opts(
    "-l -t -n -p -u -a -s -4 -6 -e -o -x -w -i -m -H -r "
    "--listening --tcp --numeric --processes --udp --all --summary --extended --options --unix --raw "
    "--info --memory --no-header --resolve --ipv4 --ipv6",
    refused={"-K": "kills sockets", "--kill": "kills sockets", "-D": "writes a file", "-F": "reads a file"},
)
_DF = _opts(
    "-h -H -T -i -k -P -a -l --human-readable --si --print-type --inodes --portability --all --local",
    {"-t": "text", "-x": "text", "--type": "text", "--exclude-type": "text"},
    optional="--output",
)
_FREE = _opts("-h -m -g -k -b -t -w -l -v --human --mega --giga --kilo --bytes --total --wide --si --lohi")
_UPTIME = _opts("-p -s --pretty --since")
_HOSTNAME = _opts("-f -s -i -I -d -A --fqdn --short --ip-address --all-ip-addresses --domain --long")
_ID = _opts("-u -g -G -n -r -a -z --user --group --groups --name --real")
_WHOAMI = _opts()
_DATE = _opts(
    "-u -R --utc --universal --rfc-email",
    {"-d": "text", "--date": "text"},
    optional="--iso-8601 --rfc-3339",
    refused={
        "-s": "sets the clock",
        "--set": "sets the clock",
        "-f": "reads a file",
        "--file": "reads a file",
    },
)


def _date(program: str, args: list[str]) -> list[str]:
    # -I takes an optional attached value (-Iseconds), which the generic parser cannot tell from a cluster.
    args = [a for a in args if not re.fullmatch(r"-I(date|hours|minutes|seconds|ns)?", a)]
    positionals = _parse(program, args, _DATE).positionals
    for word in positionals:
        if not word.startswith("+"):
            raise _Refused("date only takes a +FORMAT argument (setting the clock is not allowed)")
    return []


_PS_BSD_LETTERS = set("auxfwjlvrScnhTm")
_PS = _opts(
    "-e -f -F -l -A -a -x -H -w -y -j -T -d -N --forest --no-headers --headers",
    {
        "-o": "text",
        "-O": "text",
        "-p": "text",
        "-u": "text",
        "-U": "text",
        "-C": "text",
        "-g": "text",
        "-G": "text",
        "-t": "text",
        "-q": "text",
        "--sort": "text",
        "--format": "text",
        "--pid": "text",
        "--ppid": "text",
        "--user": "text",
        "--cols": "text",
        "--columns": "text",
        "--width": "text",
    },
)


def _ps(program: str, args: list[str]) -> list[str]:
    positionals = _parse(program, args, _PS).positionals
    for word in positionals:  # BSD-style options (ps aux); `e` would print process environments
        if "e" in word:
            raise _Refused("ps e shows process environments (secrets); use ps aux")
        if not set(word) <= _PS_BSD_LETTERS:
            raise _Refused(f"ps option {word!r} is not allowed")
    return []


_NGINX = _opts(
    "-t -T -v -V -q -h",
    {"-p": "text", "-c": "text"},  # not read-root paths: only NginxPin's values (_check_nginx)
    refused={"-s": "sends signals to nginx", "-g": "sets directives", "-e": "writes a log file"},
)


def _nginx(program: str, args: list[str]) -> list[str]:
    parsed = _parse(program, args, _NGINX)
    if parsed.positionals:
        raise _Refused(f"nginx takes no arguments, got {parsed.positionals[0]!r}")
    if not parsed.names & {"-t", "-T", "-v", "-V"}:
        raise _Refused("nginx needs -t, -T, -v or -V (without them it would start a server)")
    return []


def _check_nginx(commands: list[list[str]], pin: NginxPin) -> None:
    """nginx runs against piDeploy's own configuration or the compiled-in default, never a file
    a caller names: a configuration can `load_module` any .so, and nginx -t loads it as root
    (an instance writes its own storage folder, which is a read root of the CLI)."""
    for words in commands:
        if words[0] != "nginx":
            continue
        for name, value in _parse("nginx", words[1:], _NGINX).options:
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
                raise _Refused(
                    f"nginx {name} {value}: nginx only runs with piDeploy's own {what} "
                    f"({pin.describe()}), or with none"
                )


_SYSTEMCTL = _opts(
    "-l -a -q --full --all --no-pager --value --user --system --plain --no-legend --quiet",
    {"-n": "text", "--lines": "text", "-p": "text", "--property": "text", "-o": "text", "--output": "text"},
    refused={"-H": "talks to another host", "--host": "talks to another host", "-M": "talks to a container"},
)
_SYSTEMCTL_VERBS = ("status", "is-active", "is-failed", "show")


def _systemctl(program: str, args: list[str]) -> list[str]:
    positionals = _parse(program, args, _SYSTEMCTL).positionals
    if not positionals or positionals[0] not in _SYSTEMCTL_VERBS:
        verb = positionals[0] if positionals else "(none)"
        raise _Refused(f"systemctl {verb} is not allowed; only {', '.join(_SYSTEMCTL_VERBS)}")
    return []


_JOURNAL_WRITE = "changes the journal"
_JOURNALCTL = _opts(
    "-r -x -e -q -k -a -m --no-pager --reverse --catalog --pager-end --quiet --dmesg --all --merge "
    "--user --system --utc --no-hostname --no-full --list-boots -b",
    {
        "-u": "text",
        "--unit": "text",
        "--user-unit": "text",
        "-n": "text",
        "--lines": "text",
        "-S": "text",
        "--since": "text",
        "-U": "text",
        "--until": "text",
        "-p": "text",
        "--priority": "text",
        "-o": "text",
        "--output": "text",
        "-g": "text",
        "--grep": "text",
        "-t": "text",
        "--identifier": "text",
    },
    optional="--boot",
    refused={
        "-f": _FOLLOW,
        "--follow": _FOLLOW,
        "--rotate": _JOURNAL_WRITE,
        "--vacuum-size": _JOURNAL_WRITE,
        "--vacuum-time": _JOURNAL_WRITE,
        "--vacuum-files": _JOURNAL_WRITE,
        "--flush": _JOURNAL_WRITE,
        "--sync": _JOURNAL_WRITE,
        "--relinquish-var": _JOURNAL_WRITE,
        "--cursor-file": "writes a file",
        "-D": "reads another journal",
        "--directory": "reads another journal",
        "--file": "reads another journal",
        "--root": "reads another journal",
    },
)


def _journalctl(program: str, args: list[str]) -> list[str]:
    positionals = _parse(program, args, _JOURNALCTL).positionals
    for word in positionals:  # journal matches such as _PID=1; a path would match an executable
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s]*|\+", word):
            raise _Refused(f"journalctl argument {word!r} is not allowed; only FIELD=value matches")
    return []


_PG_ISREADY = _opts(
    "-q --quiet",
    {
        "-h": "text",
        "--host": "text",
        "-p": "text",
        "--port": "text",
        "-d": "text",
        "--dbname": "text",
        "-U": "text",
        "--username": "text",
        "-t": "text",
        "--timeout": "text",
    },
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _pg_isready(program: str, args: list[str]) -> list[str]:
    parsed = _parse(program, args, _PG_ISREADY)
    if parsed.positionals:
        raise _Refused(f"pg_isready takes no arguments, got {parsed.positionals[0]!r}")
    paths: list[str] = []
    for name, value in parsed.options:
        if name in ("-h", "--host"):
            if value.startswith("/"):
                paths.append(value)  # a socket directory: must be one of ours
            elif value not in _LOOPBACK_HOSTS:
                raise _Refused(
                    f"pg_isready -h {value}: only loopback or a socket directory under the read roots"
                )
        if name in ("-d", "--dbname") and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise _Refused("pg_isready -d takes a database name, not a connection string")
    return paths


# --- docker / podman -------------------------------------------------------

_DOCKER_GLOBAL = {
    "-H": "redirects the client to another engine",
    "--host": "redirects the client to another engine",
    "--context": "redirects the client to another engine",
    "-c": "redirects the client to another engine",
    "--config": "redirects the client to another engine",
    "--url": "redirects the client to another engine",
    "--connection": "redirects the client to another engine",
    "--remote": "redirects the client to another engine",
}
_DOCKER_SUBCOMMANDS: dict[str, _Options] = {
    "ps": _opts(
        "-a -q -l -s --all --quiet --latest --no-trunc --size --noheading",
        {"-n": "text", "--last": "text", "--format": "text", "-f": "text", "--filter": "text"},
    ),
    "inspect": _opts("-s --size", {"-f": "text", "--format": "text", "--type": "text"}),
    "logs": _opts(
        "-t --timestamps --details",
        {"--tail": "text", "--since": "text", "--until": "text"},
        refused={
            "-f": _FOLLOW,
            "--follow": _FOLLOW,
            "-n": "is ambiguous between docker and podman; use --tail",
        },
    ),
    "images": _opts(
        "-a -q --all --quiet --digests --no-trunc --noheading",
        {"--format": "text", "-f": "text", "--filter": "text"},
    ),
    "version": _opts("", {"-f": "text", "--format": "text"}),
    "info": _opts("", {"-f": "text", "--format": "text"}),
    "port": _opts(),
    "top": _opts(),
    "stats": _opts("-a --all --no-stream --no-trunc", {"--format": "text"}),
}
_DOCKER_GROUPS = {
    "container": {"ls": "ps", "inspect": "inspect", "logs": "logs", "port": "port", "top": "top"},
    "image": {"ls": "images", "inspect": "inspect"},
}
_DOCKER_WRITES = _words(
    "rm rmi run exec kill stop start restart cp create commit pull push build update rename network volume "
    "system prune pause unpause attach wait export import save load tag login logout plugin swarm service "
    "secret compose buildx manifest pod machine play kube generate"
)


@dataclass(frozen=True)
class _DockerCall:
    shown: str  # as the model wrote it, for reasons: "docker container ls"
    subcommand: str  # the canonical one: ps, inspect, logs, images, version, info, port, top, stats
    group: str  # "", "container" or "image"
    parsed: _Parsed


def _docker_call(program: str, args: list[str]) -> _DockerCall:
    if not args:
        raise _Refused(f"{program} needs a subcommand")
    if args[0].startswith("-"):
        name = args[0].partition("=")[0]
        why = _DOCKER_GLOBAL.get(name, "global flags are not allowed")
        raise _Refused(f"{program} {name} is not allowed: {why}")
    subcommand, rest, group = args[0], args[1:], ""
    shown = f"{program} {subcommand}"
    if subcommand in _DOCKER_GROUPS:
        inner = rest[0] if rest else ""
        if inner not in _DOCKER_GROUPS[subcommand]:
            allowed = " ".join(_DOCKER_GROUPS[subcommand])
            raise _Refused(f"{program} {subcommand} {inner} is not allowed; only {allowed}".rstrip())
        group, shown = subcommand, f"{shown} {inner}"
        subcommand, rest = _DOCKER_GROUPS[group][inner], rest[1:]
    if subcommand not in _DOCKER_SUBCOMMANDS:
        kind = "not read-only" if subcommand in _DOCKER_WRITES else "not allowed"
        raise _Refused(f"{shown} is {kind}; only {' '.join(_DOCKER_SUBCOMMANDS)}")
    return _DockerCall(shown, subcommand, group, _parse(shown, rest, _DOCKER_SUBCOMMANDS[subcommand]))


_PORT_SPEC = re.compile(r"\d{1,5}(/(tcp|udp|sctp))?")


def _docker(program: str, args: list[str]) -> list[str]:
    call = _docker_call(program, args)
    names, positionals = call.parsed.names, call.parsed.positionals
    if call.subcommand == "stats" and "--no-stream" not in names:
        raise _Refused(f"{program} stats needs --no-stream (it would stream forever)")
    if call.subcommand == "top" and len(positionals) != 1:
        raise _Refused(f"{program} top takes exactly one container and no ps options")
    if call.subcommand == "port" and (
        not 1 <= len(positionals) <= 2 or not all(map(_PORT_SPEC.fullmatch, positionals[1:]))
    ):
        raise _Refused(f"{call.shown} takes one container and at most one PORT[/PROTO]")
    if call.subcommand in ("inspect", "logs") and not positionals:
        raise _Refused(f"{call.shown} needs a {'name' if call.group == 'image' else 'container'}")
    for name, value in call.parsed.options:
        if name == "--format" or (name == "-f" and call.subcommand in ("inspect", "version", "info")):
            _check_template(call.shown, value)
    return []


# --- Go templates (docker --format) -------------------------------------------
#
# A template runs over the whole inspected object, so it can print any field, and Go's
# template functions can re-encode what it prints (printf "%x", slice, index, len, eq as an
# oracle): text redaction cannot find a secret once it is spelled another way. So a template
# is read here, action by action: fields, json, join, print(ln) and range/if/with/else/end
# only, no pipes, parentheses or variables; no field named Env (the environment: secrets);
# and a whole object (`.`, `$`, `.Config`...) printed or ranged over only through json, whose
# output keeps its "Env" key, which the tool's redaction finds.

_TEMPLATE_FUNCTIONS = frozenset({"json", "join", "print", "println"})
_TEMPLATE_CONTROL = frozenset({"range", "if", "with", "else", "end"})
_TEMPLATE_LITERALS = frozenset({"true", "false"})
_TEMPLATE_TOKEN = re.compile(
    r"""\s+"""
    r"""|(?P<end>-?}})"""
    r"""|(?P<string>"(?:[^"\\\n]|\\.)*"|`[^`]*`)"""
    r"""|(?P<number>-?\d+(?:\.\d+)?)"""
    r"""|(?P<field>(?:\$[A-Za-z0-9_]*)?(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\$[A-Za-z0-9_]*|\.)"""
    r"""|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"""
)
_SECRET_FIELD = re.compile(r"(?i)env|createcommand")  # createcommand: podman's, with its -e flags
_WHOLE_OBJECT = re.compile(r"(?i)\$[a-z0-9_]*|\.|.*config")  # bare . or $, or a *Config struct


def _check_template(shown: str, template: str) -> None:
    i = 0
    while (start := template.find("{{", i)) >= 0:
        i = _check_action(shown, template, start + 2)


def _check_action(shown: str, template: str, i: int) -> int:
    """Read one {{...}} action from i (after the braces); where the text goes on after it."""
    if template.startswith("- ", i):
        i += 2  # {{- trims the text before
    if template.startswith("/*", i):
        raise _Refused(f"{shown} --format: template comments are not allowed")
    tokens: list[tuple[str, str]] = []
    while True:
        match = _TEMPLATE_TOKEN.match(template, i)
        if match is None:
            what = template[i : i + 1] or "the end of the template"
            raise _Refused(
                f"{shown} --format: {what!r} is not allowed in a template (only fields, json, join, "
                "print, println, range, if, with, else, end; no pipes, parentheses or variables)"
            )
        i = match.end()
        if match.lastgroup == "end":
            break
        if match.lastgroup is not None:
            tokens.append((match.lastgroup, match.group()))
    words = [text for kind, text in tokens if kind == "word"]
    for word in words:
        if word not in _TEMPLATE_FUNCTIONS | _TEMPLATE_CONTROL | _TEMPLATE_LITERALS:
            raise _Refused(f"{shown} --format: template function {word!r} is not allowed")
    fields = [text for kind, text in tokens if kind == "field"]
    for field_ in fields:
        for part in field_.split("."):
            if _SECRET_FIELD.fullmatch(part):
                raise _Refused(
                    f"{shown} --format: the field {part} is a container's environment (secrets); "
                    "it is never shown"
                )
    head = words[0] if words and tokens[0][0] == "word" else ""
    if head not in ("json", "if", "with", "else", "end"):  # it prints or ranges over its fields
        for field_ in fields:
            if _WHOLE_OBJECT.fullmatch(field_.rsplit(".", 1)[-1] if field_ != "." else "."):
                raise _Refused(
                    f"{shown} --format: {{{{{' '.join(t for _, t in tokens)}}}}} prints a whole "
                    "object as it is (its environment too); use {{json ...}}"
                )
    return i


# What a docker command prints (a container's environment, its logs, its processes' arguments) is
# redacted only once the whole command has run: a program it is piped into could first cut a
# secret into pieces or re-encode it (cut -c, head -c, grep -o, tr, jq's @base64) so that
# redaction no longer finds it. So its output goes on only through filters that keep lines whole.
_LINE_FILTERS: dict[str, frozenset[str]] = {  # program -> its options that would cut lines
    "grep": frozenset({"-o", "--only-matching"}),
    "egrep": frozenset({"-o", "--only-matching"}),
    "fgrep": frozenset({"-o", "--only-matching"}),
    "head": frozenset({"-c", "--bytes"}),
    "tail": frozenset({"-c", "--bytes"}),
    "sort": frozenset(),
    "uniq": frozenset(),
    "wc": frozenset(),
}
_LINE_FILTER_SPECS = {"grep": _GREP, "egrep": _GREP, "fgrep": _GREP, "head": _HEAD, "tail": _TAIL}


def _check_pipeline(commands: list[list[str]]) -> None:
    docker = next((i for i, words in enumerate(commands) if words[0] in ("docker", "podman")), None)
    if docker is None:
        return
    for words in commands[docker + 1 :]:
        program = words[0]
        spec = _LINE_FILTER_SPECS.get(program)
        cutting = _LINE_FILTERS.get(program)
        if cutting is not None and spec is not None:
            cutting = cutting & _parse(program, words[1:], spec).names
        if cutting is None or cutting:
            how = f"{program} {min(cutting)}" if cutting else program
            raise _Refused(
                f"{commands[docker][0]}'s output may go on only through grep, head/tail -n, sort, uniq "
                f"or wc, which keep lines whole, not {how} (a secret in it must stay whole to be redacted)"
            )


def _check_containers(commands: list[list[str]], containers: Callable[[], Containers]) -> None:
    """A user's task names only its own containers, as the engine resolves the words it gives
    (an id, an id prefix, a name), and lists nothing: every listing shows other users'
    containers, their names, labels and commands."""
    resolved: Containers | None = None
    for words in commands:
        program, args = words[0], words[1:]
        if program in _HOST_WIDE:
            raise _Refused(f"{program} {_HOST_WIDE[program]}: for operators; {_YOUR_CONTAINER}")
        if program == "podman":
            # The podman program reads its own container store, not the engine piDeploy resolves
            # names through (and not its own sandbox either): nothing here could vouch for a name.
            raise _Refused("podman is for operators; use docker, which talks to piDeploy's engine")
        if program != "docker":
            continue
        call = _docker_call(program, args)
        for ref in _container_refs(call):
            resolved = resolved or containers()
            found = resolved.resolve(ref)
            if not found or not found <= resolved.own:
                raise _Refused(f"{ref} is not one of this user's containers", containers=found - resolved.own)
            if len(found) > 1:
                raise _Refused(f"{ref} is ambiguous (an id prefix of several containers); use the name")


_LISTING = "listing every container is for operators; name your own container, or use instance_status"
_YOUR_CONTAINER = "use docker top/stats/port/logs with your container's name, or instance_status"
# Host-wide views that enumerate every user's containers, outside docker's own words.
_HOST_WIDE = {
    "ps": "shows every container's processes (and the engine's, with container ids and names)",
    "df": "shows every container's mounts (named by container id)",
    "ss": "shows every instance's ports and connections",
    "systemctl": "shows every service's processes (the engine's, with container ids)",
    "journalctl": "reads the whole machine's journal (the engine's events, containers' logs)",
}


def _container_refs(call: _DockerCall) -> list[str]:
    """The words of a docker call that name containers; _Refused for a listing."""
    parsed, shown = call.parsed, call.shown
    if call.subcommand in ("images", "version") or (call.group == "image" and call.subcommand == "inspect"):
        return []
    if call.subcommand == "ps":
        raise _Refused(f"{shown}: {_LISTING}")
    if call.subcommand == "info":
        raise _Refused(f"{shown} counts every container and describes the engine: for operators")
    if call.subcommand == "stats" and (not parsed.positionals or parsed.names & {"-a", "--all"}):
        raise _Refused(f"{shown} without your containers' names: {_LISTING}")
    if call.subcommand == "inspect":
        kinds = {value for name, value in parsed.options if name == "--type"}
        if kinds - {"container"}:
            raise _Refused(f"{shown} --type {min(kinds - {'container'})}: only your own containers")
    if call.subcommand == "port":
        return parsed.positionals[:1]
    return parsed.positionals


# --- curl --------------------------------------------------------------------

_CURL_WRITES = "writes a file"
_CURL_SENDS = "sends data (GET/HEAD only)"
_CURL = _opts(
    "-s -S -f -i -I -v -k -g -4 -6 --silent --show-error --fail --fail-with-body --include --head --verbose "
    "--insecure --globoff --compressed --http1.1 --http2 --ipv4 --ipv6 --no-progress-meter",
    {
        "-m": "text",
        "--max-time": "text",
        "--connect-timeout": "text",
        "-H": "text",
        "--header": "text",
        "-w": "text",
        "--write-out": "text",
        "-X": "text",
        "--request": "text",
        "-A": "text",
        "--user-agent": "text",
        "--url": "text",
    },
    refused={
        "-o": _CURL_WRITES,
        "--output": _CURL_WRITES,
        "-O": _CURL_WRITES,
        "--remote-name": _CURL_WRITES,
        "--remote-name-all": _CURL_WRITES,
        "-D": _CURL_WRITES,
        "--dump-header": _CURL_WRITES,
        "-c": _CURL_WRITES,
        "--cookie-jar": _CURL_WRITES,
        "--trace": _CURL_WRITES,
        "--trace-ascii": _CURL_WRITES,
        "--stderr": _CURL_WRITES,
        "-d": _CURL_SENDS,
        "--data": _CURL_SENDS,
        "--data-raw": _CURL_SENDS,
        "--data-binary": _CURL_SENDS,
        "--data-urlencode": _CURL_SENDS,
        "--data-ascii": _CURL_SENDS,
        "--json": _CURL_SENDS,
        "-F": _CURL_SENDS,
        "--form": _CURL_SENDS,
        "-T": _CURL_SENDS,
        "--upload-file": _CURL_SENDS,
        "-K": "reads options from a file",
        "--config": "reads options from a file",
        "--unix-socket": "reaches the engine socket; use docker",
        "--abstract-unix-socket": "reaches the engine socket; use docker",
        "-u": "sends credentials",
        "--user": "sends credentials",
        "-x": "uses a proxy",
        "--proxy": "uses a proxy",
        "-L": "follows redirects off loopback",
        "--location": "follows redirects off loopback",
        "--resolve": "redirects the host",
        "--connect-to": "redirects the host",
        "-b": "reads cookies from a file",
        "--cookie": "reads cookies from a file",
    },
)
_CURL_URL = re.compile(
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?"
    r"(?P<host>127\.0\.0\.1|localhost|\[::1\])"
    r"(?::(?P<port>\d{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:%/?#-]*)?"
)
_ENGINE_PORTS = {"2375", "2376"}  # a Docker Engine API over TCP: its GETs can read container files


def _curl(program: str, args: list[str]) -> list[str]:
    parsed = _parse(program, args, _CURL)
    for name, value in parsed.options:
        if name in ("-X", "--request") and value not in ("GET", "HEAD"):
            raise _Refused(f"curl -X {value} is not allowed: {_CURL_SENDS}")
        if name in ("-H", "--header", "-w", "--write-out") and value.startswith("@"):
            raise _Refused(f"curl {name} @file reads a file")
        if name in ("-w", "--write-out") and "%output" in value:
            raise _Refused(f"curl {name} %output writes a file")
    urls = _curl_urls(parsed)
    if not urls:
        raise _Refused("curl needs a loopback URL")
    if len(urls) > MAX_CURL_URLS:
        raise _Refused(f"curl takes at most {MAX_CURL_URLS} URLs")
    for url in urls:
        port = _curl_port(url)
        if str(port) in _ENGINE_PORTS:
            raise _Refused(f"curl to port {port} (the engine API) is not allowed; use docker")
    return []


def _curl_urls(parsed: _Parsed) -> list[str]:
    return parsed.positionals + [value for name, value in parsed.options if name == "--url"]


def _curl_port(url: str) -> int:
    """The loopback TCP port an allowed curl URL connects to (80 or 443 when it names none)."""
    match = _CURL_URL.fullmatch(url)
    if match is None:
        raise _Refused(f"curl URL {url!r} is not loopback (127.0.0.1, localhost, [::1]) over http(s)")
    scheme = (match["scheme"] or "http").lower()
    if scheme not in ("http", "https"):
        raise _Refused(f"curl scheme {scheme}:// is not allowed; only http and https")
    return int(match["port"] or (443 if scheme == "https" else 80))


def _check_ports(commands: list[list[str]], allowed: Collection[int]) -> None:
    """A run limited to some TCP ports (a user's task: its own instances): every curl URL must
    name one of them, and nothing else that opens TCP connections or loads code from a
    config file may run."""
    for words in commands:
        program, args = words[0], words[1:]
        if program in ("nginx", "pg_isready"):
            # nginx -c loads the modules its config names (code, as root) from wherever it says.
            raise _Refused(f"{program} is for operators and the heartbeat, not a user's task")
        if program != "curl":
            continue
        for port in map(_curl_port, _curl_urls(_parse(program, args, _CURL))):
            if port not in allowed:
                mine = ", ".join(str(p) for p in sorted(allowed)) or "none"
                raise _Refused(f"port {port} is not one of this task's instance ports ({mine})", ports=[port])


_CHECKERS: dict[str, _Checker] = {
    "cat": _files_reader(_CAT),
    "head": _files_reader(_HEAD),
    "tail": _files_reader(_TAIL),
    "wc": _files_reader(_WC),
    "ls": _files_reader(_LS, needs_path=True),
    "stat": _files_reader(_STAT, needs_path=True),
    "du": _files_reader(_DU, needs_path=True),
    "sort": _files_reader(_SORT),
    "uniq": _files_reader(_UNIQ, max_files=1),
    "cut": _files_reader(_CUT),
    "tr": _no_files(_TR, max_args=2),
    "grep": _grep,
    "egrep": _grep,
    "fgrep": _grep,
    "jq": _jq,
    "echo": _echo,
    "docker": _docker,
    "podman": _docker,
    "curl": _curl,
    "ss": _no_files(_SS),
    "df": _no_files(_DF),  # statfs only, no content: any mount point may be asked about
    "free": _no_files(_FREE, max_args=0),
    "uptime": _no_files(_UPTIME, max_args=0),
    "date": _date,
    "hostname": _no_files(_HOSTNAME, max_args=0),
    "id": _no_files(_ID, max_args=1),
    "whoami": _no_files(_WHOAMI, max_args=0),
    "ps": _ps,
    "nginx": _nginx,
    "systemctl": _systemctl,
    "journalctl": _journalctl,
    "pg_isready": _pg_isready,
}


# ---------------------------------------------------------------------------
# run(): bash -c in its own process group, bounded in time and output
# ---------------------------------------------------------------------------

# Variables that make bash run code before the command (BASH_ENV, exported
# functions), change how it parses, or inject libraries; never passed to the child.
_UNSAFE_ENV = re.compile(r"BASH_ENV|ENV|SHELLOPTS|BASHOPTS|CDPATH|GLOBIGNORE|IFS|PS4|BASH_FUNC_.*|LD_.*")
_BASH = shutil.which("bash") or "/bin/bash"


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:  # a minimal environment: no API keys of ours reach the child
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return {k: v for k, v in env.items() if not _UNSAFE_ENV.fullmatch(k)}


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
    except _Refused as refused:
        named = {"container_ids": refused.containers, "ports": refused.ports}
        raise ToolRefused(refused.reason, command=command, **{k: v for k, v in named.items() if v}) from None
    nginx_only = commands[0][0] == "nginx"  # then it is the only command
    if nginx_only:  # its own configuration's folder, wherever the proxy keeps it
        pinned = [Path(nginx.prefix)] if nginx.prefix else []
        pinned += [Path(nginx.conf).parent] if nginx.conf else []
        roots = (*roots, *_roots(pinned))
    started = time.monotonic()
    if timeout <= 0:
        return BashResult(None, "", "", False, True, 0.0)
    deadline = started + timeout
    with _start_sandboxed(
        [_BASH, "--noprofile", "--norc", "-f", "-c", command],  # -f: no globbing, a second line
        roots,
        env=_child_env(env),
        nginx_files=nginx_only,
        connect_ports=None if connect_ports is None else frozenset(connect_ports),
    ) as proc:
        try:
            (out, err, truncated), timed_out = _read_capped(proc, deadline, output_cap)
            if not timed_out:
                timed_out = not _wait_unreaped(proc.pid, deadline)
        finally:
            # The group's leader is not reaped yet, so its id cannot have been reused: this
            # kill reaches only what the command started (all of it on timeout, stragglers
            # otherwise), also when an exception such as KeyboardInterrupt unwinds us.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return BashResult(
        exit_code=None if timed_out else code,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        truncated=truncated,
        timed_out=timed_out,
        duration_s=round(time.monotonic() - started, 3),
    )


# ---------------------------------------------------------------------------
# the sandbox
# ---------------------------------------------------------------------------

logger = logging.getLogger(__name__)

# What any allowed program needs to start and do its job, beside the read roots: binaries and
# libraries (read and execute), the few /etc files libc and ps read (never /etc itself: it holds
# /etc/shadow and secrets of other services), /proc for ps (Landlock denies what belongs to
# processes outside the sandbox: environ, mem, fd, root), the journal for journalctl.
SANDBOX_SYSTEM_PATHS: tuple[str, ...] = (
    *("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"),
    *("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/timezone"),
    *("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/host.conf"),
    *("/etc/resolv.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols"),
    *("/proc", "/sys/devices/system/cpu", "/run/utmp", "/var/log/journal", "/run/log/journal"),
    *("/etc/machine-id", "/dev/null", "/dev/zero", "/dev/urandom"),
    # systemctl status on a systemd host reads unit state and cgroups (no systemd here to check it).
    *("/run/systemd", "/sys/fs/cgroup"),
)

# Only for a command that is nginx alone (-t reads the whole configuration, TLS keys included,
# and opens its pid and error log files for writing, creating them in /var/log/nginx only).
_NGINX_READ_PATHS = ("/etc/nginx", "/etc/ssl", "/etc/letsencrypt", "/var/lib/nginx", "/usr/share/nginx")
_NGINX_WRITE_PATHS = ("/run/nginx.pid", "/var/log/nginx")

# <linux/landlock.h>, <linux/prctl.h>, <linux/capability.h>. The syscall numbers are the same
# on every architecture (they were added after the tables were unified).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH, _LANDLOCK_RULE_NET_PORT = 1, 2
_NET_CONNECT_TCP = 1 << 1  # LANDLOCK_ACCESS_NET_CONNECT_TCP (ABI 4)
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_MAKE_REG, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 8, 1 << 14, 1 << 15
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_LANDLOCK_SCOPE_SIGNAL = 1 << 1  # no signal to a process outside the sandbox (kill, ABI 6)
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 38, 24
_CAP_SETPCAP = 8
# Root reads files an instance wrote under its own uid only through these two
# (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); nginx -t, as root, also hands its temp
# folders to its worker user (CAP_CHOWN, CAP_FOWNER).
_CAPS_KEPT = frozenset({1, 2})
_CAPS_KEPT_FOR_NGINX = _CAPS_KEPT | {0, 3}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4; 0: TCP is left to the allowlist
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_warned_unsandboxed = False


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled at boot)."""
    version = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_long(0),
        ctypes.c_long(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


def sandbox_status() -> str:
    abi = landlock_abi()
    if abi:
        return f"Landlock ABI {abi}: commands read only the read roots and write nothing"
    return "no Landlock in this kernel (Linux 5.13+ needed): the command check alone guards bash"


def _handled_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= 1 << 13  # refer: linking or renaming across folders
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def _syscall(name: str, number: int, *args: Any) -> int:
    """syscall(2), or SandboxFailed. Integers go as C longs: syscall() is variadic."""
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *wide))
    if result < 0:
        raise _sandbox_failed(name)
    return result


def _prctl(name: str, option: int, value: int) -> None:
    zero = ctypes.c_ulong(0)
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) != 0:
        raise _sandbox_failed(name)


def _sandbox_failed(name: str) -> SandboxFailed:
    code = ctypes.get_errno()
    return SandboxFailed(f"bash sandbox: {name} failed: {os.strerror(code)}", call=name, errno=code)


def _enter_sandbox(
    roots: tuple[Path, ...], abi: int, *, nginx_files: bool, connect_ports: frozenset[int] | None
) -> None:
    """Restrict the CALLING THREAD (and what it starts) for good: call it on a throwaway thread.
    nginx_files: also what `nginx -t` opens (see _NGINX_READ_PATHS); in the read roots (piDeploy's
    own nginx keeps its pid and logs there) only files that exist, and only to write in place.
    connect_ports: TCP connects only to these (ABI 4+; unix sockets such as the engine's are not
    TCP and stay reachable)."""
    handled = _handled_rights(abi)
    net = _NET_CONNECT_TCP if connect_ports is not None and abi >= 4 else 0
    scoped = _LANDLOCK_SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(handled, net, scoped)
    # The struct grew with the ABI: hand the kernel only the fields it knows.
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = _syscall("landlock_create_ruleset", _SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        grants = [(Path(p), _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE) for p in SANDBOX_SYSTEM_PATHS]
        grants += [(root, _FS_READ_FILE | _FS_READ_DIR) for root in roots]
        grants += [(Path("/dev/null"), _FS_WRITE_FILE)]
        if nginx_files:
            grants += [(Path(p), _FS_READ_FILE | _FS_READ_DIR) for p in _NGINX_READ_PATHS]
            grants += [(Path(p), _FS_WRITE_FILE | _FS_MAKE_REG) for p in _NGINX_WRITE_PATHS]
            grants += [(root, _FS_WRITE_FILE) for root in roots if root.is_dir()]  # not /etc/os-release
        for path, rights in grants:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # not on this system (/lib64 on arm64, no journal, ...)
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    rights &= _FS_FILE_RIGHTS  # a rule on a file may only name file rights
                rule = _PathBeneathAttr(rights & handled, fd)
                _syscall(
                    "landlock_add_rule",
                    _SYS_LANDLOCK_ADD_RULE,
                    *(ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
                )
            finally:
                os.close(fd)
        for port in sorted(connect_ports or ()) if net else ():
            port_rule = _NetPortAttr(_NET_CONNECT_TCP, port)
            _syscall(
                "landlock_add_rule",
                _SYS_LANDLOCK_ADD_RULE,
                *(ruleset, _LANDLOCK_RULE_NET_PORT, ctypes.byref(port_rule), 0),
            )
        _drop_capabilities(_CAPS_KEPT_FOR_NGINX if nginx_files else _CAPS_KEPT)
        _prctl("prctl(PR_SET_NO_NEW_PRIVS)", _PR_SET_NO_NEW_PRIVS, 1)
        _syscall("landlock_restrict_self", _SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def _drop_capabilities(kept: frozenset[int]) -> None:
    """Shrink this thread's bounding set, so what it starts keeps only `kept` (not
    CAP_SYS_RAWIO, which would open /proc/kcore, nor CAP_SYSLOG, CAP_SYS_ADMIN ...).
    Without CAP_SETPCAP there is nothing to drop: piDeploy does not run as root."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in sorted(set(range(last + 1)) - kept, key=lambda c: c == _CAP_SETPCAP):
        try:
            _prctl(f"prctl(PR_CAPBSET_DROP, {cap})", _PR_CAPBSET_DROP, cap)
        except SandboxFailed as failed:
            # No CAP_SETPCAP: fine when this thread holds no capability it should not pass on
            # (not root); root without it would hand CAP_SYS_RAWIO and the rest to the command.
            if failed.data["errno"] == errno.EPERM and not _effective_capabilities() - kept:
                return
            raise


def _effective_capabilities() -> set[int]:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    return {cap for cap in range(64) if mask >> cap & 1}


def _start_sandboxed(
    argv: list[str],
    roots: tuple[Path, ...],
    env: dict[str, str],
    *,
    nginx_files: bool = False,
    connect_ports: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in a new process group, stdin from /dev/null, stdout/stderr piped, cwd `/`,
    inside the sandbox when the kernel has one. The restriction is taken by a thread that exists
    only to start the child: Landlock and the bounding set are per thread, so the rest of
    piDeploy stays unrestricted."""
    global _warned_unsandboxed
    abi = landlock_abi()
    if not abi and not _warned_unsandboxed:
        _warned_unsandboxed = True
        logger.warning(
            "no Landlock in this kernel: bash commands are guarded by the command check alone",
            extra={"action": "gate_sandbox_unavailable"},
        )
    outcome: list[subprocess.Popen[bytes] | BaseException] = []

    def start() -> None:
        try:
            if abi:
                _enter_sandbox(roots, abi, nginx_files=nginx_files, connect_ports=connect_ports)
            outcome.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd="/",
                    start_new_session=True,
                )
            )
        except BaseException as exc:  # handed to the caller's thread, raised there
            outcome.append(exc)

    starter = threading.Thread(target=start, name="gate-sandbox", daemon=True)
    starter.start()
    starter.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _read_capped(
    proc: subprocess.Popen[bytes], deadline: float, cap: int
) -> tuple[tuple[bytes, bytes, bool], bool]:
    """Read both pipes until EOF or the deadline; keep at most `cap` bytes of each, drain the rest."""
    assert proc.stdout is not None and proc.stderr is not None
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (bytes(kept[proc.stdout.fileno()]), bytes(kept[proc.stderr.fileno()]), truncated), True
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffer = kept[key.fd]
                room = cap - len(buffer)
                if len(chunk) > room:
                    truncated = True
                buffer += chunk[: max(room, 0)]
    return (bytes(kept[proc.stdout.fileno()]), bytes(kept[proc.stderr.fileno()]), truncated), False


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for the child to exit without reaping it; False if the deadline passed first."""
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.005)
    return False


def cli(command: str, read_roots: Sequence[Path] = (), nginx: NginxPin = NginxPin()) -> int:
    """For `python pideploy.py gate 'COMMAND'`: prints `allowed` or `refused: REASON` to stdout;
    returns 0 when allowed, 1 when refused. The scope is an operator's."""
    verdict = check(command, read_roots, nginx=nginx)
    print("allowed" if verdict.allowed else f"refused: {verdict.reason}", file=sys.stdout)
    return 0 if verdict.allowed else 1
