"""How long from "start a desktop" to a desktop, through the whole product, beside the
Docker CLI doing the same work by hand.

Starts a throwaway PostgreSQL database, one Daphne process on the Redis channel layer with
production settings, and a real Docker agent process (``python -m
agent_clients.docker_agent``) on the local engine. Then, N times in turn (sequential):

* product: ``POST /api/v1/sessions`` -> the session row reads ``running`` (polled every
  10 ms in the database) -> the RFB banner through the relay (viewer WebSocket
  ``/api/v1/vnc/<id>?token=<JWT>``, subprotocol ``binary``, read until ``RFB 00``); then
  the session is terminated (not timed);
* by hand: ``docker network create``, ``docker volume create``, ``docker run -d --network
  ... -v ...:/home/user --cpus ... --memory ... -e VNC_PASSWORD=... -p 127.0.0.1::5901``,
  ``docker port``, then the published port polled every 10 ms until the RFB banner; then
  removed (not timed).

The two alternate, so both see the same engine and cache state. One warm-up round of each
is not counted. The product path is broken down from the command row's timestamps
(API call, dispatch to the agent, the agent's work, the report back) to say what dominates.

Every container, network and volume made is removed at the end, and the database dropped.

Run: .venv/bin/python benchmarks/session_start.py     (BENCH_SESSIONS=N to change N)
Progress on stderr; the last line is one JSON object.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time

from _support import (
    bench_rows,
    drop_database,
    emit,
    fresh_database,
    median,
    percentile,
    production_env,
    progress,
    setup_django,
)

N = int(os.environ.get("BENCH_SESSIONS", "20"))
IMAGE = os.environ.get("BENCH_IMAGE", "streamspace/desktop:bookworm-3")
CPU = 0.5
MEMORY_MB = 256
POLL = 0.01  # seconds between looks at the session row / the published port
DB_NAME = "streamspace_bench_session_start"
TIMEOUT = 60.0
TARGET_P50_S = 2.0
TARGET_RATIO = 1.5


class ApiClient:
    """One keep-alive HTTP connection with TCP_NODELAY (as browsers and urllib3 do)."""

    def __init__(self, http_url: str, jwt: str):
        host, port = http_url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {jwt}"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        self.conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else {})


def setup_rows() -> tuple[str, str, str]:
    """The bench user, the template and a registered agent: (jwt, agent id, token)."""
    return bench_rows(image=IMAGE, cpu=CPU, memory_mb=MEMORY_MB)


def wait_row(session_id: str, wanted: str) -> float:
    """Poll the session row every POLL seconds until it is ``wanted``; the time seen."""
    from sessions_app.models import Session

    deadline = time.perf_counter() + TIMEOUT
    while True:
        state, error = Session.objects.filter(pk=session_id).values_list("state", "error_message").get()
        now = time.perf_counter()
        if state == wanted:
            return now
        if state == "failed":
            raise RuntimeError(f"session {session_id} failed: {error}")
        if now > deadline:
            raise RuntimeError(f"session {session_id} still {state} after {TIMEOUT:.0f}s")
        time.sleep(POLL)


def relay_banner(ws_url: str, session_id: str, jwt: str) -> None:
    """Open the viewer socket and read until the desktop's RFB banner arrives through the relay."""
    from websockets.sync.client import connect

    with connect(f"{ws_url}/api/v1/vnc/{session_id}?token={jwt}", subprotocols=["binary"], open_timeout=10) as ws:
        data = b""
        deadline = time.perf_counter() + 15
        while b"RFB 00" not in data:
            frame = ws.recv(timeout=max(0.1, deadline - time.perf_counter()))
            data += frame if isinstance(frame, bytes) else frame.encode()


def product_round(api: ApiClient, ws_url: str, jwt: str) -> dict:
    from agents_app.models import AgentCommand

    started = time.perf_counter()
    status, body = api.call("POST", "/api/v1/sessions", {"template": "desktop", "cpu": CPU, "memory_mb": MEMORY_MB})
    posted = time.perf_counter()
    if status != 201:
        raise RuntimeError(f"POST /api/v1/sessions answered {status}: {body}")
    session_id = body["id"]
    running = wait_row(session_id, "running")
    relay_banner(ws_url, session_id, jwt)
    banner = time.perf_counter()
    cmd = AgentCommand.objects.get(session_id=session_id, type="create_session")
    status, body = api.call("DELETE", f"/api/v1/sessions/{session_id}")
    if status not in (200, 202):
        raise RuntimeError(f"DELETE answered {status}: {body}")
    wait_row(session_id, "terminated")
    return {
        "start": running - started,
        "rfb": banner - started,
        "relay_banner": banner - running,
        "api_post": posted - started,
        "dispatch": (cmd.acked_at - cmd.created_at).total_seconds(),  # row written -> agent's ack stored
        "agent_work": (cmd.completed_at - cmd.acked_at).total_seconds(),  # ack -> completion stored
        "attempts": cmd.attempts,
    }


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def cli_round(prefix: str, i: int, labels: list[str]) -> float:
    """The same work by hand with the Docker CLI: seconds until the RFB banner."""
    from agent_clients.backends.docker import rfb_banner

    name = f"{prefix}-{i}"
    started = time.perf_counter()
    docker("network", "create", *labels, f"{name}-net")
    docker("volume", "create", *labels, f"{name}-home")
    docker(
        "run", "-d", "--name", name, *labels, "--network", f"{name}-net", "-v", f"{name}-home:/home/user",
        "--cpus", str(CPU), "--memory", f"{MEMORY_MB}m", "-e", "VNC_PASSWORD=bench-pw",
        "-p", "127.0.0.1::5901", IMAGE,
    )  # fmt: skip
    port = int(docker("port", name, "5901/tcp").splitlines()[0].rsplit(":", 1)[1])
    deadline = started + TIMEOUT
    while not rfb_banner("127.0.0.1", port, timeout=1.0):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: no RFB banner within {TIMEOUT:.0f}s")
        time.sleep(POLL)
    elapsed = time.perf_counter() - started
    docker("rm", "-f", name)
    docker("network", "rm", f"{name}-net")
    docker("volume", "rm", f"{name}-home")
    return elapsed


def remove_managed(agent_ids: list[str]) -> list[str]:
    """Remove every container, network and volume labelled for these agents; name them."""
    import docker as docker_sdk

    client = docker_sdk.from_env()
    removed = []
    try:
        for agent_id in agent_ids:
            flt = {"label": [f"streamspace.agent={agent_id}"]}
            for c in client.containers.list(all=True, filters=flt):
                c.remove(force=True)
                removed.append(f"container {c.name}")
            for n in client.networks.list(filters=flt):
                n.remove()
                removed.append(f"network {n.name}")
            for v in client.volumes.list(filters=flt):
                v.remove(force=True)
                removed.append(f"volume {v.name}")
    finally:
        client.close()
    return removed


def wait_online(agent_id: str, agent) -> None:
    from agents_app.models import Agent

    deadline = time.perf_counter() + 60
    while not Agent.objects.filter(agent_id=agent_id, status="online").exclude(channel_name="").exists():
        if not agent.alive or time.perf_counter() > deadline:
            raise RuntimeError(f"the Docker agent did not come online:\n{agent.output()}")
        time.sleep(0.05)


def figures_from(product: list[dict], cli: list[float]) -> dict:
    def p(key: str, q: float) -> float:
        return percentile([r[key] for r in product], q)

    start_p50, cli_p50 = p("start", 50), percentile(cli, 50)
    parts = {
        "api_post": median([r["api_post"] for r in product]),
        "dispatch": median([r["dispatch"] for r in product]),
        "agent_work": median([r["agent_work"] for r in product]),
    }
    parts["report_and_poll"] = max(0.0, start_p50 - sum(parts.values()))
    ratio = start_p50 / cli_p50 if cli_p50 else None
    figures = {
        "sessions": len(product),
        "start_p50_s": start_p50,
        "start_p95_s": p("start", 95),
        "start_max_s": max(r["start"] for r in product),
        "docker_run_p50_s": cli_p50,
        "docker_run_p95_s": percentile(cli, 95),
        "ratio_vs_docker_run": ratio,
        "rfb_via_relay_p50_s": p("rfb", 50),
        "rfb_via_relay_p95_s": p("rfb", 95),
        "relay_banner_p50_s": p("relay_banner", 50),
        "api_post_p50_s": parts["api_post"],
        "dispatch_p50_s": parts["dispatch"],
        "agent_work_p50_s": parts["agent_work"],
        "redeliveries": sum(r["attempts"] - 1 for r in product),
        "dominant": max(parts, key=parts.get),
        "start_p50_target_met": start_p50 <= TARGET_P50_S,
        "ratio_target_met": ratio is not None and ratio <= TARGET_RATIO,
    }
    figures["targets_met"] = figures["start_p50_target_met"] and figures["ratio_target_met"]
    return figures


def main() -> int:
    progress(f"preparing database {DB_NAME} ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    jwt, agent_id, token = setup_rows()
    cli_agent = f"{agent_id}-cli"  # the label on the by-hand objects, so the cleanup finds them
    cli_labels = ["--label", "streamspace.managed=true", "--label", f"streamspace.agent={cli_agent}"]

    from tests.live import ControlPlane, agent_process  # the same launchers the tests use

    cp = ControlPlane("bench-daphne", DATABASE_URL=url, AGENT_HEARTBEAT_INTERVAL="10", **production)
    agent = None
    product: list[dict] = []
    cli: list[float] = []
    try:
        cp.start()
        progress(f"starting the Docker agent {agent_id} ...")
        agent = agent_process(
            cp, agent_id, token, module="agent_clients.docker_agent", heartbeat=10, MAX_SESSIONS="50", LOG_LEVEL="INFO"
        ).start()
        wait_online(agent_id, agent)
        api = ApiClient(cp.http_url, jwt)
        progress("warm-up round (not counted) ...")
        product_round(api, cp.ws_url, jwt)
        cli_round(production["CHANNEL_PREFIX"], 0, cli_labels)
        progress(f"{N} sessions, product and docker CLI alternating ...")
        for i in range(1, N + 1):
            product.append(product_round(api, cp.ws_url, jwt))
            cli.append(cli_round(production["CHANNEL_PREFIX"], i, cli_labels))
            r = product[-1]
            progress(
                f"  {i:>3}/{N}: running {r['start']:.3f}s (api {r['api_post']:.3f}, dispatch {r['dispatch']:.3f}, "
                f"agent {r['agent_work']:.3f}), banner via relay {r['rfb']:.3f}s | docker CLI {cli[-1]:.3f}s"
            )
        figures = figures_from(product, cli)
    finally:
        if agent is not None:
            agent.stop(15)
        cp.stop()
        from django.db import connections

        connections.close_all()
        removed = remove_managed([agent_id, cli_agent])
        if removed:
            progress(f"removed leftovers: {', '.join(removed)}")
        drop_database(DB_NAME)
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
