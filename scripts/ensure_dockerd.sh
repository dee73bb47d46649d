#!/usr/bin/env bash
# Start a Docker engine if none answers. Idempotent: exits 0 at once when `docker info` works.
#
# Flags chosen for this kind of sandbox (a VM without systemd):
#   DOCKERD_FLAGS (env) overrides them; the defaults are kept minimal and are the ones
#   that were found to work here (see images/desktop/README.md).
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
WAIT=${DOCKERD_WAIT:-30}

if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure_dockerd: dockerd not found, installing docker.io" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io >&2 \
        || { echo "ensure_dockerd: FAILED to install docker.io (see apt output above)" >&2; exit 1; }
fi

if [ "$(id -u)" != 0 ]; then
    echo "ensure_dockerd: FAILED: no Docker engine answers and only root can start dockerd" >&2
    exit 1
fi

# Plain `dockerd` works on this sandbox (overlay2 on ext4, cgroup v1, iptables-nft, docker-proxy for
# 127.0.0.1 publishing); extra flags, e.g. --iptables=false, can be given in DOCKERD_FLAGS.
# shellcheck disable=SC2206
FLAGS=(${DOCKERD_FLAGS:-})

if ! pgrep -x dockerd >/dev/null 2>&1; then
    # containerd is started by dockerd itself when no system containerd runs.
    mkdir -p "$(dirname "$LOG")"
    echo "ensure_dockerd: starting dockerd ${FLAGS[*]} (log $LOG)" >&2
    nohup dockerd "${FLAGS[@]}" >>"$LOG" 2>&1 </dev/null &
    disown || true
fi

for _ in $(seq 1 $((WAIT * 4))); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.25
done
echo "ensure_dockerd: FAILED: docker info did not answer within ${WAIT}s; last log lines: $(tail -n 3 "$LOG" 2>/dev/null | tr '\n' ' ')" >&2
exit 1
