"""The bash gate's second line, which does not depend on its parser: a kernel sandbox
(Landlock, through ctypes) and the process runner (bash -c in its own process group, bounded
in time and output). gate.run() checks a command, then hands it here.

Why a file of its own: this is the part of the gate that talks to the kernel (syscalls,
capabilities, process groups, pipes); gate.py and allowlist.py only read text.

The command is started from a short-lived thread that first restricts itself with Landlock
(Linux 5.13+) and drops every capability but the two that let root read files
it does not own. The kernel then checks each open, after symlinks, against the
read roots plus the system files programs need to start (SANDBOX_SYSTEM_PATHS,
never /etc as a whole); nothing may be written, created, removed or renamed
anywhere, and Landlock also keeps the command out of other processes' memory
and environment under /proc. Sockets are not covered: the engine, nginx and
loopback HTTP stay reachable, which is what the allowlist is for. On a
kernel without Landlock, run_bash() logs a warning once (`gate_sandbox_unavailable`)
and relies on the gate's check alone; `sandbox_status()` says which (see `doctor`).
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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import SandboxFailed


@dataclass(frozen=True)
class BashResult:
    exit_code: int | None  # None if killed on timeout
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_s: float


# ---------------------------------------------------------------------------
# run_bash(): bash -c in its own process group, bounded in time and output
# ---------------------------------------------------------------------------

# Variables that make bash run code before the command (BASH_ENV, exported
# functions), change how it parses, or inject libraries; never passed to the child.
_UNSAFE_ENV = re.compile(r"BASH_ENV|ENV|SHELLOPTS|BASHOPTS|CDPATH|GLOBIGNORE|IFS|PS4|BASH_FUNC_.*|LD_.*")
_BASH = shutil.which("bash") or "/bin/bash"


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:  # a minimal environment: no API keys of ours reach the child
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return {k: v for k, v in env.items() if not _UNSAFE_ENV.fullmatch(k)}


def run_bash(
    command: str,
    roots: tuple[Path, ...],
    *,
    timeout: float,
    output_cap: int,
    env: Mapping[str, str] | None,
    nginx_files: bool,
    connect_ports: frozenset[int] | None,
) -> BashResult:
    """Run an already checked command with bash -c in a NEW PROCESS GROUP, inside the sandbox
    (roots, nginx_files, connect_ports: see _enter_sandbox); stdout/stderr capped at output_cap
    bytes each, read incrementally; on timeout the whole group is killed (timed_out=True).
    A timeout <= 0 (no time left) returns timed_out=True without starting anything."""
    started = time.monotonic()
    if timeout <= 0:
        return BashResult(None, "", "", False, True, 0.0)
    deadline = started + timeout
    with _start_sandboxed(
        [_BASH, "--noprofile", "--norc", "-f", "-c", command],  # -f: no globbing, a second line
        roots,
        env=_child_env(env),
        nginx_files=nginx_files,
        connect_ports=connect_ports,
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

# The gate's logger: the warning below is the gate's, and logs keep naming it so.
logger = logging.getLogger("gate")

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
