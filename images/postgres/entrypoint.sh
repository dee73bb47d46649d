#!/bin/sh
# streamspace/postgres: Debian's PostgreSQL 15 as the unprivileged user `postgres`.
#
# The same settings as the official `postgres` image, so either runs the Compose stack:
# POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE; required), POSTGRES_USER (postgres),
# POSTGRES_DB ($POSTGRES_USER), PGDATA (/var/lib/postgresql/data). An empty PGDATA is
# initialised once (initdb: the user as superuser with that password, scram-sha-256 over
# TCP, trust on the local socket inside the container); then PostgreSQL runs in the
# foreground, listening on every address of the container. Arguments go to `postgres`
# (e.g. `-c max_connections=200`).
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "streamspace-postgres: refusing to initialise $PGDATA: POSTGRES_PASSWORD is not set" >&2
        exit 64
    fi
    if [ ! -w "$PGDATA" ] && ! mkdir -p "$PGDATA" 2>/dev/null; then
        echo "streamspace-postgres: $PGDATA is not writable by uid $(id -u)" >&2
        exit 1
    fi
    chmod 0700 "$PGDATA"
    echo "streamspace-postgres: initialising $PGDATA (superuser $POSTGRES_USER, database $POSTGRES_DB)"
    umask 077
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    umask 022
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # Single-user mode: no server is listening while the database is made.
        echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\"" |
            postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
fi
unset POSTGRES_PASSWORD
exec postgres -D "$PGDATA" "$@"
