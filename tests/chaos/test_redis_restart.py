"""Redis killed and restarted under a live viewer whose bytes cross the channel layer.

Found this way: with Redis restarted mid-stream, ``relay.deliver`` raised out of the
consumers: the viewer was closed with 1011 and no reason, or hung with no data and no
close, while the agent kept the desktop connection open for ~20 s.

Here: a redis-server of the test's own on a free port (the shared 6379 is never
touched), two Daphne processes on it (the viewer on one, the agent on the other, so
every byte crosses Redis), the real agent runtime with the test-only FileBackend
pointing VNC at a TCP echo server, and a viewer WebSocket streaming through it. Redis
gets SIGKILL (and, in the second test, SIGSTOP) mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agents_app.models import Agent
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt
from tests.live import PYTHON, ControlPlane, Process, agent_process, free_port, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHUNK = 32 * 1024


class Redis:
    """A redis-server of this test's own."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Process | None = None

    def start(self) -> Redis:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = Process("redis", argv, {**os.environ}).start()
        wait_for(lambda: "Ready to accept connections" in self.proc.output(), 10, what=f"redis\n{self.proc.output()}")
        return self

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()


@pytest.fixture
def redis():
    server = Redis().start()
    yield server
    server.proc.signal(signal.SIGCONT)
    server.kill()


@pytest.fixture
def echo_port():
    port = free_port()
    proc = Process("redis-echo", [PYTHON, "-m", "tests.support.echo_server", str(port)], {**os.environ}).start()
    wait_for(lambda: "listening" in proc.output(), 10, what=f"echo server\n{proc.output()}")
    yield port
    proc.kill()


@pytest.fixture
def stack(redis, echo_port, alice, tmp_path):
    """(viewer's Daphne, agent's Daphne, agent process, session id)."""
    env = {"REDIS_URL": redis.url, "CELERY_BROKER_URL": redis.url}
    viewer_cp = ControlPlane("daphne-viewer", **env).start()
    agent_cp = ControlPlane("daphne-agent", **env).start()
    _, token, _ = agent_register(agent_id="redis-agent", platform="docker", region="test")
    agent = agent_process(
        agent_cp, "redis-agent", token, backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"), FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}",
    ).start()  # fmt: skip
    wait_for(lambda: Agent.objects.filter(agent_id="redis-agent", status="online").exclude(channel_name="").exists(),
             15, what=f"agent online\n{agent.output()}")  # fmt: skip
    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=64)
    status, body = agent_cp.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    assert status == 201, body
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.RUNNING, 15, what="session running")
    yield viewer_cp, agent_cp, agent, body["id"]
    agent.kill()
    viewer_cp.stop()
    agent_cp.stop()


async def stream_until_closed(url: str, on_streaming, limit: float) -> tuple[int, str, float]:
    """Stream echo traffic; once bytes have gone round, call ``on_streaming()`` (which
    breaks the layer) and keep streaming until the socket closes: (code, reason, seconds
    from the break to the close)."""
    async with connect(url, subprotocols=["binary"], max_size=None, open_timeout=10) as ws:
        broke_at = None
        received = 0
        try:
            async with asyncio.timeout(limit):
                while True:
                    await ws.send(os.urandom(CHUNK))
                    with contextlib.suppress(TimeoutError):  # cancelling recv() is safe
                        received += len(await asyncio.wait_for(ws.recv(), 0.5))
                    if broke_at is None and received >= 4 * CHUNK:
                        on_streaming()
                        broke_at = time.monotonic()
                    await asyncio.sleep(0.02)
        except ConnectionClosed as exc:
            assert broke_at is not None, f"closed before the layer broke: {exc}"
            return exc.rcvd.code, exc.rcvd.reason, time.monotonic() - broke_at
        raise AssertionError(f"the viewer socket was still open {limit}s later, received {received} B")


async def echo_once(url: str) -> bytes:
    async with connect(url, subprotocols=["binary"], max_size=None, open_timeout=10) as ws:
        payload = os.urandom(1000)
        await ws.send(payload)
        got = b""
        async with asyncio.timeout(5):
            while len(got) < len(payload):
                got += await ws.recv()
        return got == payload


def works_again(url: str) -> bool:
    try:
        return asyncio.run(echo_once(url))
    except (OSError, ConnectionClosed, TimeoutError):
        return False


def assert_no_crash(*cps: ControlPlane) -> None:
    for cp in cps:
        log = cp.output()
        assert cp.alive, log
        assert "Traceback" not in log and "Exception inside application" not in log, log


@pytest.mark.parametrize("how", ["kill", "stop"], ids=["SIGKILL", "SIGSTOP"])
def test_redis_lost_mid_stream_closes_both_ends_with_a_reason_and_a_new_viewer_works_after(stack, redis, alice, how):
    viewer_cp, agent_cp, agent, session_id = stack
    url = f"{viewer_cp.ws_url}/api/v1/vnc/{session_id}?token={jwt(alice)}"
    assert works_again(url), "a first viewer streams through the layer"

    def break_layer():
        if how == "kill":
            redis.proc.kill()
        else:
            redis.proc.signal(signal.SIGSTOP)

    code, reason, after = asyncio.run(stream_until_closed(url, break_layer, 20))
    assert code == 4503, (code, reason)
    assert reason == "control plane channel layer (Redis) unavailable", reason
    assert after < 8, f"closed {after:.1f}s after Redis went away"
    # The agent's end of the tunnel is released too, with the reason.
    wait_for(lambda: "closed by the control plane: control plane channel layer (Redis) unavailable" in agent.output(),
             10, 0.1, what=f"the agent released its tunnel\n{agent.output()}")  # fmt: skip

    # An API call that writes a command while Redis is gone answers at once (the poke of
    # the agent is bounded; a frozen Redis used to hold the request), and loses nothing.
    started = time.monotonic()
    status, body = agent_cp.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
    took = time.monotonic() - started
    assert status == 201, body
    assert took < 4, f"a create took {took:.1f}s while Redis was away"

    if how == "kill":
        redis.start()  # the same port
    else:
        redis.proc.signal(signal.SIGCONT)
    wait_for(lambda: works_again(url), 30, 0.5, what="a new viewer streaming again without any restart")
    wait_for(lambda: Session.objects.get(pk=body["id"]).state == State.RUNNING, 30, 0.2,
             what=f"the session created while Redis was away running\n{agent.output()}")  # fmt: skip
    assert agent.alive
    assert_no_crash(viewer_cp, agent_cp)
