#!/bin/sh
# The image's health check: the agent's own state (STATUS_FILE, written by the runtime:
# agent_clients/runtime/status.py) is "connected" (the control plane serves it) or
# "standby" (an HA replica waiting for leadership). Shell built-ins only.
read -r state <"${STATUS_FILE:-/run/streamspace/agent-status}" || exit 1
case $state in
    connected | standby) exit 0 ;;
    *) echo "agent: $state"; exit 1 ;;
esac
