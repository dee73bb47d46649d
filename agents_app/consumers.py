"""The agent socket: ``WS /api/v1/agent/connect?agent_id=<id>``.

Thin: authenticate, then hand each validated message to a service. VNC tunnel frames
go to the relay in vnc_app.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from agent_clients import protocol
from agents_app import commands, selectors, services
from vnc_app import relay

log = logging.getLogger(__name__)


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1")
            if text.lower().startswith("bearer "):
                return text[7:].strip()
    return None


def _claim_deliverable(agent_pk: int) -> list[str]:
    """Claim the agent's deliverable commands (pending -> sent) and return their frames."""
    frames = []
    for command in selectors.commands_to_deliver(agent_pk=agent_pk):
        if commands.command_claim_for_delivery(command_pk=command.pk):
            frames.append(protocol.encode("command", command.as_message()))
    return frames


class AgentConsumer(AsyncWebsocketConsumer):
    agent_pk: int | None = None
    agent_id: str = ""

    async def connect(self):
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        agent_id = (query.get("agent_id") or [""])[0]
        agent = None
        if agent_id:
            agent = await database_sync_to_async(services.agent_authenticate)(
                agent_id=agent_id, raw_token=_bearer(self.scope)
            )
        await self.accept()
        if agent is None:
            reason = "agent_id query parameter is required" if not agent_id else "unknown agent or wrong token"
            await self._refuse(protocol.CLOSE_UNAUTHORIZED, reason)
            return
        self.agent_pk, self.agent_id = agent.pk, agent.agent_id
        previous = await database_sync_to_async(services.agent_attach)(
            agent_pk=agent.pk, channel_name=self.channel_name
        )
        if previous:
            await self.channel_layer.send(previous, {"type": "agent.replaced"})
        log.info("agent %s connected", self.agent_id)

    async def _refuse(self, code: int, reason: str) -> None:
        await self.send(text_data=protocol.encode("error", {"reason": reason, "ref": None}))
        await self.close(code=code, reason=reason)

    async def disconnect(self, code):
        if self.agent_pk is None:
            return
        await relay.close_agent_tunnels(self.channel_layer, self.channel_name, "agent disconnected")
        await database_sync_to_async(services.agent_detach)(agent_pk=self.agent_pk, channel_name=self.channel_name)
        log.info("agent %s disconnected (%s)", self.agent_id, code)

    # --- frames from the agent ----------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if self.agent_pk is None:
            return
        if bytes_data is not None:
            await self._receive_bytes(bytes_data)
            return
        try:
            message = protocol.decode_agent_message(text_data or "")
        except protocol.ProtocolError as exc:
            await self._reject(exc)
            return
        handler = getattr(self, f"on_{message.type}")
        try:
            await handler(message)
        except services.NotOwnedByAgent as exc:
            await self.send(text_data=protocol.encode("error", {"reason": exc.message, "ref": message.id}))

    async def _receive_bytes(self, frame: bytes) -> None:
        try:
            tunnel_id, data = protocol.unpack_data(frame)
        except protocol.ProtocolError as exc:
            await self._reject(exc)
            return
        await relay.from_agent_data(self.channel_layer, self.channel_name, tunnel_id, data)

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
        await database_sync_to_async(services.agent_hello)(agent_pk=self.agent_pk, payload=message.payload)
        await self.deliver_pending()

    async def on_heartbeat(self, message):
        await database_sync_to_async(services.agent_heartbeat)(agent_pk=self.agent_pk, payload=message.payload)
        await self.deliver_pending()  # the fallback path: a lost poke costs one heartbeat interval

    async def on_ack(self, message):
        await database_sync_to_async(services.command_ack)(
            agent_pk=self.agent_pk, command_id=message.payload["command_id"]
        )

    async def on_complete(self, message):
        await database_sync_to_async(services.command_complete)(
            agent_pk=self.agent_pk, command_id=message.payload["command_id"], result=message.payload["result"]
        )
        await self.deliver_pending()

    async def on_failed(self, message):
        await database_sync_to_async(services.command_fail)(
            agent_pk=self.agent_pk,
            command_id=message.payload["command_id"],
            error=message.payload["error"],
            retryable=message.payload["retryable"],
            max_attempts=settings.COMMAND_MAX_ATTEMPTS,
        )
        await self.deliver_pending()

    async def on_session_event(self, message):
        await database_sync_to_async(services.session_event)(agent_pk=self.agent_pk, payload=message.payload)

    async def on_tunnel_ready(self, message):
        await relay.from_agent_control(self.channel_layer, self.channel_name, message)

    on_tunnel_error = on_tunnel_close = on_tunnel_credit = on_tunnel_ready

    # --- messages from other parts of the control plane --------------------------------

    async def agent_poke(self, event):
        await self.deliver_pending()

    async def agent_replaced(self, event):
        log.info("agent %s: a newer connection replaces this one", self.agent_id)
        await self._refuse(protocol.CLOSE_REPLACED, "replaced by a newer connection of the same agent")

    async def deliver_pending(self):
        for frame in await database_sync_to_async(_claim_deliverable)(self.agent_pk):
            await self.send(text_data=frame)

    async def tunnel_to_agent(self, event):
        """A viewer's relay asks this socket to send a frame to the agent."""
        if "bytes" in event:
            await self.send(bytes_data=event["bytes"])
        else:
            await self.send(text_data=event["text"])
