"""The agent socket: ``WS /api/v1/agent/connect?agent_id=<id>``.

Thin: authenticate, then hand each validated message to a service. VNC tunnel frames
are routed to the viewer consumer that opened the tunnel (vnc_app.relay).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import transaction

from agent_clients import protocol
from agent_clients.runtime.logfmt import log_context
from agents_app import commands, selectors, services
from sessions_app import selectors as session_selectors
from vnc_app import relay

log = logging.getLogger(__name__)


def _bearer(scope) -> str | None:
    headers = dict(scope.get("headers") or [])
    return services.bearer_token(headers.get(b"authorization", b"").decode("latin-1"))


def in_db_thread(func):
    """Run ``func`` in the thread pool, not on the one thread-sensitive thread: each call
    is its own transaction on a pooled connection, so thousands of sockets do not queue
    behind each other."""
    return database_sync_to_async(func, thread_sensitive=False)


def _claim_deliverable(agent_pk: int, channel_name: str) -> list[str]:
    """Claim the agent's deliverable commands (pending -> sent) and return their frames;
    nothing for a socket that is no longer the agent's current one."""
    frames = []
    with transaction.atomic():
        try:
            services.current_connection(agent_pk=agent_pk, channel_name=channel_name)
        except services.Superseded:
            return []
        for command in selectors.commands_to_deliver(agent_pk=agent_pk):
            if commands.command_claim_for_delivery(command_pk=command.pk):
                frames.append(protocol.encode("command", command.as_message()))
    return frames


def _gc_verdicts(agent_pk: int, channel_name: str, session_ids: list[str]) -> dict[str, list[str]]:
    """The garbage collector's verdicts for ``session_ids``, for the agent's current socket
    only (a replaced connection raises Superseded, like every answer it sends)."""
    with transaction.atomic():
        services.current_connection(agent_pk=agent_pk, channel_name=channel_name)
        return session_selectors.session_gc_verdicts(agent_pk=agent_pk, session_ids=session_ids)


def _connect(agent_id: str, raw_token: str | None, channel_name: str):
    """Authenticate and attach in one trip: (agent pk, the channel this socket replaces) or None."""
    agent = services.agent_authenticate(agent_id=agent_id, raw_token=raw_token)
    if agent is None:
        return None
    return agent.pk, services.agent_attach(agent_pk=agent.pk, channel_name=channel_name)


def _then_deliver(service):
    """A service call followed by delivery of what became deliverable, in one trip."""

    def call(agent_pk: int, channel_name: str, **kwargs) -> list[str]:
        service(agent_pk=agent_pk, channel_name=channel_name, **kwargs)
        return _claim_deliverable(agent_pk, channel_name)

    return in_db_thread(call)


hello_and_deliver = _then_deliver(services.agent_hello)
heartbeat_and_deliver = _then_deliver(services.agent_heartbeat)
complete_and_deliver = _then_deliver(services.command_complete)
fail_and_deliver = _then_deliver(services.command_fail)


class TunnelRoute:
    """Where one tunnel's bytes go: the viewer's channel, and the sequence of data events."""

    def __init__(self, viewer: str):
        self.viewer = viewer
        self.seq = relay.Sequence()


class AgentConsumer(relay.DirectDispatch, AsyncWebsocketConsumer):
    agent_pk: int | None = None
    agent_id: str = ""
    handling = ""  # the agent frame being handled, for the reason of a crash-close

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tunnels: dict[int, TunnelRoute] = {}

    async def connect(self):
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        agent_id = (query.get("agent_id") or [""])[0]
        attached = None
        if protocol.valid_id(agent_id):
            attached = await in_db_thread(_connect)(agent_id, _bearer(self.scope), self.channel_name)
        await self.accept()
        if attached is None:
            if not agent_id:
                reason = "agent_id query parameter is required"
            elif not protocol.valid_id(agent_id):
                reason = "agent_id must be 1-255 characters without control characters"
            else:
                reason = "unknown agent or wrong token"
            await self._refuse(protocol.CLOSE_UNAUTHORIZED, reason)
            return
        (self.agent_pk, previous), self.agent_id = attached, agent_id
        relay.register(self)
        if previous:
            await self._tell(previous, {"type": "agent.replaced"})
        with log_context(agent_id=self.agent_id):  # known from here on: dispatch sets it for every later frame
            log.info("agent %s connected", self.agent_id)

    async def _refuse(self, code: int, reason: str) -> None:
        await self.send(text_data=protocol.encode("error", {"reason": reason, "ref": None}))
        await self.close(code=code, reason=reason)

    close_with_reason = _refuse  # a lost database closes the socket this way (relay.DirectDispatch)

    async def _tell(self, channel: str, event: dict) -> bool:
        """Deliver ``event`` to another consumer; False when the channel layer is unavailable
        (the viewer's own process then closes it: relay.LayerWatch)."""
        try:
            await relay.deliver(self.channel_layer, channel, event)
        except relay.LayerUnavailable as exc:
            log.info("agent %s: could not reach %s: %s", self.agent_id, channel, exc)
            return False
        return True

    async def channel_layer_lost(self):
        """The channel layer is down: release, at the agent, every tunnel whose viewer is in
        another process (its events can no longer arrive; the viewer is closed there)."""
        for tunnel_id, route in list(self.tunnels.items()):
            if not relay.is_local(route.viewer):
                await self._release_at_agent(tunnel_id, relay.LAYER_UNAVAILABLE)

    async def _release_at_agent(self, tunnel_id: int, reason: str) -> None:
        if self.tunnels.pop(tunnel_id, None):
            await self.send(text_data=protocol.encode("tunnel_close", {"tunnel_id": tunnel_id, "reason": reason}))

    async def dispatch(self, message):
        """Whatever a handler raises (outages aside: relay.DirectDispatch closes those with
        4503) closes the socket with 4500 and a reason instead of killing the consumer, so
        ``disconnect`` still runs and clears the channel name. The agent reconnects; its
        hello resynchronises everything, whatever state the failure left behind.
        Every log line of the socket carries the agent's id (structured logs)."""
        with log_context(agent_id=self.agent_id):
            try:
                await super().dispatch(message)
            except StopConsumer:
                raise
            except Exception:
                kind = message["type"]
                if kind == "websocket.disconnect":
                    raise
                what = self.handling or kind
                log.exception("agent %s: handling %s failed", self.agent_id or "(connecting)", what)
                if not self.accepted:
                    await self.accept()
                await self._refuse(protocol.CLOSE_INTERNAL_ERROR, f"internal error handling {what[:40]}; reconnect")
            finally:
                self.handling = ""

    async def disconnect(self, code):
        if self.agent_pk is None:
            return
        try:
            relay.unregister(self)
            tunnels, self.tunnels = self.tunnels, {}
            for route in tunnels.values():
                await self._tell(route.viewer, {"type": "tunnel.closed", "reason": "agent disconnected"})
        finally:  # a stale channel name would take the agent's commands to nowhere
            await in_db_thread(services.agent_detach)(agent_pk=self.agent_pk, channel_name=self.channel_name)
        log.info("agent %s disconnected (%s)", self.agent_id, code)

    # --- frames from the agent ----------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if self.agent_pk is None:
            return
        if bytes_data is not None:
            await self._receive_bytes(bytes_data)
            return
        try:
            message = protocol.decode_agent_message(text_data or "", uuid_session_ids=True)
        except protocol.ProtocolError as exc:
            await self._reject(exc)
            return
        handler = getattr(self, f"on_{message.type}")
        self.handling = message.type
        p = message.payload  # an answer's command id, a session event's session id, in the lines it causes
        try:
            with log_context(command_id=p.get("command_id"), session_id=p.get("session_id")):
                await handler(message)
        except services.Superseded as exc:
            log.warning("agent %s: refused a %s from a replaced connection", self.agent_id, message.type)
            await self._refuse(protocol.CLOSE_REPLACED, exc.message)
        except services.NotOwnedByAgent as exc:
            await self.send(text_data=protocol.encode("error", {"reason": exc.message, "ref": message.id}))

    async def _receive_bytes(self, frame: bytes) -> None:
        try:
            tunnel_id, data = protocol.unpack_data(frame)
        except protocol.ProtocolError as exc:
            await self._reject(exc)
            return
        route = self.tunnels.get(tunnel_id)
        if route is None:
            return  # a tunnel that just closed; its last bytes have nowhere to go
        event = {"type": "tunnel.data", "seq": route.seq.next(), "bytes": data}
        if not await self._tell(route.viewer, event):
            await self._release_at_agent(tunnel_id, relay.LAYER_UNAVAILABLE)

    async def _reject(self, exc: protocol.ProtocolError) -> None:
        log.warning("agent %s sent a bad frame: %s", self.agent_id, exc.reason)
        if exc.too_large:
            await self._refuse(protocol.CLOSE_TOO_LARGE, exc.reason)
        else:
            await self.send(text_data=protocol.encode("error", {"reason": exc.reason, "ref": None}))

    async def on_hello(self, message):
        if message.payload["agent_id"] != self.agent_id:
            await self._refuse(protocol.CLOSE_FORBIDDEN, "hello names another agent")
            return
        await self._send_all(await hello_and_deliver(self.agent_pk, self.channel_name, payload=message.payload))

    async def on_heartbeat(self, message):
        # Delivering here too is the fallback path: a lost poke costs one heartbeat interval.
        await self._send_all(await heartbeat_and_deliver(self.agent_pk, self.channel_name, payload=message.payload))

    async def on_ack(self, message):
        p = message.payload
        execution = p.get("execution") or 1
        void = await in_db_thread(services.command_ack)(
            agent_pk=self.agent_pk, channel_name=self.channel_name, command_id=p["command_id"], execution=execution
        )
        if void:
            await self.send(
                text_data=protocol.encode(
                    "void", {"command_id": p["command_id"], "execution": execution, "reason": void}
                )
            )

    async def on_complete(self, message):
        p = message.payload
        frames = await complete_and_deliver(
            self.agent_pk,
            self.channel_name,
            command_id=p["command_id"],
            result=p["result"],
            execution=p.get("execution") or 1,
        )
        await self._send_all(frames)

    async def on_failed(self, message):
        p = message.payload
        frames = await fail_and_deliver(
            self.agent_pk,
            self.channel_name,
            command_id=p["command_id"],
            error=p["error"],
            retryable=p["retryable"],
            max_attempts=settings.COMMAND_MAX_ATTEMPTS,
            execution=p.get("execution") or 1,
        )
        await self._send_all(frames)

    async def on_session_event(self, message):
        await in_db_thread(services.session_event)(
            agent_pk=self.agent_pk, channel_name=self.channel_name, payload=message.payload
        )

    async def on_sessions_query(self, message):
        verdicts = await in_db_thread(_gc_verdicts)(self.agent_pk, self.channel_name, message.payload["session_ids"])
        await self.send(text_data=protocol.encode("sessions_verdict", {"request_id": message.id, **verdicts}))

    async def on_tunnel_ready(self, message):
        await self._to_viewer(message.payload["tunnel_id"], {"type": "tunnel.ready"})

    async def on_tunnel_credit(self, message):
        await self._to_viewer(message.payload["tunnel_id"], {"type": "tunnel.credit", "n": message.payload["bytes"]})

    async def on_tunnel_error(self, message):
        route = self.tunnels.pop(message.payload["tunnel_id"], None)
        if route:
            reason = f"the agent could not reach the desktop: {message.payload['error']}"[:120]
            # final: trying again cannot help (an agent older than the field never says so).
            final = message.payload.get("retryable") is False
            await self._tell(route.viewer, {"type": "tunnel.closed", "reason": reason, "final": final})

    async def on_tunnel_close(self, message):
        route = self.tunnels.pop(message.payload["tunnel_id"], None)
        if route:
            reason = message.payload.get("reason") or "the desktop closed the connection"
            await self._tell(route.viewer, {"type": "tunnel.closed", "reason": reason[:120]})

    async def _to_viewer(self, tunnel_id: int, event: dict) -> None:
        route = self.tunnels.get(tunnel_id)
        if route and not await self._tell(route.viewer, event):
            await self._release_at_agent(tunnel_id, relay.LAYER_UNAVAILABLE)

    # --- messages from other parts of the control plane --------------------------------

    async def agent_poke(self, event):
        await self.deliver_pending()

    async def agent_replaced(self, event):
        log.info("agent %s: a newer connection replaces this one", self.agent_id)
        await self._refuse(protocol.CLOSE_REPLACED, "replaced by a newer connection of the same agent")

    async def deliver_pending(self):
        await self._send_all(await in_db_thread(_claim_deliverable)(self.agent_pk, self.channel_name))

    async def _send_all(self, frames: list[str]) -> None:
        for frame in frames:
            await self.send(text_data=frame)

    # --- tunnel events from viewer consumers (direct calls or the channel layer) ----------

    async def tunnel_open(self, event):
        tunnel_id = event["tunnel_id"]
        self.tunnels[tunnel_id] = TunnelRoute(event["viewer"])
        payload = {"tunnel_id": tunnel_id, "session_id": event["session_id"]}
        if event.get("stream", "vnc") != "vnc":
            payload["stream"] = event["stream"]  # absent for VNC: what agents before sound understand
        if event.get("file"):  # a file transfer (vnc_app.file_transfer), not VNC
            payload["file"] = event["file"]
        await self.send(text_data=protocol.encode("tunnel_open", payload))

    async def tunnel_to_agent(self, event):
        route = self.tunnels.get(event["tunnel_id"])
        if route is None:
            return
        try:
            route.seq.check(event["seq"])
        except relay.SequenceGap as exc:
            await self._end_tunnel(event["tunnel_id"], exc.args[0])
            return
        for frame in event["frames"]:
            await self.send(bytes_data=frame)

    async def tunnel_grant(self, event):
        if event["tunnel_id"] in self.tunnels:
            await self.send(
                text_data=protocol.encode("tunnel_credit", {"tunnel_id": event["tunnel_id"], "bytes": event["n"]})
            )

    async def tunnel_release(self, event):
        """The viewer went away: close the tunnel at the agent."""
        if self.tunnels.pop(event["tunnel_id"], None):
            await self.send(
                text_data=protocol.encode("tunnel_close", {"tunnel_id": event["tunnel_id"], "reason": event["reason"]})
            )

    async def _end_tunnel(self, tunnel_id: int, reason: str) -> None:
        route = self.tunnels.pop(tunnel_id, None)
        if route:
            await self.send(text_data=protocol.encode("tunnel_close", {"tunnel_id": tunnel_id, "reason": reason}))
            await self._tell(route.viewer, {"type": "tunnel.closed", "reason": reason[:120]})
