"""Daphne 4 drops the ``reason`` of an ASGI ``websocket.close``; clients then see a bare
code. This wraps its reply handler so the reason reaches the client, as uvicorn does.
Applied once at ASGI start-up; harmless where Daphne is not the server."""

from __future__ import annotations


def apply() -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # another ASGI server
        return
    if getattr(WebSocketProtocol, "_streamspace_close_reason", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self, message):
        if message.get("type") == "websocket.close" and self.state != self.STATE_CONNECTING:
            code = message.get("code") or 1000
            reason = (message.get("reason") or "")[:120]
            self.sendClose(code=code, reason=reason or None)
            return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._streamspace_close_reason = True
