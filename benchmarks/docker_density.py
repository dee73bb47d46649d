"""How many desktops one Docker host carries: N small desktop sessions at once, through the
whole product.

Starts a throwaway PostgreSQL database, one Daphne process on the Redis channel layer with
production settings, and a real Docker agent process (``python -m
agent_clients.docker_agent``) on the local engine (MAX_SESSIONS above N; the agent's CPU
overcommit raised in the database so N desktops of CPU cores fit). Then:

* starts N desktop sessions (CPU and MEMORY_MB below) with ``POST /api/v1/sessions``,
  WINDOW of them starting at a time; a session's create time is from its POST to its row
  reading ``running`` (rows polled every 50 ms);
* counts the sessions running at once (all N should), and the failed ones (with their
  errors on stderr);
* terminates them all through the API and counts the managed containers, networks and
  volumes the agent left on the engine (should be none).

Every session network is its own bridge on a /28 of the agent's pool: a default dockerd's
address pools hold only about 30 such networks, so this is the check that the pool works.

Check memory first: each desktop container takes a few tens of MB (the benchmark refuses
to start when ``MemAvailable`` is below N x MIN_MB_PER_DESKTOP).

Run: .venv/bin/python benchmarks/docker_density.py     (BENCH_SESSIONS=N, default 200)
Progress on stderr; the last line is one JSON object:
``sessions_running``, ``create_p50_s``, ``create_p99_s``, ``failed``, ``left_behind``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter

from _support import (
    bench_rows,
    drop_database,
    emit,
    fresh_database,
    percentile,
    production_env,
    progress,
    setup_django,
)
from session_start import ApiClient, wait_online

N = int(os.environ.get("BENCH_SESSIONS", "200"))
IMAGE = os.environ.get("BENCH_IMAGE", "streamspace/desktop:bookworm-3")
CPU = 0.1
MEMORY_MB = 96
WINDOW = 6  # sessions starting at once
POLL = 0.05
START_TIMEOUT = 120.0  # one session, from its POST
TERMINATE_TIMEOUT = 300.0  # all of them
MIN_MB_PER_DESKTOP = 60
DB_NAME = "streamspace_bench_docker_density"


def mem_available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def setup_rows() -> tuple[str, str, str]:
    """The bench user, the template and a registered agent whose overcommit lets N small
    desktops fit on this host: (jwt, agent id, token)."""
    from agents_app.models import Agent

    jwt, agent_id, token = bench_rows(image=IMAGE, cpu=CPU, memory_mb=MEMORY_MB)
    # N desktops of CPU cores each on this host's cores: idle desktops use almost no CPU.
    cores = os.cpu_count() or 1
    Agent.objects.filter(agent_id=agent_id).update(
        cpu_overcommit=max(4.0, math.ceil(N * CPU / cores * 1.25)),
        memory_overcommit=max(1.5, math.ceil(N * MEMORY_MB / max(1, mem_available_mb()) * 1.25)),
    )
    return jwt, agent_id, token


def renew_token(api: ApiClient) -> None:
    """A fresh access token for the bench user: the run outlasts one (JWT_ACCESS_LIFETIME)."""
    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    api.headers["Authorization"] = f"Bearer {AccessToken.for_user(get_user_model().objects.get(username='bench'))}"


def start_all(api: ApiClient) -> tuple[dict[str, float], dict[str, str]]:
    """Start N sessions, WINDOW at a time: (create seconds by session, error by failed session)."""
    from sessions_app.models import Session

    posted: dict[str, float] = {}  # starting sessions -> when POSTed
    took: dict[str, float] = {}
    failed: dict[str, str] = {}
    made = reported = 0
    renewed = time.perf_counter()
    while made < N or posted:
        if time.perf_counter() - renewed > 300:
            renew_token(api)
            renewed = time.perf_counter()
        while made < N and len(posted) < WINDOW:
            status, body = api.call("POST", "/api/v1/sessions", {"template": "desktop"})
            made += 1
            if status != 201:
                failed[f"post-{made}"] = f"POST answered {status}: {body}"
                continue
            posted[body["id"]] = time.perf_counter()
        time.sleep(POLL)
        now = time.perf_counter()
        rows = Session.objects.filter(pk__in=list(posted)).values_list("pk", "state", "error_message")
        for pk, state, error in rows:
            sid = str(pk)
            if state == "running":
                took[sid] = now - posted.pop(sid)
            elif state == "failed":
                failed[sid] = error or "failed"
                posted.pop(sid)
            elif now - posted[sid] > START_TIMEOUT:
                failed[sid] = f"still {state} after {START_TIMEOUT:.0f}s"
                posted.pop(sid)
        if len(took) // 20 > reported:
            reported = len(took) // 20
            progress(f"  {len(took)} running, {len(failed)} failed, {len(posted)} starting")
    return took, failed


def terminate_all(api: ApiClient) -> int:
    """DELETE every session still live and wait until none is; the number not terminated."""
    from sessions_app.models import Session

    live = ("pending", "starting", "running", "hibernating", "hibernated", "waking", "degraded", "terminating")
    renew_token(api)
    for sid in Session.objects.exclude(state__in=("terminated",)).values_list("pk", flat=True):
        status, body = api.call("DELETE", f"/api/v1/sessions/{sid}")
        if status not in (200, 202, 409):
            progress(f"  DELETE {sid} answered {status}: {body}")
    deadline = time.perf_counter() + TERMINATE_TIMEOUT
    while Session.objects.filter(state__in=live).exists() and time.perf_counter() < deadline:
        time.sleep(0.2)
    return Session.objects.filter(state__in=live).count()


def managed_objects(agent_id: str) -> list[str]:
    import docker

    client = docker.from_env()
    flt = {"label": [f"streamspace.agent={agent_id}", "streamspace.managed=true"]}
    try:
        return (
            [f"container {c['Names'][0]}" for c in client.api.containers(all=True, filters=flt)]
            + [f"network {n['Name']}" for n in client.api.networks(filters=flt)]
            + [f"volume {v['Name']}" for v in (client.api.volumes(filters=flt) or {}).get("Volumes") or []]
        )
    finally:
        client.close()


def remove_managed(agent_id: str) -> int:
    """Remove whatever of the agent's is still on the engine (after a failure); how many."""
    import docker

    client = docker.from_env()
    flt = {"label": [f"streamspace.agent={agent_id}"]}
    removed = 0
    try:
        calls = [
            lambda c=c: client.api.remove_container(c["Id"], force=True)
            for c in client.api.containers(all=True, filters=flt)
        ]
        calls += [lambda n=n: client.api.remove_network(n["Id"]) for n in client.api.networks(filters=flt)]
        volumes = (client.api.volumes(filters=flt) or {}).get("Volumes") or []
        calls += [lambda v=v: client.api.remove_volume(v["Name"], force=True) for v in volumes]
        for call in calls:
            try:
                call()
                removed += 1
            except docker.errors.NotFound:
                pass
    finally:
        client.close()
    return removed


def main() -> int:
    available = mem_available_mb()
    if available < N * MIN_MB_PER_DESKTOP:
        progress(f"only {available} MB available: {N} desktops need about {N * MIN_MB_PER_DESKTOP} MB")
        return 1
    progress(f"preparing database {DB_NAME} ({available} MB of memory available) ...")
    url = fresh_database(DB_NAME)
    production = production_env()
    setup_django(url, **production)
    jwt, agent_id, token = setup_rows()

    from tests.live import ControlPlane, agent_process  # the same launchers the tests use

    cp = ControlPlane("bench-daphne", DATABASE_URL=url, AGENT_HEARTBEAT_INTERVAL="10", **production)
    agent = None
    figures: dict = {}
    try:
        cp.start()
        progress(f"starting the Docker agent {agent_id} ...")
        agent = agent_process(
            cp,
            agent_id,
            token,
            module="agent_clients.docker_agent",
            heartbeat=10,
            MAX_SESSIONS=str(N + 10),
            LOG_LEVEL="WARNING",
        ).start()
        wait_online(agent_id, agent)
        api = ApiClient(cp.http_url, jwt)
        progress(f"starting {N} desktops ({CPU} CPU, {MEMORY_MB} MB each), {WINDOW} at a time ...")
        began = time.perf_counter()
        took, failed = start_all(api)
        start_wall = time.perf_counter() - began
        from sessions_app.models import Session

        running = Session.objects.filter(state="running").count()
        used_mb = available - mem_available_mb()
        progress(f"{running} running after {start_wall:.0f}s, {len(failed)} failed, {used_mb} MB used")
        for error, count in Counter(failed.values()).most_common(5):
            progress(f"  {count} x {error}")
        progress("terminating all ...")
        not_terminated = terminate_all(api)
        left = managed_objects(agent_id)
        if left:
            progress(f"left behind: {', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
        times = list(took.values())
        figures = {
            "sessions": N,
            "sessions_running": running,
            "create_p50_s": percentile(times, 50) if times else None,
            "create_p99_s": percentile(times, 99) if times else None,
            "failed": len(failed),
            "left_behind": len(left),
            "not_terminated": not_terminated,
            "start_all_s": start_wall,
            "memory_used_mb": used_mb,
            "cpu_per_session": CPU,
            "memory_mb_per_session": MEMORY_MB,
        }
        figures["targets_met"] = running == N and not failed and not left
    finally:
        if agent is not None:
            agent.stop(30)
        cp.stop()
        from django.db import connections

        connections.close_all()
        removed = remove_managed(agent_id)
        if removed:
            progress(f"removed leftovers: {removed} objects")
        drop_database(DB_NAME)
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
