"""Routing for VNC tunnels between viewer sockets and agent sockets.

An event for a consumer in this process is handed over by a direct call (the fast path:
no serialisation, no Redis); otherwise it travels through the channel layer. Data
events carry a per-tunnel sequence number, so a message the layer loses is detected and
the tunnel closed with a reason instead of corrupting the stream. Flow control is by
credits (protocol.TUNNEL_WINDOW per direction), so memory stays bounded per tunnel.
"""

from __future__ import annotations

import logging

from channels.consumer import get_handler_name

from agent_clients import protocol

log = logging.getLogger(__name__)

# Consumers living in this process, by channel name.
_local: dict[str, object] = {}

# A viewer grants credit back to the agent once this much has reached the browser.
CREDIT_BATCH = protocol.TUNNEL_WINDOW // 4


class DirectDispatch:
    """Consumer mixin: socket frames and ``tunnel.*`` events go straight to their handler.

    Channels 4.2+ runs ``close_old_connections`` in the one thread-sensitive thread before
    *every* message it dispatches: a thread hop per frame, several per relayed round trip,
    all queued behind each other on one thread (measured: ~2 ms added per round trip and a
    ceiling of ~40 MB/s). These consumers touch the database only through
    ``database_sync_to_async``, which closes stale connections itself in the thread that
    uses them, so the per-message hop buys nothing here. Connect and disconnect keep it."""

    async def dispatch(self, message):
        kind = message["type"]
        if kind == "websocket.receive" or kind.startswith("tunnel."):
            handler = getattr(self, get_handler_name(message), None)
            if handler is not None:
                await handler(message)
                return
        await super().dispatch(message)


def register(consumer) -> None:
    _local[consumer.channel_name] = consumer


def unregister(consumer) -> None:
    if _local.get(consumer.channel_name) is consumer:
        del _local[consumer.channel_name]


async def deliver(channel_layer, channel: str, event: dict) -> None:
    """Send ``event`` to the consumer on ``channel``: directly when it lives here, else via the layer."""
    local = _local.get(channel)
    if local is not None:
        await local.dispatch(event)
    else:
        await channel_layer.send(channel, event)


def split(tunnel_id: int, data: bytes) -> list[bytes]:
    """Binary frames for ``data``, none larger than the protocol allows."""
    step = protocol.MAX_BINARY_PAYLOAD
    return [protocol.pack_data(tunnel_id, data[i : i + step]) for i in range(0, len(data), step)] or []


class SequenceGap(Exception):
    pass


class Sequence:
    """Numbers outgoing data events and checks incoming ones."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def next(self) -> int:
        self.sent += 1
        return self.sent

    def check(self, seq: int) -> None:
        if seq != self.received + 1:
            raise SequenceGap(f"relay lost data (expected message {self.received + 1}, got {seq})")
        self.received = seq
