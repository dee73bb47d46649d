"""Streamed file transfers between an HTTP client and a session's agent.

``route(files, other)`` sends ``/api/v1/sessions/<id>/files...`` here and everything else
on. A request is first run through Django (middleware, DRF authentication with CSRF, the
access helper) with its headers only (vnc_app.file_api); when the checks pass, this module
opens a tunnel to the session's agent exactly like a viewer does (vnc_app.relay: a direct
call when the agent's socket is in this process, the channel layer otherwise; sequence
numbers on data events; TUNNEL_WINDOW credits each way) and moves the bytes itself:

* upload: the body is read from the ASGI ``receive`` only while the tunnel has credit,
  and Daphne reads the socket only while little is queued (streamspace/daphne_streaming.py),
  so the client is slowed by TCP instead of buffered;
* download: each chunk is handed to Daphne only once its transport has drained
  (``streamspace.flow`` extension), and credit goes back to the agent only then.

So a transfer holds at most about one window (4 MiB) in this process, whatever the size.
One FileTransfer audit row per upload or download.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import tempfile
from urllib.parse import quote

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import get_script_prefix
from django.urls import set_script_prefix

from agent_clients import protocol
from vnc_app import file_services as services
from vnc_app import relay
from vnc_app.file_api import Ticket, TransferAccepted

log = logging.getLogger(__name__)

FILES_PATH = re.compile(r"^/api/v1/sessions/[^/]+/files(/|$)")
OPEN_TIMEOUT = 15.0  # the agent opens the tunnel
ANSWER_TIMEOUT = 60.0  # the agent's header line; any pause in a stream
COMMIT_TIMEOUT = 300.0  # the agent names the upload once it has every byte
MAX_HEADER = 2 * 1024 * 1024
CHUNK = protocol.MAX_BINARY_PAYLOAD
_ACTIVE: dict[str, int] = {}  # session id -> uploads and downloads running in this process


def route(files, other):
    """ASGI: file transfer paths to ``files``, the rest to ``other``."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and FILES_PATH.match(scope.get("path", "")):
            return await files(scope, receive, send)
        return await other(scope, receive, send)

    return app


def application(django_handler):
    """The files endpoint: Django decides (headers only), then :class:`Transfer` streams."""

    async def app(scope, receive, send):
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=django_handler.__class__, scope=scope)
        no_body = tempfile.SpooledTemporaryFile(max_size=1024, mode="w+b")  # noqa: SIM115 (closed below; the body is never read here)
        request, error = django_handler.create_request(scope, no_body)
        response = error if request is None else await django_handler.get_response_async(request)
        try:
            if isinstance(response, TransferAccepted):
                headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.items()
                           if k.lower() not in ("content-type", "content-length")]  # fmt: skip
                await Transfer(response.ticket, scope, receive, send, headers).run()
            else:
                if scope["method"] == "PUT":
                    response["Connection"] = "close"  # the body stays unread
                await django_handler.send_response(response, send)
        finally:
            await sync_to_async(response.close)()  # request_finished: database connections
            no_body.close()

    return app


class TransferFailed(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class ClientGone(Exception):
    pass


class Transfer:
    """One transfer: a tunnel end registered like a viewer consumer (relay.deliver reaches it)."""

    def __init__(self, ticket: Ticket, scope, receive, send, headers):
        self.ticket = ticket
        self.scope, self.receive, self.send = scope, receive, send
        self.headers = headers  # the middleware's (security headers)
        self.flow = (scope.get("extensions") or {}).get("streamspace.flow")
        self.channel_layer = get_channel_layer()
        self.channel_name = ""
        self.tunnel_id = secrets.randbits(32)
        self.events: asyncio.Queue = asyncio.Queue()
        self.woken = asyncio.Event()  # credit, data or the end arrived
        self.seq_in, self.seq_out = relay.Sequence(), relay.Sequence()
        self.outstanding = 0  # bytes sent to the agent not yet credited back
        self.unreported = 0  # bytes taken from the agent not yet credited back
        self.buffer = b""
        self.closed: str | None = None
        self.moved = 0
        self.responded = False
        self.audit: int | None = None  # the FileTransfer row, until it is finished

    async def _record(self, outcome: str, detail: str = "") -> None:
        """Finish the audit row (once): before the client hears of success, so it is there by then."""
        if self.audit is not None:
            pk, self.audit = self.audit, None
            await database_sync_to_async(services.transfer_finish)(
                pk=pk, outcome=outcome, moved=self.moved, detail=detail
            )

    # --- the tunnel end (events from the agent's consumer) -------------------------------

    async def dispatch(self, event):
        kind = event.get("type")
        if kind == "tunnel.data":
            try:
                self.seq_in.check(event["seq"])
            except relay.SequenceGap as exc:
                self._end(exc.args[0])
                return
            self.events.put_nowait(event["bytes"])
        elif kind == "tunnel.ready":
            self.events.put_nowait(True)
        elif kind == "tunnel.credit":
            self.outstanding = max(0, self.outstanding - event["n"])
        elif kind == "tunnel.closed":
            self._end(event.get("reason") or "the agent closed the transfer")
        self.woken.set()

    def _end(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self.events.put_nowait(None)
        self.woken.set()

    async def channel_layer_lost(self):
        if not relay.is_local(self.ticket.agent_channel):
            self._end(relay.LAYER_UNAVAILABLE)

    async def _listen(self):
        while True:
            await self.dispatch(await self.channel_layer.receive(self.channel_name))

    async def _to_agent(self, event: dict) -> None:
        try:
            await relay.deliver(self.channel_layer, self.ticket.agent_channel, event)
        except relay.LayerUnavailable as exc:
            raise TransferFailed(503, "agent_unavailable", str(exc)) from None

    # --- reading what the agent sends ------------------------------------------------------

    async def _next(self, timeout: float):
        try:
            item = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise TransferFailed(502, "agent_timeout", "the agent did not answer in time") from None
        if item is None:
            self.events.put_nowait(None)  # stays ended
        return item

    async def _grant(self, n: int, *, now: bool = False) -> None:
        self.unreported += n
        if self.unreported and (now or self.unreported >= relay.CREDIT_BATCH) and self.closed is None:
            grant, self.unreported = self.unreported, 0
            await self._to_agent({"type": "tunnel.grant", "tunnel_id": self.tunnel_id, "n": grant})

    async def _line(self, timeout: float = ANSWER_TIMEOUT) -> dict:
        while b"\n" not in self.buffer:
            item = await self._next(timeout)
            if item is None:
                raise TransferFailed(502, "agent_error", f"the transfer ended early: {self.closed}"[:200])
            if item is True:
                continue
            self.buffer += item
            if len(self.buffer) > MAX_HEADER:
                raise TransferFailed(502, "agent_error", "the agent's answer is too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        await self._grant(len(line) + 1, now=True)  # what follows is credited as it is used
        try:
            answer = json.loads(line)
        except ValueError:  # an agent older than file transfers opened the VNC stream instead
            raise TransferFailed(502, "agent_error", "the agent does not know file transfers: upgrade it") from None
        if not isinstance(answer, dict):
            raise TransferFailed(502, "agent_error", "the agent does not know file transfers: upgrade it")
        if not answer.get("ok"):
            status = answer.get("status") if answer.get("status") in (400, 404) else 502
            raise TransferFailed(status, str(answer.get("error") or "agent_error"), str(answer.get("detail"))[:500])
        return answer

    # --- the transfer ----------------------------------------------------------------------

    async def run(self) -> None:
        t = self.ticket
        if t.op == "list":
            return await self._run()
        if _ACTIVE.get(t.session_id, 0) >= settings.FILE_TRANSFER_MAX_PER_SESSION:
            limit = settings.FILE_TRANSFER_MAX_PER_SESSION
            return await self._error(429, "too_many_transfers", f"this session already has {limit} transfers running")
        _ACTIVE[t.session_id] = _ACTIVE.get(t.session_id, 0) + 1
        try:
            self.audit = await database_sync_to_async(services.transfer_begin)(ticket=t)
            await self._run()
        finally:
            _ACTIVE[t.session_id] -= 1
            if not _ACTIVE[t.session_id]:
                del _ACTIVE[t.session_id]

    async def _run(self) -> None:
        t = self.ticket
        self.channel_name = await self.channel_layer.new_channel("files.")
        relay.register(self)
        listener = asyncio.create_task(self._listen())
        outcome, detail = "failed", ""
        try:
            file = {"op": t.op, "path": t.path}
            if t.op == "put":
                file["size"] = t.size
            await self._to_agent({"type": "tunnel.open", "tunnel_id": self.tunnel_id, "session_id": t.session_id,
                                  "viewer": self.channel_name, "file": file})  # fmt: skip
            if await self._next(OPEN_TIMEOUT) is not True:
                raise TransferFailed(503, "agent_unavailable", f"the agent could not start the transfer: {self.closed}")
            await {"list": self._list, "get": self._get, "put": self._put}[t.op]()
            outcome = "ok"
        except TransferFailed as exc:
            detail = exc.detail
            if not self.responded:
                await self._error(exc.status, exc.error, exc.detail)
            else:
                log.warning("file %s %s of %s broke off: %s", t.op, t.path, t.session_id, exc.detail)
                await self._record("failed", detail)
                self._abort()
        except ClientGone as exc:
            detail = str(exc) or "the client went away"
            if self.responded and t.op == "get":
                await self._record("failed", detail)
                self._abort()
        except Exception:  # a bug or an outage of ours: JSON if nothing was sent, else a dropped connection
            log.exception("file %s %s of %s failed", t.op, t.path, t.session_id)
            detail = "the control plane failed (see its log)"
            await self._record("failed", detail)
            if not self.responded:
                await self._error(502, "agent_error", detail)
            else:
                self._abort()
        finally:
            listener.cancel()
            relay.unregister(self)
            if self.closed is None:
                with contextlib.suppress(TransferFailed):
                    await self._to_agent({"type": "tunnel.release", "tunnel_id": self.tunnel_id,
                                          "reason": detail or "transfer finished"})  # fmt: skip
            await self._record(outcome, detail)
            log.info("file %s %s of %s: %s, %d B%s", t.op, t.path, t.session_id, outcome, self.moved,
                     f" ({detail})" if detail else "")  # fmt: skip

    async def _list(self) -> None:
        answer = await self._line()
        answer.pop("ok", None)
        await self._json(200, answer)

    async def _get(self) -> None:
        answer = await self._line()
        size = int(answer["size"])
        name = str(answer.get("name") or "download")
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
        disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode()),
            (b"content-disposition", disposition.encode("latin-1")), (b"cache-control", b"no-store"), *self.headers,
        ]})  # fmt: skip
        self.responded = True
        gone = asyncio.create_task(self._until_disconnect())
        try:
            pending, self.buffer = self.buffer, b""
            while self.moved < size:
                if gone.done():
                    raise ClientGone()
                if not pending:
                    item = await self._next(ANSWER_TIMEOUT)
                    if item is None:
                        raise TransferFailed(502, "agent_error", f"the download ended early: {self.closed}")
                    if item is True:
                        continue
                    pending = item
                chunk, pending = pending[: size - self.moved], b""
                if self.flow is not None:
                    try:
                        await asyncio.wait_for(self.flow.writable(), settings.FILE_TRANSFER_STALL_TIMEOUT)
                    except TimeoutError:
                        raise ClientGone("the client took nothing for too long") from None
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.moved += len(chunk)
                await self._grant(len(chunk))
            await self._record("ok")
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()

    async def _until_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _put(self) -> None:
        await self._line()  # the agent checked the target: the body may come
        size, pending, more = self.ticket.size, bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(self.receive(), settings.FILE_TRANSFER_STALL_TIMEOUT)
            except TimeoutError:
                raise TransferFailed(408, "timeout", "the client sent nothing for too long") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            pending += message.get("body", b"")
            more = message.get("more_body", False)
            if len(pending) >= CHUNK or not more:
                await self._push(bytes(pending))
                pending = bytearray()
        if self.moved != size:
            raise TransferFailed(400, "invalid", f"the body held {self.moved} bytes, not its Content-Length {size}")
        answer = await self._line(COMMIT_TIMEOUT)
        answer.pop("ok", None)
        await self._record("ok")
        await self._json(201, answer)

    async def _push(self, data: bytes) -> None:
        """Send upload bytes to the agent, never more than the window ahead of its credit."""
        for start in range(0, len(data), CHUNK):
            piece = data[start : start + CHUNK]
            while self.outstanding + len(piece) > protocol.TUNNEL_WINDOW or not self.events.empty():
                if not self.events.empty():  # the agent spoke before the end: a failure
                    await self._line()
                    raise TransferFailed(502, "agent_error", "the agent answered before the upload was complete")
                self.woken.clear()
                try:
                    await asyncio.wait_for(self.woken.wait(), ANSWER_TIMEOUT)
                except TimeoutError:
                    raise TransferFailed(502, "agent_timeout", "the agent stopped taking the upload") from None
            self.outstanding += len(piece)
            frames = relay.split(self.tunnel_id, piece)
            await self._to_agent({"type": "tunnel.to_agent", "tunnel_id": self.tunnel_id,
                                  "seq": self.seq_out.next(), "frames": frames})  # fmt: skip
            self.moved += len(piece)

    # --- responses -------------------------------------------------------------------------

    def _abort(self) -> None:
        """The headers (with Content-Length) are out but the body cannot be completed: drop
        the connection so the client sees a truncated transfer instead of waiting forever."""
        if self.flow is not None and hasattr(self.flow, "abort"):
            self.flow.abort()
        else:  # another ASGI server: an exception after the response started drops the connection
            raise ConnectionAbortedError("the transfer broke off after its headers")

    async def _json(self, status: int, body: dict, *, close: bool = False) -> None:
        raw = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *self.headers]
        if close:
            headers.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": raw})
        self.responded = True

    async def _error(self, status: int, error: str, detail: str) -> None:
        await self._json(status, {"error": error, "detail": detail}, close=self.ticket.op == "put")
