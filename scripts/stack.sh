#!/usr/bin/env bash
# The real local stack piDeploy runs against, from Debian's packages only.
#
#   eval "$(scripts/stack.sh up)"   install what is missing, start the container
#                                   engine, build the gateway image; prints the
#                                   export lines on stdout, everything else on stderr
#   scripts/stack.sh status         one line per part
#   scripts/stack.sh down           stop what `up` started (its Podman service)
#
# Engine: a real Docker daemon on /var/run/docker.sock if one answers, otherwise
# Podman's Docker-compatible API served from $PDSTACK_DIR/podman.sock.
# nginx and PostgreSQL are only installed and checked: piDeploy runs private
# instances of both per data dir.
#
# Knobs (never PIDEPLOY_*: piDeploy's config refuses unknown PIDEPLOY_ names):
#   PDSTACK_DIR     state folder: socket, pid file, logs, image build (default /tmp/pideploy-stack)
#   PDSTACK_ENGINE  auto | podman | docker (default auto)
set -euo pipefail

STACK_DIR=${PDSTACK_DIR:-/tmp/pideploy-stack}
ENGINE_CHOICE=${PDSTACK_ENGINE:-auto}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GATEWAY_SRC=$HERE/gateway
IMAGE=localhost/pideploy-gateway
VERSIONS=(v1 v2)
PACKAGES=(podman runc busybox-static nginx postgresql chromium curl nftables)

DOCKER_SOCK=/var/run/docker.sock
PODMAN_SOCK=$STACK_DIR/podman.sock
PODMAN_PIDFILE=$STACK_DIR/podman.pid
PODMAN_LOG=$STACK_DIR/podman.log
POLICY_RC=/usr/sbin/policy-rc.d
ENGINE_SOCK=""     # the socket of the engine in use, set by pick_engine's callers
POLICY_CREATED=""  # set while this script's own policy-rc.d is in place

log() { printf 'stack: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    cat >&2 <<EOF
usage: $0 up|down|status

  up      install missing packages, start the container engine, build the
          gateway image; prints export lines for: eval "\$($0 up)"
  down    stop the Podman service that up started (nothing else)
  status  one line per part

environment: PDSTACK_DIR (default /tmp/pideploy-stack), PDSTACK_ENGINE=auto|podman|docker
EOF
    exit 2
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

# -- packages ----------------------------------------------------------------

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || printf '%s\n' "$pkg"
    done
}

remove_policy_rc() {
    if [[ -n $POLICY_CREATED ]]; then
        as_root rm -f "$POLICY_RC"
        POLICY_CREATED=""
    fi
}

install_packages() {
    local missing=()
    command -v dpkg >/dev/null || die "dpkg not found: this script installs from Debian's packages (${PACKAGES[*]})"
    mapfile -t missing < <(missing_packages)
    [[ ${#missing[@]} -eq 0 ]] && return 0

    if [[ $EUID -ne 0 ]] && ! { command -v sudo >/dev/null && { [[ -t 0 ]] || sudo -n true 2>/dev/null; }; }; then
        log "missing Debian packages: ${missing[*]}"
        log "install them as root, then run this again:"
        log "  apt-get install --no-install-recommends ${missing[*]}"
        exit 1
    fi
    log "installing: ${missing[*]}"
    # Package scripts must not start a system nginx or PostgreSQL (they would
    # take ports 80 and 5432): policy-rc.d exiting 101 forbids service starts.
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# written by piDeploy scripts/stack.sh for one apt-get install\nexit 101\n' |
            as_root tee "$POLICY_RC" >/dev/null
        as_root chmod 755 "$POLICY_RC"
        POLICY_CREATED=1
        trap remove_policy_rc EXIT
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    remove_policy_rc
    trap - EXIT
}

# -- container engine ----------------------------------------------------------

ping_socket() {
    [[ -S $1 ]] && curl -sf --max-time 2 --unix-socket "$1" http://d/_ping >/dev/null 2>&1
}

docker_daemon_answers() {
    # A real Docker daemon: Podman may also serve this socket (podman-docker).
    local version
    ping_socket "$DOCKER_SOCK" || return 1
    version=$(curl -sf --max-time 2 --unix-socket "$DOCKER_SOCK" http://d/version) || return 1
    [[ $version != *Podman* ]]
}

pick_engine() {
    case $ENGINE_CHOICE in
        docker)
            docker_daemon_answers || die "PDSTACK_ENGINE=docker but no Docker daemon answers on $DOCKER_SOCK"
            echo docker
            ;;
        podman) echo podman ;;
        auto) if docker_daemon_answers; then echo docker; else echo podman; fi ;;
        *) die "PDSTACK_ENGINE must be auto, podman or docker (not '$ENGINE_CHOICE')" ;;
    esac
}

containers_conf() {
    if [[ $EUID -eq 0 ]]; then
        echo /etc/containers/containers.conf
    else
        echo "${XDG_CONFIG_HOME:-$HOME/.config}/containers/containers.conf"
    fi
}

# toml_set SECTION KEY VALUE: stdin to stdout with KEY = VALUE as the first
# line of [SECTION] (the section is appended if absent); any other KEY line in
# that section is dropped, a multi-line array value included. Everything else
# is kept as it is.
toml_set() {
    awk -v section="$1" -v key="$2" -v value="$3" '
        skipping { if ($0 ~ /\]/) skipping = 0; next }
        /^[ \t]*\[/ {
            in_section = ($0 ~ "^[ \t]*\\[" section "\\][ \t]*(#.*)?$")
            print
            if (in_section && !seen) { print key " = " value; seen = 1 }
            next
        }
        in_section && $0 ~ "^[ \t]*" key "[ \t]*=" {
            rest = $0; sub(/^[^=]*=[ \t]*/, "", rest)
            if (rest ~ /^\[/ && rest !~ /\]/) skipping = 1
            next
        }
        { print }
        END {
            if (!seen) { if (NR > 0) print ""; print "[" section "]"; print key " = " value }
        }'
}

wanted_containers_conf() {
    # default_ulimits = []: Podman's default ulimits make every start fail with
    # "setrlimit RLIMIT_NOFILE: Operation not permitted" here. runc: crun fails
    # with "cgroups in hybrid mode not supported".
    toml_set containers default_ulimits '[]' | toml_set engine runtime '"runc"'
}

containers_conf_ok() {
    local conf
    conf=$(containers_conf)
    [[ -f $conf ]] && [[ $(wanted_containers_conf <"$conf") == "$(cat "$conf")" ]]
}

# Prints "changed" when the file was written.
ensure_containers_conf() {
    local conf wanted
    conf=$(containers_conf)
    containers_conf_ok && return 0
    if [[ -f $conf ]]; then
        wanted=$(wanted_containers_conf <"$conf")
        [[ -e $conf.pdstack-backup ]] || cp -p "$conf" "$conf.pdstack-backup"
        log "setting default_ulimits = [] and runtime = \"runc\" in $conf (was saved as $conf.pdstack-backup)"
    else
        wanted=$(wanted_containers_conf </dev/null)
        mkdir -p "$(dirname "$conf")"
        log "writing $conf (default_ulimits = [], runtime = \"runc\")"
    fi
    printf '%s\n' "$wanted" >"$conf.pdstack-new"
    [[ -f $conf ]] && chmod --reference="$conf" "$conf.pdstack-new"
    mv "$conf.pdstack-new" "$conf"
    echo changed
}

# The PID of the Podman service that up started, if it is still that process.
our_podman_pid() {
    local pid
    [[ -f $PODMAN_PIDFILE ]] || return 1
    pid=$(<"$PODMAN_PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "system service --time=0 unix://$PODMAN_SOCK" || return 1
    echo "$pid"
}

stop_podman() {
    local pid i
    pid=$(our_podman_pid) || { rm -f "$PODMAN_PIDFILE"; return 0; }
    log "stopping the Podman service (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "the Podman service did not stop in 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PODMAN_PIDFILE" "$PODMAN_SOCK"
}

# Run in the background: the service gets its own session and no descriptor
# but stdin/stdout/stderr. An inherited pipe (the one `eval "$(stack.sh up)"`
# reads, or a CI log) would otherwise stay open as long as the service runs,
# and an inherited up.lock descriptor would hold the lock.
launch_podman() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if ((fd > 2)) && [[ -e /proc/$BASHPID/fd/$fd ]]; then
            exec {fd}>&-
        fi
    done
    echo "$BASHPID" >"$PODMAN_PIDFILE"
    # Not a process group leader (no job control here), so setsid does not fork.
    exec setsid podman system service --time=0 "unix://$PODMAN_SOCK"
}

start_podman() {
    local restart=$1 i
    command -v podman >/dev/null || die "podman not found (apt-get install podman runc)"
    if [[ -z $restart ]] && ping_socket "$PODMAN_SOCK"; then
        return 0
    fi
    stop_podman # a service of ours that does not answer, or that must reread containers.conf
    rm -f "$PODMAN_SOCK"
    log "starting podman system service on unix://$PODMAN_SOCK (log: $PODMAN_LOG)"
    launch_podman </dev/null >>"$PODMAN_LOG" 2>&1 &
    for ((i = 0; i < 300; i++)); do
        ping_socket "$PODMAN_SOCK" && return 0
        if ((i > 10)) && ! our_podman_pid >/dev/null; then
            tail -n 20 "$PODMAN_LOG" >&2 || true
            die "the Podman service exited (log above, in $PODMAN_LOG)"
        fi
        sleep 0.1
    done
    die "the Podman service does not answer on $PODMAN_SOCK after 30 s (see $PODMAN_LOG)"
}

# -- gateway image ---------------------------------------------------------------

api() {
    local path=$1
    shift
    curl -sf --max-time 60 --unix-socket "$ENGINE_SOCK" "$@" "http://d$path"
}

gateway_hash() {
    # The gateway sources, this script (the recipe) and the busybox binary.
    (
        cd "$GATEWAY_SRC"
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum "$HERE/stack.sh" /bin/busybox
    ) | sha256sum | cut -c1-16
}

image_current() {
    local tag=$1 version=$2 hash=$3 json
    json=$(api "/images/$IMAGE:$tag/json" 2>/dev/null) || return 1
    grep -qF "\"pideploy.gateway.source\":\"$hash\"" <<<"$json" &&
        grep -qF "\"pideploy.gateway.version\":\"$version\"" <<<"$json"
}

images_current() {
    local hash=$1 version
    image_current latest v1 "$hash" || return 1
    for version in "${VERSIONS[@]}"; do
        image_current "$version" "$version" "$hash" || return 1
    done
}

image_id() {
    local json
    json=$(api "/images/$1/json" 2>/dev/null) || return 1
    [[ $json =~ \"Id\":\"(sha256:[0-9a-f]+)\" ]] && echo "${BASH_REMATCH[1]}"
}

make_rootfs() {
    local rootfs=$1 version=$2 applet
    mkdir -p "$rootfs"/{bin,etc,gateway,data,tmp,proc,sys,dev}
    chmod 1777 "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -s busybox "$rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    printf '%s\n' "$version" >"$rootfs/etc/gateway-version"
    cp -r "$GATEWAY_SRC/." "$rootfs/gateway/"
    chmod -R a+rX "$rootfs/gateway"
}

import_image() {
    local tarball=$1 version=$2 hash=$3 reply
    reply=$(api /images/create -X POST -H 'Content-Type: application/x-tar' --data-binary "@$tarball" \
        --url-query fromSrc=- \
        --url-query 'changes=CMD ["/bin/sh", "/gateway/entry.sh"]' \
        --url-query 'changes=ENV PATH=/bin' \
        --url-query 'changes=EXPOSE 8080' \
        --url-query "changes=LABEL pideploy.gateway.version=$version" \
        --url-query "changes=LABEL pideploy.gateway.source=$hash") || die "importing the $version image failed"
    [[ $reply =~ (sha256:[0-9a-f]{64}) ]] || die "no image id in the import reply: $reply"
    echo "${BASH_REMATCH[1]}"
}

tag_image() {
    api "/images/$1/tag" -X POST -o /dev/null --url-query "repo=$IMAGE" --url-query "tag=$2" ||
        die "tagging $1 as $IMAGE:$2 failed"
}

build_images() {
    local hash=$1 build=$STACK_DIR/gateway-build version id old tag
    local -A new_ids=()
    local old_ids=()
    for tag in "${VERSIONS[@]}" latest; do
        if old=$(image_id "$IMAGE:$tag") && [[ -n $old ]]; then
            old_ids+=("$old")
        fi
    done
    log "building $IMAGE with tags ${VERSIONS[*]} latest (source $hash)"
    rm -rf "$build"
    for version in "${VERSIONS[@]}"; do
        make_rootfs "$build/rootfs-$version" "$version"
        tar -C "$build/rootfs-$version" --owner=0 --group=0 --numeric-owner --sort=name --mtime=@0 \
            -cf "$build/$version.tar" .
        id=$(import_image "$build/$version.tar" "$version" "$hash")
        tag_image "$id" "$version"
        new_ids[$id]=1
    done
    tag_image "$IMAGE:v1" latest
    # Drop the images these tags pointed at before (kept if a container uses one).
    for old in "${old_ids[@]}"; do
        if [[ -z ${new_ids[$old]:-} ]]; then
            api "/images/$old" -X DELETE -o /dev/null || true
        fi
    done
    rm -rf "$build"
}

# -- commands -------------------------------------------------------------------

nginx_bin() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; }
}

postgres_bindir() {
    local initdb
    for initdb in /usr/lib/postgresql/*/bin/initdb; do
        [[ -x $initdb ]] && dirname "$initdb"
    done | sort -V | tail -n 1
}

cmd_up() {
    local engine changed="" hash nginx
    mkdir -p "$STACK_DIR"
    chmod 700 "$STACK_DIR"
    exec 9>"$STACK_DIR/up.lock"
    flock -w 600 9 || die "another 'stack.sh up' holds $STACK_DIR/up.lock"

    install_packages

    engine=$(pick_engine)
    if [[ $engine == docker ]]; then
        ENGINE_SOCK=$DOCKER_SOCK
        log "engine: the Docker daemon on $DOCKER_SOCK"
    else
        ENGINE_SOCK=$PODMAN_SOCK
        changed=$(ensure_containers_conf)
        start_podman "$changed"
        log "engine: Podman on $PODMAN_SOCK"
    fi

    hash=$(gateway_hash)
    images_current "$hash" || build_images "$hash"
    images_current "$hash" || die "the gateway images are not there after the build"

    nginx=$(nginx_bin) || die "nginx not found (apt-get install nginx)"
    "$nginx" -v 2>/dev/null || die "$nginx -v failed"
    [[ -n $(postgres_bindir) ]] || die "no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)"

    echo "export DOCKER_HOST=unix://$ENGINE_SOCK"
    echo "export PIDEPLOY_IMAGE=$IMAGE:latest"
    if ! command -v nginx >/dev/null; then
        echo "export PATH=\"\$PATH:$(dirname "$nginx")\""
    fi
}

cmd_down() {
    if our_podman_pid >/dev/null; then
        stop_podman
    else
        rm -f "$PODMAN_PIDFILE"
        log "no Podman service of ours is running for $STACK_DIR"
    fi
}

cmd_status() {
    local ok=0 missing engine hash tag version pid nginx bindir absent=()
    missing=$(missing_packages 2>/dev/null | tr '\n' ' ')
    if [[ -z $missing ]]; then echo "packages: ok (${PACKAGES[*]})"; else echo "packages: missing ${missing% }"; ok=1; fi

    engine=$(pick_engine 2>/dev/null) || engine=none
    if [[ $engine == docker ]]; then
        ENGINE_SOCK=$DOCKER_SOCK
        echo "engine: Docker daemon answering on $DOCKER_SOCK"
    else
        ENGINE_SOCK=$PODMAN_SOCK
        pid=$(our_podman_pid) || pid=none
        if ! ping_socket "$PODMAN_SOCK"; then
            echo "engine: Podman service not answering on $PODMAN_SOCK (pid $pid)"
            ok=1
        elif containers_conf_ok; then
            echo "engine: Podman answering on $PODMAN_SOCK (pid $pid), $(containers_conf) ok"
        else
            echo "engine: Podman answering on $PODMAN_SOCK (pid $pid), $(containers_conf) lacks the settings"
            ok=1
        fi
    fi

    if ping_socket "$ENGINE_SOCK"; then
        hash=$(gateway_hash)
        for tag in "${VERSIONS[@]}" latest; do
            version=$tag
            [[ $tag == latest ]] && version=v1
            image_current "$tag" "$version" "$hash" || absent+=("$tag")
        done
        if [[ ${#absent[@]} -eq 0 ]]; then
            echo "image: $IMAGE tags ${VERSIONS[*]} latest current (source $hash)"
        else
            echo "image: $IMAGE: ${absent[*]} absent or stale (source $hash)"
            ok=1
        fi
    else
        echo "image: unknown (no engine)"
        ok=1
    fi

    if nginx=$(nginx_bin) && "$nginx" -v 2>/dev/null; then
        echo "nginx: $("$nginx" -v 2>&1) at $nginx (not started: piDeploy runs its own)"
    else
        echo "nginx: missing"
        ok=1
    fi
    bindir=$(postgres_bindir)
    if [[ -n $bindir ]]; then
        echo "postgresql: server binaries in $bindir (not started: piDeploy runs its own)"
    else
        echo "postgresql: missing /usr/lib/postgresql/*/bin/initdb"
        ok=1
    fi
    return "$ok"
}

[[ $# -eq 1 ]] || usage
case $1 in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
