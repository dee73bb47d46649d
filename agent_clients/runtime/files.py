"""File transfers through a tunnel: a bounded pipe between the tunnel and a backend thread.

A ``tunnel_open`` carrying ``file`` = {op, path, size?} makes the agent run
``backend.file_transfer(session_id, request, stream)`` in a daemon thread instead of
opening the VNC stream. The tunnel's pumps (runtime/tunnels.py) see :class:`FileStream`
as their reader and writer, so the transfer gets the tunnel's credits, sequence numbers
and relay unchanged. Inside the bytes, the agent speaks first with a JSON header line:

* list: ``{"ok": true, "path", "entries": [...], "truncated"}``, then the end;
* get: ``{"ok": true, "name", "size"}``, then exactly ``size`` bytes, then the end;
* put: ``{"ok": true, "ready": true}`` once the target is checked; the control plane then
  sends exactly ``size`` bytes; the agent answers ``{"ok": true, "name", "path", "size"}``
  once the file is complete under its name;
* any failure: ``{"ok": false, "status": 400|404, "error", "detail"}`` and the end.

Memory is bounded on both sides of the pipe (``LIMIT`` bytes each way): the thread blocks
while the tunnel is behind, and the tunnel stops granting credit while the thread is.
Closing the tunnel before a transfer finished aborts it: the thread's next ``send`` or
``recv`` raises :class:`Aborted` and the backend removes what it had written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
from typing import Any

log = logging.getLogger("agent_clients.runtime.files")

LIMIT = 2 * 1024 * 1024  # bytes buffered per direction


class Aborted(Exception):
    """The tunnel closed before the transfer finished."""


class FileError(Exception):
    """A transfer refused for a reason the user can act on (sent as the header line)."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class FileStream:
    """Reader and writer for a Tunnel (event loop side); send/recv for the backend thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = LIMIT):
        self.loop = loop
        self.limit = limit
        self._cond = threading.Condition()
        self._out: collections.deque[bytes] = collections.deque()  # thread -> tunnel
        self._out_size = 0
        self._in: collections.deque[bytes] = collections.deque()  # tunnel -> thread
        self._in_size = 0
        self._finished = False  # the thread is done: no more output
        self._closed = False  # the tunnel is gone
        self._wake = asyncio.Event()
        self.header_sent = False
        self.failure: str | None = None  # set when a download broke off after its header

    # --- thread side ---------------------------------------------------------------------

    def _poke_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is exiting
            self.loop.call_soon_threadsafe(self._wake.set)

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the control plane; blocks while LIMIT bytes wait."""
        with self._cond:
            while self._out_size >= self.limit and not self._closed:
                self._cond.wait(0.5)
            if self._closed:
                raise Aborted()
            self._out.append(bytes(data))
            self._out_size += len(data)
        self._poke_loop()

    def header(self, **fields: Any) -> None:
        self.header_sent = True
        self.send(json.dumps(fields, separators=(",", ":")).encode() + b"\n")

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes the control plane sent; blocks until some arrive."""
        with self._cond:
            while not self._in and not self._closed:
                self._cond.wait(0.5)
            if not self._in:
                raise Aborted()
            chunk = self._in.popleft()
            if len(chunk) > n:
                self._in.appendleft(chunk[n:])
                chunk = chunk[:n]
            self._in_size -= len(chunk)
        self._poke_loop()
        return chunk

    def finish(self) -> None:
        """No more output: the tunnel ends once what is queued has gone."""
        with self._cond:
            self._finished = True
        self._poke_loop()

    @property
    def aborted(self) -> bool:
        return self._closed and not self._finished

    # --- event loop side (the Tunnel's reader and writer) --------------------------------

    async def read(self, n: int) -> bytes:
        while True:
            with self._cond:
                if self._out:
                    chunk = self._out.popleft()
                    if len(chunk) > n:
                        self._out.appendleft(chunk[n:])
                        chunk = chunk[:n]
                    self._out_size -= len(chunk)
                    self._cond.notify_all()
                    return chunk
                if self._finished or self._closed:
                    return b""
                self._wake.clear()
            await self._wake.wait()

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            self._in.append(data)
            self._in_size += len(data)
            self._cond.notify_all()

    async def drain(self) -> None:
        while True:
            with self._cond:
                if self._in_size < self.limit or self._closed or self._finished:
                    return
                self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake.set()

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        return None


def run_transfer(backend: Any, session_id: str, request: dict, stream: FileStream) -> None:
    """The backend thread's body: run the transfer, turn failures into the header line.

    A download that fails once its header (and so its size) is out gets no second line in
    the middle of its bytes: the tunnel ends short with ``stream.failure`` as its reason,
    and the control plane, which counts the bytes, aborts the client's connection."""
    from agent_clients.backends.base import BackendError

    op = request.get("op")
    try:
        backend.file_transfer(session_id, request, stream)
    except Aborted:
        log.info("file %s of %s: aborted (the tunnel closed)", op, session_id)
    except Exception as exc:
        if isinstance(exc, FileError):
            log.info("file %s of %s refused: %s", op, session_id, exc.detail)
            status, error, detail = exc.status, exc.error, exc.detail
        elif isinstance(exc, BackendError):
            log.warning("file %s of %s failed: %s", op, session_id, exc.detail)
            status, error, detail = 503, "agent_error", exc.message
        else:
            log.exception("file %s of %s failed", op, session_id)
            status, error, detail = 503, "agent_error", "the agent failed (see its log)"
        if op == "get" and stream.header_sent:
            stream.failure = f"the download broke off: {detail}"[:200]
        else:
            with contextlib.suppress(Aborted):
                stream.header(ok=False, status=status, error=error, detail=detail)
    finally:
        stream.finish()


def start(backend: Any, session_id: str, request: dict, loop: asyncio.AbstractEventLoop) -> FileStream:
    stream = FileStream(loop)
    threading.Thread(
        target=run_transfer, args=(backend, session_id, request, stream), daemon=True, name=f"file-{request['op']}"
    ).start()
    return stream
