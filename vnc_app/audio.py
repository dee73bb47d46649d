"""The sound socket: ``WS /api/v1/audio/<session_id>``, the viewer's second stream.

The same socket as the desktop's (``vnc_app.consumers.VncConsumer``): the login cookie
(same origin only) or a JWT, the same access helper (another user's session is 4404), a
``VNCConnection`` audit row (``stream`` "audio"), a tunnel through the session's agent
with the same credits and sequence numbers. What differs:

* only sessions created with sound (``Session.sound``: their template had ``sound`` then,
  so their desktop serves it): the others are refused with 4403 and a reason;
* the tunnel's ``stream`` is "audio": the agent connects to the desktop's sound server
  (an Ogg Opus stream, see images/desktop/entrypoint.sh) instead of its VNC server;
* nothing goes from the browser to the desktop (what the browser sends is dropped), so it
  never counts as input, nor as a viewer (sessions_app.lifecycle, streamspace.metrics);
* the stream must start as Ogg does ("OggS", however the first bytes are split): an agent
  from before sound ignores the tunnel's ``stream`` and would relay the VNC server instead,
  which closes the socket with a reason rather than reaching the decoder;
* a browser that stops reading is cut off (4503, retried) once 256 KiB wait in Daphne for
  it (``streamspace.buffered``, streamspace/daphne_streaming.py), instead of the agent
  being credited for sound that then arrives late;
* what cannot work by trying again closes with 4403, which the page does not retry
  (static/js/viewer-audio.js): no sound on the agent's platform or in the desktop (the
  agent's ``tunnel_error`` says ``retryable: false``), or an agent older than sound.
"""

from __future__ import annotations

from agent_clients import protocol
from vnc_app.consumers import VncConsumer

OGG_MAGIC = b"OggS"
# Sound waiting in Daphne for a browser that stopped reading is latency (~20 s of it at
# 96 kbit/s): past this the socket is closed with a reason, and the page reconnects.
MAX_BUFFERED = 256 * 1024
TOO_SLOW = "the browser takes the sound too slowly (256 KiB waiting): reconnect"
NO_SOUND = "this session's template has no sound"
NOT_SOUND = "the agent sent something other than sound (an agent older than sound support?)"


class AudioConsumer(VncConsumer):
    stream = "audio"
    _checked = False  # the first bytes were Ogg
    _head = b""  # the first bytes, held until there are enough to check

    def refusal(self, *, sound: bool) -> tuple[int, str] | None:
        return None if sound else (protocol.CLOSE_FORBIDDEN, NO_SOUND)

    def closed_code(self, *, final: bool) -> int:
        return protocol.CLOSE_FORBIDDEN if final else protocol.CLOSE_GOING_AWAY

    async def receive(self, text_data=None, bytes_data=None):
        """The browser has nothing to say to the desktop's sound."""

    async def _to_browser(self, data: bytes) -> None:
        if not self._checked:
            head = self._head + data
            if head[: len(OGG_MAGIC)] != OGG_MAGIC[: len(head)]:
                await self._finish(protocol.CLOSE_FORBIDDEN, NOT_SOUND)
                return
            if len(head) < len(OGG_MAGIC):
                self._head = head
                return
            data, self._head, self._checked = head, b"", True
        await super()._to_browser(data)
        buffered = (self.scope.get("extensions") or {}).get("streamspace.buffered")  # streamspace/daphne_streaming.py
        if buffered is not None and buffered() > MAX_BUFFERED:
            await self._finish(protocol.CLOSE_UNAVAILABLE, TOO_SLOW)
