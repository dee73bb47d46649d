"""FileBackend: a stand-in backend used ONLY by tests (the real backends are Docker and
Kubernetes).

Sessions live in a JSON file under ``$FILE_BACKEND_DIR`` (``state.json``), so their state
survives an agent killed with SIGKILL and restarted. The same file counts how many times
each operation really executed, per session (``executions[op][session_id]``), so a test
can assert that a redelivered command was not executed twice.

Environment:
* ``FILE_BACKEND_DIR``: the state directory (required by ``from_config``);
* ``FILE_BACKEND_CREATE_DELAY``: seconds ``create`` sleeps before it creates (so a test
  can kill the agent between ``ack`` and ``complete``);
* ``FILE_BACKEND_RETURN_DELAY``: seconds ``create`` sleeps after it created, before it
  returns (so a test can kill the agent when the work is done but not yet reported);
* ``FILE_BACKEND_VNC``: ``127.0.0.1:PORT`` that ``vnc_endpoint`` returns for every
  session (an echo server, say).

Every operation is idempotent: creating an existing session returns it without counting
an execution. Images containing ``fail-permanent`` or ``fail-retryable`` make ``create``
raise a :class:`BackendError` with that retryable flag; ``fail-retryable-N`` fails
retryably N times, then creates. Every call of ``create`` that got past "exists already" is
timed in ``create_calls[session_id]`` (wall-clock seconds), so a test can see retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from agent_clients.backends.base import Backend, BackendError, SessionSpec, SessionStatus

_lock = threading.Lock()


class FileBackend(Backend):
    platform = "docker"

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        create_delay: float = 0.0,
        return_delay: float = 0.0,
        vnc: str | None = None,
        max_sessions: int = 10,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.json"
        self.create_delay = create_delay
        self.return_delay = return_delay
        self.vnc = vnc
        self.max_sessions = max_sessions

    @classmethod
    def from_config(cls, cfg: Any) -> FileBackend:
        directory = os.environ.get("FILE_BACKEND_DIR")
        if not directory:
            raise BackendError("FILE_BACKEND_DIR is not set", retryable=False)
        return cls(
            directory,
            create_delay=float(os.environ.get("FILE_BACKEND_CREATE_DELAY") or 0),
            return_delay=float(os.environ.get("FILE_BACKEND_RETURN_DELAY") or 0),
            vnc=os.environ.get("FILE_BACKEND_VNC") or None,
            max_sessions=getattr(cfg, "max_sessions", 10),
        )

    # --- the state file ----------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self, write: bool = True):
        """The state dict, locked across threads and processes; written back on exit."""
        with _lock, open(self.dir / "state.lock", "a+") as lockfile:
            fcntl.flock(lockfile, fcntl.LOCK_EX)
            try:
                state = self.read_state(self.dir)
                yield state
                if write:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lockfile, fcntl.LOCK_UN)

    @staticmethod
    def read_state(directory: str | os.PathLike) -> dict[str, Any]:
        path = Path(directory) / "state.json"
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        state.setdefault("sessions", {})
        state.setdefault("executions", {})
        state.setdefault("create_calls", {})
        return state

    @classmethod
    def executions(cls, directory: str | os.PathLike, op: str, session_id: str) -> int:
        return cls.read_state(directory)["executions"].get(op, {}).get(session_id, 0)

    @staticmethod
    def _count(state: dict, op: str, session_id: str) -> None:
        per_op = state["executions"].setdefault(op, {})
        per_op[session_id] = per_op.get(session_id, 0) + 1

    def _status(self, session_id: str, record: dict | None) -> SessionStatus:
        if record is None:
            return SessionStatus(session_id, "missing", "no such session")
        host, port = self._vnc_addr()
        running = record["state"] == "running"
        return SessionStatus(
            session_id, record["state"], record.get("detail", ""), host if running else None, port if running else None
        )

    def _vnc_addr(self) -> tuple[str, int]:
        if not self.vnc:
            return "127.0.0.1", 5901
        host, _, port = self.vnc.rpartition(":")
        return host or "127.0.0.1", int(port)

    # --- Backend -------------------------------------------------------------------------

    def create(self, spec: SessionSpec) -> SessionStatus:
        with self._state(write=False) as state:
            record = state["sessions"].get(spec.session_id)
        if record is not None and record["state"] == "running":
            return self._status(spec.session_id, record)
        with self._state() as state:
            calls = state.setdefault("create_calls", {}).setdefault(spec.session_id, [])
            calls.append(time.time())
        if "fail-permanent" in spec.image:
            raise BackendError(f"image {spec.image} not found", retryable=False)
        failures = re.search(r"fail-retryable(?:-(\d+))?", spec.image)
        if failures and (failures.group(1) is None or len(calls) <= int(failures.group(1))):
            raise BackendError("the engine is busy", retryable=True)
        if self.create_delay:
            time.sleep(self.create_delay)
        with self._state() as state:
            record = state["sessions"].get(spec.session_id)
            if record is None or record["state"] != "running":
                record = {"state": "running", "owner": spec.owner, "image": spec.image, "detail": ""}
                state["sessions"][spec.session_id] = record
                self._count(state, "create", spec.session_id)
        if self.return_delay:
            time.sleep(self.return_delay)
        return self._status(spec.session_id, record)

    def terminate(self, session_id: str, *, keep_home: bool = False) -> None:
        with self._state() as state:
            if state["sessions"].pop(session_id, None) is not None:
                self._count(state, "terminate", session_id)
                if keep_home:
                    state.setdefault("kept_homes", []).append(session_id)

    def hibernate(self, session_id: str) -> SessionStatus:
        with self._state() as state:
            record = state["sessions"].get(session_id)
            if record is None:
                raise BackendError(f"session {session_id} not found", retryable=False)
            if record["state"] != "hibernated":
                record["state"] = "hibernated"
                self._count(state, "hibernate", session_id)
        return self._status(session_id, record)

    def wake(self, session_id: str) -> SessionStatus:
        with self._state() as state:
            record = state["sessions"].get(session_id)
            if record is None:
                raise BackendError(f"session {session_id} not found", retryable=False)
            if record["state"] != "running":
                record["state"] = "running"
                self._count(state, "wake", session_id)
        return self._status(session_id, record)

    def status(self, session_id: str) -> SessionStatus:
        with self._state(write=False) as state:
            return self._status(session_id, state["sessions"].get(session_id))

    def list_sessions(self) -> list[SessionStatus]:
        with self._state(write=False) as state:
            return [self._status(sid, rec) for sid, rec in sorted(state["sessions"].items())]

    def vnc_endpoint(self, session_id: str) -> tuple[str, int]:
        with self._state(write=False) as state:
            record = state["sessions"].get(session_id)
        if record is None or record["state"] != "running":
            raise BackendError(f"session {session_id} is not running", retryable=False)
        return self._vnc_addr()

    def capacity(self) -> dict[str, Any]:
        return {"cpu": 4, "memory_mb": 8192, "max_sessions": self.max_sessions}
