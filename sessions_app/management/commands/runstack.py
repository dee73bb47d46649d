"""Start the whole platform as one process tree: Daphne, a Celery worker with beat, and
(with STREAMSPACE_LOCAL_AGENT=docker) a local Docker agent. Ctrl+C stops everything.

It says "up" only once the port answers (and the local agent is online), and prints the
admin's login last, so a one-time password is not buried under the children's output."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.selectors import agent_liveness_cutoff
from agents_app.services import agent_issue_token, agent_register
from sessions_app.management.commands.bootstrap_admin import CHANGE_PASSWORD_HINT, ensure_admin
from sessions_app.states import LIVE_STATES
from streamspace.env import env_int, env_str

# The id every install used before ids were per install; an install whose database still
# has live sessions on it keeps it (its containers are labelled with it).
LEGACY_LOCAL_AGENT_ID = "local-docker"
LOCAL_AGENT_ID_FILE = "local-agent-id"
READY_TIMEOUT = 120.0  # seconds for Daphne to answer (a loaded machine imports slowly)
AGENT_ONLINE_TIMEOUT = 30.0
# No start-up banner and no root warning (./dev up commonly runs as root on a dev box):
# the last lines of the start are the admin's login.
CELERY_QUIET = {"PYTHONWARNINGS": "ignore:You're running the worker with superuser privileges"}
# Agent sockets live for days (Daphne's default cuts every socket at 24 h) and reconnect in
# floods after a restart (a handshake may queue longer than Daphne's default 5 s).
DAPHNE_SOCKET_FLAGS = ["--websocket_timeout", "-1", "--websocket_connect_timeout", "30"]


class Command(BaseCommand):
    help = "Run Daphne, Celery (worker + beat) and a local Docker agent together."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=env_str("BIND_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=env_int("PORT", 8000, minimum=1, maximum=65535))
        parser.add_argument("--no-agent", action="store_true", help="do not start the local Docker agent")

    def handle(self, *args, host, port, no_agent, **options):
        admin = ensure_admin()
        signal.signal(signal.SIGTERM, _interrupt)  # until it is up, SIGTERM stops like Ctrl+C
        py = sys.executable
        children: list[tuple[str, subprocess.Popen]] = []

        def start(name: str, argv: list[str], env: dict | None = None) -> None:
            self.stdout.write(f"starting {name}: {' '.join(argv[1:4])} ...")
            children.append((name, subprocess.Popen(argv, env={**os.environ, **(env or {})})))

        start(
            "daphne",
            [py, "-m", "daphne", "-b", host, "-p", str(port), *DAPHNE_SOCKET_FLAGS, "streamspace.asgi:application"],
        )
        # Beat inside the worker (-B): kombu's filesystem broker (the embedded default) is not
        # safe between two processes. Beat keeps its schedule in memory, so it starts on every
        # configuration; if it ever stops, /readyz says so (the sweeps record their runs).
        start(
            "celery",
            [py, "-m", "celery", "--quiet", "-A", "streamspace", "worker", "-B", "--pool=solo", "--loglevel=WARNING"],
            CELERY_QUIET,
        )
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        local_agent = ""
        try:
            self._wait_until_answering(url, children)
            if not no_agent and os.environ.get("STREAMSPACE_LOCAL_AGENT") == "docker":
                local_agent = local_agent_id(Path(settings.VAR_DIR))
                token = self._local_agent_token(local_agent)
                start(
                    "docker agent",
                    [py, "-m", "agent_clients.docker_agent"],
                    {
                        "AGENT_ID": local_agent,
                        "AGENT_TOKEN": token,
                        "CONTROL_PLANE_URL": f"ws://127.0.0.1:{port}",
                        "REGION": env_str("REGION", "local"),
                    },
                )
                self._wait_for_agent(local_agent, children)
        except KeyboardInterrupt:
            _stop_all(children)
            self.stdout.write("stopped before it was up")
            return
        except BaseException:
            _stop_all(children)
            raise
        self._say_up(url, local_agent, admin)
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                for name, proc in children:
                    if proc.poll() is not None:
                        raise CommandError(f"{name} exited with code {proc.returncode}; stopping the rest")
                time.sleep(0.5)
        finally:
            _stop_all(children)
            self.stdout.write("stopped")

    def _wait_until_answering(self, url: str, children) -> None:
        """Until Daphne answers /healthz; a child that exits meanwhile stops the start."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            _check_children(children)
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:  # noqa: S310 (our own port)
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise CommandError(f"nothing answered on {url} after {READY_TIMEOUT:g}s; stopping")

    def _wait_for_agent(self, agent_id: str, children) -> None:
        deadline = time.monotonic() + AGENT_ONLINE_TIMEOUT
        while time.monotonic() < deadline:
            _check_children(children)
            if Agent.objects.filter(
                agent_id=agent_id, channel_name__gt="", last_heartbeat__gte=agent_liveness_cutoff()
            ).exists():
                return
            time.sleep(0.2)
        self.stdout.write(
            self.style.WARNING(f"the local agent {agent_id} is not online after {AGENT_ONLINE_TIMEOUT:g}s; see its log")
        )

    def _say_up(self, url: str, local_agent: str, admin: tuple[str, str | None, bool]) -> None:
        """The last lines of the start: where it runs, then the admin's login."""
        username, generated, created = admin
        lines = [
            self.style.SUCCESS(f"StreamSpace is up: portal {url}/  admin {url}/admin/  API docs {url}/api/docs/"),
        ]
        if local_agent:
            lines.append(f"local Docker agent: {local_agent}")
        if generated:
            lines.append(self.style.WARNING(f"admin login: {username} / {generated}  (generated, shown once)"))
        elif created:
            lines.append(f"admin login: {username} with the password from ADMIN_PASSWORD")
        else:
            lines.append(f"admin login: {username} (password set earlier)")
        lines.append(f"change the admin password: .venv/bin/{CHANGE_PASSWORD_HINT.format(username=username)}")
        self.stdout.write("\n".join(lines))

    def _local_agent_token(self, agent_id: str) -> str:
        """A fresh token for the local agent each start (stored hashed, handed over in its environment)."""
        agent = Agent.objects.filter(agent_id=agent_id).first()
        if agent is None:
            _, token, _ = agent_register(agent_id=agent_id, platform="docker", region=env_str("REGION", "local"))
            return token
        return agent_issue_token(agent=agent)


def local_agent_id(var_dir: Path) -> str:
    """This install's local agent id: LOCAL_AGENT_ID if set, else the one stored under the
    install's var dir, made once (``local-docker-<random>``) so installs on one Docker host
    never share an id and so never see each other's containers."""
    override = env_str("LOCAL_AGENT_ID")
    if override:
        return override
    stored = var_dir / LOCAL_AGENT_ID_FILE
    try:
        agent_id = stored.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        agent_id = ""
    if agent_id:
        return agent_id
    legacy = Agent.objects.filter(agent_id=LEGACY_LOCAL_AGENT_ID).first()
    if legacy is not None and legacy.sessions.filter(state__in=LIVE_STATES).exists():
        agent_id = LEGACY_LOCAL_AGENT_ID  # keep the sessions this install already runs
    else:
        agent_id = f"local-docker-{secrets.token_hex(4)}"
    var_dir.mkdir(parents=True, exist_ok=True)
    stored.write_text(agent_id + "\n", encoding="utf-8")
    return agent_id


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _check_children(children) -> None:
    for name, proc in children:
        if proc.poll() is not None:
            raise CommandError(f"{name} exited with code {proc.returncode}; stopping the rest")


def _stop_all(children) -> None:
    for _, proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for _, proc in children:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
