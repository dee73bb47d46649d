"""Shared helpers for the benchmarks: a throwaway PostgreSQL database, processes, stats."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def fresh_database(name: str) -> str:
    """Drop and create ``name``, migrate it, and return its URL."""
    import psycopg

    conn = psycopg.connect(f"{PG_ADMIN_URL}/postgres", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    url = f"{PG_ADMIN_URL}/{name}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
    )
    return url


def drop_database(name: str) -> None:
    import psycopg

    conn = psycopg.connect(f"{PG_ADMIN_URL}/postgres", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def production_env() -> dict[str, str]:
    """Settings every benchmark process runs with: as deployed (DEBUG off, so no query log),
    one signing key for all processes, and a channel prefix of its own."""
    import uuid

    return {
        "DEBUG": "false",
        "SECRET_KEY": uuid.uuid4().hex * 2,
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",
        "LOG_LEVEL": "WARNING",
        "CHANNEL_PREFIX": f"bench-{uuid.uuid4().hex[:6]}",
        "REDIS_URL": REDIS_URL,
    }


def setup_django(database_url: str, **env: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamspace.settings")
    os.environ.update(env)
    import django

    django.setup()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(figures: dict) -> None:
    """The benchmark's last line: one JSON object."""
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}), flush=True)


def bench_rows(*, image: str, cpu: float, memory_mb: int) -> tuple[str, str, str]:
    """The bench user (no quota in the way), a desktop template, a registered Docker agent:
    (jwt, agent id, agent token). Call after setup_django()."""
    import uuid

    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    from agents_app.services import agent_register
    from sessions_app.models import Quota, Template

    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    Quota.objects.create(user=user, max_sessions=10**6, max_cpu=10**6, max_memory_mb=2**31 - 1)
    Template.objects.create(
        slug="desktop",
        name="Desktop",
        image=image,
        vnc_port=5901,
        volume_mount_path="/home/user",
        default_cpu=cpu,
        default_memory_mb=memory_mb,
    )
    agent_id = f"bench-{uuid.uuid4().hex[:8]}"
    _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="bench")
    return str(AccessToken.for_user(user)), agent_id, token
