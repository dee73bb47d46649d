"""The viewer socket: ``WS /api/v1/vnc/<session_id>`` (noVNC's ``binary`` subprotocol).

Authenticates (login cookie or ``?token=<JWT>``), checks the user may see the session,
then opens a tunnel through the session's agent, wherever that agent is connected, and
relays bytes both ways with credit-based flow control.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from agent_clients import protocol
from agent_clients.runtime.logfmt import log_context
from sessions_app import clipboard, selectors
from sessions_app import services as session_services
from sessions_app.states import State
from streamspace.errors import NotFound
from vnc_app import relay, services
from vnc_app.rfb import ClientStreamWatcher

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 15.0  # seconds for the agent to reach the desktop
# The browser cannot be paused under Daphne, so a viewer that outruns the desktop by
# this much is closed with a reason instead of being buffered without bound.
MAX_VIEWER_BACKLOG = 2 * protocol.TUNNEL_WINDOW


def same_origin(scope) -> bool:
    """True unless a browser says the page opening this socket is on another site.
    (Browsers always send Origin on WebSocket handshakes; other clients need none.)"""
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin")
    if origin is None:
        return True
    host = headers.get(b"host", b"").decode("latin-1").lower()
    return urlsplit(origin.decode("latin-1")).netloc.lower() == host


@database_sync_to_async
def _load(user, session_id):
    """(session id, agent channel, state, session has sound, clipboard rules) if the user
    may view the session; NotFound otherwise."""
    session = selectors.session_get_for_user(user=user, session_id=session_id)
    agent_channel = session.agent.channel_name if session.agent else ""
    return session.pk, agent_channel, session.state, session.sound, clipboard.rules(session.template)


class VncConsumer(relay.DirectDispatch, AsyncWebsocketConsumer):
    stream = "vnc"  # what the tunnel carries (protocol.STREAMS); vnc_app.audio.AudioConsumer: "audio"
    tunnel_id: int | None = None
    connection_pk: int | None = None
    session_id = None  # the session's UUID once connect has found it

    async def dispatch(self, message):
        with log_context(session_id=self.session_id):  # every log line of the socket names its session
            await super().dispatch(message)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_channel = ""
        self.ready = False
        self.pending: list[bytes] = []  # viewer bytes held until the agent reports the tunnel ready
        self.to_agent_outstanding = 0  # bytes sent towards the agent not yet credited back
        self.unreported = 0  # bytes delivered to the browser not yet credited to the agent
        self.bytes_to_client = 0
        self.bytes_from_client = 0
        self.close_reason = ""
        self.seq = relay.Sequence()
        self.watcher = ClientStreamWatcher()
        self.last_activity_write = 0.0
        self.open_timer: asyncio.Task | None = None

    async def connect(self):
        subprotocols = self.scope.get("subprotocols") or []
        await self.accept("binary" if "binary" in subprotocols else None)
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._finish(protocol.CLOSE_UNAUTHORIZED, "log in first")
            return
        if not self.scope.get("token_auth") and not same_origin(self.scope):
            # A login cookie rides along on cross-site sockets too: only our own pages may use it.
            await self._finish(protocol.CLOSE_FORBIDDEN, "cross-site viewer connections need ?token=<JWT>")
            return
        try:
            self.session_id, self.agent_channel, state, sound, rules = await _load(
                user, self.scope["url_route"]["kwargs"]["session_id"]
            )
        except NotFound:
            await self._finish(protocol.CLOSE_NOT_FOUND, "no such session")
            return
        if refusal := self.refusal(sound=sound):
            await self._finish(*refusal)
            return
        self.watcher = ClientStreamWatcher(rules)
        if state != State.RUNNING:
            await self._finish(protocol.CLOSE_UNAVAILABLE, f"the session is {state}, not running")
            return
        if not self.agent_channel:
            await self._finish(protocol.CLOSE_UNAVAILABLE, "the session's agent is not connected")
            return
        client = self.scope.get("client") or ("", 0)
        self.connection_pk = await database_sync_to_async(services.vnc_connection_open)(
            session_id=self.session_id, user_id=user.pk, client_address=str(client[0]), stream=self.stream
        )
        self.tunnel_id = secrets.randbits(32)
        relay.register(self)
        await relay.deliver(
            self.channel_layer,
            self.agent_channel,
            {
                "type": "tunnel.open",
                "tunnel_id": self.tunnel_id,
                "session_id": str(self.session_id),
                "viewer": self.channel_name,
                "stream": self.stream,
            },
        )
        self.open_timer = asyncio.create_task(self._open_deadline())
        with log_context(session_id=self.session_id):
            log.info("viewer of %s connected: tunnel %s", self.session_id, self.tunnel_id)

    def refusal(self, *, sound: bool) -> tuple[int, str] | None:
        """(close code, reason) when this socket is not offered for the session; None otherwise."""
        return None

    async def _open_deadline(self):
        await asyncio.sleep(OPEN_TIMEOUT)
        if not self.ready:
            await self._finish(protocol.CLOSE_UNAVAILABLE, "the agent did not open the desktop connection in time")

    async def _finish(self, code: int, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        await self.close(code=code, reason=reason)

    close_with_reason = _finish  # a lost database or channel layer closes this way (relay.DirectDispatch)

    async def channel_layer_lost(self):
        """The channel layer is down: a tunnel through it carries nothing any more. Close
        with 4503 and the reason; the viewer reconnects by itself (static/js/viewer.js)."""
        if self.tunnel_id is not None and not relay.is_local(self.agent_channel):
            await self._finish(protocol.CLOSE_UNAVAILABLE, relay.LAYER_UNAVAILABLE)

    async def disconnect(self, code):
        if self.open_timer:
            self.open_timer.cancel()
        if self.tunnel_id is None:
            return
        relay.unregister(self)
        reason = self.close_reason or f"viewer closed ({code})"
        try:
            await relay.deliver(
                self.channel_layer,
                self.agent_channel,
                {"type": "tunnel.release", "tunnel_id": self.tunnel_id, "reason": reason},
            )
        except relay.LayerUnavailable as exc:  # the agent's process releases it (relay.LayerWatch)
            log.info("viewer of %s: could not release tunnel %s: %s", self.session_id, self.tunnel_id, exc)
        log.info("viewer of %s closed tunnel %s: %s", self.session_id, self.tunnel_id, reason)
        self.tunnel_id = None
        await database_sync_to_async(services.vnc_connection_close)(
            connection_pk=self.connection_pk,
            bytes_to_client=self.bytes_to_client,
            bytes_from_client=self.bytes_from_client,
            reason=reason,
        )

    # --- browser -> agent -------------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if self.tunnel_id is None or bytes_data is None:
            return
        self.bytes_from_client += len(bytes_data)
        if self.watcher.feed(bytes_data):
            await self._note_input()
        if self.watcher.lost and self.watcher.rules.restricts:  # no longer held (vnc_app.rfb)
            await self._finish(protocol.CLOSE_PROTOCOL_ERROR, "the viewer's RFB stream cannot be followed")
            return
        bytes_data = self.watcher.take()
        if not bytes_data:
            return
        if not self.ready:
            self.pending.append(bytes_data)
            if sum(map(len, self.pending)) > MAX_VIEWER_BACKLOG:
                await self._finish(protocol.CLOSE_TOO_LARGE, "the viewer sent too much before the desktop answered")
            return
        await self._forward(bytes_data)

    async def _forward(self, data: bytes) -> None:
        self.to_agent_outstanding += len(data)
        if self.to_agent_outstanding > MAX_VIEWER_BACKLOG:
            await self._finish(protocol.CLOSE_TOO_LARGE, "the viewer sends faster than the desktop accepts")
            return
        event = {"type": "tunnel.to_agent", "tunnel_id": self.tunnel_id, "seq": self.seq.next(),
                 "frames": relay.split(self.tunnel_id, data)}  # fmt: skip
        await relay.deliver(self.channel_layer, self.agent_channel, event)

    async def _note_input(self) -> None:
        now = time.monotonic()
        if now - self.last_activity_write >= settings.SESSION_ACTIVITY_INTERVAL:
            self.last_activity_write = now
            await database_sync_to_async(session_services.session_record_activity)(session_id=self.session_id)

    # --- agent -> browser (events from the agent consumer) ----------------------------------

    async def tunnel_ready(self, event):
        self.ready = True
        if self.open_timer:
            self.open_timer.cancel()
        pending, self.pending = self.pending, []
        for data in pending:
            await self._forward(data)
        await database_sync_to_async(services.vnc_connection_tunnel_ready)(connection_pk=self.connection_pk)

    async def tunnel_data(self, event):
        if self.tunnel_id is None or self.close_reason:  # closed by us: sending would raise
            return
        try:
            self.seq.check(event["seq"])
        except relay.SequenceGap as exc:
            await self._finish(protocol.CLOSE_UNAVAILABLE, exc.args[0])
            return
        await self._to_browser(event["bytes"])

    async def _to_browser(self, data: bytes) -> None:
        """Send the desktop's bytes to the browser and credit them back to the agent (in
        batches). The credit is granted once Daphne has the bytes, not once the browser
        has them: see docs/ARCHITECTURE.md, "Flow control"."""
        await self.send(bytes_data=data)
        self.bytes_to_client += len(data)
        self.unreported += len(data)
        if self.unreported >= relay.CREDIT_BATCH:
            grant, self.unreported = self.unreported, 0
            await relay.deliver(
                self.channel_layer,
                self.agent_channel,
                {"type": "tunnel.grant", "tunnel_id": self.tunnel_id, "n": grant},
            )

    async def tunnel_credit(self, event):
        self.to_agent_outstanding = max(0, self.to_agent_outstanding - event["n"])

    async def tunnel_closed(self, event):
        if self.tunnel_id is not None:
            await self._finish(self.closed_code(final=event.get("final", False)), event["reason"])

    def closed_code(self, *, final: bool) -> int:
        """The close code when the agent ends the tunnel; ``final``: the agent said trying
        again cannot help. The viewer (static/js/viewer.js) reconnects on any code but 4401/4404."""
        return protocol.CLOSE_GOING_AWAY
