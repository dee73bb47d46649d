"""The sound socket: ``WS /api/v1/audio/<session_id>``, the viewer's second stream.

The same socket as the desktop's (``vnc_app.consumers.VncConsumer``): the login cookie
(same origin only) or a JWT, the same access helper (another user's session is 4404), a
``VNCConnection`` audit row (``stream`` "audio"), a tunnel through the session's agent
with the same credits and sequence numbers. What differs:

* only sessions whose template has ``sound``: the others are refused with 4403 and a reason;
* the tunnel's ``stream`` is "audio": the agent connects to the desktop's sound server
  (an Ogg Opus stream, see images/desktop/entrypoint.sh) instead of its VNC server;
* nothing goes from the browser to the desktop (what the browser sends is dropped), so it
  never counts as input;
* the stream must start as Ogg does ("OggS"): an agent from before sound ignores the
  tunnel's ``stream`` and would relay the VNC server instead, which closes the socket
  with a reason rather than reaching the decoder.
"""

from __future__ import annotations

from agent_clients import protocol
from vnc_app.consumers import VncConsumer

OGG_MAGIC = b"OggS"
NO_SOUND = "this session's template has no sound"
NOT_SOUND = "the agent sent something other than sound (an agent older than sound support?)"


class AudioConsumer(VncConsumer):
    stream = "audio"
    _checked = False  # the first bytes were Ogg

    def refusal(self, *, sound: bool) -> tuple[int, str] | None:
        return None if sound else (protocol.CLOSE_FORBIDDEN, NO_SOUND)

    async def receive(self, text_data=None, bytes_data=None):
        """The browser has nothing to say to the desktop's sound."""

    async def tunnel_data(self, event):
        if not self._checked and self.tunnel_id is not None:
            if not event["bytes"].startswith(OGG_MAGIC):
                await self._finish(protocol.CLOSE_UNAVAILABLE, NOT_SOUND)
                return
            self._checked = True
        await super().tunnel_data(event)
