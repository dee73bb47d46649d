"""Structured logs on the control plane: a real Daphne with ``LOG_FORMAT=json`` and
``LOG_LEVEL=DEBUG`` writes one JSON object per line, with the request, agent, command and
session ids that apply, and no secret: not a password (right or wrong), a JWT, the
agent's token, nor the VNC password a create command carries.

The agent is the real runtime process with ``tests.support.file_backend.FileBackend``
(a stand-in for Docker: this suite needs no engine), its VNC endpoint an echo server."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from websockets.sync.client import connect

from agents_app.models import Agent, AgentCommand
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.live import PYTHON, ControlPlane, Process, agent_process, free_port, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

WRONG_PASSWORD = "wrong-Pa55word-never-logged"


@pytest.fixture
def json_control_plane(transactional_db):
    cp = ControlPlane("daphne-json", LOG_FORMAT="json", LOG_LEVEL="DEBUG").start()
    yield cp
    cp.stop()


@pytest.fixture
def echo_port():
    port = free_port()
    proc = Process("json-echo", [PYTHON, "-m", "tests.support.echo_server", str(port)], {}).start()
    wait_for(lambda: "listening" in proc.output(), 10, what=f"echo server\n{proc.output()}")
    yield port
    proc.kill()


def json_lines(cp: ControlPlane) -> list[dict]:
    """Every line of the process's output, parsed; a line that is not a JSON object fails."""
    lines = []
    for number, line in enumerate(cp.log_path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= entry.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), line
        lines.append(entry)
    return lines


def get(cp: ControlPlane, path: str, headers: dict[str, str]):
    """(status, response headers) of a GET."""
    req = urllib.request.Request(cp.http_url + path, headers=headers)  # noqa: S310 (loopback)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return r.status, r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_json_logs_carry_the_ids_that_apply_and_no_secret(json_control_plane, echo_port, tmp_path, alice):
    cp = json_control_plane
    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=64)

    # log in: a wrong password, then the right one
    status, _ = cp.request("POST", "/api/v1/auth/token", body={"username": "alice", "password": WRONG_PASSWORD})
    assert status == 401
    status, tokens = cp.request(
        "POST", "/api/v1/auth/token", body={"username": "alice", "password": "alice-password-1"}
    )
    assert status == 200, tokens
    access, refresh = tokens["access"], tokens["refresh"]

    # a request id: a sane incoming one is kept and returned, anything else replaced
    status, headers = get(cp, f"/api/v1/sessions?access_token={access}", {"X-Request-ID": "trace-42.a:b_c"})
    assert status == 401 and headers["X-Request-ID"] == "trace-42.a:b_c"
    status, headers = get(cp, "/api/v1/sessions", {"X-Request-ID": 'no spaces or "quotes" here'})
    assert status == 401 and re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    generated = headers["X-Request-ID"]

    # an agent connects with its token, takes a create (its payload carries the VNC password)
    _, agent_token, _ = agent_register(agent_id="json-agent", platform="docker", region="test")
    agent = agent_process(
        cp,
        "json-agent",
        agent_token,
        backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"),
        FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}",
    ).start()
    try:
        wait_for(lambda: Agent.objects.get(agent_id="json-agent").status == "online", 15,
                 what=f"agent online\n{agent.output()}")  # fmt: skip
        status, body = cp.request("POST", "/api/v1/sessions", access, {"template": "desktop"})
        assert status == 201, body
        session_id = body["id"]
        wait_for(lambda: Session.objects.get(pk=session_id).state == State.RUNNING, 10, what="running")
        vnc_password = Session.objects.get(pk=session_id).vnc_password
        command_id = AgentCommand.objects.get(session_id=session_id).command_id
        assert vnc_password

        # the viewer, with the JWT in its URL
        with connect(f"{cp.ws_url}/api/v1/vnc/{session_id}?token={access}", subprotocols=["binary"]) as ws:
            # A viewer's first message, the ProtocolVersion (the relay forwards whole RFB messages).
            ws.send(b"RFB 003.008\n")
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
        wait_for(lambda: "closed tunnel" in cp.output(), 10, what=f"the viewer's close logged\n{cp.output()}")
    finally:
        agent.kill()
    wait_for(lambda: "json-agent disconnected" in cp.output(), 10, what=f"the agent's disconnect\n{cp.output()}")

    lines = json_lines(cp)
    text = cp.log_path.read_text()
    for secret in ("alice-password-1", WRONG_PASSWORD, access, refresh, agent_token, vnc_password):
        assert secret not in text, f"a secret is in the log: {secret[:4]}..."
    for jwt in (access, refresh):
        assert jwt.rsplit(".", 1)[1] not in text  # not even a JWT's signature

    def having(**fields) -> list[dict]:
        return [e for e in lines if all(e.get(k) == v for k, v in fields.items())]

    assert having(request_id="trace-42.a:b_c", logger="django.request", message="Unauthorized: /api/v1/sessions")
    assert having(request_id=generated, logger="django.request")
    assert len({e["request_id"] for e in having(logger="django.request")}) >= 3  # the failed login too
    created = having(
        logger="sessions_app.services", message=f"session {session_id} created for alice on agent json-agent"
    )
    assert created and re.fullmatch(r"[0-9a-f]{32}", created[0]["request_id"]), created
    assert having(agent_id="json-agent", message="agent json-agent connected")
    assert having(agent_id="json-agent", command_id=command_id, logger="agents_app.services")
    assert having(session_id=session_id, logger="vnc_app.consumers")
    assert [e for e in having(agent_id="json-agent") if "json-agent disconnected" in e["message"]]
    access_log = [e["message"] for e in having(logger="streamspace.access")]
    assert any('"GET /api/v1/sessions?access_token=[redacted]" 401' in m for m in access_log), access_log
    assert any(f"WSCONNECT /api/v1/vnc/{session_id}" in m for m in access_log), access_log
    assert not having(logger="django.db.backends")  # SQL carries secrets: never logged
