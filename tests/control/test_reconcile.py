"""session_reconcile for every (database state, reported state) pair, and the answers
around it: late results of given-up commands, void acks, retries, fencing."""

import itertools
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from agent_clients import protocol
from agents_app import services
from agents_app.models import Agent, AgentCommand
from agents_app.selectors import commands_to_deliver
from sessions_app import services as session_services
from sessions_app.models import Session
from sessions_app.states import State

pytestmark = pytest.mark.django_db

REPORTED = sorted(protocol.REPORTED_STATES | {"missing"})
FINISHED = (State.FAILED, State.TERMINATED)
WAITING = (State.PENDING, State.STARTING, State.HIBERNATING, State.WAKING, State.TERMINATING)
SOCKET = "socket-1"

# The expected outcome of every pair: a state, "cleanup" (a terminate command, state kept),
# "hibernate" (a hibernate command, state kept) or None (nothing changes).
EXPECTED = {}
for state, reported in itertools.product(State.ALL, REPORTED):
    if state in WAITING:
        outcome = None  # a command is in flight: its answer settles the state
    elif state in FINISHED:
        outcome = None if reported == "missing" else "cleanup"
    elif state == State.RUNNING:
        outcome = {"running": None, "starting": None, "hibernated": State.HIBERNATED}.get(reported, State.FAILED)
    elif state == State.HIBERNATED:
        outcome = {
            "running": "hibernate",
            "starting": "hibernate",
            "failed": State.FAILED,
            "missing": State.FAILED,
        }.get(reported)
    else:  # degraded
        outcome = {
            "running": State.RUNNING,
            "starting": None,
            "hibernated": State.HIBERNATED,
            "stopped": State.HIBERNATED,
            "failed": State.FAILED,
            "missing": State.FAILED,
        }[reported]
    EXPECTED[state, reported] = outcome


@pytest.fixture
def agent(db):
    from tests.conftest import make_agent

    agent = make_agent()
    Agent.objects.filter(pk=agent.pk).update(channel_name=SOCKET)
    return agent


def session_on(agent, owner, template, state, **fields):
    return Session.objects.create(
        owner=owner, template=template, agent=agent, cpu=1, memory_mb=64, state=state, **fields
    )


def command_for(session, type_="create_session", status="pending", **fields):
    fields.setdefault("deadline", timezone.now() + timedelta(minutes=5))
    return AgentCommand.objects.create(agent=session.agent, session=session, type=type_, status=status, **fields)


def test_the_table_names_every_pair():
    for state, reported in itertools.product(State.ALL, REPORTED):
        session_services.reconcile_action(state, reported)  # KeyError if a pair is missing


@pytest.mark.parametrize("state,reported", list(itertools.product(State.ALL, REPORTED)))
def test_every_pair_of_database_and_reported_state(alice, template, agent, state, reported):
    session = session_on(agent, alice, template, state)
    session_services.session_reconcile(
        session=session, reported=reported, endpoint={"vnc_host": "127.0.0.1", "vnc_port": 6001}
    )
    after = Session.objects.get(pk=session.pk)
    commands = list(AgentCommand.objects.filter(session=session).values_list("type", flat=True))
    expected = EXPECTED[state, reported]
    if expected == "cleanup":
        assert after.state == state, "a finished session is never resurrected"
        assert commands == ["terminate_session"]
    elif expected == "hibernate":
        assert after.state == state and commands == ["hibernate_session"]
    else:
        assert after.state == (expected or state)
        assert commands == []
    if expected == State.RUNNING:
        assert after.vnc_port == 6001
    if expected == State.FAILED:
        assert after.error_message


def test_a_cleanup_is_not_queued_twice(alice, template, agent):
    session = session_on(agent, alice, template, State.FAILED)
    for _ in range(3):
        session_services.session_reconcile(session=session, reported="running")
    assert AgentCommand.objects.filter(session=session, type="terminate_session").count() == 1


def test_a_late_create_of_a_failed_session_is_recorded_and_cleaned_up(alice, template, agent):
    session = session_on(agent, alice, template, State.FAILED, error_message="did not acknowledge")
    create = command_for(session, status="failed", error_message="did not acknowledge create session after 3 attempts")
    assert services.command_ack(agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id).startswith(
        "the control plane gave up"
    )
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, result={"state": "running"}
    )
    create.refresh_from_db()
    assert create.status == "completed" and "completed late" in create.error_message
    assert Session.objects.get(pk=session.pk).state == State.FAILED
    cleanup = AgentCommand.objects.get(session=session, type="terminate_session")
    assert cleanup.payload == {"keep_home": False, "cleanup": True}, "a create that never ran leaves nothing to keep"
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=cleanup.command_id, result={"state": "terminated"}
    )
    after = Session.objects.get(pk=session.pk)
    assert after.state == State.FAILED and after.error_message == "did not acknowledge", "the user still sees why"


def test_the_cleanup_of_a_failed_session_that_ran_keeps_its_home(alice, template, agent):
    session = session_on(agent, alice, template, State.FAILED, started_at=timezone.now(), error_message="lost")
    session_services.session_reconcile(session=session, reported="hibernated")
    cleanup = AgentCommand.objects.get(session=session, type="terminate_session")
    assert cleanup.payload == {"keep_home": True, "cleanup": True}


def test_a_failed_wake_leaves_the_desktop_hibernated_with_its_home(alice, template, agent):
    """Found by review: a wake that failed (or timed out while the agent was away) made the
    session failed, and its home was then removed as a failed session's leftover."""
    session = session_on(agent, alice, template, State.WAKING, started_at=timezone.now())
    wake = command_for(session, type_="wake_session", status="acked")
    services.command_fail(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=wake.command_id, error="no room", retryable=False,
        max_attempts=3,
    )  # fmt: skip
    after = Session.objects.get(pk=session.pk)
    assert after.state == State.HIBERNATED and "wake session failed: no room" in after.error_message
    assert not AgentCommand.objects.filter(session=session, type="terminate_session").exists()


def test_a_wake_that_timed_out_leaves_the_desktop_hibernated(alice, template, agent):
    from agents_app.sweeps import sweep_commands

    session = session_on(agent, alice, template, State.WAKING, started_at=timezone.now())
    command_for(session, type_="wake_session", status="pending", deadline=timezone.now() - timedelta(seconds=1))
    sweep_commands()
    assert Session.objects.get(pk=session.pk).state == State.HIBERNATED


def test_a_users_terminate_that_went_through_late_terminates_the_session(alice, template, agent):
    session = session_on(agent, alice, template, State.FAILED, error_message="terminate session failed: no answer")
    terminate = command_for(session, type_="terminate_session", status="timed_out", payload={"keep_home": False})
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=terminate.command_id, result={"state": "terminated"}
    )
    assert Session.objects.get(pk=session.pk).state == State.TERMINATED


def test_a_cleanup_that_went_through_late_leaves_the_session_failed(alice, template, agent):
    session = session_on(agent, alice, template, State.FAILED, started_at=timezone.now(), error_message="lost")
    cleanup = command_for(
        session, type_="terminate_session", status="timed_out", payload={"keep_home": True, "cleanup": True}
    )
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=cleanup.command_id, result={"state": "terminated"}
    )
    assert Session.objects.get(pk=session.pk).state == State.FAILED


def test_a_late_hibernate_makes_the_session_hibernated(alice, template, agent):
    session = session_on(agent, alice, template, State.RUNNING, error_message="hibernate session failed: ...")
    hibernate = command_for(session, type_="hibernate_session", status="failed")
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=hibernate.command_id, result={"state": "hibernated"}
    )
    assert Session.objects.get(pk=session.pk).state == State.HIBERNATED


def test_a_late_failure_of_a_given_up_command_queries_the_session(alice, template, agent):
    session = session_on(agent, alice, template, State.RUNNING)
    hibernate = command_for(session, type_="hibernate_session", status="timed_out")
    services.command_fail(
        agent_pk=agent.pk,
        channel_name=SOCKET,
        command_id=hibernate.command_id,
        error="boom",
        retryable=False,
        max_attempts=3,
    )
    assert AgentCommand.objects.get(session=session, type="get_session").status == "pending"


@override_settings(COMMAND_RETRY_BACKOFF_BASE=2, COMMAND_RETRY_BACKOFF_CAP=3)
def test_a_retryable_failure_is_a_fresh_execution_after_the_backoff(alice, template, agent):
    session = session_on(agent, alice, template, State.STARTING)
    create = command_for(session, status="acked", attempts=1)
    before = timezone.now()
    services.command_fail(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, error="busy", retryable=True,
        max_attempts=3,
    )  # fmt: skip
    create.refresh_from_db()
    assert (create.status, create.execution) == ("pending", 2)
    assert before + timedelta(seconds=2) <= create.not_before <= timezone.now() + timedelta(seconds=2)
    # not delivered before its time, and it holds back the session's later commands
    later = command_for(session, type_="terminate_session")
    assert commands_to_deliver(agent_pk=agent.pk) == []
    # an answer of the old execution changes nothing; its ack is void
    assert "execution 1 is over" in services.command_ack(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, execution=1
    )
    services.command_complete(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, result={"state": "running"}, execution=1
    )
    assert AgentCommand.objects.get(pk=create.pk).status == "pending"
    AgentCommand.objects.filter(pk=create.pk).update(not_before=timezone.now())
    assert commands_to_deliver(agent_pk=agent.pk) == [create]
    # the second failure waits twice as long, capped
    AgentCommand.objects.filter(pk=create.pk).update(status="acked", attempts=2)
    services.command_fail(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, error="busy", retryable=True,
        max_attempts=3, execution=2,
    )  # fmt: skip
    create.refresh_from_db()
    assert create.execution == 3 and create.not_before >= timezone.now() + timedelta(seconds=2.5)
    assert later.pk != create.pk


def test_a_permanent_failure_fails_at_once(alice, template, agent):
    session = session_on(agent, alice, template, State.STARTING)
    create = command_for(session, status="acked", attempts=1)
    services.command_fail(
        agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, error="no image", retryable=False,
        max_attempts=3,
    )  # fmt: skip
    create.refresh_from_db()
    assert (create.status, create.execution) == ("failed", 1)
    assert Session.objects.get(pk=session.pk).state == State.FAILED


def test_no_answer_from_a_replaced_socket_is_accepted(alice, template, agent):
    session = session_on(agent, alice, template, State.PENDING)
    create = command_for(session, status="sent")
    services.agent_attach(agent_pk=agent.pk, channel_name="socket-2")
    hello = {"platform": "docker", "capacity": {}, "version": "1", "sessions": []}
    beat = {"capacity": {}, "sessions": [], "status": "online"}
    for call in (
        lambda: services.command_ack(agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id),
        lambda: services.command_complete(
            agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, result={"state": "running"}
        ),
        lambda: services.command_fail(
            agent_pk=agent.pk, channel_name=SOCKET, command_id=create.command_id, error="x", retryable=False,
            max_attempts=3,
        ),
        lambda: services.session_event(
            agent_pk=agent.pk, channel_name=SOCKET, payload={"session_id": str(session.pk), "state": "failed"}
        ),
        lambda: services.agent_heartbeat(agent_pk=agent.pk, channel_name=SOCKET, payload=beat),
        lambda: services.agent_hello(agent_pk=agent.pk, channel_name=SOCKET, payload=hello),
    ):  # fmt: skip
        with pytest.raises(services.Superseded):
            call()
    assert AgentCommand.objects.get(pk=create.pk).status == "sent"
    assert Session.objects.get(pk=session.pk).state == State.PENDING
    # the current socket is heard
    services.command_ack(agent_pk=agent.pk, channel_name="socket-2", command_id=create.command_id)
    assert AgentCommand.objects.get(pk=create.pk).status == "acked"


def test_hello_cleans_up_what_it_reports_for_a_finished_session(alice, template, agent):
    failed = session_on(agent, alice, template, State.FAILED)
    gone = session_on(agent, alice, template, State.TERMINATED)
    hello = {
        "platform": "docker",
        "capacity": {},
        "version": "1",
        "sessions": [{"session_id": str(failed.pk), "state": "running"}],
    }
    services.agent_hello(agent_pk=agent.pk, channel_name=SOCKET, payload=hello)
    assert AgentCommand.objects.get(session=failed).type == "terminate_session"
    assert not AgentCommand.objects.filter(session=gone).exists()
    assert Session.objects.get(pk=failed.pk).state == State.FAILED
