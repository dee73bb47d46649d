"""PostgreSQL connections dropped under load, and a real database outage.

Found this way: ``pg_terminate_backend`` on every backend of the control plane's
database during a burst of creates and GETs gave 500s for as long as the dead
connections sat in the pool (8 of 15 creates, 16 of 20 GETs right after, some still
10 s later), as Django's HTML error page.

Here: a real Daphne on the test database with a real agent runtime (the test-only
FileBackend) connected to it, and the backends killed from a separate connection.
Nothing is mocked."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from django.db import connection

from agents_app.models import Agent
from agents_app.services import agent_register
from sessions_app.models import Template
from tests import live
from tests.channel.test_agent_socket import jwt
from tests.live import ControlPlane, agent_process, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

METRICS_TOKEN = "chaos-metrics-token-0123456789"
SESSION_COOKIE = "sessionid=" + "a" * 32  # a well-formed key: the session middleware looks it up

KILL_BACKENDS = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = %s AND pid <> pg_backend_pid()"""


def admin_connection() -> psycopg.Connection:
    """A connection of the test's own to the ``postgres`` database (it survives the kills)."""
    url = live.test_database_url().rsplit("/", 1)[0] + "/postgres"
    return psycopg.connect(url, autocommit=True)


def kill_backends(conn: psycopg.Connection) -> int:
    return conn.execute(KILL_BACKENDS, (connection.settings_dict["NAME"],)).fetchone()[0]


def call(cp: ControlPlane, method: str, path: str, token: str | None = None, body=None, cookie: str | None = None):
    """(status, content type, body text) of one request; never raises on an HTTP error."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(cp.http_url + path, data=data, method=method)  # noqa: S310 (loopback)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
            return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


def server_errors(results) -> list[str]:
    """Every answer of 500 or more that is not a 503 JSON body with ``error`` and ``detail``."""
    bad = []
    for status, ctype, text in results:
        if status < 500:
            continue
        ok = status == 503 and ctype.startswith("application/json")
        if ok:
            body = json.loads(text)
            ok = body.get("error") == "database_unavailable" and bool(body.get("detail"))
        if not ok:
            bad.append(f"{status} {ctype}: {text[:200]!r}")
    return bad


@pytest.fixture
def stack(alice, tmp_path):
    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.1, default_memory_mb=64)
    cp = ControlPlane(
        "daphne-dbkill", QUOTA_DEFAULT_MAX_SESSIONS="500", DATABASE_POOL_TIMEOUT="1", METRICS_TOKEN=METRICS_TOKEN
    ).start()
    _, token, _ = agent_register(agent_id="dbkill-agent", platform="docker", region="test")
    agent = agent_process(
        cp, "dbkill-agent", token, backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"), MAX_SESSIONS="500",
    ).start()  # fmt: skip
    wait_for(lambda: Agent.objects.filter(agent_id="dbkill-agent", status="online").exclude(channel_name="").exists(),
             15, what=f"agent online\n{agent.output()}")  # fmt: skip
    yield cp, agent
    agent.kill()
    cp.stop()


def assert_no_crash(cp: ControlPlane, agent) -> None:
    log = cp.output()
    assert "Exception inside application" not in log, log
    assert "close 1011" not in agent.output(), agent.output()
    assert "no reason" not in agent.output(), agent.output()


def test_backends_terminated_under_a_create_burst_give_503_json_only_and_recover_at_once(stack, alice):
    cp, agent = stack
    token = jwt(alice)
    admin = admin_connection()
    # Fill the pool with several connections, then kill them all, during and between bursts.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: call(cp, "GET", "/api/v1/sessions", token), range(16)))
    results = []
    lock = threading.Lock()

    def burst(n: int):
        def one(i):
            if i % 3 == 1:  # about 12 creates and 23 GETs per burst
                r = call(cp, "POST", "/api/v1/sessions", token, {"template": "desktop"})
            else:
                r = call(cp, "GET", "/api/v1/sessions", token)
            with lock:
                results.append(r)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(n)))

    killed = kill_backends(admin)
    assert killed >= 2, "the control plane held pooled connections"
    burst(35)  # right after the kill: dead connections in the pool
    killer = threading.Thread(target=lambda: [kill_backends(admin) or time.sleep(0.05) for _ in range(5)])
    killer.start()
    burst(35)  # while backends are being killed
    killer.join()
    admin.close()
    connection.close()  # the test's own connection was killed too

    assert server_errors(results) == [], f"{len(results)} answers"
    # Right after: everything works again without a restart, within a bounded short time.
    deadline = time.monotonic() + 5
    while True:
        after = [call(cp, "GET", "/api/v1/sessions", token) for _ in range(10)]
        after.append(call(cp, "POST", "/api/v1/sessions", token, {"template": "desktop"}))
        if all(s in (200, 201) for s, _, _ in after):
            break
        assert time.monotonic() < deadline, f"still failing 5 s after the kills: {[a for a in after if a[0] > 201]}"
        assert server_errors(after) == []
    wait_for(lambda: Agent.objects.filter(agent_id="dbkill-agent", status="online").exclude(channel_name="").exists(),
             15, what=f"agent connected again\n{agent.output()}")  # fmt: skip
    assert agent.alive
    assert_no_crash(cp, agent)


def test_a_database_outage_answers_503_everywhere_closes_agent_sockets_with_a_reason_and_recovers(stack, alice):
    cp, agent = stack
    token = jwt(alice)
    status, _, _ = call(cp, "POST", "/api/v1/auth/token", body={"username": "alice", "password": "alice-password-1"})
    assert status == 200
    name = connection.settings_dict["NAME"]
    admin = admin_connection()
    try:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        kill_backends(admin)
        connection.close()  # ours too: the database is down for everyone now
        api = [
            call(cp, "GET", "/api/v1/sessions", token),  # JWT authentication reads the user
            call(cp, "POST", "/api/v1/sessions", token, {"template": "desktop"}),
            call(cp, "POST", "/api/v1/auth/token", body={"username": "alice", "password": "alice-password-1"}),
            call(cp, "GET", "/api/v1/templates", cookie=SESSION_COOKIE),  # the session is looked up
            call(cp, "GET", "/api/v1/agents", token),
        ]
        assert [s for s, _, _ in api] == [503] * len(api), api
        assert server_errors(api) == []
        for path in ("/", "/admin/", "/accounts/login/"):
            status, ctype, html = call(cp, "GET", path, cookie=SESSION_COOKIE)
            assert status == 503 and ctype.startswith("text/html"), (path, status, html[:300])
            assert "The service is temporarily unavailable" in html and "Traceback" not in html, html[:500]
        status, ctype, text = call(cp, "GET", "/readyz")
        assert status == 503 and json.loads(text)["checks"]["database"].startswith("error")
        # every metric comes from the database: the scrape fails visibly, with the reason
        status, ctype, text = call(cp, "GET", "/metrics", METRICS_TOKEN)
        assert status == 503 and json.loads(text)["error"] == "database_unavailable", (status, text[:300])

        # The agent's next heartbeat cannot be written: its socket closes with a reason.
        wait_for(lambda: "4503: control plane database unavailable" in agent.output(), 15, 0.1,
                 what=f"the agent socket closed with 4503 and a reason\n{agent.output()}")  # fmt: skip
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()

    # Recovery without a restart: the API answers and the agent is connected again.
    wait_for(lambda: call(cp, "GET", "/api/v1/sessions", token)[0] == 200, 15, 0.2, what="the API answering again")
    wait_for(lambda: Agent.objects.filter(agent_id="dbkill-agent", status="online").exclude(channel_name="").exists(),
             20, 0.2, what=f"agent connected again\n{agent.output()}")  # fmt: skip
    status, _, text = call(cp, "POST", "/api/v1/sessions", token, {"template": "desktop"})
    assert status == 201, text
    assert call(cp, "GET", "/metrics", METRICS_TOKEN)[0] == 200
    assert agent.alive
    assert_no_crash(cp, agent)
