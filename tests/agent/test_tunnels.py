"""VNC tunnels through the agent: byte-exact relay both ways, credit flow control and
backpressure, closes from either side, all tunnels closed when the control socket drops."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random

import pytest

from agent_clients import protocol
from agent_clients.backends.base import SessionStatus
from agent_clients.runtime.tunnels import TunnelManager
from tests.agent.harness import FakeControlPlane, GatedBackend, TunnelPeer, running_agent
from tests.support.echo_server import start_echo_server, start_sink_server

pytestmark = pytest.mark.asyncio
WINDOW = protocol.TUNNEL_WINDOW


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class TcpPeer:
    """A VNC-server stand-in: records each connection and when it ends; can stream a
    fixed pattern to whoever connects (a source) and counts what it managed to write."""

    def __init__(self, source: bytes | None = None):
        self.source = source
        self.connections: list[dict] = []
        self.connected = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        conn = {"eof": asyncio.Event(), "writer": writer, "written": 0, "received": bytearray()}
        self.connections.append(conn)
        self.connected.put_nowait(conn)
        if self.source is not None:
            task = asyncio.create_task(self._stream(conn, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        try:
            while data := await reader.read(65536):
                conn["received"] += data
        except OSError:
            pass
        conn["eof"].set()
        writer.close()

    async def _stream(self, conn, writer):
        with contextlib.suppress(OSError):
            for i in range(0, len(self.source), 65536):
                writer.write(self.source[i : i + 65536])
                await writer.drain()
                conn["written"] += len(self.source[i : i + 65536])

    async def close(self):
        self.server.close()


async def test_bytes_relayed_exactly_both_ways_on_several_tunnels_at_once():
    echo = await start_echo_server("127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    backend = GatedBackend([SessionStatus(f"s-{i}", "running") for i in range(4)], vnc=("127.0.0.1", port))
    async with FakeControlPlane() as cp, running_agent(cp, backend) as agent:
        conn = await cp.accept()
        await conn.expect("hello")

        async def one(tunnel_id: int, size: int, chunk: int) -> None:
            peer = TunnelPeer(conn, tunnel_id, f"s-{tunnel_id % 4}")
            ready = await peer.open()
            assert ready.type == "tunnel_ready", ready.payload
            data = pattern(size, tunnel_id)
            sender = asyncio.create_task(peer.send(data, chunk=chunk))
            echoed = await peer.recv(len(data))
            await sender
            assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()
            # The agent granted back every byte we sent, once written to the VNC server.
            await asyncio.wait_for(_until(lambda: peer.credits_received == len(data)), 5)
            await peer.close()
            peer.stop()

        await asyncio.gather(
            one(1, 6 * 1024 * 1024, protocol.MAX_BINARY_PAYLOAD),
            one(2, 3 * 1024 * 1024 + 17, 40_000),
            one(3, 2 * 1024 * 1024 + 5, 65_536),
            one(4, 100, 7),  # small interactive messages never wait for a credit batch
        )
        await asyncio.wait_for(_until(lambda: len(agent.tunnels or ()) == 0), 5)
    echo.close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_agent_stops_reading_at_the_window_and_resumes_on_credit():
    source = pattern(16 * 1024 * 1024, 99)
    vnc = TcpPeer(source=source)
    port = await vnc.start()
    backend = GatedBackend([SessionStatus("s-1", "running")], vnc=("127.0.0.1", port))
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        peer = TunnelPeer(conn, 9, "s-1")
        assert (await peer.open()).type == "tunnel_ready"
        # No credit granted: exactly one window arrives, then nothing.
        got = await peer.recv(WINDOW, auto_credit=False)
        assert got == source[:WINDOW]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.data_queue(9).get(), 0.5)
        # The agent stopped reading: the source is blocked on full socket buffers, far
        # from having written everything.
        written = vnc.connections[0]["written"]
        assert written < len(source) - 4 * 1024 * 1024
        # Credit for one MiB lets exactly one more MiB through.
        await peer.grant(1024 * 1024)
        more = await peer.recv(1024 * 1024, auto_credit=False)
        assert more == source[WINDOW : WINDOW + 1024 * 1024]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.data_queue(9).get(), 0.3)
        # With credit flowing again, the rest arrives byte-exact.
        rest = len(source) - WINDOW - 1024 * 1024
        await peer.grant(WINDOW)
        tail = await peer.recv(rest)
        assert tail == source[WINDOW + 1024 * 1024 :]
        # The source finished: the agent reports the VNC side's EOF.
        vnc.connections[0]["writer"].close()
        reason = await asyncio.wait_for(peer.closed, 5)
        assert "closed" in reason
        peer.stop()
    await vnc.close()


async def test_close_from_the_control_plane_closes_tcp_and_unknown_session_errors():
    vnc = TcpPeer()
    port = await vnc.start()
    backend = GatedBackend([SessionStatus("s-1", "running")], vnc=("127.0.0.1", port))
    async with FakeControlPlane() as cp, running_agent(cp, backend) as agent:
        conn = await cp.accept()
        await conn.expect("hello")
        peer = TunnelPeer(conn, 1, "s-1")
        assert (await peer.open()).type == "tunnel_ready"
        tcp = await asyncio.wait_for(vnc.connected.get(), 5)
        await peer.send(b"hello vnc")
        await peer.close("viewer closed the tab")
        await asyncio.wait_for(tcp["eof"].wait(), 5)
        assert bytes(tcp["received"]) == b"hello vnc"
        # Unknown session: tunnel_error with the backend's message.
        bad = TunnelPeer(conn, 2, "no-such-session")
        err = await bad.open()
        assert err.type == "tunnel_error" and "not found" in err.payload["error"]
        # A reused id of an open tunnel is refused, the open one keeps working.
        again = TunnelPeer(conn, 3, "s-1")
        assert (await again.open()).type == "tunnel_ready"
        await conn.send("tunnel_open", {"tunnel_id": 3, "session_id": "s-1"})
        await asyncio.wait_for(_until(lambda: any(m.type == "tunnel_error" for m in again.messages)), 5)
        # Data after close, or for an id never opened, is ignored.
        await conn.send_raw(protocol.pack_data(1, b"late"))
        await conn.send_raw(protocol.pack_data(4242, b"stray"))
        await again.send(b"still fine")
        tcp3 = await asyncio.wait_for(vnc.connected.get(), 5)
        await asyncio.wait_for(_until(lambda: bytes(tcp3["received"]) == b"still fine"), 5)
        for p in (peer, bad, again):
            p.stop()
        assert agent.connections == 1
    await vnc.close()


async def test_all_tunnels_closed_when_the_control_socket_drops():
    vnc = TcpPeer()
    port = await vnc.start()
    backend = GatedBackend([SessionStatus("s-1", "running"), SessionStatus("s-2", "running")], vnc=("127.0.0.1", port))
    async with FakeControlPlane() as cp, running_agent(cp, backend, reconnect_cap=0.2) as agent:
        conn = await cp.accept()
        await conn.expect("hello")
        peers = [TunnelPeer(conn, i, f"s-{1 + i % 2}") for i in range(1, 4)]
        for p in peers:
            assert (await p.open()).type == "tunnel_ready"
        tcps = [await asyncio.wait_for(vnc.connected.get(), 5) for _ in peers]
        await conn.ws.close(1011, "control plane restarting")
        for tcp in tcps:
            await asyncio.wait_for(tcp["eof"].wait(), 5)
        conn2 = await cp.accept()
        await conn2.expect("hello")
        assert len(agent.tunnels) == 0
        # Old tunnel ids mean nothing on the new connection; a new tunnel works.
        await conn2.send_raw(protocol.pack_data(1, b"ghost"))
        fresh = TunnelPeer(conn2, 1, "s-1")
        assert (await fresh.open()).type == "tunnel_ready"
        tcp = await asyncio.wait_for(vnc.connected.get(), 5)
        await fresh.send(b"after reconnect")
        await asyncio.wait_for(_until(lambda: bytes(tcp["received"]) == b"after reconnect"), 5)
        for p in [*peers, fresh]:
            p.stop()
    await vnc.close()


async def test_peer_exceeding_the_window_closes_the_tunnel_not_the_agent():
    sink, stats = await start_sink_server("127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    sent: list[tuple[str, dict]] = []

    async def send_text(type_, payload):
        sent.append((type_, payload))

    async def send_bytes(frame):
        pass

    backend = GatedBackend([SessionStatus("s-1", "running")], vnc=("127.0.0.1", port))
    manager = TunnelManager(backend, send_text, send_bytes, window=1000)
    manager.open(5, "s-1")
    await asyncio.wait_for(_until(lambda: ("tunnel_ready", {"tunnel_id": 5}) in sent), 5)
    # Fed synchronously, before the writer can run: 1001 bytes into a 1000-byte window.
    manager.data(5, b"x" * 600)
    manager.data(5, b"y" * 401)
    await asyncio.wait_for(_until(lambda: any(t == "tunnel_close" for t, _ in sent)), 5)
    close = next(p for t, p in sent if t == "tunnel_close")
    assert close == {"tunnel_id": 5, "reason": "peer exceeded the flow-control window"}
    assert len(manager) == 0
    await manager.close_all()
    sink.close()
    assert stats.connections and stats.connections[0].bytes <= 1000


class SoundBackend(GatedBackend):
    """GatedBackend whose desktops also serve sound, on another port than VNC."""

    def __init__(self, sessions, vnc, sound):
        super().__init__(sessions, vnc=vnc)
        self.sound = sound

    def audio_endpoint(self, session_id: str) -> tuple[str, int]:
        return self.sound


async def test_an_audio_tunnel_reaches_the_sound_server_and_a_backend_without_sound_says_so():
    vnc, sound = TcpPeer(source=b"RFB 003.008\n"), TcpPeer(source=b"OggS-sound")
    vnc_port, sound_port = await vnc.start(), await sound.start()
    sessions = [SessionStatus("s-1", "running")]
    backend = SoundBackend(sessions, vnc=("127.0.0.1", vnc_port), sound=("127.0.0.1", sound_port))
    async with FakeControlPlane() as cp, running_agent(cp, backend):
        conn = await cp.accept()
        await conn.expect("hello")
        audio = TunnelPeer(conn, 1, "s-1")
        assert (await audio.open(stream="audio")).type == "tunnel_ready"
        assert await audio.recv(10) == b"OggS-sound"
        picture = TunnelPeer(conn, 2, "s-1")
        assert (await picture.open(stream="vnc")).type == "tunnel_ready"
        assert await picture.recv(12) == b"RFB 003.008\n"
        assert (len(vnc.connections), len(sound.connections)) == (1, 1)
        for peer in (audio, picture):
            await peer.close()
            peer.stop()
    async with FakeControlPlane() as cp, running_agent(cp, GatedBackend(sessions, vnc=("127.0.0.1", vnc_port))):
        conn = await cp.accept()
        await conn.expect("hello")
        refused = await TunnelPeer(conn, 3, "s-1").open(stream="audio")
        assert refused.type == "tunnel_error"
        assert refused.payload["error"] == "this platform does not carry sound"
        assert refused.payload["retryable"] is False  # the viewer's page stops trying
    assert len(vnc.connections) == 1  # never the VNC server instead
    vnc.server.close()
    sound.server.close()
