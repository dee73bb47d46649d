"""The sweeps as plain functions on PostgreSQL (the Celery-driven runs are in tests/channel)."""

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from agents_app import sweeps
from agents_app.models import Agent, AgentCommand
from agents_app.services import command_complete
from sessions_app.models import Session
from sessions_app.states import State
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db


def session_on(agent, owner, template, state):
    return Session.objects.create(owner=owner, template=template, agent=agent, cpu=1, memory_mb=64, state=state)


def command_for(session, type_="create_session", status="pending", **fields):
    fields.setdefault("deadline", timezone.now() + timedelta(minutes=5))
    return AgentCommand.objects.create(agent=session.agent, session=session, type=type_, status=status, **fields)


def connected(agent) -> str:
    """Give the agent a current socket (answers are accepted only from it) and return its name."""
    Agent.objects.filter(pk=agent.pk).update(channel_name="test-socket")
    return "test-socket"


def test_silent_agents_go_offline_and_only_their_running_sessions_degrade(alice, template):
    silent, live = make_agent("silent"), make_agent("live")
    Agent.objects.filter(pk=silent.pk).update(last_heartbeat=timezone.now() - timedelta(minutes=2))
    running = session_on(silent, alice, template, State.RUNNING)
    hibernated = session_on(silent, alice, template, State.HIBERNATED)
    elsewhere = session_on(live, alice, template, State.RUNNING)
    assert sweeps.sweep_silent_agents() == {"agents_offline": 1, "sessions_degraded": 1}
    assert Agent.objects.get(pk=silent.pk).status == "offline"
    assert Agent.objects.get(pk=live.pk).status == "online"
    assert Session.objects.get(pk=running.pk).state == State.DEGRADED
    assert Session.objects.get(pk=hibernated.pk).state == State.HIBERNATED
    assert Session.objects.get(pk=elsewhere.pk).state == State.RUNNING
    assert sweeps.sweep_silent_agents() == {"agents_offline": 0, "sessions_degraded": 0}  # idempotent


def test_a_command_past_its_deadline_times_out_and_fails_its_session(alice, template, agent):
    session = session_on(agent, alice, template, State.STARTING)
    command = command_for(
        session, status="acked", deadline=timezone.now() - timedelta(seconds=1),
        sent_at=timezone.now() - timedelta(minutes=5),
    )  # fmt: skip
    AgentCommand.objects.filter(pk=command.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    assert sweeps.sweep_commands()["timed_out"] == 1
    command.refresh_from_db()
    session.refresh_from_db()
    assert command.status == "timed_out" and "no answer from the agent" in command.error_message
    assert session.state == State.FAILED and "no answer from the agent" in session.error_message
    # a late answer: the command did complete, the session stays failed and its container is removed
    command_complete(
        agent_pk=agent.pk, channel_name=connected(agent), command_id=command.command_id, result={"state": "running"}
    )
    assert Session.objects.get(pk=session.pk).state == State.FAILED
    command.refresh_from_db()
    assert command.status == "completed" and "completed late" in command.error_message
    assert AgentCommand.objects.get(session=session, type="terminate_session").status == "pending"


@override_settings(COMMAND_ACK_TIMEOUT=5, COMMAND_MAX_ATTEMPTS=2)
def test_unacknowledged_commands_are_redelivered_until_the_limit(alice, template, agent):
    session = session_on(agent, alice, template, State.PENDING)
    command = command_for(session, status="sent", attempts=1, sent_at=timezone.now() - timedelta(seconds=10))
    assert sweeps.sweep_commands()["redelivered"] == 1
    assert AgentCommand.objects.get(pk=command.pk).status == "pending"
    AgentCommand.objects.filter(pk=command.pk).update(
        status="sent", attempts=2, sent_at=timezone.now() - timedelta(seconds=10)
    )
    assert sweeps.sweep_commands()["failed"] == 1
    assert "after 2 attempts" in Session.objects.get(pk=session.pk).error_message


@override_settings(SESSION_STUCK_AFTER=60)
def test_a_stuck_session_is_requeried_and_the_answer_settles_it(alice, template, agent):
    stuck = session_on(agent, alice, template, State.STARTING)
    busy = session_on(agent, alice, template, State.STARTING)
    fresh = session_on(agent, alice, template, State.STARTING)
    old = timezone.now() - timedelta(minutes=5)
    Session.objects.filter(pk__in=[stuck.pk, busy.pk]).update(state_changed_at=old)
    command_for(busy, status="acked")  # something is still in flight for it
    assert sweeps.sweep_stuck_sessions() == {"requeried": 1}
    query = AgentCommand.objects.get(session=stuck, type="get_session")
    assert not AgentCommand.objects.filter(session__in=[busy, fresh], type="get_session").exists()
    assert sweeps.sweep_stuck_sessions() == {"requeried": 0}  # the query is in flight now
    command_complete(
        agent_pk=agent.pk, channel_name=connected(agent), command_id=query.command_id,
        result={"session_id": str(stuck.pk), "state": "running", "vnc_host": "127.0.0.1", "vnc_port": 5999},
    )  # fmt: skip
    stuck.refresh_from_db()
    assert stuck.state == State.RUNNING and stuck.vnc_port == 5999


@pytest.mark.parametrize(
    "state,reported,expected",
    [
        (State.HIBERNATING, "hibernated", State.HIBERNATED),
        (State.TERMINATING, "missing", State.TERMINATED),
        (State.WAKING, "missing", State.FAILED),
        (State.PENDING, "failed", State.FAILED),
    ],
)
def test_a_get_session_answer_settles_each_transitional_state(alice, template, agent, state, reported, expected):
    session = session_on(agent, alice, template, state)
    query = command_for(session, type_="get_session", status="acked")
    command_complete(
        agent_pk=agent.pk, channel_name=connected(agent), command_id=query.command_id, result={"state": reported}
    )
    assert Session.objects.get(pk=session.pk).state == expected
