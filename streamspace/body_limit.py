"""Request bodies are bounded before they are buffered (``MAX_REQUEST_BODY`` bytes).

:class:`BodyLimit` is a pure ASGI middleware around the HTTP application: a body whose
Content-Length is over the limit is answered ``413 {"error": "too_large", ...}`` without
reading a byte of it; a body without one (chunked) is read up to the limit and answered
413 as soon as it passes it.

Daphne reads a whole body before any application runs and then queues all of it in
memory at once (an anonymous 100 MB POST grew it by 91 MiB, kept): :func:`apply` makes
its HTTP request refuse an oversized body as its headers arrive (by Content-Length) or
as its chunks pass the limit, and close the connection, so the body is never stored.
In production the proxy in front enforces the same limit (README: nginx
``client_max_body_size``). Harmless where Daphne is not the server.
"""

from __future__ import annotations

import io
import json
import logging

from django.conf import settings

log = logging.getLogger(__name__)

ERROR_CODE = "too_large"


def detail(limit: int) -> str:
    return f"the request body is larger than the {limit} bytes this server accepts"


def response_body(limit: int) -> bytes:
    return json.dumps({"error": ERROR_CODE, "detail": detail(limit)}).encode()


def declared_length(headers) -> int | None:
    """The Content-Length of ``headers`` ((name, value) byte pairs): None when absent, -1
    when it is not a number (refused like an oversized one)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class BodyLimit:
    """ASGI middleware: HTTP bodies over ``limit`` bytes are refused with 413 (see module)."""

    def __init__(self, app, limit: int | None = None):
        self.app = app
        self.limit = settings.MAX_REQUEST_BODY if limit is None else limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = declared_length(scope.get("headers") or [])
        if length is not None:
            if length < 0 or length > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        # No Content-Length: read the body here, never more than the limit, then replay it.
        messages = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away
            received += len(message.get("body", b""))
            if received > self.limit:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = response_body(self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def apply(limit: int | None = None) -> None:
    """Make Daphne refuse an oversized body before it stores it (see module). Once per process."""
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:  # another ASGI server: BodyLimit alone does it
        return
    if getattr(WebRequest, "_streamspace_body_limit", False):
        return
    limit = settings.MAX_REQUEST_BODY if limit is None else limit
    got_length, content_chunk, process = WebRequest.gotLength, WebRequest.handleContentChunk, WebRequest.process
    body = response_body(limit)
    answer = b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)

    def refuse(request) -> None:
        request._streamspace_refused = True
        request.content = io.BytesIO()  # nothing more is stored
        log.warning("refused a request body over %d bytes from %s", limit, request.getClientAddress())
        request.channel.transport.write(answer)
        request.channel.loseConnection()  # stops reading: the rest of the body is never received

    def gotLength_(self, length):
        self._streamspace_refused, self._streamspace_received = False, 0
        if length is not None and length > limit:
            refuse(self)
            return
        got_length(self, length)

    def handleContentChunk_(self, data):
        if self._streamspace_refused:
            return
        self._streamspace_received += len(data)
        if self._streamspace_received > limit:
            refuse(self)
            return
        content_chunk(self, data)

    def process_(self):
        if getattr(self, "_streamspace_refused", False):
            return None
        return process(self)

    WebRequest.gotLength, WebRequest.handleContentChunk, WebRequest.process = gotLength_, handleContentChunk_, process_
    WebRequest._streamspace_body_limit = True
