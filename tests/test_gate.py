"""The read-only bash gate: a table of commands, then run() on real subprocesses, then cli().

In the table, `{root}` stands for a read root made in tmp_path; every refusal
names a substring of its reason, so a refusal for the wrong reason fails.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gate
import pideploy
import sandbox
from config import Config
from errors import SandboxFailed, ToolRefused
from tests.conftest import make_config, require_stack


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A read root with a log, a JSON file and two symlinks that lead out of it."""
    root = tmp_path / "pideploy"
    (root / "traces").mkdir(parents=True)
    (root / "app.log").write_text("ok\nerror: boom\nok\n")
    (root / "traces" / "run.json").write_text('{"status": "done"}\n')
    (root / "etc-link").symlink_to("/etc")
    (root / "shadow-link").symlink_to("/etc/shadow")
    (tmp_path / "outside.txt").write_text("not yours\n")
    (root / "outside-link").symlink_to(tmp_path / "outside.txt")
    return root


ALLOWED = [
    # pipelines, sequences, 2>&1, comments
    "docker logs pideploy-alice-1 --tail 50 2>&1 | grep -i error",
    "docker logs x --tail 5 |& grep err",
    "docker ps -a --format '{{.Names}} {{.Status}}' | sort | uniq -c",
    "df -h && free -m",
    "df -h; uptime",
    "uptime || date",
    "uptime\nwhoami\nid",
    "ss -tlnp # who listens?",
    "ls -la \\\n  {root}",
    # docker / podman
    "docker ps",
    "podman ps -a --filter status=exited",
    "docker inspect -f '{{.State.Status}}' pideploy-alice-1",
    "docker logs --since 10m --timestamps x",
    "docker logs --tail=20 x",
    "docker images --digests",
    "docker version",
    "podman info --format json",
    "docker port x",
    "docker top x",
    "docker stats --no-stream",
    "docker container ls -a",
    "docker container logs --tail 5 x",
    "podman image ls",
    "docker image inspect localhost/pideploy-gateway:latest",
    "docker port x 8080/tcp",
    # Go templates: fields, json, join, print(ln), range/if/with/else/end
    "docker inspect -f '{{json .State}}' x",
    "docker inspect -f '{{json .}}' x",
    "docker inspect --format='{{json .Config}}' x",
    "docker inspect --format json x",
    "docker inspect -f '{{range .Mounts}}{{.Source}} {{end}}' x",
    "docker inspect -f '{{if .State.Running}}up{{else}}down{{end}}' x",
    "docker inspect -f '{{- .Name -}} {{join .Config.Cmd \" \"}}' x",
    "docker inspect -f '{{with .Config}}{{.Hostname}} {{json .Labels}}{{end}}' x",
    "docker inspect -f '{{println .Name .State.ExitCode}}' x",
    "docker ps --format 'table {{.Names}}\t{{.Label \"pideploy.user\"}}'",
    "docker ps --format '{{json .}}'",
    "docker ps -f name=x --format '{{.ID}}'",
    # docker's output through filters that keep lines whole
    "docker logs x 2>&1 | grep -i error | tail -n 5 | sort | uniq -c | wc -l",
    "docker logs x --tail 20 | head -5",
    "docker inspect x | grep -c Running",
    "cat {root}/app.log | cut -c 1-3 | tr a-z A-Z",  # not docker's
    "docker logs x; echo done | tr a-z A-Z",  # a sequence, not a pipe
    # curl to loopback
    "curl -sS http://127.0.0.1:8780/health",
    "curl -sSf -m 5 --connect-timeout 2 -H 'Accept: application/json' http://localhost:8780/api",
    "curl -I 'http://[::1]:8080/'",
    "curl -s -w '%{http_code}' 127.0.0.1:80",
    "curl -X HEAD -i https://localhost/",
    # system readers
    "ss -tlnp",
    "ss -u -a 'sport = :53'",
    "df -hT /",
    "free -h",
    "uptime -p",
    "date -u +%FT%T",
    "date -Iseconds",
    "hostname -f",
    "ps aux --sort=-%cpu",
    "ps -eo pid,ppid,cmd",
    "nginx -t",
    "nginx -V",
    "systemctl status nginx --no-pager -n 20",
    "systemctl is-active postgresql",
    "journalctl -u nginx -n 50 --no-pager --since '1 hour ago'",
    "journalctl _SYSTEMD_UNIT=nginx.service -o json",
    "pg_isready -h 127.0.0.1 -p 5432 -t 2",
    "pg_isready -h {root}",
    # text readers, paths under the roots
    "cat {root}/app.log",
    "cat /proc/loadavg /proc/meminfo /etc/os-release",
    "head -n 5 {root}/app.log",
    "head -20 {root}/app.log",
    "tail -n 100 {root}/app.log",
    "wc -l {root}/app.log",
    "grep -n error {root}/app.log",
    "grep -rn 'error$' {root}",
    "egrep -c 'ok|error' {root}/app.log",
    "grep -e boom -e ok {root}/app.log",
    "ls -la {root}",
    "ls '{root}/*.log'",
    "stat -c %s {root}/app.log",
    "du -sh {root}/traces",
    "jq -r .status {root}/traces/run.json",
    "jq -n --arg name x '$name'",
    "sort -k 2 -t : {root}/app.log",
    "cut -d : -f 1 {root}/app.log | sort | uniq -c",
    "echo done | tr a-z A-Z",
    "echo 'literal $HOME and `id` in single quotes'",
    "cat {root}/app.log -",
    # quoting that only removes quotes
    '"ca"t {root}/app.log',
    "\\cat {root}/app.log",
]

REFUSED = [
    # parsing, size, characters
    ("", "empty command"),
    ("   \n  ", "empty command"),
    ("# just a comment", "empty command"),
    ("x" * 2001, "too long"),
    ("docker ps " + "-a " * 700, "too long"),
    ("d\u043ecker ps", "non-ASCII"),  # Cyrillic o
    ("uptime\uff1b rm x", "non-ASCII"),  # fullwidth semicolon
    ("uptime\r", "control character"),
    ("echo 'unterminated", "cannot parse"),
    ("uptime |", "cannot parse"),
    ("case x in x) uptime;; esac", "cannot parse"),
    ("time uptime", "cannot parse"),
    ("echo $((1+2))", "cannot parse"),
    # quoting tricks reach the real program name
    ("'r''m' -rf /", "'rm' is not allowed: modifies files"),
    ("\\rm -rf /", "'rm' is not allowed"),
    ('"do"cker rm x', "docker rm is not read-only"),
    ("r\\m x", "'rm' is not allowed"),
    # sequences: every command is checked
    ("df -h; rm -rf /", "'rm' is not allowed"),
    ("uptime && shutdown now", "'shutdown' is not allowed"),
    ("false || reboot", "'false' is not on the allowlist"),
    ("uptime\nrm -rf /", "'rm' is not allowed"),
    ("uptime &", "background"),
    ("uptime & rm x", "background"),
    ("! uptime", "reserved word"),
    ("uptime; " * 9, "too many commands"),
    # expansions and substitutions
    ("echo $(id)", "command substitution"),
    ("echo `id`", "command substitution"),
    ('echo "$(cat /etc/shadow)"', "command substitution"),
    ("cat <(ls /)", "process substitution"),
    ("diff >(ls /) x", "process substitution"),
    ("echo $HOME", "variable expansion"),
    ('echo "${x}"', "variable expansion"),
    ("$0 -c id", "variable expansion"),
    ("echo $'\\x72m'", "variable expansion"),
    ("cat ~/.pi/agent/auth.json", "tilde expansion"),
    ("echo x=~", "tilde expansion"),
    ("ls {root}/*.log", "glob"),
    ("cat {root}/{x,../../../etc/shadow}", "brace expansion"),
    # redirections: only 2>&1
    ("uptime > /tmp/x", "redirection (>)"),
    ("uptime >> /tmp/x", "redirection (>>)"),
    ("cat < /etc/shadow", "redirection (<)"),
    ("uptime 2> /tmp/err", "redirection"),
    ("uptime &> /tmp/x", "redirection (&>)"),
    ("uptime >&2", "redirection"),
    ("cat <<EOF\nhi\nEOF", "redirection (<<)"),
    ("cat <<< hi", "redirection (<<<)"),
    # structure
    ("FOO=bar uptime", "environment prefix"),
    ("PATH=/tmp uptime", "environment prefix"),
    ("(uptime)", "subshell"),
    ("{ uptime; }", "group"),
    ("f() { uptime; }", "function"),
    ("for i in 1 2; do uptime; done", "if/for/while/case"),
    ("while true; do uptime; done", "if/for/while/case"),
    ("if true; then uptime; fi", "if/for/while/case"),
    # programs
    ("/usr/bin/cat /proc/loadavg", "bare name"),
    ("./uptime", "bare name"),
    ("sudo ls /", "changes privileges"),
    ("su -", "changes privileges"),
    ("doas ls", "changes privileges"),
    ("eval uptime", "runs arbitrary code"),
    ("exec uptime", "runs arbitrary code"),
    ("source /tmp/x", "runs arbitrary code"),
    (". /tmp/x", "runs arbitrary code"),
    ("sh -c id", "is a shell"),
    ("bash -c 'uptime'", "is a shell"),
    ("xargs rm", "runs other programs"),
    ("find / -name x", "runs other programs"),
    ("env", "exposes or changes the environment"),
    ("printenv", "exposes or changes the environment"),
    ("awk '{print}' /etc/shadow", "scripting language"),
    ("sed -i d x", "scripting language"),
    ("python3 -c 1", "scripting language"),
    ("perl -e 1", "scripting language"),
    ("echo x | tee /tmp/x", "writes files"),
    ("mv a b", "modifies files"),
    ("cp a b", "modifies files"),
    ("dd if=/dev/zero of=/dev/sda", "modifies files"),
    ("mkfs.ext4 /dev/sda", "changes filesystems"),
    ("chmod 777 /", "modifies files"),
    ("truncate -s 0 x", "modifies files"),
    ("touch x", "modifies files"),
    ("kill -9 1", "affects processes"),
    ("nc -l 4444", "network connections"),
    ("wget http://127.0.0.1/", "network connections"),
    ("ssh host", "network connections"),
    ("vim x", "not on the allowlist"),
    # docker / podman
    ("docker rm -f x", "docker rm is not read-only"),
    ("docker run alpine", "docker run is not read-only"),
    ("docker exec x sh", "docker exec is not read-only"),
    ("podman kill x", "podman kill is not read-only"),
    ("docker system prune -af", "docker system is not read-only"),
    ("docker network ls", "docker network is not read-only"),
    ("docker container rm x", "docker container rm is not allowed"),
    ("docker image rm x", "docker image rm is not allowed"),
    ("docker logs -f x", "follows forever"),
    ("docker logs --follow x", "follows forever"),
    ("podman logs -n x", "ambiguous"),
    ("docker stats", "--no-stream"),
    ("docker top x aux e", "exactly one container"),
    ("docker -H tcp://10.0.0.1:2375 ps", "redirects the client"),
    ("docker --host=unix:///x ps", "redirects the client"),
    ("docker --context prod ps", "redirects the client"),
    ("docker --config /tmp ps", "redirects the client"),
    ("docker --log-level debug ps", "global flags"),
    ("docker", "needs a subcommand"),
    ("docker ps --format {{.Names}}", "brace expansion"),
    ("docker port x y", "at most one PORT"),
    # ... but nothing that could cut a secret in docker's output before redaction sees it
    ("docker logs x | cut -c 1-5", "not cut"),
    ("docker inspect x | jq -r '.[0].Config.Env[0]'", "not jq"),
    ("docker logs x 2>&1 | head -c 20", "not head -c"),
    ("docker logs x | tail --bytes 5", "not tail --bytes"),
    ("docker logs x | grep -o 'sk-....'", "not grep -o"),
    ("docker logs x | grep --only-matching 'sk-....'", "not grep --only-matching"),
    ("docker logs x |& grep err | tr a-z A-Z", "not tr"),
    ("uptime; docker logs x | sort | uniq -c | cut -c 1-3", "not cut"),
    ("podman logs x | echo", "not echo"),
    ("docker port x 80 81", "at most one PORT"),
    ("docker inspect", "needs a container"),
    ("docker logs --tail 5", "needs a container"),
    # Go templates that print the environment, or print it in another spelling
    ("docker inspect -f '{{.Config.Env}}' x", "the field Env"),
    ("docker inspect -f '{{json .Config.Env}}' x", "the field Env"),
    ("docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' x", "the field Env"),
    ("docker inspect -f '{{with .Config}}{{json .Env}}{{end}}' x", "the field Env"),
    ("docker inspect -f '{{.Config.env}}' x", "the field env"),
    ("docker inspect -f '{{$.Config.Env}}' x", "the field Env"),
    ("docker inspect -f '{{.Config.CreateCommand}}' x", "the field CreateCommand"),
    ("docker image inspect -f '{{.ContainerConfig.Env}}' i", "the field Env"),
    ("docker inspect -f '{{.Config}}' x", "prints a whole object"),
    ("docker inspect -f '{{.HostConfig}}' x", "prints a whole object"),
    ("docker inspect -f '{{.}}' x", "prints a whole object"),
    ("docker inspect -f '{{with .Config}}{{.}}{{end}}' x", "prints a whole object"),
    ("docker inspect -f '{{range .Config}}{{json .}}{{end}}' x", "prints a whole object"),
    ("docker inspect -f '{{with .Config}}{{range .}}{{json .}}{{end}}{{end}}' x", "prints a whole object"),
    ("docker inspect -f '{{print $}}' x", "prints a whole object"),
    ("docker inspect -f '{{join .Config \",\"}}' x", "prints a whole object"),
    ("docker inspect -f '{{printf \"%x\" .Config}}' x", "function 'printf'"),
    ("docker inspect -f '{{index .Config \"Env\"}}' x", "function 'index'"),
    ("docker inspect -f '{{slice .Name 1 2}}' x", "function 'slice'"),
    ("docker inspect -f '{{len .Name}}' x", "function 'len'"),
    ("docker inspect -f '{{if eq .Name \"/a\"}}y{{end}}' x", "function 'eq'"),
    ("docker inspect -f '{{upper .Name}}' x", "function 'upper'"),
    ("docker inspect -f '{{define \"t\"}}{{.}}{{end}}' x", "function 'define'"),
    ("docker inspect -f '{{template \"t\" .}}' x", "function 'template'"),
    ("docker inspect -f '{{.Config | json}}' x", "'|' is not allowed"),
    ("docker inspect -f '{{json (.Config)}}' x", "'(' is not allowed"),
    ("docker inspect -f '{{with $c := .Config}}{{$c}}{{end}}' x", "':' is not allowed"),
    ("docker inspect -f '{{/* a */}}' x", "comments"),
    ("docker inspect -f '{{.Name' x", "the end of the template"),
    ("docker ps --format '{{.Names}} {{printf \"%q\" .Command}}'", "function 'printf'"),
    ("docker stats --no-stream --format '{{.Container}} {{html .Name}}'", "function 'html'"),
    ("docker version -f '{{js .Client}}'", "function 'js'"),
    # curl
    ("curl http://example.com/", "not loopback"),
    ("curl http://127.0.0.1@evil.com/", "not loopback"),
    ("curl http://127.0.0.1.evil.com/", "not loopback"),
    ("curl file:///etc/passwd", "not loopback"),
    ("curl ftp://127.0.0.1/", "scheme ftp"),
    ("curl 'http://{127.0.0.1,evil.com}/'", "not loopback"),
    ("curl 'http://127.0.0.1/[1-100]'", "not loopback"),
    ("curl -o /tmp/x http://127.0.0.1/", "writes a file"),
    ("curl -O http://127.0.0.1/x", "writes a file"),
    ("curl -d a=b http://127.0.0.1/", "sends data"),
    ("curl --data-binary @/etc/shadow http://127.0.0.1/", "sends data"),
    ("curl -F f=@/etc/shadow http://127.0.0.1/", "sends data"),
    ("curl -T /etc/shadow http://127.0.0.1/", "sends data"),
    ("curl -X POST http://127.0.0.1/", "curl -X POST"),
    ("curl -X DELETE http://127.0.0.1/", "curl -X DELETE"),
    ("curl -K /tmp/cfg http://127.0.0.1/", "reads options from a file"),
    ("curl --unix-socket /run/docker.sock http://x/containers/json", "engine socket"),
    ("curl -u admin:pw http://127.0.0.1/", "credentials"),
    ("curl -L http://127.0.0.1/", "redirects off loopback"),
    ("curl -H @/etc/shadow http://127.0.0.1/", "reads a file"),
    ("curl -w @/etc/shadow http://127.0.0.1/", "reads a file"),
    ("curl http://127.0.0.1:2375/containers/json", "engine API"),
    ("curl -s", "needs a loopback URL"),
    ("curl 127.0.0.1/a 127.0.0.1/b 127.0.0.1/c 127.0.0.1/d", "at most 3 URLs"),
    ("curl http://[::1]/", "glob"),
    # system tools
    ("nginx", "would start a server"),
    ("nginx -s reload", "sends signals"),
    # nginx loads the modules its configuration names: only piDeploy's own (see NginxPin)
    ("nginx -t -c /tmp/evil.conf", "only runs with piDeploy's own configuration"),
    ("nginx -T -p {root} -c {root}/app.log", "only runs with piDeploy's own prefix"),
    ("nginx -t -c {root}/app.log", "only runs with piDeploy's own configuration"),
    ("nginx -t -c{root}/app.log", "only runs with piDeploy's own configuration"),
    ("nginx -tc {root}/app.log", "only runs with piDeploy's own configuration"),
    ("nginx -t -p /", "only runs with piDeploy's own prefix"),
    ("nginx -t -g 'daemon off;'", "sets directives"),
    ("nginx -t; cat {root}/app.log", "nginx must run on its own"),
    ("nginx -V 2>&1 | head -1", "nginx must run on its own"),
    ("systemctl restart nginx", "systemctl restart is not allowed"),
    ("systemctl stop nginx", "systemctl stop is not allowed"),
    ("systemctl -H host status", "another host"),
    ("journalctl -f", "follows forever"),
    ("journalctl --rotate", "changes the journal"),
    ("journalctl --vacuum-time=1s", "changes the journal"),
    ("journalctl --flush", "changes the journal"),
    ("journalctl /usr/bin/sshd", "FIELD=value"),
    ("pg_isready -h db.example.com", "only loopback"),
    ("pg_isready -d 'host=evil.com'", "not a connection string"),
    ("date -s '2020-01-01'", "sets the clock"),
    ("date 010100002020", "+FORMAT"),
    ("hostname evil", "takes no arguments"),
    ("ps auxe", "process environments"),
    ("ps axjfe", "process environments"),
    ("ss -K dst 1.2.3.4", "kills sockets"),
    ("free -s 1", "free option -s"),
    # readers: paths
    ("cat /etc/shadow", "outside the read roots"),
    ("cat {root}/../../etc/shadow", "outside the read roots"),
    ("cat /var/lib/pideploy/../../etc/shadow", "outside the read roots"),
    ("cat {root}/etc-link/shadow", "outside the read roots"),
    ("cat {root}/shadow-link", "outside the read roots"),
    ("head {root}/outside-link", "outside the read roots"),
    ("cat app.log", "relative path"),
    ("cat '~/.pi/agent/auth.json'", "relative path"),
    ("ls", "needs an absolute path"),
    ("du -sh", "needs an absolute path"),
    ("ls /", "outside the read roots"),
    ("grep -r password", "needs an absolute path"),
    ("grep -r password /etc", "outside the read roots"),
    ("grep -R x {root}", "follows symlinks"),
    ("grep -f /etc/shadow {root}/app.log", "outside the read roots"),
    ("grep --file=/etc/shadow {root}/app.log", "outside the read roots"),
    ("jq . /etc/passwd", "outside the read roots"),
    ("jq -n --rawfile s /etc/shadow '$s'", "outside the read roots"),
    ("jq -n 'import \"x\" as y; .'", "modules"),
    ("jq -L /tmp .", "loads modules"),
    ("jq . /etc/shadow --args x", "jq --args is not allowed"),
    ("jq -f /etc/shadow", "outside the read roots"),
    ("tail -f {root}/app.log", "follows forever"),
    ("tail -F {root}/app.log", "follows forever"),
    ("tail --follow=name {root}/app.log", "follows forever"),
    ("sort -o {root}/app.log {root}/app.log", "writes a file"),
    ("sort --compress-program=sh {root}/app.log", "runs a program"),
    ("uniq {root}/app.log {root}/out", "at most 1 file"),
    ("wc --files0-from=/etc/shadow", "option --files0-from"),
    ("stat /etc/shadow", "outside the read roots"),
    ("tr a b {root}/app.log", "at most 2 arguments"),
    ("cat --unknown {root}/app.log", "option --unknown"),
]


def _fill(command: str, root: Path) -> str:
    return command.replace("{root}", str(root))


@pytest.mark.parametrize("command", ALLOWED)
def test_allowed(command: str, root: Path) -> None:
    verdict = gate.check(_fill(command, root), [root])
    assert verdict == gate.Verdict(True, ""), verdict.reason


@pytest.mark.parametrize(("command", "reason"), REFUSED)
def test_refused(command: str, reason: str, root: Path) -> None:
    verdict = gate.check(_fill(command, root), [root])
    assert not verdict.allowed
    assert reason in verdict.reason


def test_table_is_large_enough() -> None:
    assert len(ALLOWED) + len(REFUSED) >= 60


def test_default_read_roots_apply_without_arguments() -> None:
    assert Path("/proc/loadavg") in gate.DEFAULT_READ_ROOTS
    assert gate.check("cat /proc/meminfo").allowed
    assert not gate.check("cat /proc/self/environ").allowed


def test_a_root_given_through_a_symlink_still_matches(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert gate.check(f"cat {root}/app.log", [alias]).allowed
    assert gate.check(f"cat {alias}/app.log", [root]).allowed


# ---------------------------------------------------------------------------
# a user's scope: docker names only the user's own containers, as the engine resolves them
# ---------------------------------------------------------------------------

OWN_ID = "c0ffee11" + "1" * 56  # the user's container: pideploy-ns-3
OWN_OLD_ID = "dd" + "2" * 62  # the user's other container, kept by an update
THEIRS_ID = "c0ffee22" + "3" * 56  # another user's: pideploy-ns-33 (a prefix of it is shared)
OTHER_ID = "dd" + "4" * 62  # another user's: pideploy-ns-4
OPERATORS_ID = "ab" + "5" * 62  # not piDeploy's, named like an id prefix of the user's own
ENGINE = gate.Containers(
    own=frozenset({OWN_ID, OWN_OLD_ID}),
    every={
        OWN_ID: "pideploy-ns-3",
        OWN_OLD_ID: "pideploy-ns-3-old",
        THEIRS_ID: "pideploy-ns-33",
        OTHER_ID: "pideploy-ns-4",
        OPERATORS_ID: "c0ffee1",
    },
)

USER_ALLOWED = [
    "docker inspect pideploy-ns-3",
    "docker inspect -f '{{.State.Status}}' pideploy-ns-3 pideploy-ns-3-old",
    "docker inspect /pideploy-ns-3",  # Docker's own spelling of a name
    f"docker inspect {OWN_ID}",
    "docker inspect c0ffee11",  # a prefix only the user's own container has
    "docker inspect c0ffee111",
    "docker inspect --type container pideploy-ns-3",
    "docker container inspect pideploy-ns-3",
    "docker logs --tail 20 pideploy-ns-3 2>&1 | grep -i error",
    "docker container logs pideploy-ns-3",
    "docker top pideploy-ns-3",
    "docker port pideploy-ns-3 8080/tcp",
    "docker stats --no-stream pideploy-ns-3",
    "docker images",
    "docker image ls",
    "docker image inspect localhost/pideploy-gateway:latest",
    "docker version",
    "curl -s http://127.0.0.1:20003/healthz",
    "free -m; uptime; date -u; hostname; id",
]

USER_REFUSED = [
    # another user's container, by any spelling of its name
    ("docker inspect pideploy-ns-33", "pideploy-ns-33 is not one of this user's containers"),
    ("docker inspect 'pideploy-ns-'33", "pideploy-ns-33 is not one of"),
    ("docker inspect pideploy-ns-\\33", "pideploy-ns-33 is not one of"),
    ('docker inspect "pideploy-ns-"33', "pideploy-ns-33 is not one of"),
    ("docker inspect pideploy-ns-3''3", "pideploy-ns-33 is not one of"),
    ("docker inspect -f '{{json .Config}}' pideploy-ns-4", "pideploy-ns-4 is not one of"),
    ("docker logs pideploy-ns-4", "not one of"),
    ("docker container logs --tail 5 pideploy-ns-4", "not one of"),
    ("docker logs pideploy-ns-3 pideploy-ns-4", "pideploy-ns-4 is not one of"),  # podman takes several
    ("docker top pideploy-ns-4", "not one of"),
    ("docker port pideploy-ns-4", "not one of"),
    ("docker stats --no-stream pideploy-ns-3 pideploy-ns-4", "pideploy-ns-4 is not one of"),
    ("uptime; docker inspect pideploy-ns-4", "not one of"),
    # ... by its id, an id prefix, an id split by quotes
    (f"docker inspect {THEIRS_ID}", "not one of"),
    ("docker inspect c0ffee22", "not one of"),
    ("docker inspect c0ff''ee22", "c0ffee22 is not one of"),
    ("docker inspect 'c0ffee'22", "c0ffee22 is not one of"),
    ("docker inspect c0ffee", "not one of"),  # the user's and another's: the engine may pick either
    ("docker inspect c", "not one of"),
    ("docker inspect c0ffee1", "not one of"),  # a prefix of the user's own, but another's exact name
    ("docker inspect dd", "not one of"),
    # ... by what the engine forgives but is not a name
    ("docker inspect pideploy-ns-3/", "not one of"),
    ("docker inspect 'pideploy-ns-3 '", "not one of"),
    ("docker inspect pideploy-ns-3/../json", "not one of"),
    ("docker inspect C0FFEE11", "not one of"),
    ("docker inspect pideploy-ns", "not one of"),
    ("docker logs -- pideploy-ns-4", "not one of"),
    # anything that is not a container of the user's: an image, a volume, a network
    ("docker inspect localhost/pideploy-gateway:latest", "not one of"),
    ("docker inspect --type volume pideploy-ns-3", "--type volume: only your own containers"),
    ("docker inspect --type=image pideploy-ns-3", "--type image"),
    ("docker inspect --type network --type container pideploy-ns-3", "--type network"),
    # listings, by any spelling
    ("docker ps", "listing every container is for operators"),
    ("docker ps -a", "listing every container"),
    ("docker 'ps' -a", "listing every container"),
    ('"docker" p\\s -a', "listing every container"),
    ("docker ps -q --filter label=pideploy.user=alice", "listing every container"),
    ("docker ps -l --format '{{.Names}}'", "listing every container"),
    ("docker ps -n 3", "listing every container"),
    ("docker container ls -a", "listing every container"),
    ("docker stats --no-stream", "listing every container"),
    ("docker stats --no-stream -a pideploy-ns-3", "listing every container"),
    ("docker info", "counts every container"),
    ("docker info --format '{{json .}}'", "counts every container"),
    # host-wide views list every container too: by id (df's shm mounts, conmon's arguments), by
    # port, in the engine's journal
    ("ps aux", "ps shows every container's processes"),
    ("ps -eo pid,args --cols 500", "ps shows every container's processes"),
    ("df -h", "df shows every container's mounts"),
    ("df -a /proc/loadavg", "df shows every container's mounts"),
    ("ss -tlnp", "ss shows every instance's ports"),
    ("systemctl status docker --no-pager", "systemctl shows every service's processes"),
    ("journalctl CONTAINER_NAME=pideploy-ns-33", "journalctl reads the whole machine's journal"),
    ("free -m; ps aux | grep conmon", "ps shows every container's processes"),
    # podman reads its own store, not the engine the names were resolved through
    ("podman inspect pideploy-ns-3", "podman is for operators"),
    ("podman ps", "podman is for operators"),
    # what the gate refuses in every scope still comes first
    ("docker rm -f pideploy-ns-3", "not read-only"),
    ("docker inspect -f '{{.Config.Env}}' pideploy-ns-3", "the field Env"),
]


def _user_check(command: str) -> gate.Verdict:
    return gate.check(command, connect_ports={20003}, containers=lambda: ENGINE)


@pytest.mark.parametrize("command", USER_ALLOWED)
def test_a_user_may_name_its_own_containers(command: str) -> None:
    verdict = _user_check(command)
    assert verdict == gate.Verdict(True, ""), verdict.reason


@pytest.mark.parametrize(("command", "reason"), USER_REFUSED)
def test_a_user_may_not_name_or_list_other_containers(command: str, reason: str) -> None:
    verdict = _user_check(command)
    assert not verdict.allowed
    assert reason in verdict.reason


def test_an_id_prefix_of_several_own_containers_is_ambiguous() -> None:
    both = gate.Containers(
        own=frozenset({OWN_OLD_ID, "dd" + "9" * 62}), every={OWN_OLD_ID: "a", "dd" + "9" * 62: "b"}
    )
    verdict = gate.check("docker inspect dd", containers=lambda: both)
    assert not verdict.allowed and "ambiguous" in verdict.reason


def test_the_engine_is_asked_only_when_a_command_names_containers() -> None:
    asked: list[int] = []

    def engine() -> gate.Containers:
        asked.append(1)
        return ENGINE

    assert gate.check("uptime; docker images; docker version", containers=engine).allowed
    assert asked == []
    assert gate.check("docker inspect pideploy-ns-3; docker logs pideploy-ns-3", containers=engine).allowed
    assert asked == [1]


def test_an_operators_scope_keeps_its_freedom() -> None:
    for command in (
        "docker ps -a",
        "podman ps -a",
        "docker inspect pideploy-ns-4",
        "docker info",
        "docker stats --no-stream",
        "ps aux",
        "df -h",
        "ss -tlnp",
    ):
        assert gate.check(command).allowed, command


def test_resolve_follows_the_engines_order() -> None:
    assert ENGINE.resolve(OWN_ID) == {OWN_ID}
    assert ENGINE.resolve("pideploy-ns-3") == {OWN_ID}
    assert ENGINE.resolve("/pideploy-ns-3") == {OWN_ID}
    assert ENGINE.resolve("c0ffee1") == {OWN_ID, OPERATORS_ID}  # a name and a prefix: both count
    assert ENGINE.resolve("c0ffee") == {OWN_ID, THEIRS_ID}
    assert ENGINE.resolve("nothing") == frozenset()


# ---------------------------------------------------------------------------
# nginx: only piDeploy's own configuration
# ---------------------------------------------------------------------------


def test_nginx_runs_only_with_the_pinned_configuration(root: Path) -> None:
    own = gate.NginxPin(f"{root}/nginx/", f"{root}/nginx/nginx.conf")
    allowed = (
        f"nginx -t -p {root}/nginx/ -c {root}/nginx/nginx.conf",
        f"nginx -t -q -p {root}/nginx -c {root}/nginx/nginx.conf",
        f"nginx -T -c {root}/nginx/nginx.conf",
        "nginx -t",  # the compiled-in default: root's, not the caller's
        "nginx -V",
    )
    for command in allowed:
        assert gate.check(command, [root], nginx=own).allowed, command
    refused = (
        f"nginx -t -c {root}/app.log",
        f"nginx -t -c {root}/nginx/../nginx/nginx.conf",  # the same file today; the text is what counts
        f"nginx -t -c {root}/nginx//nginx.conf",
        f"nginx -t -p {root}/ -c {root}/nginx/nginx.conf",
        f"nginx -t -c {root}/nginx/nginx.conf -c {root}/app.log",
        f"nginx -t -g 'load_module {root}/evil.so;' -c {root}/nginx/nginx.conf",
    )
    for command in refused:
        verdict = gate.check(command, [root], nginx=own)
        assert not verdict.allowed, command
    # A heartbeat's scope and an operator's alike: with no pin, no -c at all.
    assert "piDeploy's own configuration" in gate.check(f"nginx -t -c {root}/nginx/nginx.conf", [root]).reason


def test_the_pin_is_read_from_the_proxys_test_command() -> None:
    embedded = [
        "nginx",
        "-t",
        "-q",
        "-p",
        "/var/lib/pideploy/nginx/",
        "-e",
        "/x.log",
        "-c",
        "/var/lib/pideploy/nginx/nginx.conf",
    ]
    assert gate.NginxPin.from_command(embedded) == gate.NginxPin(
        "/var/lib/pideploy/nginx/", "/var/lib/pideploy/nginx/nginx.conf"
    )
    assert gate.NginxPin.from_command(
        ["sudo", "/usr/sbin/nginx", "-t", "-c/etc/nginx/nginx.conf"]
    ) == gate.NginxPin(None, "/etc/nginx/nginx.conf")
    assert gate.NginxPin.from_command(["nginx", "-t"]) == gate.NginxPin()
    assert gate.NginxPin.from_command(["openresty", "-t", "-c", "/x"]) == gate.NginxPin()


# ---------------------------------------------------------------------------
# run(): real subprocesses
# ---------------------------------------------------------------------------


def test_run_captures_output_and_exit_code(root: Path) -> None:
    result = gate.run(f"grep -c ok {root}/app.log", read_roots=[root])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "2\n", "")
    assert not result.truncated and not result.timed_out
    missing = gate.run(f"ls {root}/missing", read_roots=[root])
    assert missing.exit_code == 2
    assert "No such file" in missing.stderr


def test_run_merges_stderr_with_2_to_1(root: Path) -> None:
    result = gate.run(f"ls {root}/missing 2>&1 | wc -l", read_roots=[root])
    assert result.stdout.strip() == "1"
    assert result.stderr == ""


def test_run_refuses_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "made"
    with pytest.raises(ToolRefused) as info:
        gate.run(f"touch {marker}")
    assert info.value.error_class == "tool_refused"
    assert info.value.data == {"command": f"touch {marker}"}
    assert "modifies files" in info.value.message
    assert not marker.exists()


def test_run_caps_output(root: Path) -> None:
    big = root / "big.log"
    big.write_bytes(b"x" * 2_000_000)
    result = gate.run(f"cat {big}", read_roots=[root], output_cap=1000)
    assert result.exit_code == 0  # cat ran to the end: the rest was drained, not kept
    assert result.stdout == "x" * 1000
    assert result.truncated


def test_run_ignores_bash_startup_hooks_in_env(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("echo pwned-by-bash-env\n")
    env = {
        "PATH": os.environ["PATH"],
        "BASH_ENV": str(hook),
        "BASH_FUNC_uptime%%": "() { builtin echo pwned-by-function; }",
    }
    result = gate.run("uptime", env=env)
    assert "pwned" not in result.stdout
    assert result.exit_code == 0


def test_run_with_no_time_left_does_not_start() -> None:
    result = gate.run("uptime", timeout=0)
    assert result.timed_out and result.exit_code is None


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # the process ended while we looked
                continue
    return found


def test_run_timeout_kills_the_whole_process_group(silent_server: int) -> None:
    require_stack("curl", shutil.which("curl") is not None, "apt-get install curl")
    marker = f"never-{uuid.uuid4().hex}"
    # Two curls in a pipeline: the kill must reach both, not only bash.
    command = f"curl -sS http://127.0.0.1:{silent_server}/{marker} | curl -sS http://127.0.0.1:{silent_server}/{marker}"
    started = time.monotonic()
    result = gate.run(command, timeout=1.0)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code is None
    # Not before the timeout, and long before the never-answering server would let go.
    assert 0.9 <= elapsed < 15
    assert 0.9 <= result.duration_s < 15
    # SIGKILL is delivered at once, but a loaded machine may take a moment to tear the processes
    # down: poll /proc for them to be gone, with a bound.
    gone_by = time.monotonic() + 10
    while (left := _processes_mentioning(marker)) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert left == []


# ---------------------------------------------------------------------------
# cli()
# ---------------------------------------------------------------------------


def test_cli_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.cli("uptime") == 0
    assert capsys.readouterr().out == "allowed\n"


def test_cli_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.cli("rm -rf /") == 1
    assert capsys.readouterr().out == "refused: 'rm' is not allowed: modifies files\n"


def test_cli_uses_read_roots(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.cli(f"cat {root}/app.log", [root]) == 0
    assert gate.cli(f"cat {root}/app.log") == 1
    assert "outside the read roots" in capsys.readouterr().out


def _gate_command(config: Config, command: str) -> int:
    """`pideploy.py gate COMMAND` (its handler: main() would also set up logging for good)."""
    return pideploy.cmd_gate(argparse.Namespace(bash_command=command), config)


def test_the_gate_command_pins_nginx_to_piDeploys_own_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # From the command line the read roots are piDeploy's home, where every instance writes its
    # own storage folder: a configuration planted there loads any module, as root.
    config = make_config(tmp_path)
    home = config.home.resolve()
    planted = home / "instances" / "3" / "evil.conf"
    planted.parent.mkdir(parents=True)
    planted.write_text(f"load_module {planted.parent}/evil.so;\nevents {{}}\n")
    assert _gate_command(config, f"nginx -t -c {planted}") == 1
    assert "refused: nginx -c" in capsys.readouterr().out
    assert _gate_command(config, f"nginx -t -p {home}/instances/3/ -c {planted}") == 1
    assert "refused: nginx -p" in capsys.readouterr().out
    own = f"nginx -t -p {home}/nginx/ -c {home}/nginx/nginx.conf"
    assert _gate_command(config, own) == 0
    assert _gate_command(config, "docker ps -a") == 0  # an operator's verdicts, as before
    assert _gate_command(config, f"cat {planted}") == 0
    assert _gate_command(config, "rm -rf /") == 1
    assert capsys.readouterr().out.splitlines() == [
        "allowed",
        "allowed",
        "allowed",
        "refused: 'rm' is not allowed: modifies files",
    ]
    # External mode: the operator's own test command is what may run.
    external = make_config(
        tmp_path,
        nginx_map=tmp_path / "routes.map",
        nginx_test_cmd="sudo nginx -t -c /etc/nginx/nginx.conf",
    )
    assert _gate_command(external, "nginx -t -c /etc/nginx/nginx.conf") == 0
    assert _gate_command(external, own) == 1


# ---------------------------------------------------------------------------
# the sandbox: what the kernel refuses once check() has let a command through
# ---------------------------------------------------------------------------


def require_landlock() -> None:
    require_stack("Landlock", gate.landlock_abi() > 0, "this kernel has no Landlock (Linux 5.13+)")


@pytest.fixture
def after_check(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], None]]:
    """Actions run between the check and the run: what a racing writer could do."""
    actions: list[Callable[[], None]] = []
    checked = gate._check

    def check_then_act(command: str, roots: tuple[Path, ...]) -> list[list[str]]:
        commands = checked(command, roots)
        for action in actions:
            action()
        return commands

    monkeypatch.setattr(gate, "_check", check_then_act)
    return actions


def test_a_symlink_swapped_in_after_the_check_is_not_followed(
    root: Path, tmp_path: Path, after_check: list[Callable[[], None]]
) -> None:
    # An instance writes its own storage folder, a read root of its user's tasks: between the
    # check and the run it can turn a checked file into a link to anything on the machine.
    require_landlock()
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret-of-another-user\n")
    swapped = root / "notes.txt"
    swapped.write_text("harmless\n")

    def swap() -> None:
        swapped.unlink()
        swapped.symlink_to(secret)

    after_check.append(swap)
    result = gate.run(f"cat {swapped}", read_roots=[root])
    assert "s3cret" not in result.stdout
    assert result.exit_code == 1 and "Permission denied" in result.stderr
    assert gate.run(f"cat {root}/app.log", read_roots=[root]).stdout == "ok\nerror: boom\nok\n"


def test_a_command_the_check_let_through_by_mistake_still_writes_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line does not depend on the parser: pretend it had a hole.
    require_landlock()
    monkeypatch.setattr(gate, "_check", lambda command, roots: [command.split()])
    made, victim = root / "made", root / "app.log"
    result = gate.run(f"touch {made}; rm {victim}; echo x 2>&1 | tee -a {victim}", read_roots=[root])
    assert not made.exists()
    assert victim.read_text() == "ok\nerror: boom\nok\n"
    assert result.stderr.count("Permission denied") == 3
    shadow = gate.run("cat /etc/shadow", read_roots=[root])
    assert shadow.stdout == "" and "Permission denied" in shadow.stderr
    if gate.landlock_abi() >= 6:  # signals scoped to the sandbox: piDeploy is out of reach
        signal_ = gate.run(f"kill -0 {os.getpid()}")
        assert signal_.exit_code == 1 and "not permitted" in signal_.stderr


def test_a_sandbox_that_cannot_be_set_up_runs_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_landlock()
    monkeypatch.setattr(sandbox, "_LANDLOCK_RULE_PATH_BENEATH", 99)  # a rule type the kernel rejects
    monkeypatch.setattr(gate, "_check", lambda command, roots: [command.split()])
    made = root / "made"
    with pytest.raises(SandboxFailed) as failed:
        gate.run(f"touch {made}", read_roots=[root])
    assert (
        failed.value.data["call"] == "landlock_add_rule"
        and failed.value.error_class == "tool_execution_error"
    )
    assert not made.exists()


def test_a_sandboxed_command_cannot_read_piDeploys_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    require_landlock()
    monkeypatch.setenv("PIDEPLOY_TEST_SECRET", "sk-not-for-the-model")
    monkeypatch.setattr(gate, "_check", lambda command, roots: [command.split()])
    result = gate.run(f"cat /proc/{os.getpid()}/environ")
    assert "sk-not-for-the-model" not in result.stdout
    assert "Permission denied" in result.stderr
    listed = gate.run(f"ps -o pid=,comm= -p {os.getpid()}")  # while ps still sees every process
    assert listed.stdout.split()[0] == str(os.getpid()) and listed.exit_code == 0


def test_the_sandbox_stays_on_the_thread_that_starts_the_command(root: Path, tmp_path: Path) -> None:
    require_landlock()
    bounding_before = _bounding_set()
    assert gate.run(f"cat {root}/app.log", read_roots=[root]).exit_code == 0
    written = tmp_path / "still-writable"
    written.write_text("yes")  # this thread, and piDeploy with it, is not restricted
    assert written.read_text() == "yes"
    assert _bounding_set() == bounding_before
    assert Path("/etc/hostname").read_text()


def _bounding_set() -> str:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("CapBnd:"))


@pytest.mark.stack
def test_nginx_t_of_a_running_nginx_passes_in_the_sandbox(tmp_path: Path) -> None:
    # nginx -t opens its pid and error log files for writing: alone in its command, the
    # sandbox lets it open those (and create nothing but logs under /var/log/nginx).
    require_landlock()
    require_stack("nginx", shutil.which("nginx") is not None)
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "temp").mkdir()
    if os.geteuid() == 0:
        os.chown(prefix / "temp", 65534, -1)  # as nginx left it: its worker user owns it
    (prefix / "logs" / "error.log").write_text("")
    (prefix / "nginx.pid").write_text("")  # nginx is running
    temp = prefix / "temp"
    (prefix / "nginx.conf").write_text(
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\nevents {{}}\nhttp {{\n"
        + "".join(
            f"    {kind}_temp_path {temp};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + "    access_log off;\n}\n"
    )
    # piDeploy's own configuration, pinned: its folder is readable (and its pid and log files
    # writable in place) for this run, whatever the read roots.
    own = gate.NginxPin(f"{prefix}/", f"{prefix}/nginx.conf")
    result = gate.run(f"nginx -t -p {prefix}/ -c {prefix}/nginx.conf", nginx=own)
    assert result.exit_code == 0, result.stderr
    assert "test is successful" in result.stderr
    # Had a configuration there been swapped for one naming a pid file anywhere: as root and
    # unsandboxed, nginx -t would create it.
    planted = Path(f"/etc/pideploy-planted-{uuid.uuid4().hex}.pid")
    (prefix / "nginx.conf").write_text(f"pid {planted};\nevents {{}}\n")
    try:
        refused = gate.run(f"nginx -t -p {prefix}/ -c {prefix}/nginx.conf", nginx=own)
        assert refused.exit_code == 1 and "Permission denied" in refused.stderr
        assert not planted.exists()
    finally:
        planted.unlink(missing_ok=True)


@pytest.fixture
def two_http_servers() -> Iterator[tuple[int, int]]:
    """Two loopback HTTP servers answering 200 "ok": one a command may reach, one it may not."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_a_command_connects_only_to_the_ports_it_is_given(
    two_http_servers: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_landlock()
    require_stack("Landlock network rules", gate.landlock_abi() >= 4, "Linux 6.7+ (Landlock ABI 4)")
    require_stack("curl", shutil.which("curl") is not None, "apt-get install curl")
    mine, theirs = two_http_servers
    allowed = gate.run(f"curl -sS -m 5 http://127.0.0.1:{mine}/", connect_ports={mine})
    assert (allowed.exit_code, allowed.stdout) == (0, "ok")
    with pytest.raises(ToolRefused, match=f"port {theirs} is not one of this task's instance ports"):
        gate.run(f"curl -sS -m 5 localhost:{theirs}/", connect_ports={mine})  # the check, first
    # The kernel, second: a parser hole that let the URL through still cannot connect.
    monkeypatch.setattr(gate, "_check_ports", lambda commands, allowed: None)
    denied = gate.run(f"curl -sS -m 5 http://127.0.0.1:{theirs}/", connect_ports={mine})
    assert denied.exit_code == 7 and denied.stdout == "", denied  # curl: could not connect
    anywhere = gate.run(f"curl -sS -m 5 http://127.0.0.1:{theirs}/")  # None: a heartbeat's run
    assert (anywhere.exit_code, anywhere.stdout) == (0, "ok")


def test_without_landlock_run_warns_once_and_relies_on_the_check(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)
    monkeypatch.setattr(sandbox, "_warned_unsandboxed", False)
    for _ in range(2):
        assert gate.run(f"cat {root}/app.log", read_roots=[root]).exit_code == 0
    warnings = [r for r in caplog.records if getattr(r, "action", "") == "gate_sandbox_unavailable"]
    assert len(warnings) == 1
    assert "check alone" in gate.sandbox_status()
    with pytest.raises(ToolRefused):
        gate.run("cat /etc/shadow", read_roots=[root])
