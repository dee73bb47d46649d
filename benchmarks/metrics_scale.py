"""How long a /metrics scrape takes on a large fleet (target: 250 ms or less).

A throwaway PostgreSQL database with 2,000 agents (statuses and platforms mixed),
10,000 sessions over 5 templates in every state, one finished create command per
session (10,000 AgentCommand rows, some failed) and 2,000 closed viewer connections;
one Daphne process (DEBUG off); BENCH_SCRAPES scrapes of /metrics with the bearer token
(after 3 warm-up scrapes), then as many of /healthz (no query: Daphne and Django's own
cost). Prints the median and p95 scrape time, the body size and the number of series,
then cleans up; the last line is one JSON object.

Run: .venv/bin/python benchmarks/metrics_scale.py
"""

from __future__ import annotations

import os
import random
import sys
import time
import urllib.request
import uuid
from datetime import timedelta

from _support import drop_database, emit, fresh_database, median, percentile, production_env, progress, setup_django

AGENTS = 2000
SESSIONS = 10000
VIEWERS = 2000
SCRAPES = int(os.environ.get("BENCH_SCRAPES", "50"))
TARGET_MS = 250
DB_NAME = "streamspace_bench_metrics"
TOKEN = uuid.uuid4().hex


def make_rows() -> None:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from agents_app.models import Agent, AgentCommand
    from sessions_app.models import Session, Template
    from sessions_app.states import State
    from vnc_app.models import VNCConnection

    rng = random.Random(13)
    now = timezone.now()
    agents = Agent.objects.bulk_create(
        [
            Agent(agent_id=f"sim-{i:05d}", platform=rng.choice(Agent.Platform.values), region="bench",
                  status=rng.choice(Agent.Status.values), capacity={"cpu": 8, "memory_mb": 16384, "max_sessions": 10})
            for i in range(AGENTS)
        ],
        batch_size=1000,
    )  # fmt: skip
    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    templates = [
        Template.objects.create(slug=f"t{i}", name=f"T{i}", image="img:1", default_cpu=0.1, default_memory_mb=64)
        for i in range(5)
    ]
    states = [State.RUNNING] * 5 + [State.TERMINATED] * 3 + [State.FAILED, State.HIBERNATED, State.PENDING]
    sessions = []
    for _ in range(SESSIONS):
        created = now - timedelta(seconds=rng.uniform(60, 86400))
        state = rng.choice(states)
        ran = state not in (State.FAILED, State.PENDING)
        started = created + timedelta(seconds=rng.uniform(1, 60)) if ran else None
        sessions.append(Session(owner=user, template=rng.choice(templates), agent=rng.choice(agents), state=state,
                                cpu=0.1, memory_mb=64, started_at=started))  # fmt: skip
    Session.objects.bulk_create(sessions, batch_size=1000)
    commands = []
    for s in sessions:
        failed = s.state == State.FAILED
        commands.append(AgentCommand(agent=s.agent, session=s, type=AgentCommand.Type.CREATE_SESSION,
                                     status=AgentCommand.Status.FAILED if failed else AgentCommand.Status.COMPLETED,
                                     deadline=now + timedelta(minutes=5), completed_at=now))  # fmt: skip
    AgentCommand.objects.bulk_create(commands, batch_size=1000)
    running = [s for s in sessions if s.state == State.RUNNING]
    VNCConnection.objects.bulk_create(
        [VNCConnection(session=rng.choice(running), user=user, closed_at=now, tunnel_ready_at=now,
                       bytes_to_client=rng.randint(1, 10**8), bytes_from_client=rng.randint(1, 10**6))
         for _ in range(VIEWERS)],
        batch_size=1000,
    )  # fmt: skip


def scrape(url: str) -> tuple[float, bytes]:
    """One GET with the token: (milliseconds, body)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})  # noqa: S310 (loopback)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        body = response.read()
        assert response.status == 200
    return (time.perf_counter() - started) * 1000, body


def main() -> int:
    progress(f"preparing database {DB_NAME} ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    progress(f"inserting {AGENTS} agents, {SESSIONS} sessions and commands, {VIEWERS} viewer connections ...")
    make_rows()
    from django.db import connections

    connections.close_all()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.live import ControlPlane

    cp = ControlPlane("bench-metrics-daphne", DATABASE_URL=url, METRICS_TOKEN=TOKEN, **production)
    cp.start()
    try:
        for _ in range(3):
            scrape(cp.http_url + "/metrics")
        progress(f"{SCRAPES} scrapes ...")
        times, body = [], b""
        for _ in range(SCRAPES):
            elapsed, body = scrape(cp.http_url + "/metrics")
            times.append(elapsed)
        # the same round trip to /healthz (no query): what Daphne and Django cost by themselves
        baseline = [scrape(cp.http_url + "/healthz")[0] for _ in range(SCRAPES)]
    finally:
        cp.stop()
        drop_database(DB_NAME)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    figures = {
        "agents": AGENTS,
        "sessions": SESSIONS,
        "commands": SESSIONS,
        "viewer_connections": VIEWERS,
        "scrapes": SCRAPES,
        "scrape_median_ms": median(times),
        "scrape_p95_ms": percentile(times, 95),
        "healthz_median_ms": median(baseline),
        "body_bytes": len(body),
        "series": series,
        "target_ms": TARGET_MS,
        "target_met": percentile(times, 95) <= TARGET_MS,
    }
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
