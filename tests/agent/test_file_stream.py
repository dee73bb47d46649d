"""File transfers through the agent's tunnel: a download that fails after its header.

The real agent runtime (TunnelManager, FileStream, the backend thread) against the test
control plane's socket; the backend is an in-memory one whose file_transfer fails after
its header and part of the body (a desktop that stops mid-download cannot be timed at
this level; tests/e2e/test_files_e2e.py kills a real one)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent_clients.backends.base import BackendError, SessionStatus
from tests.agent.harness import FakeControlPlane, GatedBackend, TunnelPeer, running_agent

pytestmark = pytest.mark.asyncio


class BreaksMidDownload(GatedBackend):
    def file_transfer(self, session_id, request, stream):
        stream.header(ok=True, name="big.bin", size=1000)
        stream.send(b"x" * 300)
        raise BackendError("the desktop stopped sending the file", retryable=True, detail="exec stream ended")


async def test_a_download_that_fails_after_its_header_ends_short_with_a_reason_and_no_error_line():
    backend = BreaksMidDownload([SessionStatus("s-1", "running")])
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        peer = TunnelPeer(conn, 1, "s-1")
        await conn.send("tunnel_open", {"tunnel_id": 1, "session_id": "s-1", "file": {"op": "get", "path": "big.bin"}})
        assert (await asyncio.wait_for(asyncio.shield(peer.ready), 10)).type == "tunnel_ready"
        reason = await asyncio.wait_for(asyncio.shield(peer.closed), 10)
        body = bytearray()
        queue = conn.data_queue(1)
        while not queue.empty():
            body += queue.get_nowait()
        header, _, rest = bytes(body).partition(b"\n")
        assert json.loads(header) == {"ok": True, "name": "big.bin", "size": 1000}
        assert rest == b"x" * 300  # exactly what was read: no JSON error line inside the body
        assert "broke off" in reason and "stopped sending" in reason
        peer.stop()
