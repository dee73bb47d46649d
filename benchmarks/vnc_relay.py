"""How fast and how faithfully the VNC relay moves bytes.

Starts a throwaway PostgreSQL database, two Daphne processes (production settings, the
Redis pub/sub channel layer), a TCP echo server and a desktop simulator
(``_desktop_sim.py``) standing in for desktops' VNC servers, and two real agent runtimes
(``python -m agent_clients`` with the test FileBackend), both connected to process A:
``bench-agent`` whose VNC endpoint is the echo server, ``bench-desktop-agent`` whose VNC
endpoint is the simulator, each holding one running session of the bench user.

The chain measured: viewer WebSocket -> Daphne (VncConsumer) -> direct call (same
process) or channel layer (viewer on B) -> AgentConsumer -> agent process -> TCP desktop
-> all the way back.

* bulk (echo): one stream sending 64 KiB messages flat out (at most IN_FLIGHT unechoed),
  MB/s (10^6 bytes) echoed back; the same through websockify (a WebSocket bridged
  straight to the echo server) and raw TCP to the echo server;
* round trip (echo) of a 100 B message, p50/p99; ``added_*`` = relay RTT minus raw TCP
  RTT;
* N streams (BENCH_STREAMS, default 50), asymmetric like VNC: N viewers of the simulated
  desktop through process A (the same process as its agent: the direct path). The desktop
  sends each viewer BENCH_RATE bytes/s (default 2 MB/s, a busy desktop's framebuffer
  updates) as 20 KB data frames every 10 ms for BENCH_STREAM_SECONDS (default 10), while
  the viewer sends a 16-byte input probe every 20 ms, which the desktop answers in the
  same outgoing stream, behind the framebuffer data already queued (what a user feels
  between a key press and the screen). Reported: the probes' round trips across all
  streams (``streams_p50_ms``/``streams_p99_ms``, probes answered while data flows),
  ``streams_MBps`` (data delivered downstream, all streams together), ``lost_bytes``
  (data bytes the desktop sent minus those received, summed over streams; must be 0),
  ``lost_probes`` (inputs never answered), ``corrupt_streams`` (data differing from the
  desktop's own count and sha256, sent in its end frame) and ``stream_errors``.
  The former streams phase, an echo at the rate in BOTH directions (N x 2 MB/s up as
  well, which no viewer sends), runs only with BENCH_ECHO_STREAMS=1, reported as
  ``echo_*``.

Run: .venv/bin/python benchmarks/vnc_relay.py      (no arguments; ~2-3 minutes)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import socket
import struct
import sys
import tempfile
import time

from _support import drop_database, emit, fresh_database, percentile, production_env, progress, setup_django

DB_NAME = "streamspace_bench_vnc_relay"
DESKTOP_AGENT = "bench-desktop-agent"  # its VNC endpoint is the desktop simulator (its region has this name too)
BULK_SECONDS = float(os.environ.get("BENCH_BULK_SECONDS", "3"))
BULK_RUNS = int(os.environ.get("BENCH_BULK_RUNS", "2"))  # best of: the machine is shared, runs are noisy
BULK_CHUNK = 64 * 1024
IN_FLIGHT = 4 * 1024 * 1024  # below the viewer consumer's 8 MiB limit on unacknowledged bytes
RTT_SAMPLES = int(os.environ.get("BENCH_RTT_SAMPLES", "2000"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "50"))
RATE = int(os.environ.get("BENCH_RATE", str(2_000_000)))
STREAM_SECONDS = float(os.environ.get("BENCH_STREAM_SECONDS", "10"))
ECHO_STREAMS = os.environ.get("BENCH_ECHO_STREAMS", "") not in ("", "0")  # also the former echo streams
TICK = 0.010
MB = 1e6

TARGETS = {
    "ratio_vs_websockify": (">=", 0.5),
    "added_p50_ms": ("<=", 1.0),
    "relay_cross_MBps": (">=", 50.0),
    "cross_added_p50_ms": ("<=", 2.0),
    "streams_p99_ms": ("<=", 30.0),
    "lost_bytes": ("<=", 0),
}


# --- pipes: one byte stream to the echo server, over a WebSocket or raw TCP ---------------


class WsPipe:
    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self):
        from websockets.asyncio.client import connect

        self.ws = await connect(
            self.url, subprotocols=["binary"], max_size=None, compression=None, open_timeout=15, ping_interval=None
        )
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> bytes:
        return await self.ws.recv()


class TcpPipe:
    def __init__(self, port: int):
        self.port = port

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        data = await self.reader.read(1 << 20)
        if not data:
            raise ConnectionError("echo server closed")
        return data


async def best_bulk(pipe_factory) -> float:
    """The best of BULK_RUNS bulk runs (LAST_CPU keeps the CPU shares of that run)."""
    best, best_cpu = 0.0, {}
    for _ in range(BULK_RUNS):
        mbps = await bulk(pipe_factory)
        if mbps > best:
            best, best_cpu = mbps, dict(LAST_CPU)
    LAST_CPU.clear()
    LAST_CPU.update(best_cpu)
    return best


async def bulk(pipe_factory) -> float:
    """MB/s echoed back through one stream sending flat out for BULK_SECONDS."""
    block = os.urandom(BULK_CHUNK)
    sent = received = 0
    progressed = asyncio.Event()
    stop = False
    async with pipe_factory() as pipe:

        async def reader():
            nonlocal received
            while not stop or received < sent:
                received += len(await pipe.recv())
                progressed.set()

        async def writer():
            nonlocal sent
            while not stop:
                while sent - received >= IN_FLIGHT:
                    progressed.clear()
                    await progressed.wait()
                await pipe.send(block)
                sent += len(block)

        tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
        await asyncio.sleep(0.5)  # warm up
        r0, t0, c0 = received, time.perf_counter(), cpu_times()
        await asyncio.sleep(BULK_SECONDS)
        r1, t1, c1 = received, time.perf_counter(), cpu_times()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert received == sent, f"bulk: sent {sent}, echoed {received}"
    LAST_CPU.clear()
    LAST_CPU.update({k: (c1[k] - c0[k]) / (t1 - t0) for k in c0 if k in c1})
    return (r1 - r0) / (t1 - t0) / MB


PIDS: dict[str, int] = {}  # process name -> pid, for CPU shares during the bulk runs
LAST_CPU: dict[str, float] = {}


def cpu_times() -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in [*PIDS.items(), ("bench client", os.getpid())]:
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_line() -> str:
    return "  cpu: " + ", ".join(f"{k} {v:.2f}" for k, v in LAST_CPU.items() if v >= 0.02)


async def rtts(pipe_factory, n: int = RTT_SAMPLES, size: int = 100) -> list[float]:
    """Round trips of one ``size``-byte message at a time, in ms."""
    message = os.urandom(size)
    out = []
    async with pipe_factory() as pipe:
        for i in range(n + 50):
            t0 = time.perf_counter()
            await pipe.send(message)
            got = 0
            while got < size:
                got += len(await pipe.recv())
            if i >= 50:  # warm up
                out.append((time.perf_counter() - t0) * 1000)
    return out


class Stream:
    """One viewer at RATE bytes/s: messages of RATE*TICK bytes, each stamped with its send time."""

    def __init__(self, url: str, block: bytes):
        self.url, self.block = url, block
        self.size = len(block)
        self.sent = self.received = 0
        self.sent_hash, self.received_hash = hashlib.sha256(), hashlib.sha256()
        self.latencies: list[float] = []
        self.send_times: dict[int, float] = {}
        self.error = ""

    async def run(self, start_at: float, seconds: float) -> None:
        try:
            async with WsPipe(self.url) as pipe:
                reader = asyncio.create_task(self._reader(pipe))
                try:
                    await self._writer(pipe, start_at, seconds)
                    await asyncio.wait_for(reader, 30)
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        except Exception as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"

    async def _writer(self, pipe, start_at: float, seconds: float) -> None:
        ticks = int(seconds / TICK)
        for k in range(ticks):
            delay = start_at + k * TICK - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            message = struct.pack(">dQ", now, k) + self.block[16:]
            self.send_times[k] = now
            self.sent_hash.update(message)
            await pipe.send(message)
            self.sent += len(message)
        self.done_sending = True

    async def _reader(self, pipe) -> None:
        self.done_sending = False
        while not (self.done_sending and self.received >= self.sent):
            data = await pipe.recv()
            now = time.perf_counter()
            before = self.received
            self.received += len(data)
            self.received_hash.update(data)
            # every message boundary crossed: that message is entirely back
            for k in range(before // self.size, self.received // self.size):
                t = self.send_times.pop(k, None)
                if t is not None:
                    self.latencies.append((now - t) * 1000)


async def echo_streams(url: str) -> dict:
    """The former streams phase (BENCH_ECHO_STREAMS=1 only): RATE up AND down per viewer."""
    block = os.urandom(int(RATE * TICK))
    fleet = [Stream(url, block) for _ in range(STREAMS)]
    # open the viewers first (each opens a tunnel through the agent), then stream together
    start_at = time.perf_counter() + 3.0 + STREAMS * 0.02
    await asyncio.gather(*(s.run(start_at + i * TICK / STREAMS, STREAM_SECONDS) for i, s in enumerate(fleet)))
    latencies = [x for s in fleet for x in s.latencies]
    errors = [s.error for s in fleet if s.error]
    return {
        "echo_streams_p50_ms": percentile(latencies, 50),
        "echo_streams_p99_ms": percentile(latencies, 99),
        "echo_lost_bytes": sum(max(0, s.sent - s.received) for s in fleet),
        "echo_corrupt_streams": sum(
            1 for s in fleet if s.received == s.sent and s.sent_hash.digest() != s.received_hash.digest()
        ),
        "echo_stream_errors": len(errors),
        "echo_first_stream_error": errors[0] if errors else "",
    }


# --- streams: viewers of a simulated desktop (_desktop_sim.py), asymmetric like VNC -------

PROBE_EVERY = 0.020  # one input event per viewer every 20 ms
PROBE = struct.Struct(">dQ")
FRAME_HEADER = struct.Struct(">cI")
FIN_SEQ = 2**64 - 1  # the last probe, sent after the end frame: every earlier one must be back


class DesktopViewer:
    """One viewer of the simulated desktop: probes up every PROBE_EVERY, framebuffer data down.

    Parses the frames as they arrive (a WebSocket message holds any slice of the stream),
    hashing data payloads without buffering them."""

    def __init__(self, url: str, expected: int):
        self.url, self.expected = url, expected
        self.received = 0  # data payload bytes
        self.hash = hashlib.sha256()
        self.end: tuple[int, bytes] | None = None  # (bytes, sha256) announced by the desktop
        self.latencies: list[float] = []
        self.probes_sent = self.probes_back = 0
        self.error = ""
        self._header = b""
        self._kind = b""
        self._left = 0  # payload bytes still to come in the current frame
        self._small = b""  # payload of a P or E frame being assembled
        self._ended = asyncio.Event()
        self._fin_back = asyncio.Event()
        self.ended_at = 0.0

    async def run(self, start_at: float) -> None:
        try:
            async with WsPipe(self.url) as pipe:
                reader = asyncio.create_task(self._reader(pipe))
                try:
                    await self._prober(pipe, start_at)
                    await pipe.send(PROBE.pack(time.perf_counter(), FIN_SEQ))
                    await asyncio.wait_for(self._fin_back.wait(), 30)
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        except Exception as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"

    async def _prober(self, pipe, start_at: float) -> None:
        ended = asyncio.create_task(self._ended.wait())
        try:
            for k in itertools.count():
                delay = start_at + k * PROBE_EVERY - time.perf_counter()
                if delay > 0:
                    await asyncio.wait({ended}, timeout=delay)
                if self._ended.is_set():
                    return
                if k > (STREAM_SECONDS + 30) / PROBE_EVERY:
                    raise TimeoutError("the desktop never sent its end frame")
                await pipe.send(PROBE.pack(time.perf_counter(), k))
                self.probes_sent += 1
        finally:
            ended.cancel()

    async def _reader(self, pipe) -> None:
        while True:
            self._feed(memoryview(await pipe.recv()))

    def _feed(self, data: memoryview) -> None:
        while data:
            if not self._kind:
                need = FRAME_HEADER.size - len(self._header)
                self._header += data[:need]
                data = data[need:]
                if len(self._header) == FRAME_HEADER.size:
                    self._kind, self._left = FRAME_HEADER.unpack(self._header)
                    self._header = b""
                    if self._kind not in (b"D", b"P", b"E"):
                        raise ValueError(f"unknown frame type {self._kind!r}")
                    if not self._left:
                        self._kind = b""
                continue
            piece = data[: self._left]
            data = data[self._left :]
            self._left -= len(piece)
            if self._kind == b"D":
                self.received += len(piece)
                self.hash.update(piece)
            else:
                self._small += piece
            if not self._left:
                self._frame_done(self._kind, self._small)
                self._kind, self._small = b"", b""

    def _frame_done(self, kind: bytes, payload: bytes) -> None:
        if kind == b"P":
            sent_at, seq = PROBE.unpack(payload)
            if seq == FIN_SEQ:
                self._fin_back.set()
                return
            self.probes_back += 1
            if not self._ended.is_set():  # probes answered after the end frame saw no load
                self.latencies.append((time.perf_counter() - sent_at) * 1000)
        elif kind == b"E":
            total, digest = struct.unpack(">Q32s", payload)
            self.end = (total, digest)
            self.ended_at = time.perf_counter()
            self._ended.set()


async def streams(url: str) -> dict:
    expected = int(RATE * STREAM_SECONDS)
    fleet = [DesktopViewer(url, expected) for _ in range(STREAMS)]
    # open the viewers first (each opens a tunnel through the agent); the desktop starts a
    # stream's data at its first probe, so the streams run together from start_at
    start_at = time.perf_counter() + 3.0 + STREAMS * 0.02
    await asyncio.gather(*(s.run(start_at + i * PROBE_EVERY / STREAMS) for i, s in enumerate(fleet)))
    done = time.perf_counter()
    elapsed = max(s.ended_at or done for s in fleet) - start_at  # until the last end frame (or error)
    latencies = [x for s in fleet for x in s.latencies]
    errors = [s.error for s in fleet if s.error]
    closed = [s for s in fleet if s.error]
    corrupt = sum(
        1 for s in fleet if s.end is not None and (s.end != (s.received, s.hash.digest()) or s.end[0] != expected)
    )
    return {
        "streams": STREAMS,
        "stream_rate_MBps": RATE / MB,
        "streams_p50_ms": percentile(latencies, 50),
        "streams_p99_ms": percentile(latencies, 99),
        "streams_max_ms": max(latencies) if latencies else float("nan"),
        "streams_probes": len(latencies),
        "streams_MB": sum(s.received for s in fleet) / MB,
        # delivered downstream per second, from the common start until the last end frame arrived
        "streams_MBps": sum(s.received for s in fleet) / max(elapsed, 1e-9) / MB,
        "lost_bytes": sum(max(0, expected - s.received) for s in fleet),
        # of which in streams the relay closed with a reason (not silent loss: a viewer reconnects)
        "lost_bytes_in_closed_streams": sum(max(0, expected - s.received) for s in closed),
        # input events sent but never answered (counted in streams that got the last probe back)
        "lost_probes": sum(s.probes_sent - s.probes_back for s in fleet if s._fin_back.is_set()),
        "corrupt_streams": corrupt,
        "stream_errors": len(errors),
        "first_stream_error": errors[0] if errors else "",
    }


# --- setup -----------------------------------------------------------------------------------


def make_user_and_agent():
    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    from agents_app.services import agent_register
    from sessions_app.models import Quota, Template

    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    Quota.objects.create(user=user, max_sessions=10, max_cpu=100, max_memory_mb=100_000)
    Template.objects.create(slug="bench", name="Bench", image="img:1", default_cpu=0.1, default_memory_mb=64)
    _, token, _ = agent_register(agent_id="bench-agent", platform="docker", region="bench")
    _, desktop_token, _ = agent_register(agent_id=DESKTOP_AGENT, platform="docker", region=DESKTOP_AGENT)
    return str(AccessToken.for_user(user)), token, desktop_token


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def redis_pids() -> dict[str, int]:
    import psutil

    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("redis-server"):
            return {"redis": p.pid}
    return {}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def met(figures: dict) -> dict:
    out = {}
    for key, (op, target) in TARGETS.items():
        value = figures.get(key)
        out[key] = value is not None and (value >= target if op == ">=" else value <= target)
    return out


PYSPY_DIR = os.environ.get("BENCH_PYSPY")  # a directory: profile the relay phases with py-spy
PYSPY = os.environ.get("PYSPY_BIN", "py-spy")  # e.g. PYSPY_BIN=/tmp/pyspy/bin/py-spy
AGENT_PID = 0


async def pyspy(cp, name: str, seconds: float, *more):
    """With BENCH_PYSPY set, py-spy records the control plane and the agent for ``seconds``."""
    if not PYSPY_DIR:
        return asyncio.sleep(0)
    procs = []
    for who, pid in ((cp.name, cp.proc.pid), ("agent", AGENT_PID), *((m.name, m.proc.pid) for m in more)):
        out = os.path.join(PYSPY_DIR, f"{name}-{who}.txt")
        procs.append(await asyncio.create_subprocess_exec(
            PYSPY, "record", "-d", str(int(seconds)), "-r", "200", "-f", "raw", "-o", out, "-p", str(pid),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))  # fmt: skip
    await asyncio.sleep(0.3)
    return asyncio.gather(*(p.wait() for p in procs))


async def measure(
    cp_a, cp_b, session_id: str, desktop_session_id: str, jwt: str, echo_port: int, wsfy_port: int
) -> dict:
    url_a = f"{cp_a.ws_url}/api/v1/vnc/{session_id}?token={jwt}"
    desktop_url = f"{cp_a.ws_url}/api/v1/vnc/{desktop_session_id}?token={jwt}"
    url_b = f"{cp_b.ws_url}/api/v1/vnc/{session_id}?token={jwt}"
    url_wsfy = f"ws://127.0.0.1:{wsfy_port}/"
    f: dict = {}

    progress("round trips, 100 B (raw TCP, websockify, relay one process, relay two processes) ...")
    tcp = await rtts(lambda: TcpPipe(echo_port))
    wsfy = await rtts(lambda: WsPipe(url_wsfy))
    spy = await pyspy(cp_a, "rtt-a", 2)
    same = await rtts(lambda: WsPipe(url_a))
    await spy
    cross = await rtts(lambda: WsPipe(url_b))
    tcp50, tcp99 = percentile(tcp, 50), percentile(tcp, 99)
    f["tcp_rtt_p50_ms"], f["tcp_rtt_p99_ms"] = tcp50, tcp99
    f["websockify_rtt_p50_ms"], f["websockify_rtt_p99_ms"] = percentile(wsfy, 50), percentile(wsfy, 99)
    f["relay_rtt_p50_ms"], f["relay_rtt_p99_ms"] = percentile(same, 50), percentile(same, 99)
    f["cross_rtt_p50_ms"], f["cross_rtt_p99_ms"] = percentile(cross, 50), percentile(cross, 99)
    f["added_p50_ms"], f["added_p99_ms"] = f["relay_rtt_p50_ms"] - tcp50, f["relay_rtt_p99_ms"] - tcp99
    f["cross_added_p50_ms"], f["cross_added_p99_ms"] = f["cross_rtt_p50_ms"] - tcp50, f["cross_rtt_p99_ms"] - tcp99
    for name in ("tcp", "websockify", "relay", "cross"):
        progress(f"  {name:10s} p50 {f[f'{name}_rtt_p50_ms']:.3f} ms  p99 {f[f'{name}_rtt_p99_ms']:.3f} ms")

    progress(f"bulk echo, best of {BULK_RUNS} x {BULK_SECONDS:g}s each ...")
    f["tcp_MBps"] = await best_bulk(lambda: TcpPipe(echo_port))
    progress(f"  raw TCP          {f['tcp_MBps']:.1f} MB/s" + cpu_line())
    f["websockify_MBps"] = await best_bulk(lambda: WsPipe(url_wsfy))
    progress(f"  websockify       {f['websockify_MBps']:.1f} MB/s" + cpu_line())
    spy = await pyspy(cp_a, "bulk-a", BULK_SECONDS)
    f["relay_MBps"] = await best_bulk(lambda: WsPipe(url_a))
    await spy
    progress(f"  relay (1 proc)   {f['relay_MBps']:.1f} MB/s" + cpu_line())
    spy = await pyspy(cp_b, "bulk-b", BULK_SECONDS, cp_a)
    f["relay_cross_MBps"] = await best_bulk(lambda: WsPipe(url_b))
    await spy
    progress(f"  relay (2 procs)  {f['relay_cross_MBps']:.1f} MB/s" + cpu_line())
    f["ratio_vs_websockify"] = f["relay_MBps"] / f["websockify_MBps"]
    f["cross_ratio_vs_websockify"] = f["relay_cross_MBps"] / f["websockify_MBps"]

    progress(
        f"{STREAMS} viewers of a simulated desktop sending {RATE / MB:g} MB/s each for {STREAM_SECONDS:g}s,"
        f" a 16 B input probe every {PROBE_EVERY * 1000:g} ms up, through the relay (one process) ..."
    )
    c0, t0 = cpu_times(), time.perf_counter()
    f.update(await streams(desktop_url))
    c1, t1 = cpu_times(), time.perf_counter()
    LAST_CPU.clear()
    LAST_CPU.update({k: (c1[k] - c0[k]) / (t1 - t0) for k in c0 if k in c1})
    progress(
        f"  p50 {f['streams_p50_ms']:.1f} ms  p99 {f['streams_p99_ms']:.1f} ms  max {f['streams_max_ms']:.1f} ms"
        f"  ({f['streams_probes']} probes)  {f['streams_MBps']:.1f} MB/s down  lost {f['lost_bytes']} B"
        f"  lost probes {f['lost_probes']}  corrupt {f['corrupt_streams']}  errors {f['stream_errors']}"
        f" {f['first_stream_error']}\n" + cpu_line()
    )
    if ECHO_STREAMS:
        progress(f"{STREAMS} echo streams x {RATE / MB:g} MB/s up and down (BENCH_ECHO_STREAMS) ...")
        f.update(await echo_streams(url_a))
        progress(
            f"  p50 {f['echo_streams_p50_ms']:.1f} ms  p99 {f['echo_streams_p99_ms']:.1f} ms"
            f"  lost {f['echo_lost_bytes']} B  corrupt {f['echo_corrupt_streams']}"
            f"  errors {f['echo_stream_errors']} {f['echo_first_stream_error']}"
        )
    return f


def main() -> int:
    progress(f"preparing database {DB_NAME} ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    jwt, agent_token, desktop_token = make_user_and_agent()
    from django.db import connections

    connections.close_all()
    from sessions_app.models import Session
    from tests.live import PYTHON, ControlPlane, Process, agent_process, free_port

    procs: list = []
    state_dir = tempfile.mkdtemp(prefix="bench-vnc-relay-")
    try:
        echo_port, wsfy_port = free_port(), free_port()
        progress("starting the echo server, websockify, two Daphne processes and the agent ...")
        echo = Process("bench-echo", [PYTHON, "-m", "tests.support.echo_server", str(echo_port)], dict(os.environ))
        procs.append(echo.start())
        wsfy_bin = os.path.join(os.path.dirname(PYTHON), "websockify")
        wsfy = Process("bench-websockify", [wsfy_bin, f"127.0.0.1:{wsfy_port}", f"127.0.0.1:{echo_port}"],
                       dict(os.environ))  # fmt: skip
        procs.append(wsfy.start())
        cp_a = ControlPlane("bench-daphne-a", DATABASE_URL=url, **production)
        cp_b = ControlPlane("bench-daphne-b", DATABASE_URL=url, **production)
        procs += [cp_a, cp_b]
        cp_a.start()
        cp_b.start()
        agent = agent_process(
            cp_a, "bench-agent", agent_token, backend="tests.support.file_backend:FileBackend",
            FILE_BACKEND_DIR=state_dir, FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}", LOG_LEVEL="WARNING",
        )  # fmt: skip
        procs.append(agent.start())
        global AGENT_PID
        AGENT_PID = agent.proc.pid
        PIDS.update({"daphne A": cp_a.proc.pid, "daphne B": cp_b.proc.pid, "agent": AGENT_PID,
                     "echo": echo.proc.pid, "websockify": wsfy.proc.pid})  # fmt: skip
        PIDS.update(redis_pids())
        wait_for(lambda: port_open(echo_port) and port_open(wsfy_port), 15, "echo server and websockify")
        from agents_app.models import Agent

        wait_for(lambda: Agent.objects.get(agent_id="bench-agent").status == "online", 20,
                 f"the agent to come online\n{agent.output()}")  # fmt: skip
        status, body = cp_a.request("POST", "/api/v1/sessions", jwt, {"template": "bench"})
        if status != 201:
            raise RuntimeError(f"POST /api/v1/sessions answered {status}: {body}")
        session_id = body["id"]
        wait_for(lambda: Session.objects.get(pk=session_id).state == "running", 20,
                 f"the session to run\n{agent.output()}")  # fmt: skip

        # the streams' desktop: the simulator behind a second agent (on A), with its session
        # placed there by region (started after the echo session, which cannot land on it)
        desktop_port = free_port()
        sim = Process("bench-desktop-sim", [PYTHON, os.path.join("benchmarks", "_desktop_sim.py"), str(desktop_port),
                      str(RATE), str(STREAM_SECONDS)], dict(os.environ))  # fmt: skip
        procs.append(sim.start())
        desktop_agent = agent_process(
            cp_a, DESKTOP_AGENT, desktop_token, backend="tests.support.file_backend:FileBackend",
            FILE_BACKEND_DIR=os.path.join(state_dir, "desktop"), FILE_BACKEND_VNC=f"127.0.0.1:{desktop_port}",
            LOG_LEVEL="WARNING", REGION=DESKTOP_AGENT,
        )  # fmt: skip
        procs.append(desktop_agent.start())
        PIDS.update({"desktop agent": desktop_agent.proc.pid, "desktop sim": sim.proc.pid})
        wait_for(lambda: port_open(desktop_port), 15, f"the desktop simulator\n{sim.output()}")
        wait_for(lambda: Agent.objects.get(agent_id=DESKTOP_AGENT).status == "online", 20,
                 f"the desktop agent to come online\n{desktop_agent.output()}")  # fmt: skip
        status, body = cp_a.request("POST", "/api/v1/sessions", jwt, {"template": "bench", "region": DESKTOP_AGENT})
        if status != 201:
            raise RuntimeError(f"POST /api/v1/sessions (desktop) answered {status}: {body}")
        desktop_session_id = body["id"]
        wait_for(lambda: Session.objects.get(pk=desktop_session_id).state == "running", 20,
                 f"the desktop session to run\n{desktop_agent.output()}")  # fmt: skip
        placed = Session.objects.get(pk=desktop_session_id).agent.agent_id
        if placed != DESKTOP_AGENT:
            raise RuntimeError(f"the desktop session landed on {placed}, not {DESKTOP_AGENT}")
        connections.close_all()
        figures = asyncio.run(measure(cp_a, cp_b, session_id, desktop_session_id, jwt, echo_port, wsfy_port))
        for p in (cp_a, cp_b, agent, desktop_agent, sim):
            if not p.alive:
                raise RuntimeError(f"{p.name} died during the benchmark:\n{p.output()}")
    finally:
        for p in reversed(procs):
            p.stop(5)
        connections.close_all()
        drop_database(DB_NAME)
    figures["targets"] = met(figures)
    figures["targets_met"] = all(figures["targets"].values())
    progress("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in figures["targets"].items()))
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
