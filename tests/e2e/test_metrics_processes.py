"""/metrics through the real processes: two Daphne processes, a Celery worker (the
sweeps) and a real agent process (FileBackend, VNC to a TCP echo server).

A known sequence: three session creates (one on an image the backend refuses), one
viewer connection through the relay carrying N bytes each way. Then both Daphnes are
scraped: each answers exactly the same numbers, and they are the numbers of the
sequence, whichever process saw each event. The agent's own metrics port agrees."""

from __future__ import annotations

import asyncio
import os
import urllib.request

import pytest
from websockets.asyncio.client import connect

from agents_app.models import Agent, SweepRun
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from streamspace.celery import sweep_periods
from tests.channel.test_agent_socket import jwt
from tests.live import PYTHON, ControlPlane, Process, agent_process, free_port, sweeping_celery_worker, wait_for
from tests.support.metrics import samples, value
from vnc_app.models import VNCConnection

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKEN = "e2e-metrics-token-0123456789abcdef"
N = 300_000  # bytes each way through the viewer connection


def scrape(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(url)  # noqa: S310 (loopback)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def daphnes(django_db_setup, django_db_blocker):
    first = ControlPlane("metrics-a", METRICS_TOKEN=TOKEN).start()
    second = ControlPlane("metrics-b", METRICS_TOKEN=TOKEN).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def echo_port():
    port = free_port()
    proc = Process("metrics-echo", [PYTHON, "-m", "tests.support.echo_server", str(port)], {**os.environ}).start()
    wait_for(lambda: "listening" in proc.output(), 10, what=f"echo server\n{proc.output()}")
    yield port
    proc.kill()


async def view(url: str, payload: bytes) -> int:
    """Send ``payload`` through the relay, read the echo back, close: the bytes received."""
    received = 0
    async with connect(url, subprotocols=["binary"], max_size=None, open_timeout=10) as ws:
        await ws.send(payload)
        while received < len(payload):
            received += len(await asyncio.wait_for(ws.recv(), 20))
    return received


def test_two_daphnes_report_the_same_exact_numbers_of_a_known_sequence(daphnes, echo_port, alice, tmp_path):
    cp_a, cp_b = daphnes
    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=64)
    Template.objects.create(slug="broken", name="Broken", image="img:fail-permanent", default_cpu=0.5,
                            default_memory_mb=64)  # fmt: skip
    _, token, _ = agent_register(agent_id="metrics-agent", platform="docker", region="test")
    agent_port = free_port()
    worker = sweeping_celery_worker()
    agent = agent_process(
        cp_a, "metrics-agent", token, backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"), FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}",
        METRICS_PORT=str(agent_port),
    ).start()  # fmt: skip
    try:
        wait_for(lambda: Agent.objects.get(agent_id="metrics-agent").status == "online", 15,
                 what=f"agent online\n{agent.output()}")  # fmt: skip
        created = []
        for cp, slug in ((cp_a, "desktop"), (cp_b, "desktop"), (cp_b, "broken")):
            status, body = cp.request("POST", "/api/v1/sessions", jwt(alice), {"template": slug})
            assert status == 201, body
            created.append(body["id"])
        wait_for(lambda: sorted(Session.objects.values_list("state", flat=True)) == ["failed", "running", "running"],
                 20, what=f"two sessions running, one failed\n{agent.output()}")  # fmt: skip

        url = f"{cp_b.ws_url}/api/v1/vnc/{created[0]}?token={jwt(alice)}"
        assert asyncio.run(view(url, os.urandom(N))) == N
        wait_for(lambda: VNCConnection.objects.filter(closed_at__isnull=False).count() == 1, 10,
                 what="the viewer connection closed")  # fmt: skip
        sweeps = set(sweep_periods())
        wait_for(lambda: set(SweepRun.objects.filter(runs__gt=0).values_list("name", flat=True)) >= sweeps, 30,
                 what="each sweep ran")  # fmt: skip
    finally:
        worker.stop()  # the sweeps' counters stop moving: both scrapes must then agree exactly

    try:
        status_a, text_a = scrape(cp_a.http_url + "/metrics")
        status_b, text_b = scrape(cp_b.http_url + "/metrics")
        assert (status_a, status_b) == (200, 200)
        a, b = samples(text_a), samples(text_b)
        assert a == b

        assert value(a, "streamspace_agents", status="online", platform="docker") == 1
        assert value(a, "streamspace_sessions", state="running", template="desktop") == 2
        assert value(a, "streamspace_sessions", state="failed", template="broken") == 1
        assert value(a, "streamspace_sessions_idle") == 2  # the viewer has gone
        assert value(a, "streamspace_commands_total", type="create_session", outcome="completed") == 2
        assert value(a, "streamspace_commands_total", type="create_session", outcome="failed") == 1
        assert value(a, "streamspace_session_create_to_running_seconds_count") == 2
        assert value(a, "streamspace_viewer_connections_open") == 0
        assert value(a, "streamspace_relay_bytes_total", direction="to_viewer") == N
        assert value(a, "streamspace_relay_bytes_total", direction="from_viewer") == N
        assert value(a, "streamspace_tunnel_open_seconds_count") == 1
        for run in SweepRun.objects.all():  # counted by the worker, read by both Daphnes
            sweep = run.name.rsplit(".", 1)[1]
            assert value(a, "streamspace_sweep_runs_total", sweep=sweep) == run.runs > 0
            for change, count in run.changes.items():
                assert value(a, "streamspace_sweep_changes_total", sweep=sweep, change=change) == count

        commands = SweepRun.objects.get(name="agents_app.tasks.sweep_commands")
        assert set(commands.changes) == {"redelivered", "failed", "timed_out"}  # what the sweep reports

        status, text = scrape(f"http://127.0.0.1:{agent_port}/metrics", token=None)
        assert status == 200
        own = samples(text)
        assert value(own, "streamspace_agent_commands_total", type="create_session", outcome="completed") == 2
        assert value(own, "streamspace_agent_commands_total", type="create_session", outcome="failed") == 1
        assert value(own, "streamspace_agent_tunnels_opened_total") == 1
        assert value(own, "streamspace_agent_tunnels_open") == 0
        assert value(own, "streamspace_agent_tunnel_bytes_total", direction="to_desktop") == N
        assert value(own, "streamspace_agent_tunnel_bytes_total", direction="from_desktop") == N
        assert value(own, "streamspace_agent_connected") == 1
        assert value(own, "streamspace_agent_backend_call_seconds_count", call="create") == 3
    finally:
        agent.kill()


def test_the_endpoint_refuses_a_scrape_without_the_token(daphnes):
    for cp in daphnes:
        for token in (None, "not-the-token"):
            status, text = scrape(cp.http_url + "/metrics", token=token)
            assert status == 401
            assert "streamspace_" not in text and '"error": "not_authenticated"' in text
