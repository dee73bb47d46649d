"""/metrics: refused without the token, and the numbers an operator graphs are exact.

The values are computed from the database at scrape time (streamspace/metrics.py), so
here the rows are written by the real services, then scraped through Django's test
client; tests/e2e/test_metrics_processes.py does the same through two Daphne processes,
a Celery worker and an agent process."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agents_app.models import AgentCommand
from agents_app.sweep_runs import sweep_run_record
from sessions_app import services
from tests.conftest import make_agent
from tests.support.metrics import samples, value
from vnc_app import services as vnc_services
from vnc_app.models import VNCConnection

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-for-tests-0123456789"


@pytest.fixture
def metrics_token(settings):
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


def scrape(client) -> dict:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(response.content.decode())


def test_without_a_configured_token_the_endpoint_is_disabled(client, settings):
    settings.METRICS_TOKEN = ""
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything")
    assert response.status_code == 403
    assert response.json()["error"] == "metrics_disabled"


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"],
)
def test_a_missing_or_wrong_token_is_refused_with_401(client, metrics_token, authorization):
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = client.get("/metrics", **headers)
    assert response.status_code == 401
    assert response.json() == {"error": "not_authenticated", "detail": "send Authorization: Bearer <METRICS_TOKEN>"}
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"streamspace_" not in response.content


def _finish_create(session, *, fail: str | None = None, seconds: float):
    command = AgentCommand.objects.get(session=session, type=AgentCommand.Type.CREATE_SESSION)
    services.session_on_create_acked(command=command)
    finished = command.created_at + timedelta(seconds=seconds)
    if fail:
        AgentCommand.objects.filter(pk=command.pk).update(
            status=AgentCommand.Status.FAILED, completed_at=finished, error_message=fail
        )
        services.session_on_command_failed(command=command, error=fail)
    else:
        AgentCommand.objects.filter(pk=command.pk).update(status=AgentCommand.Status.COMPLETED, completed_at=finished)
        services.session_on_command_completed(command=command, result={"vnc_host": "127.0.0.1", "vnc_port": 5901})


def test_values_are_exact_after_a_known_sequence(client, metrics_token, alice, template):
    make_agent("agent-1", platform="docker")
    make_agent("agent-2", platform="kubernetes", online=False)
    first, second, third = (services.session_create(user=alice, template_slug=template.slug) for _ in range(3))
    _finish_create(first, seconds=0.3)
    _finish_create(second, seconds=7)
    _finish_create(third, fail="image not found", seconds=0.04)
    viewer = vnc_services.vnc_connection_open(session_id=first.pk, user_id=alice.pk, client_address="127.0.0.1")
    vnc_services.vnc_connection_tunnel_ready(connection_pk=viewer)
    vnc_services.vnc_connection_open(  # still open: its bytes are not counted yet
        session_id=first.pk, user_id=alice.pk, client_address="127.0.0.1"
    )
    vnc_services.vnc_connection_open(  # the second session's sound socket alone: no viewer
        session_id=second.pk, user_id=alice.pk, client_address="127.0.0.1", stream="audio"
    )
    opened = VNCConnection.objects.get(pk=viewer).opened_at
    VNCConnection.objects.filter(pk=viewer).update(tunnel_ready_at=opened + timedelta(seconds=0.2))
    vnc_services.vnc_connection_close(connection_pk=viewer, bytes_to_client=12345, bytes_from_client=678, reason="bye")
    sweep_run_record(name="agents_app.tasks.sweep_commands", changes={"redelivered": 2, "failed": 0, "timed_out": 1})
    sweep_run_record(name="agents_app.tasks.sweep_commands", changes={"redelivered": 1, "failed": 0, "timed_out": 0})

    found = scrape(client)

    assert value(found, "streamspace_agents", status="online", platform="docker") == 1
    assert value(found, "streamspace_agents", status="offline", platform="kubernetes") == 1
    assert value(found, "streamspace_agents", status="online", platform="kubernetes") == 0
    assert value(found, "streamspace_sessions", state="running", template="desktop") == 2
    assert value(found, "streamspace_sessions", state="failed", template="desktop") == 1
    assert ("streamspace_sessions", (("state", "pending"), ("template", "desktop"))) not in found
    # one running session has a viewer still connected: the other one is idle
    assert value(found, "streamspace_sessions_idle") == 1
    assert value(found, "streamspace_viewer_connections_open") == 1

    create = "create_session"
    assert value(found, "streamspace_commands_total", type=create, outcome="completed") == 2
    assert value(found, "streamspace_commands_total", type=create, outcome="failed") == 1
    assert value(found, "streamspace_command_duration_seconds_count", type=create, outcome="completed") == 2
    assert value(found, "streamspace_command_duration_seconds_sum", type=create, outcome="completed") == pytest.approx(
        7.3
    )
    bucket = "streamspace_command_duration_seconds_bucket"
    completed = {le: value(found, bucket, type=create, outcome="completed", le=le)
                 for le in ("0.25", "0.5", "5.0", "10.0", "+Inf")}  # fmt: skip
    assert completed == {"0.25": 0, "0.5": 1, "5.0": 1, "10.0": 2, "+Inf": 2}
    assert value(found, "streamspace_command_duration_seconds_bucket", type=create, outcome="failed", le="0.05") == 1

    assert value(found, "streamspace_session_create_to_running_seconds_count") == 2
    assert value(found, "streamspace_tunnel_open_seconds_count") == 1
    assert value(found, "streamspace_tunnel_open_seconds_bucket", le="0.1") == 0
    assert value(found, "streamspace_tunnel_open_seconds_bucket", le="0.25") == 1
    assert value(found, "streamspace_tunnel_open_seconds_sum") == pytest.approx(0.2)
    # bytes count when a connection closes: the open one adds nothing yet
    assert value(found, "streamspace_relay_bytes_total", direction="to_viewer") == 12345
    assert value(found, "streamspace_relay_bytes_total", direction="from_viewer") == 678

    assert value(found, "streamspace_sweep_runs_total", sweep="sweep_commands") == 2
    assert value(found, "streamspace_sweep_changes_total", sweep="sweep_commands", change="redelivered") == 3
    assert value(found, "streamspace_sweep_changes_total", sweep="sweep_commands", change="timed_out") == 1


def test_unfinished_commands_and_sessions_not_yet_running_are_not_observed(client, metrics_token, alice, template):
    make_agent()
    services.session_create(user=alice, template_slug=template.slug)
    found = scrape(client)
    assert value(found, "streamspace_sessions", state="pending", template="desktop") == 1
    assert not [k for k in found if k[0] == "streamspace_commands_total"]
    assert value(found, "streamspace_session_create_to_running_seconds_count") == 0
    assert value(found, "streamspace_sessions_idle") == 0


def test_a_sweep_that_reports_no_changes_still_counts_its_runs(client, metrics_token):
    for _ in range(2):
        sweep_run_record(name="agents_app.tasks.sweep_lifecycle", changes=None)
    found = scrape(client)
    assert value(found, "streamspace_sweep_runs_total", sweep="sweep_lifecycle") == 2
    assert not [k for k in found if k[0] == "streamspace_sweep_changes_total"]
