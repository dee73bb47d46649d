"""Lock order between an agent's answers and a user's actions, on real PostgreSQL.

Found by review: every agent answer first locks the agent's row (connection fencing),
then the session; a user's terminate locks the session, then inserts a command whose
foreign key needs a share lock on that same agent row. With a full row lock on the agent
the two waited on each other and PostgreSQL aborted one ("deadlock detected"): a 503 for
the user, or the agent's socket closed. Two real connections in two threads here."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction

from agents_app import services
from agents_app.models import Agent, AgentCommand
from sessions_app import services as session_services
from sessions_app.models import Session
from sessions_app.states import State
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db(transaction=True)


def _lock_waiters() -> int:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cur.fetchone()[0]


def test_an_agent_answer_and_a_users_terminate_on_the_same_session_never_deadlock(alice, template):
    agent = make_agent()
    Agent.objects.filter(pk=agent.pk).update(channel_name="socket-1")
    session = Session.objects.create(
        owner=alice, template=template, agent=agent, state=State.RUNNING, cpu=1, memory_mb=1024
    )
    agent_locked, user_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def agent_answer():
        try:
            with transaction.atomic():
                services.current_connection(agent_pk=agent.pk, channel_name="socket-1")
                agent_locked.set()
                # Let the user's terminate run until it is done or waits on a lock.
                deadline = time.monotonic() + 10
                while not user_done.is_set() and not _lock_waiters() and time.monotonic() < deadline:
                    time.sleep(0.02)
                Session.objects.select_for_update().get(pk=session.pk)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    def user_terminate():
        try:
            assert agent_locked.wait(10)
            session_services.session_terminate(session=session)
        except BaseException as exc:
            errors.append(exc)
        finally:
            user_done.set()
            connection.close()

    threads = [threading.Thread(target=agent_answer), threading.Thread(target=user_terminate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a transaction is still waiting"
    assert not errors, errors
    assert Session.objects.get(pk=session.pk).state == State.TERMINATING
    assert AgentCommand.objects.filter(session=session, type=AgentCommand.Type.TERMINATE_SESSION).count() == 1
