"""Every state change of a session lands on its timeline (SessionEvent), with the reason:
what the staff's session page and the lifecycle policies build on."""

import pytest

from agents_app.models import AgentCommand
from sessions_app import services
from sessions_app.models import SessionEvent
from sessions_app.states import IllegalTransition

pytestmark = pytest.mark.django_db


def test_a_sessions_life_is_on_its_timeline_in_order_with_reasons(alice, template, agent):
    session = services.session_create(user=alice, template_slug=template.slug)
    create = AgentCommand.objects.get(session=session, type=AgentCommand.Type.CREATE_SESSION)
    services.session_on_create_acked(command=create)
    services.session_on_command_completed(command=create, result={"vnc_host": "127.0.0.1", "vnc_port": 5901})
    session.refresh_from_db()
    services.session_degrade(session=session, reason="agent a-1 stopped sending heartbeats")
    session.refresh_from_db()
    services.session_terminate(session=session)

    events = list(SessionEvent.objects.filter(session=session).values_list("from_state", "to_state", "reason"))
    assert events == [
        ("", "pending", f"launched on {agent.agent_id}"),
        ("pending", "starting", ""),
        ("starting", "running", ""),
        ("running", "degraded", "agent a-1 stopped sending heartbeats"),
        ("degraded", "terminating", ""),
    ]


def test_a_refused_transition_leaves_no_event(alice, template, agent):
    session = services.session_create(user=alice, template_slug=template.slug)
    with pytest.raises(IllegalTransition):  # pending cannot hibernate
        services.session_hibernate(session=session)
    assert SessionEvent.objects.filter(session=session).count() == 1


def test_staff_see_the_timeline_on_the_sessions_admin_page(admin_client, alice, template, agent):
    session = services.session_create(user=alice, template_slug=template.slug)
    page = admin_client.get(f"/admin/sessions_app/session/{session.pk}/change/").content.decode()
    assert f"launched on {agent.agent_id}" in page and "pending" in page
