"""The agent's state in a file (``STATUS_FILE``; off when unset), for a container's health
check to read without a port or a process of its own (the docker-agent image's check
passes on ``connected`` and ``standby``).

One word and a newline, replaced atomically (a temporary file renamed over it) at each
change: ``standby`` (waiting for leadership: an HA replica that does not lead),
``connecting`` (leader, not connected: first connect or reconnecting), ``connected``
(hello sent: the control plane serves this agent), ``draining`` (SIGTERM), ``stopped``.
Writing never stops the agent: a failure is logged once."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

STATES = ("standby", "connecting", "connected", "draining", "stopped")


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
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(state + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the status file %s: %s", self.path, exc.strerror or exc)
                self._warned = True
