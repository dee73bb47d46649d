"""Shared fixtures: personas (alice owns, bob is another user, carol is staff), an
online agent, the demo template, and API clients authenticated with real JWTs."""

from __future__ import annotations

import os

import pytest
from django.conf import settings
from django.utils import timezone


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """The suite runs on PostgreSQL (DATABASE_URL); SQLite would hide locking bugs."""
    engine = settings.DATABASES["default"]["ENGINE"]
    assert "postgresql" in engine, "run the tests with DATABASE_URL pointing at PostgreSQL (see README)"


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing():
    """Users made by tests get cheap hashes (tests/support/hashers.py); what the tests check
    about passwords does not depend on the iteration count."""
    from django.test import override_settings

    fast = override_settings(
        PASSWORD_HASHERS=["tests.support.hashers.FastPBKDF2PasswordHasher", *settings.PASSWORD_HASHERS]
    )
    fast.enable()
    yield
    fast.disable()


@pytest.fixture(scope="session", autouse=True)
def _flush_retries_a_deadlock_with_the_shared_control_plane():
    """Emptying the tables after a transactional test is a TRUNCATE of every table. The
    shared Daphne (``control_plane``) may still be finishing an answer from the test's
    agent at that moment (it locks the agent row, then writes the session); PostgreSQL
    then finds a deadlock and aborts one of the two. When it aborts the TRUNCATE the tables
    stay full and the next test fails on its fixtures (seen in CI: "Database test_test
    couldn't be flushed", then "duplicate key ... alice"). Retry the flush on a deadlock
    only; any other flush failure is raised as before."""
    import time

    from django.core.management.base import CommandError
    from django.test import TransactionTestCase

    original = TransactionTestCase._fixture_teardown

    def deadlocked(exc: BaseException) -> bool:
        cause = exc.__cause__
        return getattr(getattr(cause, "__cause__", None), "sqlstate", None) == "40P01"

    def fixture_teardown(self):
        for attempt in range(5):
            try:
                return original(self)
            except CommandError as exc:
                if attempt == 4 or not deadlocked(exc):
                    raise
                time.sleep(0.2)

    TransactionTestCase._fixture_teardown = fixture_teardown
    yield
    TransactionTestCase._fixture_teardown = original


@pytest.fixture(scope="session")
def control_plane(django_db_setup, django_db_blocker):
    """A real Daphne process on the test database and the Redis channel layer, shared by
    every socket and end-to-end test (tables are emptied between tests)."""
    from tests.live import ControlPlane

    cp = ControlPlane("daphne-a").start()
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def control_plane_b(django_db_setup, django_db_blocker):
    """A second Daphne process on the same database and channel layer (routing across processes)."""
    from tests.live import ControlPlane

    cp = ControlPlane("daphne-b").start()
    yield cp
    cp.stop()


# The tag scripts/build_desktop_image.sh builds (DESKTOP_IMAGE chooses another, as for the script).
DESKTOP_IMAGE = os.environ.get("DESKTOP_IMAGE", "streamspace/desktop:bookworm-3")


@pytest.fixture
def desktop_template(transactional_db):
    """The demo desktop template, for tests on the real engine."""
    from sessions_app.models import Template

    return Template.objects.create(
        slug="desktop",
        name="Desktop",
        description="Openbox and an xterm.",
        image=DESKTOP_IMAGE,
        vnc_port=5901,
        volume_mount_path="/home/user",
        default_cpu=0.5,
        default_memory_mb=512,
    )


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password-1")


@pytest.fixture
def carol(django_user_model):
    return django_user_model.objects.create_user("carol", password="carol-password-1", is_staff=True)


@pytest.fixture
def template(db):
    from sessions_app.models import Template

    return Template.objects.create(
        slug="desktop", name="Desktop", image="streamspace/desktop:bookworm-3", default_cpu=1.0, default_memory_mb=1024
    )


def make_agent(agent_id="agent-1", *, platform="docker", region="eu", online=True, **capacity):
    from agents_app.models import Agent

    cap = {"cpu": 8, "memory_mb": 16384, "max_sessions": 10}
    cap.update(capacity)
    return Agent.objects.create(
        agent_id=agent_id,
        platform=platform,
        region=region,
        status=Agent.Status.ONLINE if online else Agent.Status.OFFLINE,
        last_heartbeat=timezone.now() if online else None,
        capacity=cap,
    )


@pytest.fixture
def agent(db):
    return make_agent()


def api_client_for(user):
    from rest_framework.test import APIClient
    from rest_framework_simplejwt.tokens import AccessToken

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {AccessToken.for_user(user)}")
    return client


@pytest.fixture
def as_alice(alice):
    return api_client_for(alice)


@pytest.fixture
def as_bob(bob):
    return api_client_for(bob)


@pytest.fixture
def as_carol(carol):
    return api_client_for(carol)


def _leaked_managed_objects() -> list[str] | None:
    """Remove and name the managed Docker objects of this run's agents (ids start with
    tests.docker.conftest.RUN_ID); None when no engine is reachable."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:
        return None
    from tests.docker.conftest import RUN_ID

    def ours(labels) -> bool:
        return str((labels or {}).get("streamspace.agent", "")).startswith(RUN_ID)

    flt = {"label": "streamspace.managed=true"}
    leaked: list[str] = []
    try:
        for kind, objects in (
            ("container", lambda: client.containers.list(all=True, filters=flt)),
            ("network", lambda: client.networks.list(filters=flt)),
            ("volume", lambda: client.volumes.list(filters=flt)),
        ):
            for obj in objects():
                labels = obj.labels if kind == "container" else obj.attrs.get("Labels")
                if not ours(labels):
                    continue
                leaked.append(f"{kind} {obj.name} (agent {labels.get('streamspace.agent')})")
                try:
                    obj.remove(force=True) if kind != "network" else obj.remove()
                except Exception as exc:
                    leaked[-1] += f", could not remove it: {exc}"
    finally:
        client.close()
    return leaked


def pytest_collection_modifyitems(session, config, items):
    """The Swarm tests run last: leaving the swarm at their end removes ``docker_gwbridge``,
    which cuts the containers then running on the engine off their bridge networks (seen
    with a Compose stack up at that moment), so nothing else may be running by then."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_swarm_leadership.py"))


def pytest_sessionfinish(session, exitstatus):
    """After the whole suite: no container, network or volume of this run's agents may be
    left on the engine. A leak fails the run, is printed, and is removed."""
    leaked = _leaked_managed_objects()
    if not leaked:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    title = "tests left managed Docker objects behind (now removed)"
    if reporter is not None:
        reporter.line("")
        reporter.write_sep("=", title, red=True, bold=True)
        for item in leaked:
            reporter.write_line(f"  {item}", red=True)
    else:
        print(title, *leaked, sep="\n  ")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
