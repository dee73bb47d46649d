"""The admin refuses JSON the database cannot store (issue 10: NUL on every field that
takes text): a NUL in a template's env, a session's tags or an agent's metadata was a 500
from PostgreSQL ("unsupported Unicode escape sequence"); now it is the form's own error."""

import pytest

from agents_app.models import Agent
from sessions_app.models import Session, Template

pytestmark = pytest.mark.django_db

TEMPLATE_FORM = {
    "slug": "nul", "name": "Nul", "description": "", "image": "img:1", "vnc_port": "5901",
    "default_cpu": "1", "default_memory_mb": "1024", "env": "{}", "volume_mount_path": "/home/user",
    "enabled": "on", "platform": "", "region": "", "egress": "internet", "egress_allow": "[]",
}  # fmt: skip


@pytest.mark.parametrize(
    "env",
    ['{"GREETING": "hi\\u0000there"}', '{"A\\u0000B": "x"}', "[" * 40 + "]" * 40],
    ids=["nul-value", "nul-key", "deep"],
)
def test_a_template_env_the_database_cannot_store_is_a_form_error(admin_client, env):
    response = admin_client.post("/admin/sessions_app/template/add/", {**TEMPLATE_FORM, "env": env})
    assert response.status_code == 200
    page = response.content.decode()
    assert "errorlist" in page and ("NUL" in page or "nested deeper" in page)
    assert not Template.objects.filter(slug="nul").exists()
    response = admin_client.post("/admin/sessions_app/template/add/", {**TEMPLATE_FORM, "env": '{"GREETING": "hi"}'})
    assert response.status_code == 302
    assert Template.objects.get(slug="nul").env == {"GREETING": "hi"}


def test_session_tags_and_agent_metadata_with_nul_are_form_errors(admin_client, alice, template):
    agent = Agent.objects.create(agent_id="a-1", platform="docker", token_hash="x", metadata={"rack": "r1"})
    session = Session.objects.create(owner=alice, template=template, agent=agent, cpu=1, memory_mb=512, tags=["ok"])

    response = admin_client.post(
        f"/admin/sessions_app/session/{session.pk}/change/", {"tags": '["a\\u0000b"]', "keep_home": ""}
    )
    assert response.status_code == 200 and "NUL" in response.content.decode()
    session.refresh_from_db()
    assert session.tags == ["ok"]

    response = admin_client.post(
        f"/admin/agents_app/agent/{agent.pk}/change/",
        {"agent_id": "a-1", "platform": "docker", "region": "", "metadata": '{"rack": "r\\u0000"}',
         "cpu_overcommit": "4", "memory_overcommit": "1.5"},
    )  # fmt: skip
    assert response.status_code == 200 and "NUL" in response.content.decode()
    agent.refresh_from_db()
    assert agent.metadata == {"rack": "r1"}
