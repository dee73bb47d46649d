"""Real processes for socket tests: Daphne control planes, Celery, agents.

Each process runs against the test database (pytest-django's) and the Redis channel
layer on 127.0.0.1, with a channel prefix unique to this test run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RUN_ID = uuid.uuid4().hex[:8]
LOG_DIR = Path(tempfile.gettempdir()) / f"streamspace-tests-{RUN_ID}"
LOG_DIR.mkdir(parents=True, exist_ok=True)
REDIS_URL = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


# Agent sockets live for days and reconnect in floods: no 24 h cap on a socket's life, and
# 30 s (not 5) for a handshake queued behind a reconnect storm. The same flags as deploy/.
DAPHNE_FLAGS = ["--websocket_timeout", "-1", "--websocket_connect_timeout", "30"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_database_url() -> str:
    s = connection.settings_dict
    user = s.get("USER") or "postgres"
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


def control_plane_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update(
        DJANGO_SETTINGS_MODULE="streamspace.settings",
        DATABASE_URL=test_database_url(),
        REDIS_URL=REDIS_URL,
        CELERY_BROKER_URL=REDIS_URL,
        CHANNEL_PREFIX=f"sstest-{RUN_ID}",
        AGENT_HEARTBEAT_INTERVAL="1",
        COMMAND_ACK_TIMEOUT="3",
        COMMAND_RETRY_BACKOFF_BASE="1",
        SWEEP_INTERVAL="0.5",
        SESSION_ACTIVITY_INTERVAL="1",  # the relay's input writes: short lifecycle timeouts in tests
        DEBUG="true",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log_path = LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's life)
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class ControlPlane(Process):
    """A Daphne process serving streamspace.asgi on 127.0.0.1."""

    def __init__(self, name: str = "daphne", port: int | None = None, **env: str):
        self.port = port or free_port()
        super().__init__(
            name,
            [
                PYTHON,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                *DAPHNE_FLAGS,
                "streamspace.asgi:application",
            ],
            control_plane_env(**env),
        )

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> ControlPlane:
        super().start()
        wait_for(self._healthy, 20, 0.1, f"{self.name} to answer /healthz\n{self.output()}")
        return self

    def _healthy(self) -> bool:
        if not self.alive:
            raise AssertionError(f"{self.name} exited:\n{self.output()}")
        try:
            with urllib.request.urlopen(self.http_url + "/healthz", timeout=1) as r:  # noqa: S310 (loopback)
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def restart(self) -> ControlPlane:
        self.stop()
        return self.start()

    def request(self, method: str, path: str, token: str | None = None, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)  # noqa: S310
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, (json.loads(raw) if raw else {})


def sweeping_celery_worker(**env: str) -> Process:
    """A started ``celery_worker``, returned once it has swept (beat sweeps at start): a
    test's own deadlines must not include the worker's start-up, which takes seconds on a
    loaded machine (a frozen-agent test missed its deadline so)."""
    from agents_app.models import SweepRun

    worker = celery_worker(**env).start()
    wait_for(lambda: SweepRun.objects.filter(name="agents_app.tasks.sweep_agents").exists(), 60, 0.1,
             what=f"the first sweep\n{worker.output()}")  # fmt: skip
    return worker


def celery_worker(**env: str) -> Process:
    """A real Celery worker with an embedded beat scheduler, on the Redis broker."""
    return Process(
        "celery",
        [PYTHON, "-m", "celery", "-A", "streamspace", "worker", "-B", "--pool=solo", "--loglevel=INFO",
         "-s", str(LOG_DIR / f"beat-{uuid.uuid4().hex[:6]}")],
        control_plane_env(**env),
    )  # fmt: skip


def agent_process(
    cp: ControlPlane,
    agent_id: str,
    token: str,
    *,
    module: str = "agent_clients",
    backend: str | None = None,
    heartbeat: float = 1.0,
    reconnect_cap: float = 2.0,
    name: str | None = None,
    **env: str,
) -> Process:
    """A real agent runtime process (``python -m <module>``) connected to ``cp``.

    ``module`` is ``agent_clients`` (with ``backend``), ``agent_clients.docker_agent`` or
    ``agent_clients.k8s_agent``. Not started: call ``.start()``."""
    argv = [PYTHON, "-m", module]
    if backend:
        argv += ["--backend", backend]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    base.update(
        AGENT_ID=agent_id,
        AGENT_TOKEN=token,
        CONTROL_PLANE_URL=cp.ws_url,
        HEARTBEAT_INTERVAL=str(heartbeat),
        RECONNECT_CAP=str(reconnect_cap),
        REGION="test",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    base.update(env)
    return Process(name or f"agent-{agent_id}", argv, base)
