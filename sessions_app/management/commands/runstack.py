"""Start the whole platform as one process tree: Daphne, a Celery worker with beat, and
(with STREAMSPACE_LOCAL_AGENT=docker) a local Docker agent. Ctrl+C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.services import agent_issue_token, agent_register
from streamspace.env import env_int, env_str

LOCAL_AGENT_ID = "local-docker"
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
        start("celery", [py, "-m", "celery", "-A", "streamspace", "worker", "-B", "--pool=solo", "--loglevel=WARNING"])
        if not no_agent and os.environ.get("STREAMSPACE_LOCAL_AGENT") == "docker":
            token = self._local_agent_token()
            start(
                "docker agent",
                [py, "-m", "agent_clients.docker_agent"],
                {
                    "AGENT_ID": LOCAL_AGENT_ID,
                    "AGENT_TOKEN": token,
                    "CONTROL_PLANE_URL": f"ws://127.0.0.1:{port}",
                    "REGION": env_str("REGION", "local"),
                },
            )
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        self.stdout.write(
            self.style.SUCCESS(f"StreamSpace is up: portal {url}/  admin {url}/admin/  API docs {url}/api/docs/")
        )
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
            for _, proc in children:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for _, proc in children:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.stdout.write("stopped")

    def _local_agent_token(self) -> str:
        """A fresh token for the local agent each start (stored hashed, handed over in its environment)."""
        agent = Agent.objects.filter(agent_id=LOCAL_AGENT_ID).first()
        if agent is None:
            _, token, _ = agent_register(agent_id=LOCAL_AGENT_ID, platform="docker", region=env_str("REGION", "local"))
            return token
        return agent_issue_token(agent=agent)
