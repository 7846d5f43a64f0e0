#!/usr/bin/env bash
# Start/stop a Docker daemon on this machine with host networking only: no docker0 bridge, no
# iptables/NAT, no IP forwarding, so no container gets a private-range address and every container
# and build must use the host's network (`--network host`, compose `network_mode: host`).
#
#   docker/local/dockerd.sh start    # idempotent; waits until the daemon answers
#   docker/local/dockerd.sh stop     # stops only the daemon this script started (pid file)
#   docker/local/dockerd.sh status
#
# Storage: overlay2 when the kernel allows it, else vfs (slow, disk-hungry, but works anywhere).
# Settings (env): SATML_DOCKER_SOCK (default /var/run/docker.sock), SATML_DOCKER_DATA_ROOT
# (/var/lib/docker), SATML_DOCKER_STORAGE (auto|overlay2|vfs), SATML_DOCKER_LOG (/var/log/satml-dockerd.log).
# Needs root and Debian's docker.io (apt-get install -y docker.io).
set -euo pipefail

SOCK=${SATML_DOCKER_SOCK:-/var/run/docker.sock}
DATA_ROOT=${SATML_DOCKER_DATA_ROOT:-/var/lib/docker}
EXEC_ROOT=${SATML_DOCKER_EXEC_ROOT:-/var/run/satml-docker}
PIDFILE=${SATML_DOCKER_PIDFILE:-/var/run/satml-dockerd.pid}
LOG=${SATML_DOCKER_LOG:-/var/log/satml-dockerd.log}
STORAGE=${SATML_DOCKER_STORAGE:-auto}
export DOCKER_HOST="unix://$SOCK"

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_with() {  # $1: storage driver; returns 0 once the daemon answers
    local driver=$1
    echo "starting dockerd (storage $driver, host networking only), log $LOG" >&2
    # setsid: the daemon outlives this script and the shell that ran it.
    setsid dockerd \
        --host "unix://$SOCK" \
        --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
        --storage-driver "$driver" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        >>"$LOG" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
        if answers; then
            echo "dockerd up: $(docker version --format 'server {{.Server.Version}}') on $SOCK" >&2
            return 0
        fi
        # the daemon exited: give up on this driver
        if ! kill -0 "$!" 2>/dev/null; then
            echo "dockerd (storage $driver) exited; last log lines:" >&2
            tail -n 5 "$LOG" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "dockerd (storage $driver) did not answer within 30 s" >&2
    kill "$!" 2>/dev/null || true
    return 1
}

case "${1:-start}" in
start)
    if answers; then echo "a daemon already answers on $SOCK" >&2; exit 0; fi
    if [[ $EUID -ne 0 ]]; then echo "dockerd needs root" >&2; exit 1; fi
    command -v dockerd >/dev/null || { echo "dockerd not installed (apt-get install -y docker.io)" >&2; exit 1; }
    mkdir -p "$(dirname "$LOG")"
    if [[ $STORAGE == auto ]]; then
        start_with overlay2 || start_with vfs
    else
        start_with "$STORAGE"
    fi
    ;;
stop)
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        kill "$(cat "$PIDFILE")"
        for _ in $(seq 1 30); do kill -0 "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null || break; sleep 0.5; done
        echo "dockerd stopped" >&2
    else
        echo "no dockerd started by this script is running" >&2
    fi
    ;;
status)
    if answers; then docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}, root {{.DockerRootDir}}'; else echo "no daemon answers on $SOCK"; exit 1; fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
