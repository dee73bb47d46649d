#!/bin/sh
# The image's health check: the agent's own state (STATUS_FILE, written by the runtime:
# agent_clients/runtime/status.py) is "connected" (the control plane serves it) or
# "standby" (an HA replica waiting for leadership), and the file is fresh: the agent
# touches it every min(HEARTBEAT_INTERVAL, 10) s, so one older than STATUS_STALE_AFTER
# seconds (default 30: three touches) was left by a process that hung or died.
file=${STATUS_FILE:-/run/streamspace/agent-status}
read -r state <"$file" || exit 1
age=$(($(date +%s) - $(stat -c %Y "$file")))
if [ "$age" -gt "${STATUS_STALE_AFTER:-30}" ]; then
    echo "agent: $state, but the status file is ${age}s old (stale)"
    exit 1
fi
case $state in
    connected | standby) exit 0 ;;
    *) echo "agent: $state"; exit 1 ;;
esac
