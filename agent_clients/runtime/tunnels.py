"""VNC tunnels between the agent's control socket and sessions' VNC servers.

The control plane sends ``tunnel_open`` {tunnel_id, session_id, stream}; the agent opens a
TCP stream with ``backend.open_vnc_stream(session_id)`` (or ``open_audio_stream`` for a
``stream`` of "audio": the desktop's sound) and answers ``tunnel_ready`` or
``tunnel_error``. Bytes travel in binary frames (``protocol.pack_data``), many tunnels
on one socket.

Flow control is credit based, per tunnel and per direction: a sender may have at most
``protocol.TUNNEL_WINDOW`` bytes outstanding; the receiver grants bytes back with
``tunnel_credit`` once it has written them to its sink. So:

* TCP -> socket: the agent reads at most as many bytes as it has credit for
  (``reader.read(min(MAX_BINARY_PAYLOAD, credit))``); at zero credit it stops reading
  the VNC server until credit arrives. Nothing is dropped, nothing queues.
* socket -> TCP: received frames go into a per-tunnel queue drained by a writer task
  (``write`` + ``await drain()``), so one slow VNC server never stalls the socket's
  reader. The queue is bounded by the window: a peer that sends beyond it breaks the
  protocol and the tunnel is closed with a reason. Credit is granted back in batches
  (once a quarter of the window has been written), when the queue is empty and 64 KiB
  were written, or after 20 ms idle, so a small interactive message never leaves credit
  outstanding for long and a stream of small frames does not cost a credit message each.

Either side ends a tunnel with ``tunnel_close``. When the control socket drops,
:meth:`TunnelManager.close_all` closes every tunnel's TCP connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent_clients import protocol
from agent_clients.backends.base import BackendError
from agent_clients.runtime import files
from agent_clients.runtime.deadlines import within

log = logging.getLogger("agent_clients.runtime.tunnels")

SendText = Callable[[str, dict[str, Any]], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]

CREDIT_BATCH = protocol.TUNNEL_WINDOW // 4
# Below a batch, credit is granted once the queue is empty and this much was written, or
# after CREDIT_IDLE_DELAY without more data: a stream of small frames then costs one
# credit message per 64 KiB instead of one per frame (each is a JSON frame that the
# control plane decodes and routes), and an idle tunnel still gets every byte back.
CREDIT_IDLE_BATCH = 64 * 1024
CREDIT_IDLE_DELAY = 0.02
OPEN_TIMEOUT = 15.0


class Tunnel:
    """One VNC stream relayed over the control socket."""

    def __init__(
        self, manager: TunnelManager, tunnel_id: int, session_id: str, window: int, stream: str = "vnc", file=None
    ):
        self.manager = manager
        self.file = file  # a file transfer request (runtime/files.py) instead of VNC
        self.id = tunnel_id
        self.session_id = session_id
        self.stream = stream  # protocol.STREAMS: what the TCP end is
        self.window = window
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        # TCP -> socket: bytes we may still send before the peer grants more.
        self.send_credit = window
        self._credit_changed = asyncio.Event()
        # socket -> TCP: frames received and not yet written, and credit bookkeeping.
        self._inbound: collections.deque[bytes] = collections.deque()
        self._inbound_ready = asyncio.Event()
        self.received_uncredited = 0  # received from the peer, not yet granted back
        self.written_uncredited = 0  # of those, already written to the VNC server
        self.bytes_in = 0  # socket -> TCP, total
        self.bytes_out = 0  # TCP -> socket, total
        self._tasks: list[asyncio.Task] = []
        self.opener: asyncio.Task | None = None

    # --- socket side -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the control plane for the VNC server. Never blocks."""
        if self.closed:
            return
        if self.received_uncredited + len(data) > self.window:
            self.manager._close_soon(self, "peer exceeded the flow-control window", notify=True)
            return
        self.received_uncredited += len(data)
        self._inbound.append(data)
        self._inbound_ready.set()

    @property
    def server(self) -> str:
        """What the TCP end is, for close reasons and logs."""
        if self.file is not None:
            return "file transfer"
        return "sound server" if self.stream == "audio" else "vnc server"

    def grant(self, nbytes: int) -> None:
        """The control plane granted ``nbytes`` back: we may send them again."""
        self.send_credit = min(self.window, self.send_credit + nbytes)
        self._credit_changed.set()

    # --- pumps -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._tcp_to_socket(), name=f"tunnel-{self.id}-out"),
            asyncio.create_task(self._socket_to_tcp(), name=f"tunnel-{self.id}-in"),
        ]

    async def _tcp_to_socket(self) -> None:
        assert self.reader is not None
        reason = f"{self.server} closed the connection"
        try:
            while True:
                while self.send_credit <= 0:
                    self._credit_changed.clear()
                    await self._credit_changed.wait()
                data = await self.reader.read(min(protocol.MAX_BINARY_PAYLOAD, self.send_credit))
                if not data:
                    reason = getattr(self.reader, "failure", None) or reason  # a file transfer that broke off
                    break
                self.send_credit -= len(data)
                self.bytes_out += len(data)
                await self.manager.send_bytes(protocol.pack_data(self.id, data))
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"{self.server} connection error: {exc.__class__.__name__}"
        except Exception as exc:  # the control socket dropped: close_all follows
            reason = f"relay error: {exc.__class__.__name__}"
        self.manager._close_soon(self, reason, notify=True)

    async def _socket_to_tcp(self) -> None:
        assert self.writer is not None
        try:
            while True:
                while not self._inbound:
                    self._inbound_ready.clear()
                    if self.written_uncredited:
                        # Idle with a little ungranted: grant it if nothing follows soon.
                        try:
                            await within(CREDIT_IDLE_DELAY, self._inbound_ready.wait())
                        except TimeoutError:
                            await self._grant_written()
                    else:
                        await self._inbound_ready.wait()
                # Coalesce what is queued into one write (bounded by the window).
                chunks = []
                while self._inbound:
                    chunks.append(self._inbound.popleft())
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                self.writer.write(data)
                await self.writer.drain()
                self.bytes_in += len(data)
                self.written_uncredited += len(data)
                if self.written_uncredited >= CREDIT_BATCH or (
                    not self._inbound and self.written_uncredited >= CREDIT_IDLE_BATCH
                ):
                    await self._grant_written()
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            self.manager._close_soon(self, f"{self.server} connection error: {exc.__class__.__name__}", notify=True)
        except Exception as exc:
            self.manager._close_soon(self, f"relay error: {exc.__class__.__name__}", notify=True)

    async def _grant_written(self) -> None:
        grant = self.written_uncredited
        self.written_uncredited = 0
        self.received_uncredited -= grant
        await self.manager.send_text("tunnel_credit", {"tunnel_id": self.id, "bytes": grant})

    # --- teardown --------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop the pumps and close the TCP connection (idempotent)."""
        self.closed = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        if self.opener is not None and self.opener is not current and not self.opener.done():
            tasks.append(self.opener)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._inbound.clear()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await within(2, self.writer.wait_closed())


class TunnelManager:
    """Every tunnel of one control-socket connection.

    ``send_text(type, payload)`` and ``send_bytes(frame)`` write to that connection
    (through the agent's single writer); the manager never writes to the socket itself.
    """

    def __init__(
        self, backend: Any, send_text: SendText, send_bytes: SendBytes, *, window: int | None = None, metrics=None
    ):
        self.backend = backend
        self.metrics = metrics  # agent_clients.runtime.metrics.AgentMetrics, or None
        self.send_text = send_text
        self.send_bytes = send_bytes
        self.window = window or protocol.TUNNEL_WINDOW
        self.tunnels: dict[int, Tunnel] = {}
        self._closing: set[asyncio.Task] = set()
        self._unknown_logged: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.closed = False

    def __len__(self) -> int:
        return len(self.tunnels)

    # --- messages from the control plane ----------------------------------------------

    def open(self, tunnel_id: int, session_id: str, stream: str = "vnc", file: dict | None = None) -> None:
        """Handle ``tunnel_open``: connect in the background, answer ready or error. With
        ``file``, the tunnel carries a file transfer (runtime/files.py), not VNC."""
        if self.closed:
            return
        if tunnel_id in self.tunnels:
            self._spawn(self.send_text("tunnel_error", {"tunnel_id": tunnel_id, "error": "tunnel id already in use"}))
            return
        tunnel = Tunnel(self, tunnel_id, session_id, self.window, stream, file=file)
        self.tunnels[tunnel_id] = tunnel
        tunnel.opener = asyncio.create_task(self._open(tunnel), name=f"tunnel-{tunnel_id}-open")

    async def _open(self, tunnel: Tunnel) -> None:
        try:
            if tunnel.file is not None:
                stream = files.start(self.backend, tunnel.session_id, tunnel.file, asyncio.get_running_loop())
                reader, writer = stream, stream
            else:
                opener = self.backend.open_audio_stream if tunnel.stream == "audio" else self.backend.open_vnc_stream
                reader, writer = await within(OPEN_TIMEOUT, opener(tunnel.session_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = True
            if isinstance(exc, BackendError):
                error, retryable = exc.message, exc.retryable
            elif isinstance(exc, TimeoutError):
                error = f"timed out connecting to the {'sound' if tunnel.stream == 'audio' else 'VNC'} server"
            else:
                log.exception("tunnel %s: opening the %s stream of %s failed", tunnel.id, tunnel.stream,
                              tunnel.session_id)  # fmt: skip
                error = f"could not open the {tunnel.stream} stream"
            log.warning("tunnel %s for session %s: %s", tunnel.id, tunnel.session_id, error)
            tunnel.closed = True
            self.tunnels.pop(tunnel.id, None)
            with contextlib.suppress(Exception):
                await self.send_text("tunnel_error", {"tunnel_id": tunnel.id, "error": error, "retryable": retryable})
            return
        if tunnel.closed or self.closed:
            writer.close()
            return
        tunnel.reader, tunnel.writer = reader, writer
        try:
            await self.send_text("tunnel_ready", {"tunnel_id": tunnel.id})
        except Exception:
            self._close_soon(tunnel, None, notify=False)
            return
        tunnel.start()
        if self.metrics is not None:
            self.metrics.tunnels_opened.inc()
        log.info("tunnel %s open to session %s, %s (%d open)",
                 tunnel.id, tunnel.session_id, tunnel.stream, len(self.tunnels))  # fmt: skip

    def data(self, tunnel_id: int, data: bytes) -> None:
        """Handle a binary frame. Unknown tunnels are ignored (logged once each)."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.closed:
            if tunnel_id not in self._unknown_logged:
                self._unknown_logged[tunnel_id] = None
                if len(self._unknown_logged) > 1024:
                    self._unknown_logged.popitem(last=False)
                log.info("ignoring data for unknown tunnel %s", tunnel_id)
            return
        tunnel.feed(data)

    def credit(self, tunnel_id: int, nbytes: int) -> None:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is not None:
            tunnel.grant(nbytes)

    def close(self, tunnel_id: int, reason: str | None) -> None:
        """Handle ``tunnel_close`` from the control plane (no close is sent back)."""
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is not None:
            self._close_soon(tunnel, reason or "closed by the control plane", notify=False, by_peer=True)

    # --- closing ---------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await coro

        task = asyncio.ensure_future(run())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_soon(self, tunnel: Tunnel, reason: str | None, *, notify: bool, by_peer: bool = False) -> None:
        if self.tunnels.get(tunnel.id) is not tunnel:
            return
        del self.tunnels[tunnel.id]
        tunnel.closed = True
        self._count_bytes(tunnel)
        log.info(
            "tunnel %s closed%s: %s (in %d B, out %d B)",
            tunnel.id,
            " by the control plane" if by_peer else "",
            reason,
            tunnel.bytes_in,
            tunnel.bytes_out,
        )

        async def finish() -> None:
            await tunnel.shutdown()
            if notify and not self.closed:
                await self.send_text("tunnel_close", {"tunnel_id": tunnel.id, "reason": reason})

        self._spawn(finish())

    def _count_bytes(self, tunnel: Tunnel) -> None:
        if self.metrics is not None:
            self.metrics.tunnel_bytes.labels("to_desktop").inc(tunnel.bytes_in)
            self.metrics.tunnel_bytes.labels("from_desktop").inc(tunnel.bytes_out)

    async def close_all(self, reason: str = "control connection closed") -> None:
        """Close every tunnel's TCP connection (the control socket is gone or closing)."""
        self.closed = True
        tunnels = list(self.tunnels.values())
        self.tunnels.clear()
        for tunnel in tunnels:
            self._count_bytes(tunnel)
        if tunnels:
            log.info("closing %d tunnel(s): %s", len(tunnels), reason)
        await asyncio.gather(*(t.shutdown() for t in tunnels), return_exceptions=True)
        pending = list(self._closing)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
