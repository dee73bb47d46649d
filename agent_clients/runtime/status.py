"""The agent's state in a file (``STATUS_FILE``; off when unset), for a container's health
check to read without a port or a process of its own (the docker-agent image's check
passes on ``connected`` and ``standby``).

One word and a newline, replaced atomically (a temporary file renamed over it) at each
change: ``standby`` (waiting for leadership: an HA replica that does not lead),
``connecting`` (leader, not connected: first connect or reconnecting), ``connected``
(hello sent: the control plane serves this agent), ``draining`` (SIGTERM), ``stopped``.
Writing never stops the agent: a failure is logged once.

The agent writes ``connecting`` first thing at start-up (a file left by a crashed process
never speaks for the new one) and touches the file every ``touch_period`` seconds while it
runs (min(HEARTBEAT_INTERVAL, 10)): a file older than ``STALE_AFTER`` (3 touches of the
default) belongs to a process that hung or died, and the health check fails on it."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

STATES = ("standby", "connecting", "connected", "draining", "stopped")
TOUCH_EVERY_MAX = 10.0  # seconds between touches at most
STALE_AFTER = 30  # seconds: the health check's default (images/docker-agent/healthcheck.sh)


def touch_period(heartbeat_interval: float) -> float:
    return min(heartbeat_interval, TOUCH_EVERY_MAX)


class StatusFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.state = ""
        self._warned = False

    def set(self, state: str) -> None:
        assert state in STATES, state
        if not self.path or state == self.state:
            return
        self.state = state
        self._write()

    def touch(self) -> None:
        """The process is alive: the file's time is now (rewritten if someone removed it)."""
        if not self.path or not self.state:
            return
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._write()
        except OSError as exc:
            self._warn(exc)

    def _write(self) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(self.state + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            log.warning("cannot write the status file %s: %s", self.path, exc.strerror or exc)
            self._warned = True
