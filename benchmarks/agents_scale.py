"""How many agents one control-plane process carries.

Starts a throwaway PostgreSQL database, one Daphne process on the Redis channel layer,
and N simulated agents (asyncio websockets clients in this process, using the real
runtime's reconnect backoff). Prints: time to connect N agents, heartbeat messages per
second handled and the server's CPU share at 10 s heartbeats, the reconnect storm after
the process restarts, and command dispatch latency (API call -> agent receipt).

Baseline in the same run: a bare `websockets` server (no Django, no database) receiving
the same heartbeat load, to show what the framework costs.

Run: .venv/bin/python benchmarks/agents_scale.py     (BENCH_AGENTS=N to change N)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import socket
import sys
import time
import uuid

from _support import drop_database, emit, fresh_database, percentile, production_env, progress, setup_django

N = int(os.environ.get("BENCH_AGENTS", "2000"))
HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "10"))
HEARTBEAT_WINDOW = float(os.environ.get("BENCH_WINDOW", "30"))
DISPATCH_SAMPLES = int(os.environ.get("BENCH_DISPATCH", "200"))
DB_NAME = "streamspace_bench_agents"
API_TIMES: list[float] = []  # the POST round trip alone, to tell the API's cost from delivery


def make_agents_and_user():
    from django.contrib.auth import get_user_model

    from agents_app.models import Agent
    from agents_app.services import TOKEN_PREFIX, hash_token
    from sessions_app.models import Quota, Template

    tokens = {}
    rows = []
    for i in range(N):
        agent_id = f"sim-{i:05d}"
        token = TOKEN_PREFIX + uuid.uuid4().hex + uuid.uuid4().hex
        tokens[agent_id] = token
        rows.append(Agent(agent_id=agent_id, platform="docker", region="bench", token_hash=hash_token(token)))
    Agent.objects.bulk_create(rows, batch_size=1000)
    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    Quota.objects.create(user=user, max_sessions=10**6, max_cpu=10**6, max_memory_mb=2**31 - 1)
    Template.objects.create(slug="bench", name="Bench", image="img:1", default_cpu=0.1, default_memory_mb=64)
    from rest_framework_simplejwt.tokens import AccessToken

    return tokens, str(AccessToken.for_user(user))


class SimAgent:
    """A simulated agent: hello, heartbeats, ack+complete for every command."""

    def __init__(self, fleet, agent_id: str, token: str):
        self.fleet, self.agent_id, self.token = fleet, agent_id, token
        self.connects = 0

    async def run(self):
        from websockets.asyncio.client import connect

        from agent_clients import protocol
        from agent_clients.runtime.agent import backoff_delay

        attempt = 0
        url = f"{self.fleet.ws_url}/api/v1/agent/connect?agent_id={self.agent_id}"
        while not self.fleet.stopping:
            try:
                async with connect(
                    url, additional_headers={"Authorization": f"Bearer {self.token}"}, open_timeout=30,
                    ping_interval=None,
                ) as ws:  # fmt: skip
                    await ws.send(protocol.encode("hello", {
                        "agent_id": self.agent_id, "platform": "docker", "protocol": protocol.PROTOCOL_VERSION,
                        "version": "sim", "region": "bench", "sessions": [],
                        "capacity": {"cpu": 64, "memory_mb": 65536, "max_sessions": 1000},
                    }))  # fmt: skip
                    attempt = 0
                    self.connects += 1
                    self.fleet.connected(self)
                    beats = asyncio.create_task(self.heartbeats(ws, protocol))
                    try:
                        async for raw in ws:
                            if isinstance(raw, bytes):
                                continue
                            message = json.loads(raw)
                            if message["type"] == "command":
                                p = message["payload"]
                                self.fleet.received(p["session_id"])
                                await ws.send(protocol.encode("ack", {"command_id": p["command_id"]}))
                                await ws.send(
                                    protocol.encode(
                                        "complete", {"command_id": p["command_id"], "result": {"state": "running"}}
                                    )
                                )
                    finally:
                        beats.cancel()
            except Exception:  # noqa: S110 (any failure means: back off and reconnect)
                pass
            if self.fleet.stopping:
                return
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    async def heartbeats(self, ws, protocol):
        await asyncio.sleep(random.uniform(0, HEARTBEAT))
        while True:
            await ws.send(protocol.encode("heartbeat", {
                "capacity": {"cpu": 64, "memory_mb": 65536, "max_sessions": 1000}, "sessions": [], "status": "online",
            }))  # fmt: skip
            self.fleet.heartbeats += 1
            await asyncio.sleep(HEARTBEAT)


class Fleet:
    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.stopping = False
        self.heartbeats = 0
        self.receipts: dict[str, float] = {}
        self.waiting: set = set()
        self.all_in = asyncio.Event()

    def expect_all(self, agents) -> None:
        self.waiting = set(agents)
        self.all_in.clear()

    def connected(self, agent) -> None:
        self.waiting.discard(agent)
        if not self.waiting:
            self.all_in.set()

    def received(self, session_id: str) -> None:
        self.receipts.setdefault(session_id, time.perf_counter())


class ApiClient:
    """One keep-alive HTTP connection with TCP_NODELAY, as urllib3 and browsers use (plain
    http.client writes headers and body separately and then waits out delayed ACKs: +40 ms)."""

    def __init__(self, http_url: str, jwt: str):
        host, port = http_url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {jwt}"}

    def post_session(self) -> tuple[float, str]:
        started = time.perf_counter()
        self.conn.request("POST", "/api/v1/sessions", body=json.dumps({"template": "bench"}), headers=self.headers)
        response = self.conn.getresponse()
        body = json.loads(response.read())
        API_TIMES.append((time.perf_counter() - started) * 1000)
        if response.status != 201:
            raise RuntimeError(f"POST /api/v1/sessions answered {response.status}: {body}")
        return started, body["id"]


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def baseline_cpu_share(n: int) -> float:
    """A bare websockets server receiving N agents' heartbeats: its CPU share of one core."""
    import resource

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def handler(ws):
        async for _ in ws:
            pass

    def usage():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async with serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        clients = []
        for i in range(0, n, 200):
            clients += await asyncio.gather(*[connect(f"ws://127.0.0.1:{port}", ping_interval=None)
                                              for _ in range(min(200, n - i))])  # fmt: skip
        frame = json.dumps(
            {
                "type": "heartbeat",
                "id": "x" * 32,
                "ts": 0,
                "payload": {
                    "capacity": {"cpu": 64, "memory_mb": 65536, "max_sessions": 1000},
                    "sessions": [],
                    "status": "online",
                },
            }
        )
        window = 10.0
        before, t0 = usage(), time.perf_counter()
        # Same rate as the real run: n heartbeats per HEARTBEAT seconds, spread evenly.
        sent = 0
        while (elapsed := time.perf_counter() - t0) < window:
            due = int(elapsed / HEARTBEAT * n)
            for c in clients[sent % n : sent % n + max(0, due - sent)]:
                await c.send(frame)
            sent = max(sent, due)
            await asyncio.sleep(0.01)
        share = (usage() - before) / (time.perf_counter() - t0)
        for c in clients:
            await c.close()
    return share  # client and server share this process: an upper bound for the server alone


async def scenario(cp, jwt: str, tokens: dict[str, str]) -> dict:
    fleet = Fleet(cp.ws_url)
    agents = [SimAgent(fleet, agent_id, token) for agent_id, token in tokens.items()]
    fleet.expect_all(agents)
    progress(f"connecting {N} agents ...")
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await asyncio.wait_for(fleet.all_in.wait(), 300)
    connect_s = time.perf_counter() - t0
    progress(f"  all {N} connected in {connect_s:.2f}s")

    progress(f"heartbeats for {HEARTBEAT_WINDOW:.0f}s at {HEARTBEAT:g}s intervals ...")
    await asyncio.sleep(HEARTBEAT)  # let the random first-beat offsets settle into a steady rate
    beats0, cpu0, w0 = fleet.heartbeats, cpu_seconds(cp.proc.pid), time.perf_counter()
    await asyncio.sleep(HEARTBEAT_WINDOW)
    elapsed = time.perf_counter() - w0
    heartbeats_per_s = (fleet.heartbeats - beats0) / elapsed
    cpu_share = (cpu_seconds(cp.proc.pid) - cpu0) / elapsed
    progress(f"  {heartbeats_per_s:.0f} heartbeats/s, server CPU {cpu_share:.2f} of a core")

    progress(f"dispatching {DISPATCH_SAMPLES} commands (API call -> agent receipt) ...")
    latencies = []
    api = ApiClient(cp.http_url, jwt)
    for i in range(DISPATCH_SAMPLES):
        started, session_id = await asyncio.to_thread(api.post_session)
        deadline = time.perf_counter() + 10
        while session_id not in fleet.receipts and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
        if session_id in fleet.receipts:
            latencies.append((fleet.receipts[session_id] - started) * 1000)
        if i % 50 == 49:
            progress(f"  {i + 1}/{DISPATCH_SAMPLES}")
    lost = DISPATCH_SAMPLES - len(latencies)

    progress("restarting the control plane (reconnect storm) ...")
    fleet.expect_all(agents)
    t_restart = time.perf_counter()
    await asyncio.to_thread(cp.restart)
    t_up = time.perf_counter()
    await asyncio.wait_for(fleet.all_in.wait(), 300)
    storm_s = time.perf_counter() - t_restart
    progress(f"  all back {storm_s:.2f}s after the restart began ({time.perf_counter() - t_up:.2f}s after it answered)")
    fleet.stopping = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "agents": N,
        "connect_s": connect_s,
        "heartbeat_interval_s": HEARTBEAT,
        "heartbeats_per_s": heartbeats_per_s,
        "cpu_share": cpu_share,
        "reconnect_storm_s": storm_s,
        "reconnect_after_ready_s": storm_s - (t_up - t_restart),
        "restart_s": t_up - t_restart,
        "dispatch_p50_ms": percentile(latencies, 50),
        "dispatch_p99_ms": percentile(latencies, 99),
        "dispatch_lost": lost,
        "api_post_p50_ms": percentile(API_TIMES, 50),
    }


def main() -> int:
    progress(f"preparing database {DB_NAME} ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    tokens, jwt = make_agents_and_user()
    from django.db import connections

    connections.close_all()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.live import ControlPlane, control_plane_env  # noqa: F401 (the same launcher the tests use)

    cp = ControlPlane("bench-daphne", DATABASE_URL=url, AGENT_HEARTBEAT_INTERVAL=str(HEARTBEAT), **production)
    cp.start()
    try:
        figures = asyncio.run(scenario(cp, jwt, tokens))
        progress("baseline: a bare websockets server with the same heartbeat load ...")
        base = asyncio.run(baseline_cpu_share(N))
        figures["baseline_cpu_share"] = base
        figures["cpu_ratio_vs_bare_websockets"] = figures["cpu_share"] / base if base else None
        figures["targets_met"] = bool(
            figures["cpu_share"] <= 0.5 and figures["dispatch_p50_ms"] <= 20
            and figures["dispatch_p99_ms"] <= 100 and figures["reconnect_storm_s"] <= 5
        )  # fmt: skip
    finally:
        cp.stop()
        drop_database(DB_NAME)
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
