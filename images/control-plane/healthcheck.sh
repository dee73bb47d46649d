#!/bin/bash
# The image's health check: GET /healthz (or the path given: /readyz, which Docker Compose
# uses to start the agent once the database and the channel layer answer) on the local
# Daphne answers 200. Bash's /dev/tcp, no extra process. Host "localhost" (keep it in ALLOWED_HOSTS) and X-Forwarded-Proto
# https (so SECURE_SSL_REDIRECT does not answer 301), as the Kubernetes probes send.
exec 3<>"/dev/tcp/127.0.0.1/${PORT:-8000}" || exit 1
path=${1:-/healthz}
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nX-Forwarded-Proto: https\r\n\r\n' "$path" >&3
IFS= read -r -t 3 status <&3 || exit 1
case $status in
    "HTTP/1."?" 200 "*) exit 0 ;;
    *) echo "$path: ${status%$'\r'}"; exit 1 ;;
esac
