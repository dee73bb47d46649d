"""A protocol-level agent for socket tests: speaks frames by hand so tests can send
exactly what they mean, including what a well-behaved agent never would."""

from __future__ import annotations

import json
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from agent_clients import protocol


class WireAgent:
    def __init__(self, ws_url: str, agent_id: str, token: str | None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.agent_id = agent_id
        self.ws = connect(
            f"{ws_url}/api/v1/agent/connect?agent_id={agent_id}",
            additional_headers=headers,
            max_size=2**22,
            open_timeout=5,
        ).__enter__()

    def send(self, type_: str, payload: dict) -> None:
        self.ws.send(protocol.encode(type_, payload))

    def send_raw(self, data) -> None:
        self.ws.send(data)

    def hello(self, sessions: list | None = None, platform: str = "docker") -> None:
        self.send(
            "hello",
            {
                "agent_id": self.agent_id,
                "platform": platform,
                "protocol": protocol.PROTOCOL_VERSION,
                "version": "test",
                "region": "eu",
                "capacity": {"cpu": 8, "memory_mb": 16384, "max_sessions": 10},
                "sessions": sessions or [],
            },
        )

    def heartbeat(self, sessions: list | None = None, status: str = "online") -> None:
        self.send(
            "heartbeat",
            {
                "capacity": {"cpu": 8, "memory_mb": 16384, "max_sessions": 10},
                "sessions": sessions or [],
                "status": status,
            },
        )

    def recv(self, timeout: float = 5.0) -> dict:
        """The next text frame as a dict (binary frames are returned as {'bytes': ...})."""
        raw = self.ws.recv(timeout=timeout)
        if isinstance(raw, bytes):
            return {"type": "binary", "bytes": raw}
        return json.loads(raw)

    def expect(self, type_: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            if message["type"] == type_:
                return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {type_} within {timeout}s")

    def nothing_within(self, seconds: float, type_: str = "command") -> bool:
        """True if no frame of ``type_`` arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                if self.recv(timeout=left)["type"] == type_:
                    return False
            except TimeoutError:
                return True
        return True

    def closed_with(self, timeout: float = 5.0) -> tuple[int, str]:
        """Read until the server closes; return (code, reason)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else 1006, exc.rcvd.reason if exc.rcvd else ""
        raise AssertionError("the server did not close the socket")

    def close(self) -> None:
        self.ws.close()
