"""The bash gate's per-program rules: which programs may run, with which options and arguments.

Why a file of its own: gate.py parses a command into simple commands (word lists); this
module says whether each of them may run. Most of it is data, one table (PROGRAMS: a
program's name -> a Rule of its options and positionals); code is kept for the few rules
a table cannot say: docker's subcommands and --format templates, curl's URLs, file paths.
What depends on who runs the command (a user's containers and ports, nginx's pinned
configuration) is gate.py's, over what this module reads out of the words (container_refs...).

Policy decisions:
- Options are allowlisted per program (unknown option: refused), so a follow flag, an
  output file or a file-reading option is never let through by accident. Notable:
  `docker logs -n` is refused (it means --tail in docker but --names in podman);
  `docker top` takes no ps options; `ps e` (process environments) is refused; curl may not
  use --unix-socket (the engine socket would expose every container), -L (a redirect leaves
  loopback), `@file` header or write-out values, or the Docker Engine TCP ports 2375/2376.
- `find` is refused entirely (it can exec and delete); `ls -R`, `du` and `grep -r` cover
  its read-only uses.
- File arguments must be absolute and, after os.path.realpath (`..` and symlinks), lie under
  a read root. Relative paths are refused (the command runs in `/`), and programs that would
  default to the working directory (`ls`, `du`, `grep -r`) need a path.
- docker --format templates are read action by action (_check_template): they may print
  fields but never a container's Env, nor re-encode what they print. docker's output is piped
  on only into filters that keep lines whole (grep, head/tail -n, sort, uniq, wc): the tool
  redacts secrets from the final output, and cut, head -c, grep -o, tr or jq could first cut
  one in pieces.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_CURL_URLS = 3


class Refused(Exception):
    """Unwinds the gate's checks to gate.check(), which turns it into a Verdict. `containers`
    and `ports`: what the refused command named that is someone else's (the tool records the
    refusal on those instances)."""

    def __init__(self, reason: str, *, containers: Iterable[str] = (), ports: Iterable[int] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.containers = sorted(containers)
        self.ports = sorted(ports)


# ---------------------------------------------------------------------------
# options: a small getopt that only knows the options we allow
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What one program (or docker subcommand) may be run with: its options, then its positionals."""

    flags: frozenset[str] = frozenset()  # "-a", "--all": no value
    valued: Mapping[str, str] = field(default_factory=dict)  # option -> "text" | "path"
    optional: frozenset[str] = frozenset()  # long options whose value must be attached with "="
    refused: Mapping[str, str] = field(default_factory=dict)  # option -> why (a clearer refusal)
    dash_number: bool = False  # head/tail -20
    files: bool = True  # positionals are files (checked against the read roots), else plain words
    needs_path: bool = False  # no file is refused: the program would read the working directory
    most: int | None = None  # at most this many positionals
    # Rules that must be code, instead of files/needs_path/most: refuse (raise Refused) or return
    # every file the command would read, from positionals and option values alike.
    check: Callable[[str, list[str], Rule], list[str]] | None = None


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _rule(
    flags: str = "",
    *,
    text: str = "",
    paths: str = "",
    optional: str = "",
    refused: Mapping[str, str] | None = None,
    dash_number: bool = False,
    files: bool = True,
    needs_path: bool = False,
    most: int | None = None,
    check: Callable[[str, list[str], Rule], list[str]] | None = None,
) -> Rule:
    """A Rule from blank-separated option names; `refused` maps a reason to the names it refuses."""
    valued = dict.fromkeys(text.split(), "text") | dict.fromkeys(paths.split(), "path")
    why = {name: reason for reason, names in (refused or {}).items() for name in names.split()}
    return Rule(_words(flags), valued, _words(optional), why, dash_number, files, needs_path, most, check)


@dataclass
class Parsed:
    options: list[tuple[str, str]]  # (name, value or "")
    positionals: list[str]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.options}

    def option_paths(self, spec: Rule) -> list[str]:
        """Values of options that name a file (grep -f, jq -f): checked like file arguments."""
        return [value for name, value in self.options if spec.valued.get(name) == "path"]


def parse(program: str, args: Sequence[str], spec: Rule) -> Parsed:
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
                    value, i = _next_value(program, name, args, i)
                options.append((name, value))
            elif name in spec.flags and not eq:
                options.append((name, ""))
            elif name in spec.optional:
                options.append((name, value))
            else:
                raise Refused(_option_reason(program, name, spec))
        elif arg.startswith("-") and len(arg) > 1:
            if spec.dash_number and arg[1:].isdigit():
                options.append(("-n", arg[1:]))
                continue
            for k in range(1, len(arg)):
                name = "-" + arg[k]
                if name in spec.valued:
                    value = arg[k + 1 :]
                    if not value:
                        value, i = _next_value(program, name, args, i)
                    options.append((name, value))
                    break
                if name not in spec.flags:
                    raise Refused(_option_reason(program, name, spec))
                options.append((name, ""))
        else:
            positionals.append(arg)
    return Parsed(options, positionals)


def _next_value(program: str, name: str, args: Sequence[str], i: int) -> tuple[str, int]:
    """The value of option `name` from the next word, and the index after it."""
    if i >= len(args):
        raise Refused(f"{program} {name} needs a value")
    return args[i], i + 1


def _no_positionals(program: str, positionals: list[str]) -> None:
    if positionals:
        raise Refused(f"{program} takes no arguments, got {positionals[0]!r}")


def _option_reason(program: str, name: str, spec: Rule) -> str:
    why = spec.refused.get(name)
    if why:
        return f"{program} {name} is not allowed: {why}"
    return f"{program} option {name} is not allowed"


# ---------------------------------------------------------------------------
# programs: check_simple() over the PROGRAMS table
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


def check_simple(words: list[str], roots: tuple[Path, ...]) -> None:
    """One simple command (its words, after quote removal) against the table and the read roots."""
    program, args = words[0], words[1:]
    if "/" in program:
        raise Refused(f"program must be a bare name, not a path: {program}")
    if program.startswith("mkfs"):
        raise Refused(f"'{program}' is not allowed: changes filesystems")
    if program in _REFUSED_PROGRAMS:
        raise Refused(f"'{program}' is not allowed: {_REFUSED_PROGRAMS[program]}")
    rule = PROGRAMS.get(program)
    if rule is None:
        raise Refused(f"'{program}' is not on the allowlist")
    for path in _files(program, args, rule):
        check_path(program, path, roots)


def _files(program: str, args: list[str], rule: Rule) -> list[str]:
    """The files a command reads, after its rule's checks."""
    if rule.check is not None:
        return rule.check(program, args, rule)
    parsed = parse(program, args, rule)
    positionals = parsed.positionals
    if rule.needs_path and not positionals:
        raise Refused(f"{program} needs an absolute path under the read roots")
    if rule.most is not None and len(positionals) > rule.most:
        if rule.files:  # uniq: its second file is its output
            raise Refused(f"{program} takes at most {rule.most} file (a second one would be written)")
        if rule.most == 0:
            _no_positionals(program, positionals)  # the clearer refusal
        raise Refused(f"{program} takes at most {rule.most} arguments")
    return parsed.option_paths(rule) + positionals if rule.files else []


def check_path(program: str, path: str, roots: tuple[Path, ...]) -> None:
    if path == "-":
        return  # stdin
    if not path.startswith("/"):
        raise Refused(f"{program}: {path!r} is a relative path; use an absolute path under the read roots")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        raise Refused(f"{program}: {path} is outside the read roots")


def _grep(program: str, args: list[str], spec: Rule) -> list[str]:
    parsed = parse(program, args, spec)
    names, positionals = parsed.names, parsed.positionals
    if not names & {"-e", "-f", "--regexp", "--file"}:
        if not positionals:
            raise Refused(f"{program} needs a pattern")
        positionals = positionals[1:]
    if names & {"-r", "--recursive"} and not positionals:
        raise Refused(f"{program} -r needs an absolute path under the read roots")
    return parsed.option_paths(spec) + positionals


def _jq(program: str, args: list[str], spec: Rule) -> list[str]:
    # --arg/--argjson/--slurpfile/--rawfile take two values; handled before the generic parser.
    rest: list[str] = []
    files: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("--arg", "--argjson", "--slurpfile", "--rawfile"):
            if i + 2 >= len(args):
                raise Refused(f"jq {args[i]} needs a name and a value")
            if args[i] in ("--slurpfile", "--rawfile"):
                files.append(args[i + 2])
            i += 3
        else:
            rest.append(args[i])
            i += 1
    parsed = parse(program, rest, spec)
    names, positionals = parsed.names, parsed.positionals
    files += parsed.option_paths(spec)
    if not names & {"-f", "--from-file"}:
        if not positionals:
            return files  # `jq` alone is `jq .` on stdin
        if re.search(r"\b(import|include|modulemeta)\b", positionals[0]):
            raise Refused("jq modules (import/include) are not allowed")
        positionals = positionals[1:]
    return files + positionals


def _echo(program: str, args: list[str], spec: Rule) -> list[str]:
    return []  # prints its arguments; they were already checked for expansions


def _date(program: str, args: list[str], spec: Rule) -> list[str]:
    # -I takes an optional attached value (-Iseconds), which the generic parser cannot tell from a cluster.
    args = [a for a in args if not re.fullmatch(r"-I(date|hours|minutes|seconds|ns)?", a)]
    for word in parse(program, args, spec).positionals:
        if not word.startswith("+"):
            raise Refused("date only takes a +FORMAT argument (setting the clock is not allowed)")
    return []


_PS_BSD_LETTERS = set("auxfwjlvrScnhTm")


def _ps(program: str, args: list[str], spec: Rule) -> list[str]:
    for word in parse(program, args, spec).positionals:  # BSD-style options (ps aux)
        if "e" in word:  # it would print process environments
            raise Refused("ps e shows process environments (secrets); use ps aux")
        if not set(word) <= _PS_BSD_LETTERS:
            raise Refused(f"ps option {word!r} is not allowed")
    return []


def _nginx(program: str, args: list[str], spec: Rule) -> list[str]:
    parsed = parse(program, args, spec)
    _no_positionals(program, parsed.positionals)
    if not parsed.names & {"-t", "-T", "-v", "-V"}:
        raise Refused("nginx needs -t, -T, -v or -V (without them it would start a server)")
    return []


_SYSTEMCTL_VERBS = ("status", "is-active", "is-failed", "show")


def _systemctl(program: str, args: list[str], spec: Rule) -> list[str]:
    positionals = parse(program, args, spec).positionals
    if not positionals or positionals[0] not in _SYSTEMCTL_VERBS:
        verb = positionals[0] if positionals else "(none)"
        raise Refused(f"systemctl {verb} is not allowed; only {', '.join(_SYSTEMCTL_VERBS)}")
    return []


def _journalctl(program: str, args: list[str], spec: Rule) -> list[str]:
    for word in parse(program, args, spec).positionals:
        # journal matches such as _PID=1; a path would match an executable
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s]*|\+", word):
            raise Refused(f"journalctl argument {word!r} is not allowed; only FIELD=value matches")
    return []


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _pg_isready(program: str, args: list[str], spec: Rule) -> list[str]:
    parsed = parse(program, args, spec)
    _no_positionals(program, parsed.positionals)
    paths: list[str] = []
    for name, value in parsed.options:
        if name in ("-h", "--host"):
            if value.startswith("/"):
                paths.append(value)  # a socket directory: must be one of ours
            elif value not in _LOOPBACK_HOSTS:
                raise Refused(
                    f"pg_isready -h {value}: only loopback or a socket directory under the read roots"
                )
        if name in ("-d", "--dbname") and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise Refused("pg_isready -d takes a database name, not a connection string")
    return paths


# --- docker / podman -------------------------------------------------------

_FOLLOW = "follows forever"
_DOCKER_REDIRECTS = _words("-H --host --context -c --config --url --connection --remote")
_DOCKER_SUBCOMMANDS: dict[str, Rule] = {
    "ps": _rule(
        "-a -q -l -s --all --quiet --latest --no-trunc --size --noheading",
        text="-n --last --format -f --filter",
    ),
    "inspect": _rule("-s --size", text="-f --format --type"),
    "logs": _rule(
        "-t --timestamps --details",
        text="--tail --since --until",
        refused={_FOLLOW: "-f --follow", "is ambiguous between docker and podman; use --tail": "-n"},
    ),
    "images": _rule("-a -q --all --quiet --digests --no-trunc --noheading", text="--format -f --filter"),
    "version": _rule(text="-f --format"),
    "info": _rule(text="-f --format"),
    "port": _rule(),
    "top": _rule(),
    "stats": _rule("-a --all --no-stream --no-trunc", text="--format"),
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
    parsed: Parsed


def _docker_call(program: str, args: list[str]) -> _DockerCall:
    if not args:
        raise Refused(f"{program} needs a subcommand")
    if args[0].startswith("-"):
        name = args[0].partition("=")[0]
        why = (
            "redirects the client to another engine"
            if name in _DOCKER_REDIRECTS
            else "global flags are not allowed"
        )
        raise Refused(f"{program} {name} is not allowed: {why}")
    subcommand, rest, group = args[0], args[1:], ""
    shown = f"{program} {subcommand}"
    if subcommand in _DOCKER_GROUPS:
        inner = rest[0] if rest else ""
        if inner not in _DOCKER_GROUPS[subcommand]:
            allowed = " ".join(_DOCKER_GROUPS[subcommand])
            raise Refused(f"{program} {subcommand} {inner} is not allowed; only {allowed}".rstrip())
        group, shown = subcommand, f"{shown} {inner}"
        subcommand, rest = _DOCKER_GROUPS[group][inner], rest[1:]
    if subcommand not in _DOCKER_SUBCOMMANDS:
        kind = "not read-only" if subcommand in _DOCKER_WRITES else "not allowed"
        raise Refused(f"{shown} is {kind}; only {' '.join(_DOCKER_SUBCOMMANDS)}")
    return _DockerCall(shown, subcommand, group, parse(shown, rest, _DOCKER_SUBCOMMANDS[subcommand]))


_PORT_SPEC = re.compile(r"\d{1,5}(/(tcp|udp|sctp))?")


def _docker(program: str, args: list[str], spec: Rule) -> list[str]:
    call = _docker_call(program, args)
    names, positionals = call.parsed.names, call.parsed.positionals
    if call.subcommand == "stats" and "--no-stream" not in names:
        raise Refused(f"{program} stats needs --no-stream (it would stream forever)")
    if call.subcommand == "top" and len(positionals) != 1:
        raise Refused(f"{program} top takes exactly one container and no ps options")
    if call.subcommand == "port" and (
        not 1 <= len(positionals) <= 2 or not all(map(_PORT_SPEC.fullmatch, positionals[1:]))
    ):
        raise Refused(f"{call.shown} takes one container and at most one PORT[/PROTO]")
    if call.subcommand in ("inspect", "logs") and not positionals:
        raise Refused(f"{call.shown} needs a {'name' if call.group == 'image' else 'container'}")
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
        raise Refused(f"{shown} --format: template comments are not allowed")
    tokens: list[tuple[str, str]] = []
    while True:
        match = _TEMPLATE_TOKEN.match(template, i)
        if match is None:
            what = template[i : i + 1] or "the end of the template"
            raise Refused(
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
            raise Refused(f"{shown} --format: template function {word!r} is not allowed")
    fields = [text for kind, text in tokens if kind == "field"]
    for field_ in fields:
        for part in field_.split("."):
            if _SECRET_FIELD.fullmatch(part):
                raise Refused(
                    f"{shown} --format: the field {part} is a container's environment (secrets); "
                    "it is never shown"
                )
    head = words[0] if words and tokens[0][0] == "word" else ""
    if head not in ("json", "if", "with", "else", "end"):  # it prints or ranges over its fields
        for field_ in fields:
            if _WHOLE_OBJECT.fullmatch(field_.rsplit(".", 1)[-1] if field_ != "." else "."):
                raise Refused(
                    f"{shown} --format: {{{{{' '.join(t for _, t in tokens)}}}}} prints a whole "
                    "object as it is (its environment too); use {{json ...}}"
                )
    return i


# --- curl --------------------------------------------------------------------

_CURL_SENDS = "sends data (GET/HEAD only)"
_CURL_URL = re.compile(
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?"
    r"(?P<host>127\.0\.0\.1|localhost|\[::1\])"
    r"(?::(?P<port>\d{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:%/?#-]*)?"
)
_ENGINE_PORTS = {"2375", "2376"}  # a Docker Engine API over TCP: its GETs can read container files


def _curl(program: str, args: list[str], spec: Rule) -> list[str]:
    parsed = parse(program, args, spec)
    for name, value in parsed.options:
        if name in ("-X", "--request") and value not in ("GET", "HEAD"):
            raise Refused(f"curl -X {value} is not allowed: {_CURL_SENDS}")
        if name in ("-H", "--header", "-w", "--write-out") and value.startswith("@"):
            raise Refused(f"curl {name} @file reads a file")
        if name in ("-w", "--write-out") and "%output" in value:
            raise Refused(f"curl {name} %output writes a file")
    urls = _curl_urls(parsed)
    if not urls:
        raise Refused("curl needs a loopback URL")
    if len(urls) > MAX_CURL_URLS:
        raise Refused(f"curl takes at most {MAX_CURL_URLS} URLs")
    for url in urls:
        port = _curl_port(url)
        if str(port) in _ENGINE_PORTS:
            raise Refused(f"curl to port {port} (the engine API) is not allowed; use docker")
    return []


def _curl_urls(parsed: Parsed) -> list[str]:
    return parsed.positionals + [value for name, value in parsed.options if name == "--url"]


def _curl_port(url: str) -> int:
    """The loopback TCP port an allowed curl URL connects to (80 or 443 when it names none)."""
    match = _CURL_URL.fullmatch(url)
    if match is None:
        raise Refused(f"curl URL {url!r} is not loopback (127.0.0.1, localhost, [::1]) over http(s)")
    scheme = (match["scheme"] or "http").lower()
    if scheme not in ("http", "https"):
        raise Refused(f"curl scheme {scheme}:// is not allowed; only http and https")
    return int(match["port"] or (443 if scheme == "https" else 80))


# --- the table ---------------------------------------------------------------

_HEAD_TAIL_FLAGS, _HEAD_TAIL_VALUED = "-q -v -z --quiet --silent --verbose", "-n -c --lines --bytes"
_GREP = _rule(
    "-i -v -n -c -l -L -h -H -o -q -s -w -x -E -F -G -P -r -a -I -z -b "
    "--ignore-case --invert-match --line-number --count --files-with-matches --files-without-match "
    "--no-filename --with-filename --only-matching --quiet --silent --no-messages --word-regexp "
    "--line-regexp --extended-regexp --fixed-strings --basic-regexp --perl-regexp --recursive --text",
    text="-e -A -B -C -m --regexp --after-context --before-context --context --max-count --include "
    "--exclude --exclude-dir",
    paths="-f --file",
    optional="--color --colour",
    refused={"follows symlinks out of the read roots; use -r": "-R --dereference-recursive"},
    check=_grep,
)
_JOURNAL_WRITE = "changes the journal"
_DOCKER = _rule(check=_docker)  # options per subcommand: _DOCKER_SUBCOMMANDS

PROGRAMS: dict[str, Rule] = {
    "cat": _rule("-n -b -A -E -T -v -s -e -t --number --number-nonblank --show-all --squeeze-blank"),
    "head": _rule(_HEAD_TAIL_FLAGS, text=_HEAD_TAIL_VALUED, dash_number=True),
    "tail": _rule(
        _HEAD_TAIL_FLAGS,
        text=_HEAD_TAIL_VALUED,
        refused={_FOLLOW: "-f -F --follow --retry --pid"},
        dash_number=True,
    ),
    "wc": _rule("-l -w -c -m -L --lines --words --bytes --chars --max-line-length"),
    "ls": _rule(
        "-l -a -A -h -t -r -S -d -1 -R -i -n -F -s -c -u -U --all --almost-all --human-readable "
        "--recursive --directory --full-time --numeric-uid-gid --inode --size",
        optional="--color --time-style",
        needs_path=True,
    ),
    "stat": _rule("-t -f --terse --file-system", text="-c --format --printf", needs_path=True),
    "du": _rule(
        "-s -h -a -c -x -k -m -b --summarize --human-readable --all --total --one-file-system --apparent-size",
        text="-d --max-depth --exclude",
        needs_path=True,
    ),
    "sort": _rule(
        "-n -r -u -h -V -f -b -s -M -g -R -z --numeric-sort --reverse --unique --human-numeric-sort "
        "--version-sort --ignore-case --ignore-leading-blanks --stable --month-sort --general-numeric-sort",
        text="-k -t --key --field-separator",
        refused={
            "writes a file": "-o --output",
            "writes temporary files": "-T",
            "runs a program": "--compress-program",
            "reads a file list": "--files0-from",
        },
    ),
    "uniq": _rule(
        "-c -d -u -i -z --count --repeated --unique --ignore-case",
        text="-f -s -w --skip-fields --skip-chars",
        most=1,
    ),
    "cut": _rule("-s -z --complement --only-delimited", text="-d -f -c -b --delimiter --fields"),
    "tr": _rule(
        "-d -s -c -C -t --delete --squeeze-repeats --complement --truncate-set1", files=False, most=2
    ),
    "grep": _GREP,
    "egrep": _GREP,
    "fgrep": _GREP,
    "jq": _rule(
        "-r -j -c -n -s -e -S -C -M -a --raw-output --join-output --compact-output --null-input --slurp "
        "--exit-status --sort-keys --color-output --monochrome-output --ascii-output --tab --raw-input -R",
        text="--indent",
        paths="-f --from-file",
        refused={
            "loads modules": "-L --library-path",
            # what follows --args is strings, what precedes it files: not worth the order-tracking
            "use --arg NAME VALUE": "--args",
            "use --argjson NAME VALUE": "--jsonargs",
        },
        check=_jq,
    ),
    "echo": _rule(check=_echo),
    "docker": _DOCKER,
    "podman": _DOCKER,
    "curl": _rule(
        "-s -S -f -i -I -v -k -g -4 -6 --silent --show-error --fail --fail-with-body --include --head "
        "--verbose --insecure --globoff --compressed --http1.1 --http2 --ipv4 --ipv6 --no-progress-meter",
        text="-m --max-time --connect-timeout -H --header -w --write-out -X --request -A --user-agent --url",
        refused={
            "writes a file": "-o --output -O --remote-name --remote-name-all -D --dump-header -c "
            "--cookie-jar --trace --trace-ascii --stderr",
            _CURL_SENDS: "-d --data --data-raw --data-binary --data-urlencode --data-ascii --json -F "
            "--form -T --upload-file",
            "reads options from a file": "-K --config",
            "reaches the engine socket; use docker": "--unix-socket --abstract-unix-socket",
            "sends credentials": "-u --user",
            "uses a proxy": "-x --proxy",
            "follows redirects off loopback": "-L --location",
            "redirects the host": "--resolve --connect-to",
            "reads cookies from a file": "-b --cookie",
        },
        check=_curl,
    ),
    "ss": _rule(
        "-l -t -n -p -u -a -s -4 -6 -e -o -x -w -i -m -H -r --listening --tcp --numeric --processes "
        "--udp --all --summary --extended --options --unix --raw --info --memory --no-header --resolve "
        "--ipv4 --ipv6",
        refused={"kills sockets": "-K --kill", "writes a file": "-D", "reads a file": "-F"},
        files=False,
    ),
    "df": _rule(  # statfs only, no content: any mount point may be asked about
        "-h -H -T -i -k -P -a -l --human-readable --si --print-type --inodes --portability --all --local",
        text="-t -x --type --exclude-type",
        optional="--output",
        files=False,
    ),
    "free": _rule(
        "-h -m -g -k -b -t -w -l -v --human --mega --giga --kilo --bytes --total --wide --si --lohi",
        files=False,
        most=0,
    ),
    "uptime": _rule("-p -s --pretty --since", files=False, most=0),
    "date": _rule(
        "-u -R --utc --universal --rfc-email",
        text="-d --date",
        optional="--iso-8601 --rfc-3339",
        refused={"sets the clock": "-s --set", "reads a file": "-f --file"},
        check=_date,
    ),
    "hostname": _rule(
        "-f -s -i -I -d -A --fqdn --short --ip-address --all-ip-addresses --domain --long",
        files=False,
        most=0,
    ),
    "id": _rule("-u -g -G -n -r -a -z --user --group --groups --name --real", files=False, most=1),
    "whoami": _rule(files=False, most=0),
    "ps": _rule(
        "-e -f -F -l -A -a -x -H -w -y -j -T -d -N --forest --no-headers --headers",
        text="-o -O -p -u -U -C -g -G -t -q --sort --format --pid --ppid --user --cols --columns --width",
        check=_ps,
    ),
    "nginx": _rule(
        "-t -T -v -V -q -h",
        text="-p -c",  # not read-root paths: only NginxPin's values (check_nginx)
        refused={"sends signals to nginx": "-s", "sets directives": "-g", "writes a log file": "-e"},
        check=_nginx,
    ),
    "systemctl": _rule(
        "-l -a -q --full --all --no-pager --value --user --system --plain --no-legend --quiet",
        text="-n --lines -p --property -o --output",
        refused={"talks to another host": "-H --host", "talks to a container": "-M"},
        check=_systemctl,
    ),
    "journalctl": _rule(
        "-r -x -e -q -k -a -m --no-pager --reverse --catalog --pager-end --quiet --dmesg --all --merge "
        "--user --system --utc --no-hostname --no-full --list-boots -b",
        text="-u --unit --user-unit -n --lines -S --since -U --until -p --priority -o --output -g --grep "
        "-t --identifier",
        optional="--boot",
        refused={
            _FOLLOW: "-f --follow",
            _JOURNAL_WRITE: "--rotate --vacuum-size --vacuum-time --vacuum-files --flush --sync --relinquish-var",
            "writes a file": "--cursor-file",
            "reads another journal": "-D --directory --file --root",
        },
        check=_journalctl,
    ),
    "pg_isready": _rule(
        "-q --quiet", text="-h --host -p --port -d --dbname -U --username -t --timeout", check=_pg_isready
    ),
}


# ---------------------------------------------------------------------------
# rules over the whole command: pipelines, and who runs it
# ---------------------------------------------------------------------------

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


def check_pipeline(commands: list[list[str]]) -> None:
    """The commands of one pipeline, each already allowed on its own."""
    docker = next((i for i, words in enumerate(commands) if words[0] in ("docker", "podman")), None)
    if docker is None:
        return
    for words in commands[docker + 1 :]:
        program = words[0]
        cutting = _LINE_FILTERS.get(program)
        if cutting:
            cutting = cutting & parse(program, words[1:], PROGRAMS[program]).names
        if cutting is None or cutting:
            how = f"{program} {min(cutting)}" if cutting else program
            raise Refused(
                f"{commands[docker][0]}'s output may go on only through grep, head/tail -n, sort, uniq "
                f"or wc, which keep lines whole, not {how} (a secret in it must stay whole to be redacted)"
            )


_LISTING = "listing every container is for operators; name your own container, or use instance_status"


def container_refs(program: str, args: list[str]) -> list[str]:
    """The words of a docker command that name containers; Refused for a listing (every listing
    shows other users' containers, their names, labels and commands)."""
    call = _docker_call(program, args)
    parsed, shown = call.parsed, call.shown
    if call.subcommand in ("images", "version") or (call.group == "image" and call.subcommand == "inspect"):
        return []
    if call.subcommand == "ps":
        raise Refused(f"{shown}: {_LISTING}")
    if call.subcommand == "info":
        raise Refused(f"{shown} counts every container and describes the engine: for operators")
    if call.subcommand == "stats" and (not parsed.positionals or parsed.names & {"-a", "--all"}):
        raise Refused(f"{shown} without your containers' names: {_LISTING}")
    if call.subcommand == "inspect":
        kinds = {value for name, value in parsed.options if name == "--type"}
        if kinds - {"container"}:
            raise Refused(f"{shown} --type {min(kinds - {'container'})}: only your own containers")
    if call.subcommand == "port":
        return parsed.positionals[:1]
    return parsed.positionals


def curl_ports(args: list[str]) -> list[int]:
    """The loopback TCP ports an allowed curl command connects to."""
    return [_curl_port(url) for url in _curl_urls(parse("curl", args, PROGRAMS["curl"]))]
