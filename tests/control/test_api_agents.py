"""Agent registration (bootstrap secret) and the staff agent endpoints."""

import pytest
from django.test import override_settings

from agents_app.models import Agent
from agents_app.services import hash_token
from sessions_app.models import Session
from sessions_app.states import State
from tests.conftest import make_agent

pytestmark = pytest.mark.django_db

BOOTSTRAP = "bootstrap-secret-for-tests"


@pytest.fixture(autouse=True)
def _bootstrap():
    with override_settings(AGENT_BOOTSTRAP_TOKEN=BOOTSTRAP):
        yield


def register(client, secret=BOOTSTRAP, **body):
    body.setdefault("agent_id", "docker-eu-1")
    body.setdefault("platform", "docker")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}"} if secret else {}
    return client.post("/api/v1/agents/register", body, content_type="application/json", **headers)


def test_it_registers_an_agent_and_returns_its_token_once(client):
    response = register(client, region="eu-west", capacity={"cpu": 4, "memory_mb": 8192, "max_sessions": 5})
    assert response.status_code == 201
    body = response.json()
    assert body["agent_id"] == "docker-eu-1" and body["region"] == "eu-west" and body["status"] == "offline"
    token = body["token"]
    assert token.startswith("ssa_") and len(token) > 40
    agent = Agent.objects.get(agent_id="docker-eu-1")
    assert agent.token_hash == hash_token(token) and token not in agent.token_hash


def test_a_duplicate_agent_id_is_a_409(client):
    register(client)
    response = register(client)
    assert response.status_code == 409 and response.json()["error"] == "conflict"
    assert Agent.objects.count() == 1


def test_the_agent_itself_may_register_again_with_its_token(client):
    token = register(client).json()["token"]
    response = register(client, region="moved", agent_token=token)
    assert response.status_code == 200
    assert "token" not in response.json()
    assert Agent.objects.get().region == "moved"
    assert register(client, agent_token="ssa_wrong").status_code == 409


@pytest.mark.parametrize("platform", ["openstack", "", "DOCKER"])
def test_an_unknown_platform_is_a_400(client, platform):
    response = register(client, platform=platform)
    assert response.status_code == 400
    assert Agent.objects.count() == 0


@pytest.mark.parametrize("agent_id", ["has space", "semi;colon", "x" * 256])
def test_a_bad_agent_id_is_a_400(client, agent_id):
    assert register(client, agent_id=agent_id).status_code == 400
    assert Agent.objects.count() == 0


@pytest.mark.parametrize("secret", ["wrong", None])
def test_a_wrong_or_missing_bootstrap_secret_is_a_401(client, secret):
    response = register(client, secret=secret)
    assert response.status_code == 401
    assert "bootstrap" in response.json()["detail"]
    assert Agent.objects.count() == 0


def test_registration_is_off_without_a_bootstrap_secret(client):
    with override_settings(AGENT_BOOTSTRAP_TOKEN=""):
        response = register(client, secret="anything")
    assert response.status_code == 403 and Agent.objects.count() == 0


def test_agents_list_is_for_staff_only(as_alice, as_carol):
    make_agent("a")
    assert as_alice.get("/api/v1/agents").status_code == 403
    assert [a["agent_id"] for a in as_carol.get("/api/v1/agents").json()] == ["a"]


def test_agents_list_filters_by_platform_status_and_region(as_carol):
    make_agent("d-eu", platform="docker", region="eu")
    make_agent("k-us", platform="kubernetes", region="us")
    make_agent("d-us-off", platform="docker", region="us", online=False)

    def ids(query):
        return sorted(a["agent_id"] for a in as_carol.get(f"/api/v1/agents?{query}").json())

    assert ids("platform=docker") == ["d-eu", "d-us-off"]
    assert ids("status=online") == ["d-eu", "k-us"]
    assert ids("region=us") == ["d-us-off", "k-us"]
    assert ids("platform=docker&region=us") == ["d-us-off"]


def test_agent_detail_shows_its_live_sessions(as_carol, alice, template):
    agent = make_agent("a")
    Session.objects.create(owner=alice, template=template, agent=agent, cpu=1, memory_mb=512, state=State.RUNNING)
    Session.objects.create(owner=alice, template=template, agent=agent, cpu=1, memory_mb=512, state=State.TERMINATED)
    body = as_carol.get("/api/v1/agents/a").json()
    assert body["agent_id"] == "a" and body["active_sessions"] == 1
    assert "token_hash" not in body and "token" not in body
    assert as_carol.get("/api/v1/agents/nope").status_code == 404


def test_deleting_an_agent_with_live_sessions_is_refused(as_carol, alice, template):
    agent = make_agent("a")
    Session.objects.create(owner=alice, template=template, agent=agent, cpu=1, memory_mb=512, state=State.HIBERNATED)
    response = as_carol.delete("/api/v1/agents/a")
    assert response.status_code == 409 and "live sessions" in response.json()["detail"]
    assert Agent.objects.filter(agent_id="a").exists()


def test_deleting_an_idle_agent(as_carol, as_alice):
    make_agent("a")
    assert as_alice.delete("/api/v1/agents/a").status_code == 403
    assert as_carol.delete("/api/v1/agents/a").status_code == 204
    assert not Agent.objects.filter(agent_id="a").exists()
