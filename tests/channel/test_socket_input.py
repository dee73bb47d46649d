"""Sockets never crash: every bad payload that passes the envelope, and every path no socket
lives at, is answered with an error frame or a close with a code and a reason, on a real
Daphne process. A crash never leaves a stale channel name on the agent row."""

import uuid
from urllib.parse import quote

import pytest
from django.db import connection
from websockets.sync.client import connect

from agent_clients import protocol
from agents_app.models import Agent
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt, online_agent, registered
from tests.channel.test_vnc_relay import closed_with, viewer
from tests.channel.wire import WireAgent
from tests.live import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
CAPACITY = {"cpu": 8, "memory_mb": 16384, "max_sessions": 10}


def envelope(type_: str, payload_json: str) -> str:
    return f'{{"type": "{type_}", "id": "m1", "payload": {payload_json}}}'


def hello(**changes) -> str:
    payload = {"agent_id": "agent-1", "platform": "docker", "protocol": 1, "version": "test", "region": "eu",
               "capacity": CAPACITY, "sessions": []}  # fmt: skip
    return protocol.encode("hello", {**payload, **changes})


def heartbeat(**changes) -> str:
    return protocol.encode("heartbeat", {"capacity": CAPACITY, "sessions": [], "status": "online", **changes})


DEEP = 60_000

BAD_PAYLOADS = {
    "a heartbeat entry that is not an object": (heartbeat(sessions=["running"]), "sessions"),
    "a control character in a reported session id": (
        heartbeat(sessions=[{"session_id": "s\x1b", "state": "running"}]),
        "session_id",
    ),
    "NUL in the hello's version": (hello(version="te\x00st"), "version"),
    "NUL in the hello's region": (hello(region="eu\x00"), "region"),
    "a control character in the hello's agent id": (hello(agent_id="agent-1\x1b"), "agent_id"),
    "a lone surrogate in the hello's version": (hello(version="\ud800"), "version"),
    "NUL in a command id": (protocol.encode("ack", {"command_id": "c\x00"}), "command_id"),
    "NUL in a failure's error": (
        protocol.encode("failed", {"command_id": "c1", "error": "bo\x00om", "retryable": False}),
        "error",
    ),
    "NUL deep in a completion's result": (
        protocol.encode("complete", {"command_id": "c1", "result": {"state": "running", "x": [{"y": "\x00"}]}}),
        "NUL",
    ),
    "NUL in a result's key": (protocol.encode("complete", {"command_id": "c1", "result": {"a\x00": 1}}), "NUL"),
    "a VNC port no column can hold": (
        protocol.encode("complete", {"command_id": "c1", "result": {"vnc_port": 10**20}}),
        "vnc_port",
    ),
    "a VNC host longer than the column": (
        heartbeat(sessions=[{"session_id": SID, "state": "running", "vnc_host": "h" * 300}]),
        "vnc_host",
    ),
    "NUL in a session event's session id": (
        protocol.encode("session_event", {"session_id": SID + "\x00", "state": "failed", "reason": None}),
        "session_id",
    ),
    "a session event for a non-uuid session": (
        protocol.encode("session_event", {"session_id": "s-1", "state": "failed", "reason": None}),
        "UUID",
    ),
    "JSON nested 60,000 deep in a heartbeat": (
        envelope("heartbeat", f'{{"capacity": {"[" * DEEP}{"]" * DEEP}, "sessions": [], "status": "online"}}'),
        "nested",
    ),
    "JSON nested 60,000 deep in the envelope": ("[" * DEEP + "]" * DEEP, "nested"),
    "objects nested 40 deep in a result": (
        envelope("complete", '{"command_id": "c1", "result": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"),
        "nested",
    ),
}


@pytest.fixture
def daphne_log(control_plane):
    """What the shared Daphne process logs during the test (it must hold no traceback)."""
    start = control_plane.log_path.stat().st_size

    def new_output() -> str:
        with open(control_plane.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    return new_output


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log and "Exception inside application" not in log, log[-4000:]


def still_serves(wire: WireAgent) -> None:
    beat = Agent.objects.get(agent_id=wire.agent_id).last_heartbeat
    wire.heartbeat()
    wait_for(lambda: Agent.objects.get(agent_id=wire.agent_id).last_heartbeat > beat, 5, what=f"{wire.agent_id} served")


@pytest.mark.parametrize("frame,reason", list(BAD_PAYLOADS.values()), ids=list(BAD_PAYLOADS))
def test_a_bad_payload_is_answered_with_an_error_frame_and_the_socket_keeps_serving(
    control_plane, daphne_log, frame, reason
):
    wire, bystander = online_agent(control_plane, "agent-1"), online_agent(control_plane, "bystander")
    channel = Agent.objects.get(agent_id="agent-1").channel_name
    wire.send_raw(frame)
    error = wire.expect("error")["payload"]
    assert reason in error["reason"], error
    still_serves(wire)
    still_serves(bystander)
    assert Agent.objects.get(agent_id="agent-1").channel_name == channel
    assert_no_traceback(daphne_log())


def test_a_session_id_this_control_plane_never_made_is_left_out_not_a_refused_hello(control_plane, daphne_log):
    """Found by review: one container labelled by hand (an id that is no lower-case UUID) in
    the agent's report refused every hello and heartbeat, so the agent never came online.
    Such entries are left out; the rest of the report counts."""
    foreign = [{"session_id": "made-by-hand", "state": "running"}, {"session_id": SID.upper(), "state": "running"}]
    wire = WireAgent(control_plane.ws_url, "agent-1", registered("agent-1"))
    wire.hello(sessions=foreign)
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").status == "online", 5, what="agent online")
    still_serves(wire)
    wire.heartbeat(sessions=foreign)
    assert wire.nothing_within(1.0, "error")
    assert_no_traceback(daphne_log())


def test_a_nul_in_the_agent_id_of_the_socket_url_is_refused_with_4401(control_plane, daphne_log):
    registered()
    wire = WireAgent(control_plane.ws_url, quote("agent-1\x00"), "ssa_whatever")
    code, reason = wire.closed_with()
    assert code == protocol.CLOSE_UNAUTHORIZED and "agent_id" in reason
    assert_no_traceback(daphne_log())


@pytest.fixture
def hello_fault(transactional_db):
    """A real fault in the database: a trigger refuses the agent row's update when a hello
    reports version 'fault', as a bug the protocol cannot catch would (dropped afterwards)."""
    with connection.cursor() as cur:
        cur.execute("""
            CREATE FUNCTION sstest_hello_fault() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER sstest_hello_fault BEFORE UPDATE ON agents_app_agent
            FOR EACH ROW WHEN (NEW.version = 'fault') EXECUTE FUNCTION sstest_hello_fault();
        """)
    yield
    with connection.cursor() as cur:
        cur.execute("DROP TRIGGER sstest_hello_fault ON agents_app_agent; DROP FUNCTION sstest_hello_fault();")


def test_a_handler_that_crashes_closes_with_a_reason_and_clears_the_channel(control_plane, hello_fault):
    token = registered()
    bystander = online_agent(control_plane, "bystander")
    wire = WireAgent(control_plane.ws_url, "agent-1", token)
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").channel_name, 5, what="attached")
    wire.send_raw(hello(version="fault"))
    code, reason = wire.closed_with()
    assert code == protocol.CLOSE_INTERNAL_ERROR and "hello" in reason and "reconnect" in reason
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").channel_name == "", 5, what="channel cleared")
    again = WireAgent(control_plane.ws_url, "agent-1", token)
    again.hello()
    wait_for(lambda: Agent.objects.get(agent_id="agent-1").status == "online", 5, what="online after reconnect")
    beat = Agent.objects.get(agent_id="bystander").last_heartbeat
    bystander.heartbeat()
    wait_for(lambda: Agent.objects.get(agent_id="bystander").last_heartbeat > beat, 5, what="bystander served")


UNROUTED = [
    "/api/v1/agent/connect/extra?agent_id=agent-1",
    "/api/v1/agent",
    f"/api/v1/vnc/{SID}/extra",
    "/api/v1/vnc/",
    "/api/v1/vnc",
    "/nowhere",
    "/",
]


@pytest.mark.parametrize("path", UNROUTED)
def test_a_path_no_socket_lives_at_is_closed_with_4404_and_a_reason(control_plane, daphne_log, path):
    ws = connect(f"{control_plane.ws_url}{path}", open_timeout=5).__enter__()
    code, reason = closed_with(ws)
    assert code == protocol.CLOSE_NOT_FOUND and reason == "no such socket path"
    assert_no_traceback(daphne_log())


@pytest.fixture
def desktop(transactional_db):
    return Template.objects.create(slug="desktop", name="Desktop", image="img:1")


@pytest.mark.parametrize(
    ("spelling", "api_answer"),
    [
        ("not-a-uuid", (404, "not_found")),
        ("1b4e28ba", (404, "not_found")),
        (SID.replace("-", "") + "zz", (404, "not_found")),
        ("%00", (400, "malformed")),  # a NUL in an API path is refused before any lookup
    ],
)
def test_a_viewer_socket_for_a_non_uuid_id_is_closed_like_the_api_answers(
    control_plane, daphne_log, alice, spelling, api_answer
):
    """The REST API answers 404 no such session for an id that is no UUID (400 for a NUL);
    the socket closes 4404 "no such session" for each: no such session can be opened."""
    status, body = control_plane.request("GET", f"/api/v1/sessions/{spelling}", jwt(alice))
    assert (status, body["error"]) == api_answer
    code, reason = closed_with(viewer(control_plane, spelling, jwt(alice)))
    assert (code, reason) == (protocol.CLOSE_NOT_FOUND, "no such session")
    assert_no_traceback(daphne_log())


def test_an_upper_case_session_id_means_the_same_session_on_the_api_and_the_socket(
    control_plane, daphne_log, alice, desktop
):
    agent = online_agent(control_plane)
    session = Session.objects.create(
        owner=alice, template=desktop, agent=Agent.objects.get(agent_id="agent-1"), cpu=1, memory_mb=64,
        state=State.RUNNING,
    )  # fmt: skip
    upper = str(session.pk).upper()
    status, body = control_plane.request("GET", f"/api/v1/sessions/{upper}", jwt(alice))
    assert status == 200 and body["id"] == str(session.pk)
    ws = viewer(control_plane, upper, jwt(alice))
    assert agent.expect("tunnel_open")["payload"]["session_id"] == str(session.pk)
    ws.close()
    unknown = str(uuid.uuid4()).upper()
    assert control_plane.request("GET", f"/api/v1/sessions/{unknown}", jwt(alice))[0] == 404
    assert closed_with(viewer(control_plane, unknown, jwt(alice))) == (protocol.CLOSE_NOT_FOUND, "no such session")
    assert_no_traceback(daphne_log())


def test_a_long_non_ascii_close_reason_from_the_agent_reaches_the_viewer_cut_to_fit(
    control_plane, daphne_log, alice, desktop
):
    """A close reason has room for 123 bytes of UTF-8: the agent's reason is cut to fit,
    on a character boundary, instead of failing the viewer's close."""
    agent = online_agent(control_plane)
    session = Session.objects.create(
        owner=alice, template=desktop, agent=Agent.objects.get(agent_id="agent-1"), cpu=1, memory_mb=64,
        state=State.RUNNING,
    )  # fmt: skip
    ws = viewer(control_plane, session.pk, jwt(alice))
    tunnel = agent.expect("tunnel_open")["payload"]["tunnel_id"]
    agent.send("tunnel_ready", {"tunnel_id": tunnel})
    agent.send("tunnel_close", {"tunnel_id": tunnel, "reason": "désolé, " * 40})
    code, reason = closed_with(ws)
    assert code == protocol.CLOSE_GOING_AWAY and reason.startswith("désolé, désolé")
    assert len(reason.encode()) <= 123
    assert_no_traceback(daphne_log())
