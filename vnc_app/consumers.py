"""The viewer socket: ``WS /api/v1/vnc/<session_id>``."""

from channels.generic.websocket import AsyncWebsocketConsumer

from agent_clients import protocol


class VncConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        await self.accept()
        await self.close(code=protocol.CLOSE_UNAVAILABLE, reason="the VNC relay is not available yet")
