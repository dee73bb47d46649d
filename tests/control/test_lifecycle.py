"""Lifecycle policies (sessions_app.lifecycle) as plain functions on PostgreSQL: idle
warning then action, input and "Stay" calling it off, maximum lifetime, no-viewer timeout,
group overrides, the environment's defaults, and two sweepers at once. Time is not faked:
the sessions' timestamps are set in the past. (The real stack, with noVNC in Chromium and
Celery workers, is tests/browser/test_lifecycle.py.)"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client
from django.utils import timezone

from agents_app.models import AgentCommand
from sessions_app import services
from sessions_app.lifecycle import human_duration, sweep_lifecycle
from sessions_app.models import GroupPolicy, Session, SessionEvent
from sessions_app.states import State
from streamspace.env import env_seconds
from tests.conftest import api_client_for, make_agent

pytestmark = pytest.mark.django_db

NOTHING = {"warned": 0, "hibernate": 0, "terminate": 0}


@pytest.fixture(autouse=True)
def _defaults(settings):
    settings.SESSION_IDLE_TIMEOUT = 0
    settings.SESSION_IDLE_ACTION = "hibernate"
    settings.SESSION_MAX_LIFETIME = 0
    settings.SESSION_NO_VIEWER_TIMEOUT = 0
    settings.SESSION_IDLE_WARNING = 60
    settings.SESSION_ACTIVITY_INTERVAL = 10


def running(owner, template, agent, *, since: float, **fields) -> Session:
    """A running session that became running ``since`` seconds ago."""
    session = Session.objects.create(owner=owner, template=template, agent=agent, cpu=1, memory_mb=64,
                                     state=State.RUNNING)  # fmt: skip
    now = timezone.now()
    fields.setdefault("started_at", now - timedelta(seconds=since))
    Session.objects.filter(pk=session.pk).update(state_changed_at=now - timedelta(seconds=since), **fields)
    session.refresh_from_db()
    return session


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def reasons(session) -> list[str]:
    return list(SessionEvent.objects.filter(session=session).exclude(reason="").values_list("reason", flat=True))


def test_an_idle_session_is_warned_then_hibernated_with_the_reason_on_its_timeline_and_row(alice, template, agent):
    template.idle_timeout = 120
    template.save()
    session = running(alice, template, agent, since=100)  # idle 100 s of 120; warning: 60 s before
    assert sweep_lifecycle() == {**NOTHING, "warned": 1}
    session.refresh_from_db()
    assert session.idle_warned_at is not None and session.state == State.RUNNING
    warning = api_client_for(alice).get(f"/api/v1/sessions/{session.pk}").json()["lifecycle_warning"]
    assert warning["action"] == "hibernate" and warning["can_stay"] is True
    assert 50 <= warning["seconds_left"] <= 60  # never sooner than the warning's length after it
    assert sweep_lifecycle() == NOTHING  # warned once; the action waits for the warning's length

    # The warning's length has passed, still no input: hibernated, and said why.
    Session.objects.filter(pk=session.pk).update(idle_warned_at=ago(61), state_changed_at=ago(200))
    assert sweep_lifecycle() == {**NOTHING, "hibernate": 1}
    session.refresh_from_db()
    assert session.state == State.HIBERNATING
    assert session.lifecycle_reason == "hibernated after 2 min without input"
    assert reasons(session)[-1] == "hibernated after 2 min without input"
    assert AgentCommand.objects.filter(session=session, type=AgentCommand.Type.HIBERNATE_SESSION).count() == 1
    client = Client()
    client.force_login(alice)
    assert "Hibernated after 2 min without input" in client.get("/sessions/rows").content.decode()
    assert sweep_lifecycle() == NOTHING


def test_a_late_sweep_still_warns_before_it_acts(alice, template, agent):
    template.idle_timeout = 120
    template.save()
    session = running(alice, template, agent, since=3600)  # long past its deadline, never warned
    assert sweep_lifecycle() == {**NOTHING, "warned": 1}
    assert Session.objects.get(pk=session.pk).state == State.RUNNING


def test_input_through_the_relay_or_stay_calls_the_warning_off(alice, bob, carol, template, agent):
    template.idle_timeout = 120
    template.save()
    typed = running(alice, template, agent, since=100)
    stayed = running(alice, template, agent, since=100)
    assert sweep_lifecycle()["warned"] == 2
    Session.objects.filter(pk__in=[typed.pk, stayed.pk]).update(idle_warned_at=ago(61), state_changed_at=ago(200))

    services.session_record_activity(session_id=typed.pk)  # what the relay does on a key event
    assert api_client_for(bob).post(f"/api/v1/sessions/{stayed.pk}/keepalive").status_code == 404
    # Staff at the viewer may stay too, as their typing through the relay counts (found by review:
    # Stay answered 403 for them and the viewer said nothing).
    assert api_client_for(carol).post(f"/api/v1/sessions/{stayed.pk}/keepalive").status_code == 200
    answer = api_client_for(alice).post(f"/api/v1/sessions/{stayed.pk}/keepalive")
    assert answer.status_code == 200 and answer.json()["lifecycle_warning"] is None

    assert sweep_lifecycle() == NOTHING
    for session in (typed, stayed):
        session.refresh_from_db()
        assert session.state == State.RUNNING and session.idle_warned_at is None


def test_keepalive_on_a_session_that_is_not_running_is_a_conflict(alice, template, agent):
    session = running(alice, template, agent, since=10)
    Session.objects.filter(pk=session.pk).update(state=State.HIBERNATED)
    answer = api_client_for(alice).post(f"/api/v1/sessions/{session.pk}/keepalive")
    assert answer.status_code == 409
    assert answer.json() == {"error": "conflict", "detail": "the session is hibernated, not running"}


def test_input_between_two_writes_of_the_relay_counts(alice, template, agent, settings):
    """The relay writes input at most every SESSION_ACTIVITY_INTERVAL: a session whose last
    write is just over the timeout old may have had input since, so it is not warned yet."""
    template.idle_timeout = 120
    template.save()
    settings.SESSION_ACTIVITY_INTERVAL = 10
    settings.SESSION_IDLE_WARNING = 0
    running(alice, template, agent, since=1000, last_activity=ago(125))
    assert sweep_lifecycle() == NOTHING
    running(alice, template, agent, since=1000, last_activity=ago(131))
    assert sweep_lifecycle() == {**NOTHING, "warned": 1}


def test_max_lifetime_terminates_a_busy_session_and_a_hibernated_one(alice, template, agent):
    template.max_lifetime = 3600
    template.save()
    busy = running(alice, template, agent, since=3601, last_activity=timezone.now())
    asleep = running(alice, template, agent, since=3700, state=State.HIBERNATED)
    young = running(alice, template, agent, since=3000, last_activity=timezone.now())
    assert sweep_lifecycle() == {**NOTHING, "terminate": 2}
    for session in (busy, asleep):
        session.refresh_from_db()
        assert session.state == State.TERMINATING
        assert reasons(session)[-1] == "terminated after 1 h, its maximum lifetime"
    assert Session.objects.get(pk=young.pk).state == State.RUNNING


def test_the_end_of_the_lifetime_is_announced_without_a_stay(alice, template, agent):
    template.max_lifetime = 3600
    template.save()
    session = running(alice, template, agent, since=3570, last_activity=timezone.now())
    warning = api_client_for(alice).get(f"/api/v1/sessions/{session.pk}").json()["lifecycle_warning"]
    assert warning["action"] == "terminate" and warning["can_stay"] is False


def test_no_viewer_timeout_hibernates_only_sessions_nobody_watches(alice, template, agent):
    from vnc_app.models import VNCConnection

    template.no_viewer_timeout = 300
    template.save()
    unwatched = running(alice, template, agent, since=600)
    watched = running(alice, template, agent, since=600)
    VNCConnection.objects.create(session=watched, user=alice)
    left_lately = running(alice, template, agent, since=600)
    VNCConnection.objects.create(session=left_lately, user=alice, closed_at=ago(60))
    # Only the sound socket open (a script can hold it): nobody watches.
    heard_only = running(alice, template, agent, since=600)
    VNCConnection.objects.create(session=heard_only, user=alice, stream="audio")
    VNCConnection.objects.create(session=heard_only, user=alice, stream="audio", closed_at=ago(60))
    assert sweep_lifecycle() == {**NOTHING, "hibernate": 2}
    for session in (unwatched, heard_only):
        session.refresh_from_db()
        assert session.state == State.HIBERNATING
        assert session.lifecycle_reason == "hibernated after 5 min with no viewer open"
    assert {Session.objects.get(pk=s.pk).state for s in (watched, left_lately)} == {State.RUNNING}


def test_a_groups_policy_overrides_the_templates_and_the_most_lenient_group_wins(alice, bob, template, agent):
    template.idle_timeout = 120
    template.save()
    power, kiosk, strict = (Group.objects.create(name=n) for n in ("power", "kiosk", "strict"))
    GroupPolicy.objects.create(group=power, idle_timeout=0)  # off
    GroupPolicy.objects.create(group=strict, idle_timeout=60)
    GroupPolicy.objects.create(group=kiosk, idle_timeout=60, idle_action="terminate")
    alice.groups.add(power, strict)
    bob.groups.add(kiosk)
    alices = running(alice, template, agent, since=3600)
    bobs = running(bob, template, agent, since=3600, idle_warned_at=ago(31))
    assert sweep_lifecycle() == {**NOTHING, "terminate": 1}
    assert Session.objects.get(pk=alices.pk).idle_warned_at is None
    bobs.refresh_from_db()
    assert bobs.state == State.TERMINATING and bobs.lifecycle_reason == "terminated after 1 min without input"


def test_the_environments_defaults_apply_and_zero_is_off(alice, template, agent, settings):
    settings.SESSION_IDLE_TIMEOUT = 120
    settings.SESSION_IDLE_ACTION = "terminate"
    by_default = running(alice, template, agent, since=100)
    assert sweep_lifecycle() == {**NOTHING, "warned": 1}
    by_default.refresh_from_db()
    assert by_default.idle_warned_at is not None

    template.idle_timeout = 0  # the template turns it off
    template.save()
    Session.objects.filter(pk=by_default.pk).update(idle_warned_at=ago(61), state_changed_at=ago(9999))
    assert sweep_lifecycle() == NOTHING
    assert Session.objects.get(pk=by_default.pk).state == State.RUNNING


@pytest.mark.parametrize(
    "raw, seconds",
    [("0", 0), ("45", 45), ("90s", 90), ("30m", 1800), ("30min", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400)],
)
def test_durations_in_the_environment_take_units(monkeypatch, raw, seconds):
    monkeypatch.setenv("SESSION_IDLE_TIMEOUT", raw)
    assert env_seconds("SESSION_IDLE_TIMEOUT", 0, minimum=0) == seconds


@pytest.mark.parametrize("raw", ["soon", "5 parsecs", "-1", "inf", "m"])
def test_junk_durations_stop_the_process_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("SESSION_MAX_LIFETIME", raw)
    with pytest.raises(ImproperlyConfigured, match="SESSION_MAX_LIFETIME"):
        env_seconds("SESSION_MAX_LIFETIME", 0, minimum=0)


def test_reasons_read_like_durations():
    assert [human_duration(s) for s in (8, 90, 1800, 28800, 5400)] == ["8 s", "1 min 30 s", "30 min", "8 h",
                                                                      "1 h 30 min"]  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_two_sweepers_at_once_act_once_on_each_session(alice, template):
    """Two real database connections in two threads, started together, sweep the same
    twenty due sessions: each is hibernated once, with one command and one event."""
    agent = make_agent()
    template.idle_timeout = 60
    template.save()
    due = [running(alice, template, agent, since=3600, idle_warned_at=ago(31)) for _ in range(20)]
    start = threading.Barrier(2)
    results, errors = [], []

    def sweeper():
        try:
            start.wait(10)
            results.append(sweep_lifecycle())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r["hibernate"] for r in results) == 20, results
    for session in due:
        assert Session.objects.get(pk=session.pk).state == State.HIBERNATING
        assert AgentCommand.objects.filter(session=session, type=AgentCommand.Type.HIBERNATE_SESSION).count() == 1
        assert SessionEvent.objects.filter(session=session, to_state=State.HIBERNATING).count() == 1
