#!/bin/sh
# The piDeploy gateway stand-in: run by busybox sh as PID 1 of the container.
#
# Serves, with busybox httpd on $GATEWAY_PORT (default 8080), from a folder it
# prepares at each start:
#   /healthz -> 200 "ok"            /version -> "v1" or "v2"
#   /        -> a small page "piDeploy gateway stand-in" with the version
#
# Faults, each from an environment variable or from a file in /data (the file
# form changes an existing container's behaviour before its next start); the
# variable wins when both are set:
#   GATEWAY_CRASH_AT_START=1  | /data/crash_at_start (present) -> exit 3 at once
#   GATEWAY_CRASH_AFTER=N     | /data/crash_after  (holds N)   -> exit 1 after N s
#   GATEWAY_HEALTHZ_DELAY=N   | /data/healthz_delay (holds N)  -> /healthz 404 for N s
#   GATEWAY_LOG_MESSAGE=text  | /data/log_message (holds text) -> text on stdout at start
# SIGTERM or SIGINT stops it at once with exit code 0.
# tests/test_stack.py checks this contract against the real engine; the
# in-memory engine implements the same one.

PATH=/bin
export PATH

VERSION=$(cat /etc/gateway-version 2>/dev/null || echo unknown)
PORT=${GATEWAY_PORT:-8080}
DATA=/data
WWW=/tmp/www
HTTPD_PID=
TIMER_PIDS=

say() {
    echo "gateway $VERSION: $*"
}

# setting VAR FILE: the variable's value if set, else the file's content
# (first line, surrounding blanks removed), else nothing.
setting() {
    eval "value=\${$1:-}"
    if [ -z "$value" ] && [ -f "$DATA/$2" ]; then
        value=$(head -n 1 "$DATA/$2" | tr -d ' \t\r')
    fi
    echo "$value"
}

# seconds VAR FILE: a whole number of seconds from setting, or nothing.
seconds() {
    value=$(setting "$1" "$2")
    case $value in
        '') ;;
        *[!0-9]*) say "ignoring $1/$DATA/$2: '$value' is not a whole number of seconds" >&2 ;;
        *) echo "$value" ;;
    esac
}

stop_children() {
    for pid in $HTTPD_PID $TIMER_PIDS; do
        kill "$pid" 2>/dev/null
    done
}

# shellcheck disable=SC2317  # run by the trap
on_term() {
    say "stopping (signal)"
    stop_children
    exit 0
}

# shellcheck disable=SC2317  # run by the trap
on_crash() {
    say "crashing now (crash_after $CRASH_AFTER s)"
    stop_children
    exit 1
}

# -- start ---------------------------------------------------------------
trap on_term TERM INT
trap on_crash USR1

if [ -n "${GATEWAY_LOG_MESSAGE:-}" ]; then
    printf '%s\n' "$GATEWAY_LOG_MESSAGE"
elif [ -f "$DATA/log_message" ]; then
    printf '%s\n' "$(cat "$DATA/log_message")"
fi

if [ -f "$DATA/openclaw.json" ]; then
    say "config $DATA/openclaw.json present"
else
    say "config $DATA/openclaw.json missing"
fi

crash_at_start=${GATEWAY_CRASH_AT_START:-}
if [ -f "$DATA/crash_at_start" ] || { [ -n "$crash_at_start" ] && [ "$crash_at_start" != 0 ]; }; then
    say "crash at start requested, exiting with code 3"
    exit 3
fi

rm -rf "$WWW"
mkdir -p "$WWW"
printf '%s' "$VERSION" >"$WWW/version"
cat >"$WWW/index.html" <<EOF
<!doctype html>
<html><head><meta charset="utf-8"><title>piDeploy gateway stand-in</title></head>
<body><h1>piDeploy gateway stand-in</h1><p>version <span id="version">$VERSION</span></p></body></html>
EOF

HEALTHZ_DELAY=$(seconds GATEWAY_HEALTHZ_DELAY healthz_delay)
if [ -n "$HEALTHZ_DELAY" ] && [ "$HEALTHZ_DELAY" -gt 0 ]; then
    say "/healthz answers 404 for the first $HEALTHZ_DELAY s"
    (sleep "$HEALTHZ_DELAY"; printf ok >"$WWW/healthz") &
    TIMER_PIDS="$TIMER_PIDS $!"
else
    printf ok >"$WWW/healthz"
fi

busybox httpd -f -p "$PORT" -h "$WWW" &
HTTPD_PID=$!
echo "gateway $VERSION listening on $PORT"

CRASH_AFTER=$(seconds GATEWAY_CRASH_AFTER crash_after)
if [ -n "$CRASH_AFTER" ]; then
    say "will crash after $CRASH_AFTER s"
    (sleep "$CRASH_AFTER"; kill -USR1 $$) &
    TIMER_PIDS="$TIMER_PIDS $!"
fi

# A trapped signal interrupts wait; the trap then ends the script.
wait "$HTTPD_PID"
status=$?
say "httpd exited with status $status"
stop_children
exit 2
