"""Daphne streams the bodies of file uploads instead of storing them (once per process).

Daphne (4.2) starts an application only once the whole body has arrived (Twisted keeps
it in a temporary file) and then queues all of it in memory at once. For
``PUT /api/v1/sessions/<id>/files/...`` this patch starts the application as soon as the
headers are in, hands each chunk to it as it arrives, and stops reading the socket while
more than ``HIGH`` bytes wait in the application's queue (resumed below ``LOW``): the
client is slowed by TCP, and the process holds at most ``HIGH`` of the body. A response
sent before the body is complete closes the connection (the rest is never parsed).

Every HTTP scope also gets the ``streamspace.flow`` extension: ``await writable()``
returns once the connection's send buffer has drained, so a download is handed to Daphne
no faster than the client takes it (Twisted would buffer it without bound), and
``abort()`` drops the connection at once (a download that broke off after its headers:
the client sees a truncated body, never a hang).
Harmless where Daphne is not the server: vnc_app.file_transfer works without either.

Every WebSocket scope gets ``streamspace.buffered``: a callable returning how many bytes
Twisted holds for the connection, not yet taken by the kernel (a browser that stops
reading makes it grow without bound; vnc_app.audio closes the sound socket past a limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re

STREAMED = re.compile(rb"^/api/v1/sessions/[^/?]+/files/")
HIGH = 2 * 1024 * 1024
LOW = 512 * 1024


class _NoContent:
    """Stands in for Twisted's body file: nothing is stored, and Daphne's ``process``
    sees it closed, so it queues no body of its own."""

    closed = True

    def seek(self, *args):
        return 0

    def tell(self):
        return 0

    def read(self, *args):
        return b""

    def write(self, data):
        pass

    def close(self):
        pass


class Flow:
    """The ``streamspace.flow`` extension of one HTTP request."""

    def __init__(self, request):
        self.request = request
        channel = request.channel
        if channel is not None and not hasattr(channel, "_ss_waiters"):
            channel._ss_waiters = []
            resume = channel.resumeProducing

            def resumed():
                resume()
                waiters, channel._ss_waiters = channel._ss_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

            channel.resumeProducing = resumed

    async def writable(self) -> None:
        """Return once the connection's send buffer has room (at once when it has)."""
        channel = self.request.channel
        while channel is not None and getattr(channel, "_waitingForTransport", False) and not self.request.finished:
            waiter = asyncio.get_running_loop().create_future()
            channel._ss_waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, 1.0)
            channel = self.request.channel

    def abort(self) -> None:
        """Drop the connection now (what was sent stays short of its Content-Length)."""
        channel = self.request.channel
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()


def _buffered(protocol) -> int:
    """Bytes waiting in the Twisted transport's write buffer (0 where it has none, as TLS)."""
    transport = getattr(protocol, "transport", None)
    data = getattr(transport, "dataBuffer", b"")
    return max(0, len(data) - getattr(transport, "offset", 0)) + getattr(transport, "_tempDataLen", 0)


def apply() -> None:
    try:
        from daphne.http_protocol import WebRequest
        from daphne.server import Server
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    if getattr(WebRequest, "_streamspace_streaming", False):
        return
    got_length, content_chunk, process, finish = (
        WebRequest.gotLength, WebRequest.handleContentChunk, WebRequest.process, WebRequest.finish
    )  # fmt: skip
    create_application = Server.create_application

    def gotLength_(self, length):
        channel = self.channel
        self._ss_stream = False
        if getattr(channel, "_command", b"") == b"PUT" and STREAMED.match(getattr(channel, "_path", b"")):
            self._ss_stream, self._ss_queued, self._ss_paused, self._ss_complete = True, 0, False, False
            self.content = _NoContent()
            self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
            self.path = self.uri.split(b"?", 1)[0]
            process(self)  # creates the application now; it queues nothing (_NoContent)
            return
        got_length(self, length)

    def handleContentChunk_(self, data):
        if not self._ss_stream:
            return content_chunk(self, data)
        queue = self.application_queue
        if queue is None:
            return None
        queue.put_nowait({"type": "http.request", "body": data, "more_body": True})
        self._ss_queued += len(data)
        if self._ss_queued > HIGH and not self._ss_paused and self.channel is not None:
            self._ss_paused = True
            self.channel._networkProducer.pauseProducing()
        return None

    def process_(self):
        if getattr(self, "_ss_stream", False):
            if self.application_queue is not None:  # the body is complete
                self._ss_complete = True
                self.application_queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
            return None
        return process(self)

    def finish_(self):
        incomplete = getattr(self, "_ss_stream", False) and not self._ss_complete
        channel = self.channel
        finish(self)
        if incomplete and channel is not None:
            channel.loseConnection()  # the rest of the body is never read

    def create_application_(server, protocol, scope):
        if isinstance(protocol, WebRequest):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "streamspace.flow": Flow(protocol)}}
        elif isinstance(protocol, WebSocketProtocol):
            buffered = functools.partial(_buffered, protocol)
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "streamspace.buffered": buffered}}
        queue = create_application(server, protocol, scope)
        if getattr(protocol, "_ss_stream", False) and queue is not None:
            get = queue._get

            def counted_get():
                item = get()
                protocol._ss_queued -= len(item.get("body", b""))
                if protocol._ss_paused and protocol._ss_queued < LOW and protocol.channel is not None:
                    protocol._ss_paused = False
                    protocol.channel._networkProducer.resumeProducing()
                return item

            queue._get = counted_get
        return queue

    WebRequest.gotLength, WebRequest.handleContentChunk = gotLength_, handleContentChunk_
    WebRequest.process, WebRequest.finish = process_, finish_
    Server.create_application = create_application_
    WebRequest._streamspace_streaming = True
