"""A template's clipboard switches and the operator's limits reach the agent in the create
command, and the agent turns them into the desktop's Xvnc settings (images/desktop/entrypoint.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_clients import protocol
from agent_clients.backends.base import SessionSpec
from agents_app.models import AgentCommand
from sessions_app import services
from tests.control.test_template_egress import ADD, form

pytestmark = pytest.mark.django_db


def test_the_switches_and_limits_reach_the_desktops_environment(admin_client, alice, agent, settings):
    settings.CLIPBOARD_MAX_TO_DESKTOP, settings.CLIPBOARD_MAX_TO_BROWSER = 4096, 2048
    # The admin form: "to the desktop" ticked, "to the browser" not; the template's own env
    # tries to turn the clipboard back on.
    env = '{"VNC_CLIPBOARD_TO_BROWSER": "1", "LANG": "de_DE.UTF-8"}'
    response = admin_client.post(ADD, form(clipboard_to_desktop="on", env=env))
    assert response.status_code == 302, response.context["adminform"].form.errors
    session = services.session_create(user=alice, template_slug="locked")
    payload = AgentCommand.objects.get(session=session, type="create_session").payload
    assert payload["template"]["clipboard"] == {
        "to_desktop": True, "to_browser": False, "max_to_desktop": 4096, "max_to_browser": 2048,
    }  # fmt: skip
    env = SessionSpec.from_payload(str(session.pk), payload).desktop_env()
    assert env == {
        "LANG": "de_DE.UTF-8",
        "VNC_CLIPBOARD_TO_DESKTOP": "1",
        "VNC_CLIPBOARD_TO_BROWSER": "0",
        "VNC_CLIPBOARD_MAX_TO_DESKTOP": "4096",
    }


def test_a_command_from_before_the_clipboard_rules_leaves_it_on():
    """An agent newer than its control plane: no ``clipboard`` in the payload."""
    spec = SessionSpec.from_payload("s1", {"template": {"image": "img:1"}})
    assert spec.desktop_env()["VNC_CLIPBOARD_TO_DESKTOP"] == "1"
    assert spec.desktop_env()["VNC_CLIPBOARD_TO_BROWSER"] == "1"


def start_django(**env) -> subprocess.CompletedProcess:
    """A real start of the settings (``manage.py check``) with these variables set."""
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )  # fmt: skip


def test_a_limit_to_the_desktop_beyond_half_the_tunnel_window_stops_the_start_saying_why():
    """A paste is released in one piece; above the tunnel's 4 MiB window the agent would
    close the viewer's tunnel in the middle of a session instead."""
    ceiling = protocol.TUNNEL_WINDOW // 2
    refused = start_django(CLIPBOARD_MAX_TO_DESKTOP=str(ceiling + 1))
    assert refused.returncode != 0
    assert f"CLIPBOARD_MAX_TO_DESKTOP must be at most {ceiling} bytes" in refused.stderr
    assert "in one piece" in refused.stderr
    assert start_django(CLIPBOARD_MAX_TO_DESKTOP=str(ceiling)).returncode == 0


def test_the_api_lists_a_templates_clipboard_switches(as_alice, template):
    template.clipboard_to_browser = False
    template.save()
    (listed,) = as_alice.get("/api/v1/templates").json()
    assert (listed["clipboard_to_desktop"], listed["clipboard_to_browser"], listed["sound"]) == (True, False, False)
