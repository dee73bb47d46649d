"""Test harness for the agent runtime.

``FakeControlPlane`` is a small ``websockets`` server written for these tests: a
stand-in for the control plane that records what the agent sends and lets a test send
exactly what it means. (The real control plane's integration tests with a real agent
are written with the Django side.) ``GatedBackend`` is an in-memory backend whose calls
can be held at a gate, so tests control timing without sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent_clients import protocol
from agent_clients.backends.base import Backend, BackendError, SessionSpec, SessionStatus
from agent_clients.config import AgentConfig
from agent_clients.leadership.base import AlwaysLeader
from agent_clients.runtime.agent import Agent

TIMEOUT = 5.0
TOKEN = "s3cret-agent-token"


@dataclass
class Conn:
    """One agent connection as the fake control plane sees it."""

    ws: ServerConnection
    headers: dict[str, str]
    texts: asyncio.Queue = field(default_factory=asyncio.Queue)
    binaries: asyncio.Queue = field(default_factory=asyncio.Queue)
    log: list[protocol.Message] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    pending: list[protocol.Message] = field(default_factory=list)
    path: str = ""
    # per tunnel: binary payloads, and tunnel_* control messages from the agent
    tunnel_data: dict[int, asyncio.Queue] = field(default_factory=dict)
    tunnel_msgs: dict[int, asyncio.Queue] = field(default_factory=dict)
    # the garbage collector's sessions_query frames (left unanswered: no collection)
    gc_requests: asyncio.Queue = field(default_factory=asyncio.Queue)

    def data_queue(self, tunnel_id: int) -> asyncio.Queue:
        return self.tunnel_data.setdefault(tunnel_id, asyncio.Queue())

    def msg_queue(self, tunnel_id: int) -> asyncio.Queue:
        return self.tunnel_msgs.setdefault(tunnel_id, asyncio.Queue())

    async def send(self, type_: str, payload: dict[str, Any]) -> None:
        await self.ws.send(protocol.encode(type_, payload))

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def command(self, command_id: str, type_: str, session_id: str | None = None, payload=None) -> None:
        await self.send(
            "command",
            {"command_id": command_id, "type": type_, "session_id": session_id, "payload": payload or {}},
        )

    async def next(self, timeout: float = TIMEOUT) -> protocol.Message:
        """The next text message (messages skipped by ``expect`` come first)."""
        if self.pending:
            return self.pending.pop(0)
        return await asyncio.wait_for(self.texts.get(), timeout)

    def clear_pending(self, type_: str | None = None) -> None:
        """Forget messages already received and skipped (of ``type_``, or all)."""
        while not self.texts.empty():
            self.pending.append(self.texts.get_nowait())
        self.pending = [m for m in self.pending if type_ is not None and m.type != type_]

    async def expect(self, type_: str, timeout: float = TIMEOUT, **match: Any) -> protocol.Message:
        """The first message of ``type_`` whose payload contains ``match``; other messages
        stay pending for later calls."""
        for i, msg in enumerate(self.pending):
            if msg.type == type_ and all(msg.payload.get(k) == v for k, v in match.items()):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {type_} {match} within {timeout}s; saw {[m.type for m in self.log[-20:]]}")
            try:
                msg = await asyncio.wait_for(self.texts.get(), left)
            except TimeoutError:
                continue
            if msg.type == type_ and all(msg.payload.get(k) == v for k, v in match.items()):
                return msg
            self.pending.append(msg)

    async def expect_none(self, type_: str, within: float, **match: Any) -> None:
        """Assert no such message arrives within ``within`` seconds (absence needs a bounded wait)."""
        with contextlib.suppress(AssertionError):
            msg = await self.expect(type_, within, **match)
            raise RuntimeError(f"unexpected {type_}: {msg.payload}")


class TunnelPeer:
    """The control plane's end of one tunnel, obeying the agent's flow-control window."""

    def __init__(self, conn: Conn, tunnel_id: int, session_id: str, window: int = protocol.TUNNEL_WINDOW):
        self.conn, self.id, self.session_id, self.window = conn, tunnel_id, session_id, window
        self.send_credit = window
        self.credit_changed = asyncio.Event()
        self.credits_received = 0
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.received = 0
        self.unreported = 0
        self.messages: list[protocol.Message] = []
        self._pump = asyncio.create_task(self._control())

    async def _control(self) -> None:
        queue = self.conn.msg_queue(self.id)
        while True:
            msg = await queue.get()
            self.messages.append(msg)
            if msg.type == "tunnel_credit":
                self.send_credit += msg.payload["bytes"]
                self.credits_received += msg.payload["bytes"]
                assert self.send_credit <= self.window, "agent granted more than was sent"
                self.credit_changed.set()
            elif msg.type in ("tunnel_ready", "tunnel_error") and not self.ready.done():
                self.ready.set_result(msg)
            elif msg.type == "tunnel_close" and not self.closed.done():
                self.closed.set_result(msg.payload.get("reason"))

    async def open(self, timeout: float = TIMEOUT, stream: str | None = None) -> protocol.Message:
        payload = {"tunnel_id": self.id, "session_id": self.session_id}
        if stream is not None:
            payload["stream"] = stream
        await self.conn.send("tunnel_open", payload)
        return await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def send(self, data: bytes, chunk: int = protocol.MAX_BINARY_PAYLOAD, timeout: float = 20) -> None:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            piece = bytes(view[i : i + chunk])
            while self.send_credit < len(piece):
                self.credit_changed.clear()
                await asyncio.wait_for(self.credit_changed.wait(), timeout)
            self.send_credit -= len(piece)
            await self.conn.send_raw(protocol.pack_data(self.id, piece))

    async def grant(self, nbytes: int) -> None:
        await self.conn.send("tunnel_credit", {"tunnel_id": self.id, "bytes": nbytes})

    async def recv(self, n: int, *, auto_credit: bool = True, timeout: float = 20) -> bytes:
        """Exactly ``n`` bytes (frames are not split across calls in these tests)."""
        out = bytearray()
        queue = self.conn.data_queue(self.id)
        while len(out) < n:
            data = await asyncio.wait_for(queue.get(), timeout)
            assert len(data) <= protocol.MAX_BINARY_PAYLOAD
            out += data
            self.received += len(data)
            if auto_credit:
                self.unreported += len(data)
                if self.unreported >= self.window // 4 or len(out) >= n:
                    await self.grant(self.unreported)
                    self.unreported = 0
        assert len(out) == n, f"received {len(out)} bytes, expected {n}"
        return bytes(out)

    async def close(self, reason: str = "viewer left") -> None:
        await self.conn.send("tunnel_close", {"tunnel_id": self.id, "reason": reason})

    def stop(self) -> None:
        self._pump.cancel()


class FakeControlPlane:
    def __init__(self) -> None:
        self.connections: asyncio.Queue[Conn] = asyncio.Queue()
        self.all: list[Conn] = []
        self.server = None
        self.port = 0
        # What to do right after accepting: None (serve), or a close code.
        self.refuse_with: int | None = None

    async def __aenter__(self) -> FakeControlPlane:
        self.server = await serve(self._handler, "127.0.0.1", 0, max_size=2**22, ping_interval=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, ws: ServerConnection) -> None:
        headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        conn = Conn(ws, headers)
        conn.path = ws.request.path
        self.all.append(conn)
        await self.connections.put(conn)
        if self.refuse_with is not None:
            await ws.close(self.refuse_with, "refused by test")
            conn.close_code = self.refuse_with
            conn.closed.set()
            return
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    tunnel_id, data = protocol.unpack_data(frame)
                    conn.data_queue(tunnel_id).put_nowait(data)
                else:
                    msg = protocol.decode_agent_message(frame)  # the agent must send valid frames
                    conn.log.append(msg)
                    if msg.type.startswith("tunnel_"):
                        conn.msg_queue(msg.payload["tunnel_id"]).put_nowait(msg)
                    elif msg.type == "sessions_query":
                        conn.gc_requests.put_nowait(msg)
                    else:
                        conn.texts.put_nowait(msg)
        except ConnectionClosed:
            pass
        finally:
            conn.close_code = ws.close_code
            conn.closed.set()

    async def accept(self, timeout: float = TIMEOUT) -> Conn:
        return await asyncio.wait_for(self.connections.get(), timeout)


class Gate:
    """A threading gate a backend call waits at until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def wait(self) -> None:
        self.entered.set()
        if not self.opened.wait(30):
            raise RuntimeError("gate never opened")

    def open(self) -> None:
        self.opened.set()

    async def wait_entered(self, timeout: float = TIMEOUT) -> None:
        if not await asyncio.to_thread(self.entered.wait, timeout):
            raise AssertionError("backend call never started")


class GatedBackend(Backend):
    """In-memory backend for runtime tests. ``gates[(op, session_id)]`` holds a call."""

    platform = "docker"

    def __init__(self, sessions: list[SessionStatus] | None = None, vnc: tuple[str, int] = ("127.0.0.1", 1)):
        self.sessions: dict[str, SessionStatus] = {s.session_id: s for s in sessions or []}
        self.gates: dict[tuple[str, str], Gate] = {}
        self.events: list[tuple[str, str, str]] = []  # (op, session_id, "start" | "end")
        self.calls: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], Exception] = {}
        self.vnc = vnc
        self.vnc_by_session: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()
        self.list_gate: Gate | None = None
        self.watch_emit = None
        self.closed = False

    def gate(self, op: str, session_id: str) -> Gate:
        self.gates[(op, session_id)] = gate = Gate()
        return gate

    def _call(self, op: str, session_id: str) -> None:
        with self.lock:
            self.events.append((op, session_id, "start"))
            self.calls[(op, session_id)] = self.calls.get((op, session_id), 0) + 1
        gate = self.gates.get((op, session_id))
        if gate:
            gate.wait()
        with self.lock:
            self.events.append((op, session_id, "end"))
        error = self.errors.get((op, session_id))
        if error:
            raise error

    def create(self, spec: SessionSpec) -> SessionStatus:
        self._call("create", spec.session_id)
        status = SessionStatus(spec.session_id, "running", "", *self.vnc)
        self.sessions[spec.session_id] = status
        return status

    def terminate(self, session_id: str, *, keep_home: bool = False) -> None:
        self._call("terminate", session_id)
        self.sessions.pop(session_id, None)

    def hibernate(self, session_id: str) -> SessionStatus:
        self._call("hibernate", session_id)
        if session_id not in self.sessions:
            raise BackendError("no such session", retryable=False)
        self.sessions[session_id] = status = SessionStatus(session_id, "hibernated")
        return status

    def wake(self, session_id: str) -> SessionStatus:
        self._call("wake", session_id)
        self.sessions[session_id] = status = SessionStatus(session_id, "running", "", *self.vnc)
        return status

    def status(self, session_id: str) -> SessionStatus:
        self._call("status", session_id)
        return self.sessions.get(session_id) or SessionStatus(session_id, "missing")

    def list_sessions(self) -> list[SessionStatus]:
        if self.list_gate is not None:
            self.list_gate.wait()
        return list(self.sessions.values())

    def vnc_endpoint(self, session_id: str) -> tuple[str, int]:
        if session_id not in self.sessions:
            raise BackendError(f"session {session_id} not found", retryable=False)
        return self.vnc_by_session.get(session_id, self.vnc)

    def capacity(self) -> dict[str, Any]:
        return {"cpu": 8, "memory_mb": 16384}

    def close(self) -> None:
        self.closed = True


def make_config(url: str, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "agent_id": "agent-test",
        "control_plane_url": url,
        "token": TOKEN,
        "region": "eu-test",
        "heartbeat_interval": 5.0,
        "reconnect_cap": 0.5,
        "max_sessions": 7,
        "drain_timeout": 5.0,
    }
    values.update(overrides)
    return AgentConfig(**values)


@contextlib.asynccontextmanager
async def running_agent(cp: FakeControlPlane, backend: Backend, **overrides: Any):
    """Run an in-process Agent against ``cp``; drain it on exit."""
    agent = Agent(make_config(cp.url, **overrides), backend, AlwaysLeader(), install_signal_handlers=False)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.request_shutdown()
        try:
            assert await asyncio.wait_for(task, 15) == 0
        finally:
            task.cancel()


def text(msg: protocol.Message) -> str:
    return json.dumps(msg.payload, sort_keys=True)


def create_payload(image: str = "streamspace/desktop:test") -> dict[str, Any]:
    return {"owner": "alice", "template": {"image": image, "vnc_port": 5901, "slug": "desktop"}, "cpu": 1}
