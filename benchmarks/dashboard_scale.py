"""How long the staff dashboard takes with a large fleet, and how many queries it runs.

Starts a throwaway PostgreSQL database, inserts 2,000 agents (docker, kubernetes, vm in
8 regions, most online) and 10,000 sessions of 500 users in every state, plus a timeline
(state changes, commands, viewer connections) on one session, then requests each
dashboard page through Django's whole stack in this process (middleware, sessions, CSRF,
templates; the test client, no socket) as a logged-in staff user, DEBUG off. Prints the
median and p95 page time and the number of SQL queries per page; the last line is one
JSON object. Target: the dashboard page and its live-refresh endpoint at most 300 ms.

Run: .venv/bin/python benchmarks/dashboard_scale.py    (BENCH_AGENTS, BENCH_SESSIONS to change the sizes)
"""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta

from _support import drop_database, emit, fresh_database, median, percentile, production_env, progress, setup_django

AGENTS = int(os.environ.get("BENCH_AGENTS", "2000"))
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "10000"))
USERS = 500
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "30"))
DB_NAME = "streamspace_bench_dashboard"


def insert_rows():
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.utils import timezone

    from agents_app.models import Agent, AgentCommand
    from sessions_app.models import Session, SessionEvent, Template
    from sessions_app.states import State
    from vnc_app.models import VNCConnection

    rng = random.Random(13)
    now = timezone.now()
    User = get_user_model()
    password = make_password("bench-password-1")
    User.objects.bulk_create(User(username=f"user-{i:04d}", password=password) for i in range(USERS))
    staff = User.objects.create_user("staff", password="staff-password-1", is_staff=True)
    users = list(User.objects.filter(username__startswith="user-"))
    templates = [
        Template.objects.create(slug=f"t{i}", name=f"Template {i}", image="img:1", default_cpu=1, default_memory_mb=512)
        for i in range(5)
    ]
    platforms = ("docker", "kubernetes", "vm")
    Agent.objects.bulk_create(
        (
            Agent(
                agent_id=f"agent-{i:05d}",
                platform=platforms[i % 3],
                region=f"region-{i % 8}",
                status=rng.choices(("online", "draining", "offline"), (90, 3, 7))[0],
                last_heartbeat=now - timedelta(seconds=rng.uniform(0, 25)),
                capacity={"cpu": 16, "memory_mb": 65536, "max_sessions": 20},
                version="1.0.0",
            )
            for i in range(AGENTS)
        ),
        batch_size=1000,
    )
    agents = list(Agent.objects.all())
    states = list(State.ALL)
    Session.objects.bulk_create(
        (
            Session(
                owner=rng.choice(users),
                template=rng.choice(templates),
                agent=rng.choice(agents),
                platform="docker",
                state=rng.choice(states),
                cpu=rng.choice((0.5, 1.0, 2.0)),
                memory_mb=rng.choice((512, 1024, 2048)),
                last_activity=now - timedelta(minutes=rng.uniform(0, 600)),
            )
            for _ in range(SESSIONS)
        ),
        batch_size=2000,
    )
    watched = Session.objects.filter(state=State.RUNNING).select_related("agent").first()
    SessionEvent.objects.bulk_create(
        SessionEvent(session=watched, from_state="running", to_state="degraded", reason="agent silent")
        for _ in range(100)
    )
    AgentCommand.objects.bulk_create(
        AgentCommand(
            agent=watched.agent,
            session=watched,
            type="get_session",
            status="completed",
            deadline=now,
            sent_at=now,
            acked_at=now,
            completed_at=now,
        )
        for _ in range(100)
    )
    VNCConnection.objects.bulk_create(
        VNCConnection(session=watched, user=watched.owner, bytes_to_client=10**6, close_reason="closed")
        for _ in range(100)
    )
    return staff, watched


def measure(client, url: str) -> tuple[list[float], int]:
    from django.db import connection

    for _ in range(3):  # warm up: templates compiled, connections open
        assert client.get(url).status_code == 200, url
    queries = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        assert client.get(url).status_code == 200, url
    times = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, url
    return times, len(queries)


def main() -> None:
    url = fresh_database(DB_NAME)
    try:
        setup_django(url, **production_env())
        from django.test import Client

        progress(f"inserting {AGENTS} agents and {SESSIONS} sessions")
        staff, watched = insert_rows()
        client = Client(SERVER_NAME="127.0.0.1")
        client.force_login(staff)
        pages = {
            "dashboard": "/dashboard/",
            "live": "/dashboard/live",
            "agents_filtered": "/dashboard/?platform=kubernetes&status=online&region=region-3",
            "sessions": "/dashboard/sessions/?state=all",
            "sessions_idle": "/dashboard/sessions/?idle=120",
            "agent": f"/dashboard/agents/{watched.agent.agent_id}/",
            "session": f"/dashboard/sessions/{watched.pk}/",
        }
        figures: dict = {"agents": AGENTS, "sessions": SESSIONS, "requests_per_page": REQUESTS}
        for name, path in pages.items():
            times, queries = measure(client, path)
            figures[f"{name}_median_ms"] = median(times)
            figures[f"{name}_p95_ms"] = percentile(times, 95)
            figures[f"{name}_queries"] = queries
            progress(f"{path}: median {median(times):.1f} ms, p95 {percentile(times, 95):.1f} ms, {queries} queries")
        figures["target_ms"] = 300
        figures["dashboard_within_target"] = figures["dashboard_p95_ms"] <= 300 and figures["live_p95_ms"] <= 300
    finally:
        from django.db import connections

        connections.close_all()
        drop_database(DB_NAME)
    emit(figures)


if __name__ == "__main__":
    main()
