"""Browser fixtures: the shared Daphne processes (A holds the Docker agent, B serves the browser),
a real Docker agent process, the desktop template, and one headless Chromium per module
driven by Playwright (Debian's /usr/bin/chromium; never ``playwright install``).

Screenshots of every open page are written to /tmp when a test fails."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest

from tests.docker.conftest import RUN_ID, docker_client  # noqa: F401 (the engine and the desktop image)
from tests.live import ControlPlane, agent_process, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT_DIR = Path(tempfile.gettempdir()) / f"streamspace-browser-{RUN_ID}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def docker_agent(transactional_db, docker_client, control_plane):  # noqa: F811
    """A real Docker agent process (``agent_clients.docker_agent``) connected to Daphne A."""
    from agents_app.models import Agent
    from agents_app.services import agent_register

    agent_id = f"{RUN_ID}-browser"
    _, token, _ = agent_register(agent_id=agent_id, platform="docker", region="test")
    proc = agent_process(control_plane, agent_id, token, module="agent_clients.docker_agent").start()
    proc.agent_id = agent_id
    try:
        wait_for(
            lambda: Agent.objects.filter(agent_id=agent_id, status="online").exists() or not proc.alive,
            30,
            0.1,
            what=f"the Docker agent online\n{proc.output()}",
        )
        assert proc.alive, f"the Docker agent exited:\n{proc.output()}"
        yield proc
    finally:
        _terminate_leftovers(control_plane, agent_id, proc)
        proc.stop(15)


def _terminate_leftovers(cp: ControlPlane, agent_id: str, proc) -> None:
    """After a failed test: ask the agent to end what is still live (the session-finish
    leftover check of tests/docker removes anything it misses, and says so)."""
    from rest_framework_simplejwt.tokens import AccessToken

    from sessions_app.models import Session
    from sessions_app.states import State

    live = Session.objects.filter(agent__agent_id=agent_id).exclude(state__in=[State.TERMINATED, State.FAILED])
    for session in live.select_related("owner"):
        cp.request("DELETE", f"/api/v1/sessions/{session.pk}", str(AccessToken.for_user(session.owner)))
    if proc.alive and live.exists():
        with contextlib.suppress(AssertionError):  # the leftover check reports what stays
            wait_for(lambda: not live.exists(), 30, 0.2, what="leftover sessions terminated")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps its event loop registered on this thread while it runs,
    # so Django would take the test's (synchronous) ORM calls for calls from async code.
    with pytest.MonkeyPatch.context() as mp, sync_playwright() as p:
        mp.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def new_context(browser, request):
    """new_context(name) -> a fresh browser context (its own cookies); every page of it is
    screenshotted to /tmp if the test fails, and the contexts are closed afterwards."""
    made = []

    def make(name: str, **kwargs):
        kwargs.setdefault("viewport", {"width": 1366, "height": 900})
        context = browser.new_context(**kwargs)
        context.set_default_timeout(15_000)
        context.problems = problems = []  # failed requests, page errors, console errors: shown on failure
        context.on("requestfailed", lambda r: problems.append(f"request failed: {r.method} {r.url}: {r.failure}"))
        context.on("weberror", lambda e: problems.append(f"page error: {e.error}"))
        context.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        made.append((name, context))
        return context

    yield make
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        for name, context in made:
            for problem in context.problems:
                print(f"{name}: {problem}")
            for i, page in enumerate(context.pages):
                path = SCREENSHOT_DIR / f"{request.node.name}-{name}-{i}.png"
                try:
                    page.screenshot(path=str(path), full_page=True, timeout=5_000)
                    print(f"screenshot: {path} ({page.url})")
                except Exception as exc:  # a crashed page must not hide the test's own failure
                    print(f"no screenshot of {page.url}: {exc}")
    for _, context in made:
        context.close()
