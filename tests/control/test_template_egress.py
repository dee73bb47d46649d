"""A template's egress policy: validated in the admin with a field error, sent to the agent
in the create command, read back by the agent's SessionSpec."""

import pytest

from agent_clients.backends.base import SessionSpec
from agents_app.models import AgentCommand
from sessions_app import services
from sessions_app.models import Template

pytestmark = pytest.mark.django_db

ADD = "/admin/sessions_app/template/add/"


def form(**fields):
    data = {
        "slug": "locked",
        "name": "Locked",
        "description": "",
        "image": "streamspace/desktop:bookworm-3",
        "vnc_port": 5901,
        "default_cpu": 1.0,
        "default_memory_mb": 1024,
        "env": "{}",
        "volume_mount_path": "/home/user",
        "enabled": "on",
        "platform": "",
        "region": "",
        "egress": "internet",
        "egress_allow": "[]",
    }
    data.update(fields)
    return data


def test_a_bad_allow_entry_is_refused_with_a_field_error(admin_client):
    response = admin_client.post(ADD, form(egress_allow='["10.0.0.0/8", "example.com:443"]'))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["egress_allow"]
    assert "'example.com:443': expected an IPv4 address or CIDR" in errors["egress_allow"][0]
    assert not Template.objects.filter(slug="locked").exists()
    response = admin_client.post(ADD, form(egress="sometimes"))
    assert "egress" in response.context["adminform"].form.errors


def test_the_policy_reaches_the_agent(admin_client, alice, agent):
    response = admin_client.post(ADD, form(egress="none", egress_allow='["10.1.2.3/24:443", "8443"]'))
    assert response.status_code == 302, response.context["adminform"].form.errors
    session = services.session_create(user=alice, template_slug="locked")
    payload = AgentCommand.objects.get(session=session, type="create_session").payload
    assert payload["template"]["egress"] == "none"
    assert payload["template"]["egress_allow"] == ["10.1.2.0/24:443", "8443"]
    spec = SessionSpec.from_payload(str(session.pk), payload)
    assert (spec.egress, spec.egress_allow) == ("none", ("10.1.2.0/24:443", "8443"))


def test_templates_default_to_internet(template):
    assert template.as_payload()["egress"] == "internet" and template.as_payload()["egress_allow"] == []
