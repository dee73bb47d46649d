"""Byte-exact VNC relay through the whole chain, with the real agent runtime.

viewer WebSocket (subprotocol ``binary``, ``?token=<JWT>``) -> Daphne (VncConsumer) ->
direct call or Redis channel layer -> AgentConsumer -> the real agent process
(``python -m agent_clients`` with the FileBackend) -> a TCP echo server -> and back.

Several viewers stream tens of MB of random bytes at once; what comes back must be
complete and in order (sha256), in both directions, and the VNCConnection audit rows
must carry the byte counts. Once with viewer and agent on one Daphne process (the
in-process fast path), once across two processes (the channel layer between)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest
from websockets.asyncio.client import connect

from agents_app.models import Agent
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt
from tests.live import PYTHON, Process, agent_process, free_port, wait_for
from vnc_app.models import VNCConnection

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

VIEWERS = 4
BYTES_PER_VIEWER = 6 * 1024 * 1024  # 24 MiB per direction in all
IN_FLIGHT = 2 * 1024 * 1024  # a viewer keeps at most this much unechoed (below the relay's 8 MiB limit)


@pytest.fixture(scope="module")
def echo_port():
    port = free_port()
    proc = Process("relay-echo", [PYTHON, "-m", "tests.support.echo_server", str(port)], {**os.environ}).start()
    wait_for(lambda: "listening" in proc.output(), 10, what=f"echo server\n{proc.output()}")
    yield port
    proc.kill()


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=64)


@pytest.fixture
def running_agent(control_plane, echo_port, tmp_path):
    """The real agent runtime on control plane A, its FileBackend pointing VNC at the echo server."""
    _, token, _ = agent_register(agent_id="relay-agent", platform="docker", region="test")
    proc = agent_process(
        control_plane,
        "relay-agent",
        token,
        backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"),
        FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}",
    ).start()
    wait_for(lambda: Agent.objects.get(agent_id="relay-agent").status == "online", 15,
             what=f"agent online\n{proc.output()}")  # fmt: skip
    yield proc
    proc.kill()


async def stream_through(url: str, payload: bytes, seed: int) -> tuple[int, str]:
    """Send ``payload`` in messages of random sizes (some above the 256 KiB frame limit,
    so the relay must split them) and read the echo: (bytes back, sha256 of them)."""
    rng = random.Random(seed)
    got = hashlib.sha256()
    received = 0
    progress = asyncio.Event()
    async with connect(url, subprotocols=["binary"], max_size=None, open_timeout=10) as ws:
        assert ws.subprotocol == "binary"

        async def reader():
            nonlocal received
            while received < len(payload):
                data = await ws.recv()
                got.update(data)
                received += len(data)
                progress.set()

        async def writer():
            sent = 0
            while sent < len(payload):
                while sent - received > IN_FLIGHT:
                    progress.clear()
                    await progress.wait()
                size = rng.choice((1, 100, 4096, 65536, 300_000, rng.randint(1, 200_000)))
                await ws.send(payload[sent : sent + size])
                sent += size

        read = asyncio.create_task(reader())
        await asyncio.wait_for(asyncio.gather(writer(), read), 45)
    return received, got.hexdigest()


async def run_viewers(url: str, payloads: list[bytes]) -> list[tuple[int, str]]:
    return await asyncio.gather(*(stream_through(url, p, i) for i, p in enumerate(payloads)))


@pytest.mark.parametrize("two_processes", [False, True], ids=["one-process", "two-processes"])
def test_tens_of_megabytes_arrive_complete_and_in_order_through_the_real_agent(
    control_plane, control_plane_b, running_agent, alice, desktop, two_processes
):
    status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201, body
    session_id = body["id"]
    wait_for(lambda: Session.objects.get(pk=session_id).state == State.RUNNING, 10,
             what=f"session running\n{running_agent.output()}")  # fmt: skip
    assert Session.objects.get(pk=session_id).agent.agent_id == "relay-agent"

    viewer_cp = control_plane_b if two_processes else control_plane
    url = f"{viewer_cp.ws_url}/api/v1/vnc/{session_id}?token={jwt(alice)}"
    payloads = [os.urandom(BYTES_PER_VIEWER) for _ in range(VIEWERS)]
    results = asyncio.run(run_viewers(url, payloads))

    for payload, (received, digest) in zip(payloads, results, strict=True):
        assert received == len(payload)
        assert digest == hashlib.sha256(payload).hexdigest(), "the echo came back altered or out of order"

    wait_for(lambda: VNCConnection.objects.filter(session_id=session_id, closed_at__isnull=False).count() == VIEWERS,
             10, what="audit rows closed")  # fmt: skip
    audits = VNCConnection.objects.filter(session_id=session_id)
    assert (
        sorted((a.bytes_from_client, a.bytes_to_client) for a in audits)
        == [(BYTES_PER_VIEWER, BYTES_PER_VIEWER)] * VIEWERS
    )
    assert all(a.user == alice and a.client_address == "127.0.0.1" for a in audits)
    assert running_agent.alive
