"""The whole path in a real browser: portal → launch → noVNC viewer → typing → hibernate →
wake → another user refused → terminate.

Everything is real: headless Chromium (Playwright), two Daphne processes on the Redis
channel layer (the Docker agent holds its socket on A, the browser talks to B, so every
VNC byte crosses Redis), the agent runtime process with the Docker backend, and a
desktop container (Xvnc + openbox + a focused xterm) on the local engine."""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.live import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

ALICE_PASSWORD = "alice-password-1"  # tests/conftest.py's personas
BOB_PASSWORD = "bob-password-1"

VIEWER_CONNECTED = "() => window.streamspaceViewer && window.streamspaceViewer.state === 'connected'"

# The desktop has taken the size of the viewer's screen area (the viewer resizes it).
DESKTOP_FOLLOWS_WINDOW = """() => {
  const canvas = document.querySelector('#screen canvas');
  const screen = document.getElementById('screen');
  return !!canvas && canvas.width === screen.clientWidth && canvas.height === screen.clientHeight;
}"""
SCREEN_SHAPE = (
    "() => [document.getElementById('screen').clientHeight, document.getElementById('screen').clientWidth, 3]"
)

# The RGBA pixels of noVNC's canvas (the remote framebuffer at its own size), base64 encoded.
READ_CANVAS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let binary = '';
  for (let i = 0; i < data.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
  }
  return { width: canvas.width, height: canvas.height, rgba: btoa(binary) };
}"""

# Every value #viewer-status[data-state] takes, in order, installed before the page's own
# scripts run. Kept in sessionStorage, so the list survives the viewer reloading itself
# (what it does when noVNC's modules fail to load); "(load)" marks each document.
RECORD_VIEWER_STATES = """(() => {
  if (!location.pathname.startsWith('/vnc-viewer/')) return;
  const key = 'streamspace-test-viewer-states';
  const states = JSON.parse(sessionStorage.getItem(key) || '[]');
  states.push('(load)');
  window.__viewerStates = states;
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.id === 'viewer-status') states.push(r.target.dataset.state);
    }
    sessionStorage.setItem(key, JSON.stringify(states));
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
  sessionStorage.setItem(key, JSON.stringify(states));
})();"""

OPEN_SOCKET = """(url) => new Promise((resolve) => {
  const ws = new WebSocket(url, ['binary']);
  ws.binaryType = 'arraybuffer';
  let received = 0;
  ws.onmessage = (e) => { received += e.data.byteLength || 0; };
  ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, received });
  setTimeout(() => resolve({ code: null, reason: 'still open after 10 s', received }), 10000);
})"""


@dataclass
class Frame:
    """One picture of the remote desktop as the browser's canvas holds it."""

    rgb: np.ndarray  # (height, width, 3), uint8

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.rgb.tobytes()).hexdigest()

    @property
    def colours(self) -> int:
        packed = (
            (self.rgb[..., 0].astype(np.uint32) << 16) | (self.rgb[..., 1].astype(np.uint32) << 8) | self.rgb[..., 2]
        )
        return len(np.unique(packed))

    @property
    def lit(self) -> int:
        """Pixels that are not (near) black."""
        return int((self.rgb.max(axis=2) > 32).sum())

    def blank_reason(self) -> str | None:
        """Why this picture is not a desktop, or None. A canvas noVNC never drew on is one
        colour; the desktop (black root, openbox frame, a black xterm with an anti-aliased
        prompt) has dozens of colours and thousands of lit pixels."""
        if self.colours < 8:
            return f"only {self.colours} distinct colours"
        if self.lit < 2000:
            return f"only {self.lit} non-black pixels"
        return None

    def changed_text_rows(self, other: Frame) -> np.ndarray:
        """Rows where at least 8 pixels differ: lines of text. (A pointer the desktop
        hides or shows touches a pixel or two per row, and does not count.)"""
        per_row = (self.rgb != other.rgb).any(axis=2).sum(axis=1)
        return np.nonzero(per_row >= 8)[0]

    def changed_pixels(self, other: Frame) -> int:
        return int((self.rgb != other.rgb).any(axis=2).sum())


def read_canvas(page) -> Frame | None:
    shot = page.evaluate(READ_CANVAS)
    if shot is None:
        return None
    raw = np.frombuffer(base64.b64decode(shot["rgba"]), dtype=np.uint8)
    return Frame(raw.reshape(shot["height"], shot["width"], 4)[..., :3].copy())


def desktop_frame(page, timeout: float) -> Frame:
    """The canvas once it shows the desktop and has stopped changing (two equal reads)."""
    deadline = time.monotonic() + timeout
    last, why = None, "no canvas"
    while time.monotonic() < deadline:
        frame = read_canvas(page)
        if frame is not None:
            why = frame.blank_reason()
            if why is None and last is not None and frame.digest == last.digest:
                return frame
            last = frame if why is None else None
        time.sleep(0.3)
    raise AssertionError(f"the viewer's canvas did not show a settled desktop within {timeout}s: {why}")


def note_reloads(page, context) -> list[str]:
    """The viewer's states so far; says so when the viewer had to reload itself (its own
    recovery from noVNC failing to load: worth seeing, not a failure)."""
    states = page.evaluate("window.__viewerStates")
    if states.count("(load)") > 1:
        print(f"the viewer reloaded itself: {states}", *context.problems, sep="\n  ")
    return states


def login(page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base_url}/")
    assert page.locator(".user-name").inner_text() == username


def session_row(page, session_id: str):
    return page.locator(f'tr[data-session-id="{session_id}"]')


def wait_row_state(page, session_id: str, state: str, timeout: float) -> None:
    page.wait_for_selector(f'tr[data-session-id="{session_id}"][data-state="{state}"]', timeout=timeout * 1000)


def jwt(cp, username: str, password: str) -> str:
    status, body = cp.request("POST", "/api/v1/auth/token", body={"username": username, "password": password})
    assert status == 200, body
    return body["access"]


def vnc_socket_close_code(url: str) -> tuple[int | None, bytes]:
    """Open the viewer socket with the ``websockets`` client; (close code or None if it
    stayed open, the first bytes received)."""
    with ws_connect(url, subprotocols=["binary"], open_timeout=10, close_timeout=2) as ws:
        try:
            first = ws.recv(timeout=10)
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), b""
        except TimeoutError:
            return None, b""
        return None, first if isinstance(first, bytes) else first.encode()


def containers_of(docker_client, session_id: str):
    return docker_client.containers.list(all=True, filters={"label": f"streamspace.session={session_id}"})


def state_of(session_id: str) -> str:
    from sessions_app.models import Session

    return Session.objects.get(pk=session_id).state


def test_portal_viewer_typing_hibernate_wake_isolation_terminate(
    control_plane, control_plane_b, docker_agent, docker_client, desktop_template, alice, bob, new_context
):
    from agents_app.models import AgentCommand
    from sessions_app.models import Session

    started = time.monotonic()
    base = control_plane_b.http_url
    alice_ctx = new_context("alice")
    alice_ctx.add_init_script(RECORD_VIEWER_STATES)

    # 1. Log in at B (the agent is connected to A).
    portal = alice_ctx.new_page()
    login(portal, base, "alice", ALICE_PASSWORD)

    # 2. Launch from the catalog; the row follows the session to "running" without a reload.
    portal.locator('li.template[data-template="desktop"]').get_by_role("button", name="Launch").click()
    portal.wait_for_url(f"{base}/#sessions")
    row = portal.locator("tr[data-session-id]")
    assert row.count() == 1
    session_id = row.get_attribute("data-session-id")
    first_state = row.get_attribute("data-state")
    assert first_state in ("pending", "starting"), first_state
    portal.evaluate("window.__sameDocument = true")
    wait_row_state(portal, session_id, "running", 60)
    assert session_row(portal, session_id).locator(".state").inner_text().strip() == "Running"
    assert portal.evaluate("window.__sameDocument === true"), "the portal reloaded instead of refreshing the row"
    session = Session.objects.select_related("agent").get(pk=session_id)
    assert session.owner == alice and session.agent.agent_id == docker_agent.agent_id
    assert len(containers_of(docker_client, session_id)) == 1

    # 3. Open the viewer from the row (a new tab); noVNC connects through B → Redis → A → agent.
    with alice_ctx.expect_page() as opened:
        session_row(portal, session_id).get_by_role("link", name="Open viewer").click()
    viewer = opened.value
    assert viewer.url == f"{base}/vnc-viewer/{session_id}"
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    assert viewer.get_attribute("#viewer-status", "data-state") == "connected"
    assert viewer.evaluate("window.streamspaceViewer.connects") == 1
    note_reloads(viewer, alice_ctx)
    viewer.wait_for_function(DESKTOP_FOLLOWS_WINDOW, timeout=20_000)
    before = desktop_frame(viewer, 20)
    assert list(before.rgb.shape) == viewer.evaluate(SCREEN_SHAPE)  # resized to the window, not 1280x800

    # 4. Typing reaches the focused xterm: the picture changes, over more than one text line
    # (the echoed command, its output, the next prompt).
    viewer.keyboard.type("echo streamspace", delay=15)
    viewer.keyboard.press("Enter")
    deadline = time.monotonic() + 10
    while (after := read_canvas(viewer)).digest == before.digest:
        assert time.monotonic() < deadline, "typing did not change the picture"
        time.sleep(0.2)
    after = desktop_frame(viewer, 10)
    changed = before.changed_pixels(after)
    lines = before.changed_text_rows(after)
    assert changed > 200, f"only {changed} pixels changed"
    assert lines.size and lines[-1] - lines[0] >= 30, f"text changed in rows {lines.tolist()}: no new line after Enter?"
    print(
        f"desktop: {before.colours} colours, {before.lit} lit pixels; typing changed {changed} pixels, "
        f"text in rows {lines[0]}..{lines[-1]}"
    )

    # 5. Hibernate from the portal (the viewer closed, so nothing wakes it meanwhile).
    viewer.close()
    session_row(portal, session_id).get_by_role("button", name="Hibernate").click()
    portal.wait_for_url(f"{base}/#sessions")
    portal.evaluate("window.__sameDocument = true")
    wait_row_state(portal, session_id, "hibernated", 30)
    assert portal.evaluate("window.__sameDocument === true")
    hibernated_row = session_row(portal, session_id)
    assert hibernated_row.locator(".state").inner_text().strip() == "Hibernated"
    assert hibernated_row.get_by_role("button", name="Wake").is_visible()
    assert hibernated_row.get_by_role("link", name="Open viewer").count() == 0
    assert state_of(session_id) == "hibernated"
    (container,) = containers_of(docker_client, session_id)
    assert container.status == "exited", container.status  # processes stopped, container (and home) kept

    # ... and wake by opening the viewer again: it wakes the session itself and connects.
    viewer = alice_ctx.new_page()
    viewer.goto(f"{base}/vnc-viewer/{session_id}")
    viewer.wait_for_function(VIEWER_CONNECTED, timeout=45_000)
    assert viewer.evaluate("window.streamspaceViewer.connects") == 1
    states = note_reloads(viewer, alice_ctx)
    assert states[0] == "(load)" and "waking" in states and states[-1] == "connected", states
    assert state_of(session_id) == "running"
    # Known product bug, not fixed here (images/desktop/entrypoint.sh): now and then the
    # first xterm after a start runs but its window never shows (killing it, the restarted
    # one appears in 0.6 s), likely a race with openbox starting at the same moment; the
    # woken desktop then stays black and this check fails. Drawn ~5.6 s after a wake otherwise.
    viewer.wait_for_function(DESKTOP_FOLLOWS_WINDOW, timeout=20_000)
    woken = desktop_frame(viewer, 20)
    assert list(woken.rgb.shape) == viewer.evaluate(SCREEN_SHAPE)
    print(f"woken desktop: {woken.colours} colours, {woken.lit} lit pixels")
    wake = AgentCommand.objects.get(session_id=session_id, type=AgentCommand.Type.WAKE_SESSION)
    assert wake.status == AgentCommand.Status.COMPLETED

    # 6. bob: the viewer page is a 404 without the password, and the socket is refused (4404)
    # whether it carries bob's JWT or his login cookie; alice's JWT on the same URL is served.
    password = Session.objects.get(pk=session_id).vnc_password
    bob_ctx = new_context("bob")
    bob_page = bob_ctx.new_page()
    login(bob_page, base, "bob", BOB_PASSWORD)
    response = bob_page.goto(f"{base}/vnc-viewer/{session_id}")
    assert response.status == 404
    assert password not in bob_page.content()
    socket_url = f"{control_plane_b.ws_url}/api/v1/vnc/{session_id}"
    bob_page.goto(f"{base}/")
    from_page = bob_page.evaluate(OPEN_SOCKET, socket_url)
    assert from_page["code"] == 4404 and from_page["received"] == 0, from_page
    code, first = vnc_socket_close_code(f"{socket_url}?token={jwt(control_plane_b, 'bob', BOB_PASSWORD)}")
    assert code == 4404 and first == b"", (code, first)
    code, first = vnc_socket_close_code(f"{socket_url}?token={jwt(control_plane_b, 'alice', ALICE_PASSWORD)}")
    assert code is None and first.startswith(b"RFB 003."), (code, first)

    # 7. Terminate from the portal: the row goes away by itself, the viewer says the session
    # ended, and the container is gone.
    portal.reload()
    session_row(portal, session_id).get_by_role("button", name="Terminate").click()
    portal.wait_for_url(f"{base}/#sessions")
    session_row(portal, session_id).wait_for(state="detached", timeout=30_000)
    assert state_of(session_id) == "terminated"
    viewer.wait_for_function("() => window.streamspaceViewer.state === 'ended'", timeout=15_000)
    wait_for(lambda: not containers_of(docker_client, session_id), 15, 0.2, what="the container removed")

    elapsed = time.monotonic() - started
    print(f"browser end-to-end: {elapsed:.1f}s")
