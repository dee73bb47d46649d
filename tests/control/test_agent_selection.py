"""Which agent a new session lands on."""

import pytest
from django.utils import timezone

from agents_app.models import Agent
from agents_app.selectors import agent_select_for_session
from sessions_app.models import Session
from sessions_app.states import State
from streamspace.errors import NoAgentAvailable
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db


def occupy(agent, owner, template, n=1, cpu=1.0, memory_mb=512, state=State.RUNNING):
    for _ in range(n):
        Session.objects.create(owner=owner, template=template, agent=agent, cpu=cpu, memory_mb=memory_mb, state=state)


def test_it_prefers_the_agent_with_the_most_free_session_slots(alice, template):
    busy = make_agent("busy", max_sessions=4)
    make_agent("idle", max_sessions=4)
    occupy(busy, alice, template, n=2)
    assert agent_select_for_session(cpu=1, memory_mb=512).agent_id == "idle"


def test_ties_on_slots_break_on_free_cpu_then_memory(alice, template):
    a = make_agent("a", cpu=4, memory_mb=8192, max_sessions=10)
    b = make_agent("b", cpu=8, memory_mb=4096, max_sessions=10)
    assert agent_select_for_session(cpu=1, memory_mb=512).agent_id == "b"
    occupy(b, alice, template, cpu=6, state=State.HIBERNATED)  # hibernated: uses a slot but no CPU
    occupy(a, alice, template, cpu=0.5)
    assert agent_select_for_session(cpu=1, memory_mb=512).agent_id == "b"


def test_an_agent_without_room_for_the_request_is_skipped(alice, template):
    make_agent("small", cpu=2, memory_mb=1024, max_sessions=10)
    make_agent("big", cpu=16, memory_mb=65536, max_sessions=1)
    assert agent_select_for_session(cpu=4, memory_mb=512).agent_id == "big"
    assert agent_select_for_session(cpu=1, memory_mb=4096).agent_id == "big"
    occupy(Agent.objects.get(agent_id="big"), alice, template)
    with pytest.raises(NoAgentAvailable):
        agent_select_for_session(cpu=4, memory_mb=512)


def test_terminated_and_failed_sessions_free_their_slot(alice, template):
    a = make_agent("a", max_sessions=1)
    occupy(a, alice, template, state=State.TERMINATED)
    occupy(a, alice, template, state=State.FAILED)
    assert agent_select_for_session(cpu=1, memory_mb=512) == a


def test_it_filters_on_platform_and_region(db):
    make_agent("d-eu", platform="docker", region="eu")
    make_agent("k-eu", platform="kubernetes", region="eu")
    make_agent("k-us", platform="kubernetes", region="us")
    assert agent_select_for_session(cpu=1, memory_mb=512, platform="kubernetes", region="us").agent_id == "k-us"
    assert agent_select_for_session(cpu=1, memory_mb=512, platform="docker").agent_id == "d-eu"
    with pytest.raises(NoAgentAvailable) as exc:
        agent_select_for_session(cpu=1, memory_mb=512, platform="docker", region="us")
    assert "platform=docker region=us" in str(exc.value)


def test_offline_draining_and_silent_agents_are_ignored(db):
    make_agent("off", online=False)
    make_agent("draining").__class__.objects.filter(agent_id="draining").update(status=Agent.Status.DRAINING)
    silent = make_agent("silent")
    Agent.objects.filter(pk=silent.pk).update(last_heartbeat=timezone.now() - timezone.timedelta(minutes=5))
    with pytest.raises(NoAgentAvailable):
        agent_select_for_session(cpu=1, memory_mb=512)
    make_agent("live")
    assert agent_select_for_session(cpu=1, memory_mb=512).agent_id == "live"


def test_template_restrictions_route_the_session(as_alice, db):
    from sessions_app.models import Template

    Template.objects.create(slug="k8s-only", name="K", image="x:1", platform="kubernetes")
    make_agent("d", platform="docker")
    make_agent("k", platform="kubernetes")
    body = as_alice.post("/api/v1/sessions", {"template": "k8s-only"}, format="json").json()
    assert body["agent_id"] == "k" and body["platform"] == "kubernetes"
