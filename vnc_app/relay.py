"""Routing for VNC tunnels between viewer sockets and agent sockets.

An event for a consumer in this process is handed over by a direct call (the fast path:
no serialisation, no Redis); otherwise it travels through the channel layer. Data
events carry a per-tunnel sequence number, so a message the layer loses is detected and
the tunnel closed with a reason instead of corrupting the stream. Flow control is by
credits (protocol.TUNNEL_WINDOW per direction), so memory stays bounded per tunnel.
"""

from __future__ import annotations

import asyncio
import logging

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from redis.exceptions import RedisError

from agent_clients import protocol
from streamspace.database_outage import DATABASE_ERRORS

log = logging.getLogger(__name__)

# What the channel layer raises when Redis is gone (refused, reset) or does not answer in time.
LAYER_ERRORS = (RedisError, OSError)  # OSError covers ConnectionError and TimeoutError
LAYER_TIMEOUT = 3.0  # seconds a send may take before the layer counts as unavailable
PROBE_EVERY = 0.5  # seconds between probes of the layer (see LayerWatch)
PROBE_DEADLINE = 3.0  # no probe back for this long: the layer is unavailable
DATABASE_UNAVAILABLE = "control plane database unavailable"
LAYER_UNAVAILABLE = "control plane channel layer (Redis) unavailable"


class LayerUnavailable(Exception):
    """The channel layer could not carry an event to another process."""


# Consumers living in this process, by channel name.
_local: dict[str, object] = {}

# A viewer grants credit back to the agent once this much has reached the browser.
CREDIT_BATCH = protocol.TUNNEL_WINDOW // 4


class DirectDispatch:
    """Consumer mixin: socket frames and ``tunnel.*`` events go straight to their handler,
    and a lost database or channel layer closes the socket with a code and a reason
    instead of crashing the consumer (which Daphne answers with a bare 1011).

    Channels 4.2+ runs ``close_old_connections`` in the one thread-sensitive thread before
    *every* message it dispatches: a thread hop per frame, several per relayed round trip,
    all queued behind each other on one thread (measured: ~2 ms added per round trip and a
    ceiling of ~40 MB/s). These consumers touch the database only through
    ``database_sync_to_async``, which closes stale connections itself in the thread that
    uses them, so the per-message hop buys nothing here. Connect and disconnect keep it.

    Consumers implement ``close_with_reason(code, reason)`` and ``channel_layer_lost()``."""

    accepted = False

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except LAYER_ERRORS as exc:
            if getattr(self, "channel_name", None):
                raise
            # new_channel() could not subscribe: Redis is down while this socket opens.
            log.warning("refusing a socket: %s (%s)", LAYER_UNAVAILABLE, exc.__class__.__name__)
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": protocol.CLOSE_UNAVAILABLE, "reason": LAYER_UNAVAILABLE})

    async def accept(self, *args, **kwargs):
        await super().accept(*args, **kwargs)
        self.accepted = True

    async def dispatch(self, message):
        kind = message["type"]
        try:
            if kind == "websocket.receive" or kind.startswith("tunnel."):
                handler = getattr(self, get_handler_name(message), None)
                if handler is not None:
                    await handler(message)
                    return
            await super().dispatch(message)
        except DATABASE_ERRORS as exc:
            await self._unavailable(kind, DATABASE_UNAVAILABLE, exc)
        except LayerUnavailable as exc:
            await self._unavailable(kind, LAYER_UNAVAILABLE, exc)

    async def _unavailable(self, kind: str, reason: str, exc: Exception) -> None:
        log.warning("%s: %s (%s while handling %s)", self.__class__.__name__, reason, exc.__class__.__name__, kind)
        if kind == "websocket.disconnect":
            raise StopConsumer from None  # the socket is gone already; nothing to tell
        if not self.accepted:
            await self.accept()
        await self.close_with_reason(protocol.CLOSE_UNAVAILABLE, reason)

    async def close_with_reason(self, code: int, reason: str) -> None:
        await self.close(code=code, reason=reason)

    async def channel_layer_lost(self) -> None:
        """The layer stopped carrying messages: end whatever crosses processes."""


def register(consumer) -> None:
    _local[consumer.channel_name] = consumer
    LayerWatch.ensure(consumer.channel_layer)


def is_local(channel: str) -> bool:
    """True when the consumer on ``channel`` lives in this process (no layer in between)."""
    return channel in _local


def unregister(consumer) -> None:
    if _local.get(consumer.channel_name) is consumer:
        del _local[consumer.channel_name]


async def deliver(channel_layer, channel: str, event: dict) -> None:
    """Send ``event`` to the consumer on ``channel``: directly when it lives here, else via the layer."""
    local = _local.get(channel)
    if local is not None:
        await local.dispatch(event)
        return
    try:
        await asyncio.wait_for(channel_layer.send(channel, event), LAYER_TIMEOUT)
    except LAYER_ERRORS as exc:
        raise LayerUnavailable(f"{LAYER_UNAVAILABLE} ({exc.__class__.__name__})") from exc


class LayerWatch:
    """One per process: does the channel layer still carry messages between processes?

    A probe goes out through the layer to a channel of the watch's own every PROBE_EVERY.
    When none has come back for PROBE_DEADLINE (Redis killed, restarted or frozen), every
    consumer of this process is told (``channel_layer_lost``) and ends what crosses
    processes, with a reason, at both ends: a viewer or agent waiting for the other side
    would otherwise hear nothing, and the agent would hold the desktop connection open.
    Messages lost meanwhile cannot corrupt a stream either way: sequence numbers catch them.
    """

    _current: LayerWatch | None = None

    def __init__(self, layer):
        self.layer = layer
        self.loop = asyncio.get_running_loop()
        self.last_back = self.loop.time()
        self.available = True
        self.task = self.loop.create_task(self._run(), name="relay-layer-watch")

    @classmethod
    def ensure(cls, layer) -> None:
        watch = cls._current
        if layer is None or (watch and watch.loop is asyncio.get_running_loop() and not watch.task.done()):
            return
        cls._current = cls(layer)

    async def _run(self) -> None:
        channel, receiver = None, None
        while True:
            try:
                if channel is None:
                    channel = await asyncio.wait_for(self.layer.new_channel("relay-probe."), LAYER_TIMEOUT)
                    receiver = self.loop.create_task(self._receive(channel))
                await asyncio.wait_for(self.layer.send(channel, {"type": "relay.probe"}), LAYER_TIMEOUT)
            except LAYER_ERRORS:
                pass  # the deadline below decides
            await asyncio.sleep(PROBE_EVERY)
            if receiver is not None and receiver.done():
                channel, receiver = None, None
            silent = self.loop.time() - self.last_back
            if self.available and silent > PROBE_DEADLINE:
                self.available = False
                log.warning("%s: no probe came back for %.0fs; ending tunnels between processes",
                            LAYER_UNAVAILABLE, silent)  # fmt: skip
                await self._tell_consumers()
            elif not self.available and silent < PROBE_DEADLINE:
                self.available = True
                log.warning("control plane channel layer (Redis) is back")

    async def _receive(self, channel: str) -> None:
        while True:
            await self.layer.receive(channel)
            self.last_back = self.loop.time()

    async def _tell_consumers(self) -> None:
        for consumer in list(_local.values()):
            try:
                await consumer.channel_layer_lost()
            except Exception:
                log.exception("%s could not end its tunnels", consumer.__class__.__name__)


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
