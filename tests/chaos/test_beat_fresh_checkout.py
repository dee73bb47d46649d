"""Celery beat on a fresh checkout with PostgreSQL + Redis, and a dead beat made visible.

Found this way: a clean clone has no ``var/`` (that directory is only created for SQLite),
beat's schedule file lived there, and ``celery -A streamspace beat`` died at start with
FileNotFoundError; with ``worker -B`` the worker kept running with no beat, so no agent
ever went offline and no command was ever redelivered or timed out, with nothing saying so.

Here: a copy of the repository's files (what a clone holds: tracked and not ignored,
so no ``var/``), real ``celery beat`` and ``celery worker`` processes started in it the
way the README says, on the test database and Redis; a silent agent must go offline
(the sweep ran) and ``/readyz`` must say ready; then beat is killed and ``/readyz``
must answer 503 naming the overdue sweeps."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from agents_app.models import Agent
from tests.conftest import make_agent
from tests.live import PYTHON, ROOT, ControlPlane, Process, control_plane_env, free_port, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def fresh_checkout(tmp_path) -> Path:
    """The files a clone of the working tree would have: tracked and untracked-but-not-ignored."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    dest = tmp_path / "checkout"
    dest.mkdir()
    existing = b"\0".join(f for f in files if f and (ROOT / f.decode()).is_file())
    subprocess.run(["tar", "-c", "--null", "-T", "-", "-f", str(tmp_path / "c.tar")], cwd=ROOT, input=existing,
                   check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-f", str(tmp_path / "c.tar")], cwd=dest, check=True)
    assert not (dest / "var").exists()
    return dest


def in_checkout(name: str, checkout: Path, argv: list[str]) -> Process:
    """A process run in the fresh copy, importing its code, with STREAMSPACE_VAR_DIR unset."""
    env = control_plane_env(PYTHONPATH=str(checkout))
    env.pop("STREAMSPACE_VAR_DIR", None)
    return Process(name, argv, env, cwd=checkout)


def probe(cp: ControlPlane, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(cp.http_url + path, timeout=5) as r:  # noqa: S310 (loopback)
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def readyz(cp: ControlPlane) -> tuple[int, dict]:
    return probe(cp, "/readyz")


def sweeps(cp: ControlPlane) -> tuple[int, dict]:
    return probe(cp, "/healthz/sweeps")


def check_sweeps(checkout) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "manage.py", "check_sweeps"], cwd=checkout, env=control_plane_env(
        PYTHONPATH=str(checkout), SWEEP_OVERDUE_MIN="5"), capture_output=True, text=True, timeout=60)  # fmt: skip


def test_beat_starts_on_a_fresh_postgres_redis_checkout_and_a_dead_beat_is_visible(fresh_checkout):
    silent = make_agent("beat-silent-agent")
    Agent.objects.filter(pk=silent.pk).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    cp = ControlPlane("daphne-beat", SWEEP_OVERDUE_MIN="5").start()
    celery = [PYTHON, "-m", "celery", "-A", "streamspace"]
    beat = in_checkout("beat", fresh_checkout, [*celery, "beat", "--loglevel=INFO"])
    worker = in_checkout("worker", fresh_checkout, [*celery, "worker", "--pool=solo", "--loglevel=INFO"])
    try:
        beat.start()
        worker.start()

        def offline():
            assert beat.alive, f"celery beat exited on a fresh checkout:\n{beat.output()}"
            return Agent.objects.get(pk=silent.pk).status == Agent.Status.OFFLINE

        wait_for(offline, 30, 0.2, what=f"the sweep to take the silent agent offline\n{worker.output()}")
        wait_for(lambda: sweeps(cp)[0] == 200, 20, 0.2, what=f"/healthz/sweeps ok: {sweeps(cp)}")
        status, body = readyz(cp)
        assert status == 200 and body["checks"] == {"database": "ok", "channel_layer": "ok"}, body
        wait_for(lambda: check_sweeps(fresh_checkout).returncode == 0, 30, 0.2, what="check_sweeps ok")
        assert not (fresh_checkout / "var").exists(), "beat needs no writable directory"

        beat.kill()
        _, body = wait_for(lambda: (r := sweeps(cp))[0] == 503 and r, 20, 0.2, what="/healthz/sweeps failing")
        assert body["status"] == "unavailable"
        assert "sweep_agents last ran" in body["sweeps"] and "is Celery beat running?" in body["sweeps"], body
        # Visible on /readyz too, but a dead beat does not take this process out of service.
        status, body = readyz(cp)
        assert status == 200 and "is Celery beat running?" in body["sweeps"], body
        # The beat Deployment's liveness probe fails, so Kubernetes restarts beat.
        failed = check_sweeps(fresh_checkout)
        assert failed.returncode == 1 and "is Celery beat running?" in failed.stderr, failed
    finally:
        beat.kill()
        worker.kill()
        cp.stop()


def test_runstack_on_embedded_defaults_runs_beat_and_readyz_sees_the_sweeps(fresh_checkout):
    """``./dev up`` runs ``manage.py runstack``: on the embedded defaults (SQLite, the
    in-memory layer, the filesystem broker) beat must run too, and /readyz must see it."""
    env = control_plane_env(PYTHONPATH=str(fresh_checkout), SWEEP_OVERDUE_MIN="5")
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "STREAMSPACE_VAR_DIR", "STREAMSPACE_LOCAL_AGENT"):
        env.pop(name, None)
    migrate = subprocess.run([PYTHON, "manage.py", "migrate", "-v0"], cwd=fresh_checkout, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    stack = Process("runstack", [PYTHON, "manage.py", "runstack", "--no-agent", "--port", str(port)], env,
                    cwd=fresh_checkout).start()  # fmt: skip
    cp = ControlPlane("runstack-probe", port=port)  # only to ask /readyz; not started
    try:

        def ready():
            assert stack.alive, stack.output()
            try:
                return readyz(cp)[0] == 200
            except OSError:
                return False

        wait_for(ready, 60, 0.3, what=f"/readyz ready\n{stack.output()}")
        wait_for(lambda: sweeps(cp)[0] == 200, 30, 0.3, what=f"the sweeps running\n{stack.output()}")
        assert readyz(cp)[1]["checks"] == {"database": "ok", "channel_layer": "ok"}
    finally:
        stack.stop(20)
