"""The viewer works like a local desktop: the clipboard crosses both ways (UTF-8), the
desktop takes the browser window's size (on open, on resize, on a phone in portrait),
and a template can turn a clipboard direction off, which the relay and Xvnc enforce.

Everything is real: Debian's Chromium (Playwright) with the clipboard permissions
granted, the viewer on Daphne B, the Docker agent on Daphne A (every byte crosses
Redis), the desktop container; the desktop's clipboard is read and written with xclip
inside it, and its size read from Xvnc's own ServerInit (a raw RFB login on the
container's port)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.browser.test_viewer_e2e import ALICE_PASSWORD, VIEWER_CONNECTED, jwt, login
from tests.docker.rfb import handshake, vnc_auth_response
from tests.live import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.browser,
]

NON_ASCII = "Grüße aus Köln · 東京 · ✓ — ½"
PASTED = "Ça marche: Δ→ζ 🙂"
BEFORE_OPEN = "copié avant l'ouverture ✓"
EXTENDED_CLIPBOARD = -1063131698  # 0xC0A1E5CE
DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE = -223, -308
CAPS, REQUEST, NOTIFY, PROVIDE, TEXT = 1 << 24, 1 << 25, 1 << 27, 1 << 28, 1

# What noVNC sends on the viewer socket, kept for tests/test_rfb_watcher.py's captures.
RECORD_SENT = """(() => {
  const sent = [];
  window.__rfbSent = sent;
  const original = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (this.url.includes('/api/v1/vnc/')) {
      const u8 = data instanceof Uint8Array ? data : new Uint8Array(data);
      let s = '';
      for (let i = 0; i < u8.length; i++) s += String.fromCharCode(u8[i]);
      sent.push(btoa(s));
    }
    return original.call(this, data);
  };
})();"""

SIZES = """() => {
  const canvas = document.querySelector('#screen canvas');
  const screen = document.getElementById('screen');
  return { canvas: canvas ? [canvas.width, canvas.height] : null, screen: [screen.clientWidth, screen.clientHeight] };
}"""


def start_session(cp, template_slug: str) -> str:
    from sessions_app.models import Session

    status, body = cp.request("POST", "/api/v1/sessions", jwt(cp, "alice", ALICE_PASSWORD), {"template": template_slug})
    assert status == 201, body
    session_id = body["id"]
    wait_for(lambda: Session.objects.get(pk=session_id).state == "running", 60, 0.2, what="the session running")
    return session_id


def container_of(docker_client, session_id: str):
    (container,) = docker_client.containers.list(filters={"label": f"streamspace.session={session_id}"})
    return container


def xclip(container, *args: str, stdin: str | None = None) -> str:
    """Run xclip as the desktop's user on its display; its output (or '' when it fails)."""
    command = ["timeout", "5", "xclip", "-selection", "clipboard", *args]
    if stdin is not None:  # xclip -i stays up to serve the selection: not on the exec's output
        command = ["sh", "-c", 'printf "%s" "$1" | xclip -selection clipboard -i >/dev/null 2>&1', "sh", stdin]
    code, out = container.exec_run(command, user="1000", environment={"DISPLAY": ":1"})
    return out.decode("utf-8", "replace") if code == 0 else ""


def desktop_size(container, session) -> tuple[int, int]:
    """The framebuffer size Xvnc itself reports (ServerInit of a fresh RFB login)."""
    container.reload()
    port = int(container.ports["5901/tcp"][0]["HostPort"])
    width, height, _ = handshake("127.0.0.1", port, session.vnc_password)
    return width, height


def wait_desktop_follows(page, container, session, timeout: float = 15) -> tuple[int, int]:
    """Wait until the canvas, and Xvnc's framebuffer, have the screen area's size."""
    seen = {}

    def follows():
        sizes = page.evaluate(SIZES)
        seen.update(sizes, xvnc=desktop_size(container, session))
        return sizes["canvas"] == sizes["screen"] and tuple(sizes["screen"]) == seen["xvnc"]

    wait_for(follows, timeout, 0.3, what=f"the desktop to take the window's size: {seen}")
    return tuple(seen["xvnc"])


def open_viewer(new_context, base, session_id, clipboard_text=None, **context_args):
    """A logged-in viewer page, connected; ``clipboard_text`` is put in the browser's
    clipboard before the viewer opens."""
    ctx = new_context("alice", permissions=["clipboard-read", "clipboard-write"], **context_args)
    ctx.add_init_script(RECORD_SENT)
    page = ctx.new_page()
    login(page, base, "alice", ALICE_PASSWORD)
    if clipboard_text is not None:
        page.evaluate(f"navigator.clipboard.writeText({clipboard_text!r})")
    page.goto(f"{base}/vnc-viewer/{session_id}")
    page.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    return ctx, page


@pytest.fixture(scope="module")
def limited_daphne(django_db_setup, django_db_blocker):
    """A Daphne on the same database and channel layer allowing 1000 bytes to the browser."""
    from tests.live import ControlPlane

    cp = ControlPlane("daphne-clipb", CLIPBOARD_MAX_TO_BROWSER="1000").start()
    yield cp
    cp.stop()


def test_clipboard_both_ways_and_the_desktop_follows_the_window_and_the_phone(
    limited_daphne, control_plane, control_plane_b, docker_agent, docker_client, desktop_template, alice, new_context
):
    from sessions_app.models import Session

    session_id = start_session(control_plane, "desktop")
    session = Session.objects.get(pk=session_id)
    container = container_of(docker_client, session_id)
    ctx, page = open_viewer(new_context, control_plane_b.http_url, session_id, clipboard_text=BEFORE_OPEN)

    # Browser -> desktop on connect: what the browser's clipboard held before the viewer
    # opened is sent once the RFB handshake is done (noVNC drops a paste before it).
    wait_for(lambda: xclip(container, "-o") == BEFORE_OPEN, 10, 0.2, what="the clipboard of before in the desktop's")

    # Resize to the window: on open, then when the window changes (noVNC debounces it).
    opened = wait_desktop_follows(page, container, session)
    assert opened != (1280, 800) and opened[0] > 1200, opened
    page.set_viewport_size({"width": 1000, "height": 700})
    resized = wait_desktop_follows(page, container, session)
    assert resized[0] == 1000 and resized[1] < 700, resized

    # Desktop -> browser: copied with xclip in the desktop, read from the browser's clipboard.
    xclip(container, stdin=NON_ASCII)
    wait_for(lambda: page.evaluate("window.streamspaceViewer.clipboard.written") == NON_ASCII, 10, 0.2,
             what="the desktop's clipboard in the browser's")  # fmt: skip
    assert page.evaluate("navigator.clipboard.readText()") == NON_ASCII
    assert page.input_value("#viewer-clipboard-text") == NON_ASCII

    # Browser -> desktop, by itself: the browser's clipboard changes while the page is in the
    # background; coming back to the tab sends it.
    other = ctx.new_page()
    other.goto(f"{control_plane_b.http_url}/")
    other.evaluate(f"navigator.clipboard.writeText({PASTED!r})")
    page.bring_to_front()
    page.evaluate("window.dispatchEvent(new Event('focus'))")  # headless Chromium sends no focus on tab switch
    wait_for(lambda: xclip(container, "-o") == PASTED, 10, 0.2, what="the browser's clipboard in the desktop's")
    other.close()

    # Browser -> desktop through the panel (what works in every browser).
    page.click("#viewer-clipboard")
    page.fill("#viewer-clipboard-text", "from the panel: ünïcödé")
    page.click("#viewer-clipboard-send")
    wait_for(
        lambda: xclip(container, "-o") == "from the panel: ünïcödé", 10, 0.2, what="the panel's text in the desktop"
    )

    # Full screen: the desktop takes the whole screen; leaving it gives the old size back.
    page.click("#viewer-fullscreen")
    full = wait_desktop_follows(page, container, session)
    assert full[1] > resized[1], (full, resized)
    page.evaluate("document.exitFullscreen()")
    assert wait_desktop_follows(page, container, session) == resized

    page.mouse.click(300, 300)
    page.keyboard.type("echo captured\n", delay=20)
    wait_for(lambda: len(page.evaluate("window.__rfbSent")) > 20, 5, 0.1, what="the typing sent")
    if os.environ.get("STREAMSPACE_CAPTURE_RFB"):  # how tests/data/novnc-client-stream.b64 was made
        Path(os.environ["STREAMSPACE_CAPTURE_RFB"]).write_bytes(base64.b64encode(captured(page)))

    # Raw clients connect only once the page's own resizes are done: Xvnc (TigerVNC 1.12,
    # SMsgWriter::writeDesktopSize) closes a client that has not yet announced DesktopSize
    # ("Client does not support desktop size changes") when the framebuffer changes size,
    # and through the relay a raw client's SetEncodings is still in flight ~50-100 ms after
    # ServerInit, so a resize of the page's landing then closed it (seen: 2 in ~10 runs).
    wait_desktop_follows(page, container, session)

    # A client other than the page, through the relay: it gets the desktop's copies and
    # its paste lands (the control for the template with the clipboard off, below).
    assert exchange_with_raw_clients(control_plane_b, session, container, direct=False, crosses=True) == (
        "pasted by raw client 0",
        [["copied while raw clients watch"]],
    )

    # A client that announces the extended clipboard but never sends Caps is held to the
    # limit to the browser too (1000 bytes on this Daphne): a copy within it arrives, a
    # longer one is only announced. (Xvnc cannot fetch an X selection sent in INCR pieces,
    # above about 256 KiB, so the default 1 MiB could not show this.)
    small, large = "s" * 900, "L" * 1100
    wait_desktop_follows(page, container, session)  # no resize lands while it logs in (above)
    got, notified = copies_to_a_client_without_caps(limited_daphne, session, container, small, large)
    assert (got, notified) == ([small], 1)

    # Scale instead (remembered): after a reload the desktop keeps its size whatever the window.
    page.click("#viewer-fit")
    assert page.evaluate("localStorage.getItem('streamspace-viewer-fit')") == "scale"
    page.set_viewport_size({"width": 900, "height": 650})
    page.reload()
    page.wait_for_function(VIEWER_CONNECTED, timeout=30_000)
    assert page.inner_text("#viewer-fit") == "Fit to window"
    time.sleep(1.5)  # noVNC's resize debounce is 0.5 s: a resize in scale mode would show by now
    assert desktop_size(container, session) == resized

    # The relay followed every message noVNC sent (resizes, extended clipboard, QEMU key
    # events, fences): after all that, typing still counts as input.
    mark = Session.objects.get(pk=session_id).last_activity
    time.sleep(1.1)  # SESSION_ACTIVITY_INTERVAL in tests: the next input is written
    page.keyboard.type("echo ok\n", delay=20)
    wait_for(lambda: Session.objects.get(pk=session_id).last_activity != mark, 10, 0.2, what="typing recorded")
    ctx.close()

    # A phone in portrait gets a desktop of its own size, not a thumbnail of a wide one.
    _, phone = open_viewer(new_context, control_plane_b.http_url, session_id,
                           viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                           device_scale_factor=3)  # fmt: skip
    width, height = wait_desktop_follows(phone, container, session)
    assert width == 390 and 600 < height < 844, (width, height)


# --- a template with the clipboard off: nothing crosses, whoever sends it -----------------


class RawRFB:
    """An RFB client on a byte transport (the relay's socket, or the container's port)
    that speaks the extended clipboard like noVNC and answers the server's requests."""

    def __init__(self, send, recv, password: str, answer_caps: bool = True):
        self.send, self._recv, self.buf = send, recv, b""
        self.answer_caps = answer_caps  # False: announce the extended clipboard, never send Caps
        self.notified = 0  # extended Notify messages the server sent us
        self.server_caps = False  # the server's Caps arrived (its answer to our SetEncodings)
        self.error: Exception | None = None
        self.offered = None  # the text our Provide answers a Request with
        self.got: list[str] = []  # clipboard texts the server sent us
        self._read(12)
        self.send(b"RFB 003.008\n")
        count = self._read(1)[0]
        assert 2 in self._read(count)
        self.send(b"\x02")
        self.send(vnc_auth_response(password, self._read(16)))
        assert self._read(4) == b"\0\0\0\0", "VncAuth refused"
        self.send(b"\x01")
        self.width, self.height = struct.unpack(">HH", self._read(4))
        self._read(16)
        self._read(struct.unpack(">I", self._read(4))[0])
        # Raw, the extended clipboard, and desktop size changes (the page resizes the desktop).
        self.send(struct.pack(">BxHiiii", 2, 4, 0, EXTENDED_CLIPBOARD, DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def cut_text(self, flags: int, payload: bytes = b"") -> bytes:
        body = struct.pack(">I", flags) + payload
        return struct.pack(">Bxxxi", 6, -len(body)) + body

    def paste(self, text: str) -> None:
        """Offer text as noVNC does (Notify; Provide on Request), and the old way as well."""
        self.offered = text
        self.send(self.cut_text(NOTIFY | TEXT))
        latin = text.encode("latin-1", "replace")
        self.send(struct.pack(">Bxxxi", 6, len(latin)) + latin)

    def provide(self, text: str) -> bytes:
        data = (text + "\0").encode()
        return self.cut_text(PROVIDE | TEXT, zlib.compress(struct.pack(">I", len(data)) + data))

    def serve(self, stop: threading.Event) -> None:
        """Answer server messages until stopped: caps, requests, clipboard, screen updates
        (what ends it early is kept in ``error``)."""
        try:
            self._serve(stop)
        except Exception as exc:
            self.error = exc
            raise

    def _serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                kind = self._read(1)[0]
            except TimeoutError:
                continue
            if kind == 0:  # FramebufferUpdate (raw)
                self._read(1)
                for _ in range(struct.unpack(">H", self._read(2))[0]):
                    _, _, w, h, enc = struct.unpack(">HHHHi", self._read(12))
                    if enc == 0:
                        self._read(w * h * 4)
                    elif enc == EXTENDED_DESKTOP_SIZE:
                        self._read(16 * self._read(4)[0])
            elif kind == 2:  # Bell
                pass
            elif kind == 3:  # ServerCutText
                self._read(3)
                (length,) = struct.unpack(">i", self._read(4))
                body = self._read(abs(length))
                if length >= 0:
                    self.got.append(body.decode("latin-1"))
                    continue
                (flags,) = struct.unpack(">I", body[:4])
                if flags & CAPS:
                    self.server_caps = True
                    if self.answer_caps:
                        self.send(self.cut_text(CAPS | REQUEST | NOTIFY | PROVIDE | TEXT, struct.pack(">I", 1 << 20)))
                elif flags & REQUEST and self.offered is not None:
                    self.send(self.provide(self.offered))
                elif flags & NOTIFY and flags & TEXT:
                    self.notified += 1
                    self.send(self.cut_text(REQUEST | TEXT))
                elif flags & PROVIDE:
                    raw = zlib.decompressobj().decompress(body[4:])  # a zlib stream, never finished
                    self.got.append(raw[4 : 4 + struct.unpack(">I", raw[:4])[0]].rstrip(b"\0").decode())
            else:
                raise AssertionError(f"unexpected server message {kind}")


def relay_transport(cp, session_id, token):
    url = f"{cp.ws_url}/api/v1/vnc/{session_id}?token={token}"
    ws = ws_connect(url, subprotocols=["binary"], open_timeout=10).__enter__()

    def recv():
        return ws.recv(timeout=0.5)

    return ws, ws.send, recv


def exchange_with_raw_clients(cp, session, container, direct: bool, crosses: bool = False):
    """Raw clients (through the relay; and straight at Xvnc's port if ``direct``) each
    paste a text, then the desktop copies one: (the desktop's clipboard once the pastes
    are in or refused, what each client received). ``crosses``: the clipboard is on, so
    wait (at most 15 s, on a loaded machine) until a paste lands and every client got the
    copy; otherwise give each 2 s."""
    ws, send, recv = relay_transport(cp, session.pk, jwt(cp, "alice", ALICE_PASSWORD))
    clients = [RawRFB(send, recv, session.vnc_password)]
    sock = None
    if direct:
        container.reload()
        sock = socket.create_connection(("127.0.0.1", int(container.ports["5901/tcp"][0]["HostPort"])), timeout=10)
        sock.settimeout(0.5)
        clients.append(RawRFB(sock.sendall, lambda: sock.recv(65536), session.vnc_password))
    stop = threading.Event()
    threads = [threading.Thread(target=c.serve, args=(stop,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        clients[0].paste("pasted by raw client 0")
        if direct:
            clients[1].paste("pasted by raw client 1")
        # A paste lands at once (Xvnc owns the selection and asks the client when read).
        offered = {c.offered for c in clients}
        deadline = time.monotonic() + (15 if crosses else 2)
        while (pasted := xclip(container, "-o")) not in offered and time.monotonic() < deadline:
            time.sleep(0.2)
        xclip(container, stdin="copied while raw clients watch")
        deadline = time.monotonic() + (15 if crosses else 2)
        while not all(c.got for c in clients) and time.monotonic() < deadline:
            time.sleep(0.2)
        return pasted, [c.got for c in clients]
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        ws.close()
        if sock:
            sock.close()


def copies_to_a_client_without_caps(cp, session, container, small: str, large: str) -> tuple[list[str], int]:
    """A raw client through the relay announces the extended clipboard and never sends
    Caps (TigerVNC then assumes 20 MiB unasked); the desktop copies ``small``, then
    ``large``: (the texts the client received, how many Notify it got). Xvnc answers
    each copy with a Provide or a Notify, so each wait ends with its answer."""
    ws, send, recv = relay_transport(cp, session.pk, jwt(cp, "alice", ALICE_PASSWORD))
    client = RawRFB(send, recv, session.vnc_password, answer_caps=False)
    stop = threading.Event()
    thread = threading.Thread(target=client.serve, args=(stop,), daemon=True)
    thread.start()

    def copy(text):  # long texts do not fit an exec's argument: made in the desktop by a pipe
        command = f"head -c {len(text)} /dev/zero | tr '\\0' {text[0]!r} | xclip -selection clipboard -i"
        container.exec_run(["sh", "-c", f"{command} >/dev/null 2>&1"], user="1000", environment={"DISPLAY": ":1"})

    try:
        # Xvnc answers SetEncodings with its Caps; the relay's follow them on the same stream.
        wait_for(lambda: client.server_caps or client.error, 15, 0.1, what="Xvnc's Caps")
        assert client.error is None, (repr(client.error), container.logs(tail=60).decode(errors="replace")[-3000:])
        time.sleep(0.3)
        copy(small)
        wait_for(lambda: client.got or client.notified, 15, 0.1, what="Xvnc's answer to the short copy")
        copy(large)
        wait_for(lambda: len(client.got) + client.notified > 1, 15, 0.1, what="Xvnc's answer to the long copy")
        return client.got, client.notified
    finally:
        stop.set()
        thread.join(5)
        ws.close()


def test_a_template_with_the_clipboard_off_lets_nothing_cross(
    control_plane, control_plane_b, docker_agent, docker_client, desktop_template, alice, new_context
):
    from sessions_app.models import Session, Template

    Template.objects.create(slug="sealed", name="Sealed", image=desktop_template.image,
                            clipboard_to_desktop=False, clipboard_to_browser=False)  # fmt: skip
    session_id = start_session(control_plane, "sealed")
    session = Session.objects.get(pk=session_id)
    container = container_of(docker_client, session_id)
    xclip(container, stdin="inside only")

    # The page shows no clipboard and sends nothing; the desktop's copies never arrive.
    ctx, page = open_viewer(new_context, control_plane_b.http_url, session_id)
    assert page.is_hidden("#viewer-clipboard")
    page.evaluate("navigator.clipboard.writeText('from the browser')")
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    xclip(container, stdin=NON_ASCII)
    # Something that does cross afterwards, on the same connection: typed text on screen.
    page.keyboard.type("echo sealed\n", delay=20)
    time.sleep(2)
    assert page.evaluate("window.streamspaceViewer.clipboard.fromDesktop") is None
    assert xclip(container, "-o") == NON_ASCII
    ctx.close()

    # A client that ignores the page: through the relay (which drops what it offers and asks
    # for), then straight at Xvnc (-AcceptCutText=0 -SendCutText=0, and vncconfig inside
    # the desktop cannot turn them back on).
    code, out = container.exec_run(["vncconfig", "-display", ":1", "-set", "AcceptCutText=1"], user="1000")
    assert exchange_with_raw_clients(control_plane_b, session, container, direct=True) == (
        NON_ASCII,  # what the desktop copied before: no paste replaced it
        [[], []],
    )
    print(f"vncconfig -set AcceptCutText=1 inside the desktop: exit {code}, {out.decode(errors='replace').strip()!r}")


def captured(page) -> bytes:
    return b"".join(base64.b64decode(chunk) for chunk in page.evaluate("window.__rfbSent"))
