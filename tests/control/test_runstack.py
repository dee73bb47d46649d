"""``./dev up`` (``manage.py runstack``) as an operator meets it (issue 9, items 17, 18).

Found: it printed "up" before the port answered and buried the one-time admin password
under the children's output; and every install on one Docker host ran its local agent as
``local-docker``, so each saw (and counted) the others' containers. Here two installs
(two var dirs, two ports) run for real on this Docker host: Daphne, Celery and the real
Docker agent. They share the test database only because the test needs to read it;
their agents create no containers (no session is started)."""

from __future__ import annotations

import signal
import urllib.request

import pytest
from django.contrib.auth import get_user_model

from agents_app.models import Agent
from sessions_app.management.commands.runstack import LEGACY_LOCAL_AGENT_ID, local_agent_id
from sessions_app.models import Session, Template
from sessions_app.states import State
from tests.live import PYTHON, Process, control_plane_env, free_port, wait_for

UP = "StreamSpace is up"


def runstack(var_dir, port: int, **extra: str) -> Process:
    env = control_plane_env(
        STREAMSPACE_VAR_DIR=str(var_dir),
        STREAMSPACE_LOCAL_AGENT="docker",
        ADMIN_PASSWORD="",
        HEARTBEAT_INTERVAL="1",
        **extra,
    )
    env.pop("LOCAL_AGENT_ID", None)
    return Process(f"runstack-{port}", [PYTHON, "manage.py", "runstack", "--port", str(port)], env)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until_up(proc: Process, port: int) -> list[str]:
    """Wait for the "up" line; the port must answer the moment it is printed. Returns the
    lines from "up" on, once the change-password hint (the last line of the start) is there."""
    wait_for(lambda: UP in proc.output() or not proc.alive, 150, 0.05, what=f"{UP}\n{proc.output()}")
    assert proc.alive, proc.output()
    assert answers(port), f"said up, but nothing answers on port {port}\n{proc.output()}"
    wait_for(lambda: "changepassword" in proc.output().split(UP, 1)[1], 5, what=f"the admin lines\n{proc.output()}")
    return proc.output().split(UP, 1)[1].splitlines()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.docker
def test_two_installs_on_one_docker_host_say_up_when_they_answer_and_have_distinct_agents(tmp_path):
    ports = free_port(), free_port()
    # Both start at once (as on a host rebooting); each install has its own admin user here
    # only because the test shares one database between them.
    installs = [
        runstack(tmp_path / "install-1", ports[0]).start(),
        runstack(tmp_path / "install-2", ports[1], ADMIN_USERNAME="admin2").start(),
    ]
    try:
        for proc, port, username in zip(installs, ports, ("admin", "admin2"), strict=True):
            after_up = wait_until_up(proc, port)
            login = next(line for line in after_up if "admin login:" in line)
            password = login.split("/ ", 1)[1].split()[0]
            assert get_user_model().objects.get(username=username).check_password(password)
            assert any(f".venv/bin/python manage.py changepassword {username}" in line for line in after_up)

        ids = [(tmp_path / d / "local-agent-id").read_text().strip() for d in ("install-1", "install-2")]
        assert ids[0] != ids[1] and all(i.startswith("local-docker-") for i in ids)
        for agent_id in ids:
            connected = Agent.objects.filter(agent_id=agent_id, status="online").exclude(channel_name="")
            wait_for(connected.exists, 10, what=f"agent {agent_id} connected")
        assert not Agent.objects.filter(agent_id=LEGACY_LOCAL_AGENT_ID).exists()
    finally:
        for proc in installs:
            proc.signal(signal.SIGTERM)
        for proc in installs:
            proc.stop(timeout=25)


@pytest.mark.django_db
def test_the_local_agent_id_is_made_once_per_install_and_may_be_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_AGENT_ID", raising=False)
    one = local_agent_id(tmp_path / "one")
    assert one.startswith("local-docker-") and local_agent_id(tmp_path / "one") == one
    assert (tmp_path / "one" / "local-agent-id").read_text().strip() == one
    assert local_agent_id(tmp_path / "two") != one
    monkeypatch.setenv("LOCAL_AGENT_ID", "my-host-agent")
    assert local_agent_id(tmp_path / "one") == "my-host-agent"


@pytest.mark.django_db
def test_an_install_already_running_sessions_as_local_docker_keeps_that_id(tmp_path, monkeypatch, alice):
    """Upgrading must not orphan the desktops labelled with the old shared id."""
    monkeypatch.delenv("LOCAL_AGENT_ID", raising=False)
    legacy = Agent.objects.create(agent_id=LEGACY_LOCAL_AGENT_ID, platform="docker")
    assert local_agent_id(tmp_path / "idle") != LEGACY_LOCAL_AGENT_ID  # nothing runs on it: a fresh id
    template = Template.objects.create(slug="t", name="T", image="x:1")
    Session.objects.create(owner=alice, template=template, agent=legacy, cpu=1, memory_mb=512, state=State.RUNNING)
    assert local_agent_id(tmp_path / "upgraded") == LEGACY_LOCAL_AGENT_ID
