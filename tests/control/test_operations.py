"""Health probes, the API schema and docs, and the management commands."""

import io
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.utils import timezone

from agents_app.models import Agent, SweepRun
from agents_app.services import agent_authenticate
from agents_app.sweep_runs import sweep_run_record
from sessions_app.models import Template
from streamspace.celery import sweep_periods

pytestmark = pytest.mark.django_db


def test_healthz_answers_while_the_process_is_up(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_the_database_and_the_channel_layer_and_shows_the_sweeps(client):
    for name in sweep_periods():
        sweep_run_record(name=name)
    body = client.get("/readyz").json()
    assert body == {"status": "ok", "checks": {"database": "ok", "channel_layer": "ok"}, "sweeps": "ok"}
    assert client.get("/healthz/sweeps").json() == {"status": "ok", "sweeps": "ok"}


def test_stopped_sweeps_are_visible_without_taking_the_process_out_of_service(client, settings):
    """A dead Celery beat (or worker) must be visible: the sweeps record their own runs.
    /healthz/sweeps and check_sweeps fail; /readyz (what load balancers read) shows it but
    stays ready: found by review, a beat restart made every Daphne pod unready."""
    settings.SWEEP_OVERDUE_MIN = 1
    for name in sweep_periods():
        sweep_run_record(name=name)
    SweepRun.objects.filter(name="agents_app.tasks.sweep_agents").update(
        finished_at=timezone.now() - timedelta(minutes=5)
    )
    response = client.get("/healthz/sweeps")
    assert response.status_code == 503
    state = response.json()["sweeps"]
    assert state.startswith("error: sweep_agents last ran 300s ago"), state
    assert "is Celery beat running?" in state
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["sweeps"] == state
    with pytest.raises(CommandError, match="is Celery beat running"):
        call_command("check_sweeps")
    SweepRun.objects.all().delete()
    assert "sweep_commands has never run" in client.get("/healthz/sweeps").json()["sweeps"]


def test_the_openapi_schema_names_every_endpoint(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/v1/sessions", "/api/v1/sessions/{session_id}", "/api/v1/sessions/{session_id}/wake",
                 "/api/v1/agents/register", "/api/v1/agents", "/api/v1/templates", "/api/v1/auth/token"):  # fmt: skip
        assert path in paths


def test_swagger_ui_is_served_without_a_cdn(client):
    html = client.get("/api/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_bootstrap_admin_uses_admin_password_and_is_idempotent(monkeypatch, django_user_model):
    monkeypatch.setenv("ADMIN_PASSWORD", "a-strong-admin-password")
    assert "from ADMIN_PASSWORD" in run("bootstrap_admin")
    admin = django_user_model.objects.get(username="admin")
    assert admin.is_superuser and admin.check_password("a-strong-admin-password")
    assert "exists" in run("bootstrap_admin")


def test_bootstrap_admin_prints_a_generated_password_once(monkeypatch, django_user_model):
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    out = run("bootstrap_admin")
    password = out.split("password: ")[1].split()[0]
    assert django_user_model.objects.get(username="admin").check_password(password)


def test_agent_token_creates_then_rotates():
    token = run("agent_token", "docker-9", "--platform", "docker", "--quiet").strip()
    agent = Agent.objects.get(agent_id="docker-9")
    assert agent_authenticate(agent_id="docker-9", raw_token=token) == agent
    rotated = run("agent_token", "docker-9", "--quiet").strip()
    assert rotated != token
    assert agent_authenticate(agent_id="docker-9", raw_token=token) is None
    assert agent_authenticate(agent_id="docker-9", raw_token=rotated) == agent
    assert token not in Agent.objects.get(pk=agent.pk).token_hash


def test_agent_token_from_env_sets_the_deployment_s_token_and_keeps_it(monkeypatch):
    """Docker Compose keeps the agent's token in its env file: the setup step on every
    start makes it the agent's token, creating the agent the first time, and never prints it."""
    secret = "c0mp0se-" + "x" * 40
    monkeypatch.setenv("COMPOSE_AGENT_TOKEN", secret)
    out = run("agent_token", "docker-7", "--platform", "docker", "--from-env", "COMPOSE_AGENT_TOKEN")
    assert "created agent docker-7" in out and secret not in out
    agent = Agent.objects.get(agent_id="docker-7")
    assert agent_authenticate(agent_id="docker-7", raw_token=secret) == agent
    stamp = agent.updated_at
    assert "kept the token of docker-7" in run(
        "agent_token", "docker-7", "--platform", "docker", "--from-env", "COMPOSE_AGENT_TOKEN"
    )
    assert Agent.objects.get(pk=agent.pk).updated_at == stamp  # nothing written

    monkeypatch.setenv("COMPOSE_AGENT_TOKEN", secret + "-rotated")
    assert "set the token of docker-7" in run("agent_token", "docker-7", "--from-env", "COMPOSE_AGENT_TOKEN")
    assert agent_authenticate(agent_id="docker-7", raw_token=secret) is None
    assert agent_authenticate(agent_id="docker-7", raw_token=secret + "-rotated") == agent


@pytest.mark.django_db(transaction=True)
def test_two_first_runs_of_agent_token_from_env_at_once_both_succeed(monkeypatch):
    """Two replicas run the setup step together: the other run (here, the test's own open
    transaction) creates the agent after this run looked for it and before its insert; the
    insert waits on the unique index, fails when the other commits, and the run retries."""
    secret = "c0mp0se-" + "y" * 40
    monkeypatch.setenv("COMPOSE_AGENT_TOKEN", secret)
    outcome: list = []

    def second_run():
        try:
            outcome.append(run("agent_token", "docker-6", "--platform", "docker", "--from-env", "COMPOSE_AGENT_TOKEN"))
        except BaseException as exc:  # reported below
            outcome.append(exc)
        finally:
            connections.close_all()

    with transaction.atomic():
        Agent.objects.create(agent_id="docker-6", platform="docker")  # the first run, not yet committed
        thread = threading.Thread(target=second_run)
        thread.start()
        deadline = time.monotonic() + 10
        with connection.cursor() as cur:  # until the second run's insert waits on ours
            while True:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s",
                            [connection.settings_dict["NAME"]])  # fmt: skip
                if cur.fetchone()[0] or not thread.is_alive() or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
    assert "set the token of docker-6" in outcome[0]
    assert agent_authenticate(agent_id="docker-6", raw_token=secret) is not None


def test_agent_token_from_env_refuses_a_weak_or_missing_token_and_creates_nothing(monkeypatch):
    monkeypatch.setenv("COMPOSE_AGENT_TOKEN", "short")
    with pytest.raises(CommandError, match="at least 32"):
        call_command("agent_token", "docker-8", "--platform", "docker", "--from-env", "COMPOSE_AGENT_TOKEN")
    monkeypatch.delenv("COMPOSE_AGENT_TOKEN")
    with pytest.raises(CommandError, match="COMPOSE_AGENT_TOKEN_FILE is set"):
        call_command("agent_token", "docker-8", "--platform", "docker", "--from-env", "COMPOSE_AGENT_TOKEN")
    assert not Agent.objects.exists()


def test_deploy_setup_makes_a_fresh_install_usable_and_changes_nothing_the_second_time(monkeypatch, django_user_model):
    """Docker Compose's setup service runs it on every start."""
    secret = "d3pl0y-" + "y" * 40
    monkeypatch.setenv("ADMIN_PASSWORD", "a-strong-admin-password")
    monkeypatch.setenv("COMPOSE_AGENT_TOKEN", secret)
    args = ("deploy_setup", "--agent-id", "docker-5", "--agent-token-env", "COMPOSE_AGENT_TOKEN")
    first = run(*args)
    assert "created admin user 'admin'" in first and "created agent docker-5" in first and secret not in first
    assert django_user_model.objects.get(username="admin").check_password("a-strong-admin-password")
    assert agent_authenticate(agent_id="docker-5", raw_token=secret) is not None
    templates = set(Template.objects.values_list("slug", flat=True))
    assert templates

    second = run(*args)
    assert "kept the token of docker-5" in second and "exists" in second
    assert set(Template.objects.values_list("slug", flat=True)) == templates
    assert Agent.objects.count() == 1 and django_user_model.objects.count() == 1


def test_agent_token_refuses_an_unknown_agent_without_a_platform():
    with pytest.raises(CommandError, match="pass --platform"):
        call_command("agent_token", "nobody")
    assert not Agent.objects.exists()


def test_load_demo_templates_is_idempotent():
    run("load_demo_templates")
    run("load_demo_templates")
    assert Template.objects.filter(slug__startswith="debian-desktop").count() == 2


def test_load_demo_templates_keeps_what_an_operator_edited_unless_asked_to_reset():
    """Found: every ``./dev up`` (which runs load_demo_templates) undid the operator's edits."""
    run("load_demo_templates")
    Template.objects.filter(slug="debian-desktop").update(default_cpu=0.25, name="Our desktop")
    Template.objects.filter(slug="debian-desktop-large").delete()
    out = run("load_demo_templates")
    assert "kept template debian-desktop" in out and "created template debian-desktop-large" in out
    edited = Template.objects.get(slug="debian-desktop")
    assert (edited.default_cpu, edited.name) == (0.25, "Our desktop")
    out = run("load_demo_templates", "--reset")
    assert "reset template debian-desktop" in out
    reset = Template.objects.get(slug="debian-desktop")
    assert (reset.default_cpu, reset.name) == (1.0, "Debian desktop")


def test_drain_agent_stops_new_sessions_landing_on_it(agent):
    assert "draining" in run("drain_agent", agent.agent_id)
    drained = Agent.objects.get(pk=agent.pk)
    assert drained.status == "draining" and drained.drain_requested


def test_undrain_agent_takes_new_sessions_again(agent):
    run("drain_agent", agent.agent_id)
    assert "undrained" in run("undrain_agent", agent.agent_id)
    undrained = Agent.objects.get(pk=agent.pk)
    assert undrained.status == "online" and not undrained.drain_requested
    assert "nothing to do" in run("undrain_agent", agent.agent_id)
    with pytest.raises(CommandError, match="no agent"):
        call_command("undrain_agent", "nobody")
