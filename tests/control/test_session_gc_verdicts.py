"""The garbage collector's verdicts (sessions_app.selectors.session_gc_verdicts).

Found by a review: the collector removed every object of this agent whose session was not
live on the control plane: other installs' desktops on a shared host (ids this control
plane never made) and the homes of failed sessions. A verdict now exists only for the
agent's own sessions the control plane knows, and a failed session that had run keeps its
home."""

import uuid

import pytest
from django.utils import timezone

from sessions_app.models import Session
from sessions_app.selectors import session_gc_verdicts
from sessions_app.states import LIVE_STATES, State
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db


@pytest.fixture
def session_of(alice, template):
    def make(agent, state, *, ran=False, keep_home=False) -> str:
        s = Session.objects.create(
            owner=alice,
            template=template,
            agent=agent,
            state=state,
            cpu=1,
            memory_mb=64,
            keep_home=keep_home,
            started_at=timezone.now() if ran else None,
        )
        return str(s.pk)

    return make


def test_every_live_state_keeps_everything(agent, session_of):
    ids = [session_of(agent, state, ran=True) for state in sorted(LIVE_STATES)]
    verdicts = session_gc_verdicts(agent_pk=agent.pk, session_ids=ids)
    assert sorted(verdicts["live"]) == sorted(ids)
    assert verdicts["remove"] == verdicts["remove_keep_home"] == []


@pytest.mark.parametrize(
    "state, ran, keep_home, verdict",
    [
        (State.FAILED, True, False, "remove_keep_home"),  # a desktop that died, a wake that failed
        (State.FAILED, True, True, "remove_keep_home"),
        (State.FAILED, False, False, "remove"),  # a failed create: nothing of value
        (State.FAILED, False, True, "remove"),
        (State.TERMINATED, True, False, "remove"),
        (State.TERMINATED, False, False, "remove"),
        (State.TERMINATED, True, True, "remove_keep_home"),  # the home the user asked to keep
    ],
)
def test_finished_sessions(agent, session_of, state, ran, keep_home, verdict):
    sid = session_of(agent, state, ran=ran, keep_home=keep_home)
    verdicts = session_gc_verdicts(agent_pk=agent.pk, session_ids=[sid])
    assert verdicts == {"live": [], "remove": [], "remove_keep_home": [], verdict: [sid]}


def test_unknown_ids_and_another_agents_sessions_get_no_verdict(agent, session_of):
    """A session of another install (an id never made here), an id that is no UUID at all,
    and another agent's sessions in every state: in no list, so left alone."""
    other = make_agent("agent-2")
    others = [session_of(other, state, ran=True) for state in State.ALL]
    mine = session_of(agent, State.TERMINATED)
    ids = [str(uuid.uuid4()), "not-a-uuid", *others, mine]
    assert session_gc_verdicts(agent_pk=agent.pk, session_ids=ids) == {
        "live": [],
        "remove": [mine],
        "remove_keep_home": [],
    }


def test_no_ids_no_query(agent, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert session_gc_verdicts(agent_pk=agent.pk, session_ids=[]) == {
            "live": [],
            "remove": [],
            "remove_keep_home": [],
        }
