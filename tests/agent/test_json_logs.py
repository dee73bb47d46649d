"""Structured logs on an agent: the real runtime process with ``LOG_FORMAT=json`` and
``LOG_LEVEL=DEBUG`` writes one JSON object per line, each with its agent id, and the
command and session ids where they apply; never its token (sent in the connect's
``Authorization`` header, which websockets prints at DEBUG) nor the VNC password a create
command carries (in a frame, which websockets prints at DEBUG too).

The backend is ``tests.support.file_backend.FileBackend`` (a stand-in for Docker: this
suite needs no engine), its VNC endpoint an echo server; the control plane is the real
shared Daphne."""

from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
from websockets.sync.client import connect

from agent_clients.runtime import logfmt
from agents_app.models import Agent, AgentCommand
from agents_app.services import agent_register
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.channel.test_agent_socket import jwt
from tests.live import PYTHON, ROOT, Process, agent_process, free_port, wait_for

AGENT_ID = "json-logs-agent"


@pytest.fixture
def echo_port():
    port = free_port()
    proc = Process("agent-json-echo", [PYTHON, "-m", "tests.support.echo_server", str(port)], {}).start()
    wait_for(lambda: "listening" in proc.output(), 10, what=f"echo server\n{proc.output()}")
    yield port
    proc.kill()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_an_agents_json_logs_carry_its_ids_and_no_secret(control_plane, echo_port, tmp_path, alice):
    Template.objects.create(slug="desktop", name="Desktop", image="img:1", default_cpu=0.5, default_memory_mb=64)
    _, token, _ = agent_register(agent_id=AGENT_ID, platform="docker", region="test")
    agent = agent_process(
        control_plane,
        AGENT_ID,
        token,
        backend="tests.support.file_backend:FileBackend",
        FILE_BACKEND_DIR=str(tmp_path / "file-backend"),
        FILE_BACKEND_VNC=f"127.0.0.1:{echo_port}",
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
    ).start()
    try:
        wait_for(lambda: Agent.objects.get(agent_id=AGENT_ID).status == "online", 15,
                 what=f"agent online\n{agent.output()}")  # fmt: skip
        status, body = control_plane.request("POST", "/api/v1/sessions", jwt(alice), {"template": "desktop"})
        assert status == 201, body
        session_id = body["id"]
        wait_for(lambda: Session.objects.get(pk=session_id).state == State.RUNNING, 10, what="running")
        vnc_password = Session.objects.get(pk=session_id).vnc_password
        command_id = AgentCommand.objects.get(session_id=session_id).command_id
        assert vnc_password
        url = f"{control_plane.ws_url}/api/v1/vnc/{session_id}?token={jwt(alice)}"
        with connect(url, subprotocols=["binary"]) as ws:
            # A viewer's first message, the ProtocolVersion (the relay forwards whole RFB messages).
            ws.send(b"RFB 003.008\n")
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
        wait_for(lambda: re.search(r'"message": "tunnel \d+ closed', agent.output()), 10,
                 what=f"the tunnel's close logged\n{agent.output()}")  # fmt: skip
    finally:
        assert agent.stop() == 0  # SIGTERM: a drain, logged too

    text = agent.log_path.read_text(errors="replace")
    assert token not in text and token.split("_", 1)[-1] not in text
    assert vnc_password not in text
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        assert entry["agent_id"] == AGENT_ID, line
        lines.append(entry)
    assert any(e["level"] == "DEBUG" for e in lines)  # DEBUG is on: what is left out is left out on purpose
    ran = [e for e in lines if e.get("command_id") == command_id and e.get("session_id") == session_id]
    assert any("create_session" in e["message"] and "completed" in e["message"] for e in ran), ran
    tunnel = [e for e in lines if e["message"].startswith("tunnel ") and e.get("session_id") == session_id]
    assert tunnel, lines
    assert any(e["message"] == "agent stopped" for e in lines)


def test_a_traceback_is_one_line_of_json_and_the_ids_follow_the_context():
    """The formatter alone: the ids of the innermost context win, None leaves one as it
    was, and a record's ``extra`` attributes are never written."""
    formatter = logfmt.JsonFormatter(fixed={"agent_id": "a-1"})
    logger = logging.getLogger("tests.json")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logger.makeRecord("tests.json", logging.ERROR, __file__, 1, "failed %s", ("x",), True, extra={
            "params": ["vnc-password-1"]})  # fmt: skip
        import sys

        record.exc_info = sys.exc_info()
    with logfmt.log_context(command_id="c-1", session_id="s-1"), logfmt.log_context(command_id="c-2", session_id=None):
        line = formatter.format(record)
    assert "\n" not in line and "vnc-password-1" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed x" and entry["level"] == "ERROR" and entry["logger"] == "tests.json"
    assert (entry["agent_id"], entry["command_id"], entry["session_id"]) == ("a-1", "c-2", "s-1")
    assert "request_id" not in entry
    assert entry["exc"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in entry["exc"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    with pytest.raises(TypeError):
        logfmt.log_context(token="x").__enter__()


def test_a_junk_log_format_stops_the_agent_naming_the_setting():
    env = {"AGENT_ID": "a", "CONTROL_PLANE_URL": "ws://127.0.0.1:1", "AGENT_TOKEN": "ssa_x", "LOG_FORMAT": "xml",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([PYTHON, "-m", "agent_clients"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "LOG_FORMAT must be text or json, got 'xml'" in done.stderr
