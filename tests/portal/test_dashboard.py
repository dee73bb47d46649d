"""The staff dashboard (/dashboard/): who may see it, the numbers on its cards for a known
set of rows, the agents and sessions tables and their filters, the agent and session
pages (the timeline), every action through its confirmation page and the services, and a
number of queries that does not grow with the rows."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from agents_app.models import Agent, AgentCommand
from sessions_app.models import Session, SessionEvent, Template
from sessions_app.states import State
from tests.conftest import make_agent
from tests.portal.conftest import page
from vnc_app.models import VNCConnection

pytestmark = pytest.mark.django_db


def stat(html: str, name: str) -> str:
    match = re.search(rf'data-stat="{re.escape(name)}">([^<]*)<', html)
    assert match, f"no card figure {name}"
    return match.group(1).strip()


def rows(html: str, attribute: str) -> list[str]:
    return re.findall(rf'<tr {attribute}="([^"]+)"', html)


def session_row(owner, template, agent, state, *, cpu=1.0, memory_mb=1024, **fields) -> Session:
    return Session.objects.create(
        owner=owner,
        template=template,
        agent=agent,
        platform=agent.platform if agent else "",
        region=agent.region if agent else "",
        state=state,
        cpu=cpu,
        memory_mb=memory_mb,
        **fields,
    )


@pytest.fixture
def fleet(alice, bob, template):
    """Three agents (two online docker in eu and us, one offline kubernetes) and sessions
    of alice and bob in known states."""
    eu = make_agent("docker-eu", region="eu", cpu=8, memory_mb=16384)
    us = make_agent("docker-us", region="us", cpu=4, memory_mb=8192)
    k8s = make_agent("k8s-eu", platform="kubernetes", region="eu", online=False)
    other = Template.objects.create(slug="office", name="Office", image="img:office")
    sessions = {
        "alice-running": session_row(alice, template, eu, State.RUNNING, cpu=2.0, memory_mb=2048),
        "alice-hibernated": session_row(alice, template, eu, State.HIBERNATED),
        "bob-running": session_row(bob, other, us, State.RUNNING, cpu=1.5, memory_mb=1024),
        "bob-starting": session_row(bob, template, eu, State.STARTING, cpu=0.5, memory_mb=512),
        "bob-terminated": session_row(bob, template, us, State.TERMINATED),
        "alice-failed": session_row(alice, template, k8s, State.FAILED),
    }
    return {"eu": eu, "us": us, "k8s": k8s, "sessions": sessions}


# --- who may see it ---------------------------------------------------------------------

DASHBOARD_URLS = ["/dashboard/", "/dashboard/live", "/dashboard/sessions/", "/dashboard/agents/docker-eu/"]


@pytest.mark.parametrize("url", DASHBOARD_URLS)
def test_a_plain_user_gets_403_and_anyone_logged_out_the_login_page(url, client, alice_client, fleet):
    assert alice_client.get(url).status_code == 403
    response = client.get(url)
    assert response.status_code == 302 and response.url.startswith("/accounts/login/?next=")


def test_plain_users_cannot_act_either(alice_client, fleet):
    eu, session = fleet["eu"], fleet["sessions"]["bob-running"]
    assert alice_client.post("/dashboard/agents/docker-eu/drain").status_code == 403
    assert alice_client.post(f"/dashboard/sessions/{session.pk}/terminate").status_code == 403
    eu.refresh_from_db()
    session.refresh_from_db()
    assert not eu.drain_requested and session.state == State.RUNNING


def test_the_header_links_the_dashboard_for_staff_only(alice_client, carol_client):
    assert 'href="/dashboard/"' in page(carol_client.get("/"))
    assert 'href="/dashboard/"' not in page(alice_client.get("/"))


# --- the cards --------------------------------------------------------------------------


def test_the_cards_count_the_known_rows(carol_client, fleet, alice):
    connection = VNCConnection.objects.create(session=fleet["sessions"]["alice-running"], user=alice)
    VNCConnection.objects.create(session=connection.session, user=alice, closed_at=timezone.now())
    html = page(carol_client.get("/dashboard/"))
    assert stat(html, "agents_online") == "2" and stat(html, "agents_total") == "3"
    assert stat(html, "sessions_live") == "4"  # running x2, hibernated, starting
    assert stat(html, "sessions_running") == "2" and stat(html, "sessions_hibernated") == "1"
    assert stat(html, "sessions_terminated") == "1" and stat(html, "sessions_failed") == "1"
    assert stat(html, "users_active") == "2"  # alice and bob have a desktop running or starting
    assert stat(html, "viewers_open") == "1"
    # docker: 2 + 1.5 + 0.5 CPU reserved (the hibernated one holds none) of (8 + 4) x 4 offered
    assert stat(html, "cpu_docker") == "4 / 48"
    assert stat(html, "memory_docker") == "3584 / 36864"  # (16384 + 8192) x 1.5
    assert 'data-stat="cpu_kubernetes"' not in html  # offline, nothing reserved: not listed


def test_a_session_stored_below_the_minimum_is_reserved_as_the_scheduler_charges_it(carol_client, fleet, alice):
    """Found by review: the card summed raw CPU while placement charges at least
    SESSION_MIN_CPU (0.1) and SESSION_MIN_MEMORY_MB (64), so old sub-minimum sessions made the
    fleet look emptier than the scheduler sees it. One rule now (sessions_app.limits)."""
    eu = fleet["sessions"]["alice-running"].agent
    session_row(alice, fleet["sessions"]["alice-running"].template, eu, State.RUNNING, cpu=1e-10, memory_mb=1)
    html = page(carol_client.get("/dashboard/"))
    assert stat(html, "cpu_docker") == "4.1 / 48"
    assert stat(html, "memory_docker") == "3648 / 36864"


def test_an_agent_whose_heartbeats_stopped_is_not_counted_online(carol_client, fleet):
    Agent.objects.filter(pk=fleet["us"].pk).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    html = page(carol_client.get("/dashboard/live"))
    assert stat(html, "agents_online") == "1"
    us_row = re.search(r'<tr data-agent-id="docker-us".*?</tr>', html, re.S).group(0)
    assert "not reporting" in us_row and "not reporting" not in html.split('data-agent-id="docker-us"')[0]
    assert rows(page(carol_client.get("/dashboard/?status=stale")), "data-agent-id") == ["docker-us", "k8s-eu"]


# --- the agents table -------------------------------------------------------------------


def test_the_agents_table_shows_use_and_filters(carol_client, fleet):
    html = page(carol_client.get("/dashboard/"))
    assert rows(html, "data-agent-id") == ["docker-eu", "docker-us", "k8s-eu"]
    eu_row = re.search(r'<tr data-agent-id="docker-eu".*?</tr>', html, re.S).group(0)
    assert "3 / 10" in eu_row  # live sessions of max_sessions
    assert "2.5 / 8" in eu_row  # CPU reserved (running + starting) / reported
    assert rows(page(carol_client.get("/dashboard/?platform=kubernetes")), "data-agent-id") == ["k8s-eu"]
    assert rows(page(carol_client.get("/dashboard/?region=eu")), "data-agent-id") == ["docker-eu", "k8s-eu"]
    assert rows(page(carol_client.get("/dashboard/?status=offline")), "data-agent-id") == ["k8s-eu"]
    live = page(carol_client.get("/dashboard/live?region=us"))
    assert rows(live, "data-agent-id") == ["docker-us"] and "<html" not in live


def test_the_agent_page_shows_its_sessions_and_commands_with_latencies(carol_client, fleet):
    eu = fleet["eu"]
    session = fleet["sessions"]["alice-running"]
    t0 = timezone.now() - timedelta(seconds=10)
    AgentCommand.objects.create(
        agent=eu, session=session, type="create_session", status="completed", deadline=t0 + timedelta(minutes=5),
        sent_at=t0 + timedelta(milliseconds=40), acked_at=t0 + timedelta(milliseconds=160),
        completed_at=t0 + timedelta(seconds=3),
    )  # fmt: skip
    AgentCommand.objects.filter(agent=eu).update(created_at=t0)
    AgentCommand.objects.create(
        agent=eu, session=session, type="hibernate_session", status="failed", deadline=t0,
        error_message="docker: no such container",
    )  # fmt: skip
    html = page(carol_client.get("/dashboard/agents/docker-eu/"))
    assert set(rows(html, "data-session-id")) == {
        str(fleet["sessions"][k].pk) for k in ("alice-running", "alice-hibernated", "bob-starting")
    }
    assert "40 ms" in html and "120 ms" in html and "3.0 s" in html
    assert "docker: no such container" in html
    assert carol_client.get("/dashboard/agents/nope/").status_code == 404


# --- agent actions ----------------------------------------------------------------------


def test_drain_and_undrain_through_their_confirmations(carol_client, fleet):
    confirm = page(carol_client.get("/dashboard/agents/docker-eu/drain"))
    assert "No new session will land on docker-eu. Its 3 live session(s) keep running" in confirm
    assert not Agent.objects.get(agent_id="docker-eu").drain_requested  # the GET only asks
    response = carol_client.post("/dashboard/agents/docker-eu/drain", follow=True)
    agent = Agent.objects.get(agent_id="docker-eu")
    assert agent.drain_requested and agent.status == Agent.Status.DRAINING
    assert "docker-eu is draining; its 3 live session(s) keep running." in page(response)
    assert 'data-action="undrain"' in page(response)
    carol_client.post("/dashboard/agents/docker-eu/undrain")
    agent.refresh_from_db()
    assert not agent.drain_requested and agent.status == Agent.Status.ONLINE


def test_remove_is_refused_while_sessions_live_and_says_so(carol_client, fleet):
    confirm = page(carol_client.get("/dashboard/agents/docker-eu/remove"))
    assert "docker-eu holds 3 live session(s): removing it is refused until they have ended" in confirm
    response = carol_client.post("/dashboard/agents/docker-eu/remove", follow=True)
    assert "still holds live sessions" in page(response)
    assert Agent.objects.filter(agent_id="docker-eu").exists()


def test_remove_an_agent_without_live_sessions(carol_client, fleet):
    confirm = page(carol_client.get("/dashboard/agents/k8s-eu/remove"))
    assert "Its ended sessions stay in the history without an agent" in confirm
    response = carol_client.post("/dashboard/agents/k8s-eu/remove", follow=True)
    assert response.redirect_chain[-1][0] == "/dashboard/"
    assert "Agent k8s-eu removed." in page(response)
    assert not Agent.objects.filter(agent_id="k8s-eu").exists()
    failed = fleet["sessions"]["alice-failed"]
    failed.refresh_from_db()
    assert failed.agent_id is None


def test_actions_need_the_csrf_token(carol, fleet):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(carol)
    assert client.post("/dashboard/agents/docker-eu/drain").status_code == 403
    assert not Agent.objects.get(agent_id="docker-eu").drain_requested
    confirm = page(client.get("/dashboard/agents/docker-eu/drain"))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', confirm).group(1)
    assert client.post("/dashboard/agents/docker-eu/drain", {"csrfmiddlewaretoken": token}).status_code == 302
    assert Agent.objects.get(agent_id="docker-eu").drain_requested


# --- the sessions table -----------------------------------------------------------------


def test_the_sessions_table_lists_everyone_and_filters(carol_client, fleet, alice):
    s = fleet["sessions"]

    def listed(query=""):
        return set(rows(page(carol_client.get(f"/dashboard/sessions/{query}")), "data-session-id"))

    def ids(*keys):
        return {str(s[k].pk) for k in keys}

    assert listed() == ids("alice-running", "alice-hibernated", "bob-running", "bob-starting")
    assert listed("?state=all") == {str(x.pk) for x in s.values()}
    assert listed("?state=failed") == ids("alice-failed")
    assert listed("?user=bob") == ids("bob-running", "bob-starting")
    assert listed("?agent=docker-us&state=all") == ids("bob-running", "bob-terminated")
    assert listed("?template=office") == ids("bob-running")
    now = timezone.now()
    Session.objects.filter(pk=s["alice-running"].pk).update(last_activity=now - timedelta(minutes=90))
    Session.objects.filter(pk=s["bob-running"].pk).update(last_activity=now - timedelta(minutes=5))
    Session.objects.filter(state=State.HIBERNATED).update(last_activity=now)
    Session.objects.filter(pk=s["bob-starting"].pk).update(created_at=now - timedelta(hours=2))  # never used
    assert listed("?idle=60") == ids("alice-running", "bob-starting")
    assert listed("?idle=bogus") == listed()


def test_terminate_and_hibernate_from_the_sessions_table(carol_client, fleet):
    s = fleet["sessions"]
    html = page(carol_client.get("/dashboard/sessions/"))
    row = re.search(rf'<tr data-session-id="{s["bob-running"].pk}".*?</tr>', html, re.S).group(0)
    assert 'data-action="hibernate"' in row and 'data-action="terminate"' in row

    confirm = page(carol_client.get(f"/dashboard/sessions/{s['bob-running'].pk}/terminate"))
    assert "The desktop Office of bob on docker-us stops and is removed; its home volume is deleted" in confirm
    response = carol_client.post(f"/dashboard/sessions/{s['bob-running'].pk}/terminate", follow=True)
    assert "Terminating Office of bob." in page(response)
    assert Session.objects.get(pk=s["bob-running"].pk).state == State.TERMINATING
    assert AgentCommand.objects.filter(session=s["bob-running"], type="terminate_session").exists()

    confirm = page(carol_client.get(f"/dashboard/sessions/{s['alice-running'].pk}/hibernate"))
    assert "its home is kept, and its user can wake it again" in confirm
    carol_client.post(f"/dashboard/sessions/{s['alice-running'].pk}/hibernate")
    assert Session.objects.get(pk=s["alice-running"].pk).state == State.HIBERNATING

    # An action the state does not allow is refused by the service, and said.
    response = carol_client.post(f"/dashboard/sessions/{s['alice-hibernated'].pk}/hibernate", follow=True)
    assert "cannot go from hibernated to hibernating" in page(response)
    assert Session.objects.get(pk=s["alice-hibernated"].pk).state == State.HIBERNATED


# --- the session page -------------------------------------------------------------------


def test_the_session_page_shows_its_timeline(carol_client, fleet, alice):
    session = fleet["sessions"]["alice-running"]
    t0 = timezone.now() - timedelta(minutes=5)
    SessionEvent.objects.create(session=session, from_state="", to_state="pending", reason="launched by alice")
    SessionEvent.objects.create(session=session, from_state="starting", to_state="running", reason="")
    command = AgentCommand.objects.create(
        agent=fleet["eu"], session=session, type="create_session", status="completed", deadline=t0,
        sent_at=t0 + timedelta(milliseconds=25), acked_at=t0 + timedelta(milliseconds=75),
        completed_at=t0 + timedelta(seconds=2),
    )  # fmt: skip
    AgentCommand.objects.filter(pk=command.pk).update(created_at=t0)
    AgentCommand.objects.create(
        agent=fleet["eu"], session=session, type="hibernate_session", status="failed", deadline=t0,
        error_message="the engine refused",
    )  # fmt: skip
    VNCConnection.objects.create(
        session=session, user=alice, client_address="127.0.0.1", closed_at=timezone.now(),
        bytes_to_client=5 * 1024 * 1024, bytes_from_client=2048, close_reason="the user closed the tab",
    )  # fmt: skip
    html = page(carol_client.get(f"/dashboard/sessions/{session.pk}/"))
    kinds = re.findall(r'data-kind="(\w+)"', html)
    assert kinds[0] == "command" and sorted(kinds) == ["command", "command", "state", "state", "viewer"]
    assert "— → pending</strong>: launched by alice" in html
    assert "queued 25 ms, ack 50 ms, total 2.0 s" in html
    assert "the engine refused" in html
    assert "5.0\xa0MB to the browser, 2.0\xa0KB from it" in html and "(the user closed the tab)" in html
    assert "File transfers are not part of StreamSpace yet" in html
    assert carol_client.get("/dashboard/sessions/not-a-uuid/").status_code == 404


# --- queries do not grow with the rows --------------------------------------------------


def _grow(owner, template, prefix: str, n_agents: int) -> None:
    """n agents, 3 sessions per agent, and on the first session's agent and on that session
    n more sessions, commands, state changes and viewer connections."""
    Agent.objects.bulk_create(
        Agent(
            agent_id=f"{prefix}-{i:04d}", platform=("docker", "kubernetes", "vm")[i % 3], region=f"r{i % 4}",
            status="online", last_heartbeat=timezone.now(), capacity={"cpu": 8, "memory_mb": 8192, "max_sessions": 5},
        )
        for i in range(n_agents)
    )  # fmt: skip
    agents = list(Agent.objects.filter(agent_id__startswith=f"{prefix}-"))
    Session.objects.bulk_create(
        Session(owner=owner, template=template, agent=agents[i % n_agents], platform=agents[i % n_agents].platform,
                state=(State.RUNNING, State.HIBERNATED, State.TERMINATED)[i % 3], cpu=1, memory_mb=512)
        for i in range(n_agents * 3)
    )  # fmt: skip
    watched = Session.objects.order_by("created_at", "pk").first()
    Session.objects.bulk_create(
        Session(owner=owner, template=template, agent=watched.agent, state=State.RUNNING, cpu=1, memory_mb=512)
        for _ in range(n_agents)
    )
    deadline = timezone.now() + timedelta(minutes=5)
    AgentCommand.objects.bulk_create(
        AgentCommand(agent=watched.agent, session=watched, type="get_session", status="completed", deadline=deadline)
        for _ in range(n_agents)
    )
    SessionEvent.objects.bulk_create(
        SessionEvent(session=watched, from_state="running", to_state="degraded") for _ in range(n_agents)
    )
    VNCConnection.objects.bulk_create(VNCConnection(session=watched, user=owner) for _ in range(n_agents))


def test_the_number_of_queries_does_not_grow_with_the_rows(
    carol_client, alice, template, django_assert_max_num_queries
):
    _grow(alice, template, "few", 10)
    watched = Session.objects.order_by("created_at", "pk").first()
    urls = [
        "/dashboard/",
        "/dashboard/live",
        "/dashboard/sessions/?state=all",
        f"/dashboard/agents/{watched.agent.agent_id}/",
        f"/dashboard/sessions/{watched.pk}/",
    ]
    counts = {}
    for url in urls:
        with django_assert_max_num_queries(20) as counted:
            assert carol_client.get(url).status_code == 200
        counts[url] = len(counted.captured_queries)
    _grow(alice, template, "many", 200)
    assert Agent.objects.count() == 210
    for url in urls:
        # The same count with 20 times the rows (it prints every query when it fails).
        with django_assert_max_num_queries(counts[url]):
            assert carol_client.get(url).status_code == 200
