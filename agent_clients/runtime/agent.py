"""The agent runtime: one process that dials out to the control plane and does what
commands say, with any backend (Docker, Kubernetes, ...).

No Django here. The loop: acquire leadership -> connect -> ``hello`` -> serve (reader,
heartbeats, commands, tunnels) until the socket drops, leadership is lost or shutdown
is asked for -> reconnect with capped exponential backoff and full jitter.

Guarantees:
* one writer: every frame goes through :meth:`Agent._send` under one lock;
* ``ack`` at once, then execution; commands of one session run in arrival order,
  different sessions concurrently; blocking backend calls run in (daemon) threads;
* a command execution (command id, execution number) runs at most once per process: a
  finished one has its answer re-sent from a bounded cache, an in-flight one is only acked
  again; a retried command comes with a new execution number and runs again; an answer
  that could not be sent (socket down) is kept and sent after the next ``hello``;
* a ``void`` from the control plane (it gave up on that execution) skips it if it has not
  started yet;
* superseded (close 4409: another process connected with this agent's id): the process
  stops at once with one clear log line and exit code 3, without a drain;
* heartbeats never wait for a slow backend: the session list comes from a cache that a
  background thread refreshes, with a timeout;
* SIGTERM/SIGINT drains: heartbeat ``draining`` at once, new commands left unacked (the
  control plane redelivers them), in-flight ones finish (up to ``drain_timeout``),
  tunnels closed, socket closed with 1000, leadership released (and closed), exit 0.
  Sessions keep running;
* a replica that loses the leadership stops acting at once: the connection drops, the
  commands in flight are cancelled and their answers never sent (the new leader's
  ``hello`` puts every unfinished command back to pending, so the control plane
  redelivers them there), and every backend call that changes state is preceded by a
  check of ``leadership.is_leader`` (a backend call already running in its thread cannot
  be stopped; what it did is reconciled from the next leader's listing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agent_clients import protocol
from agent_clients.backends.base import Backend, BackendError, SessionSpec, SessionStatus
from agent_clients.config import BACKENDS, LEADERSHIPS, AgentConfig, ConfigError, import_dotted, parse_config
from agent_clients.leadership.base import Leadership
from agent_clients.runtime import logfmt
from agent_clients.runtime.deadlines import within
from agent_clients.runtime.metrics import AgentMetrics
from agent_clients.runtime.status import StatusFile, touch_period
from agent_clients.runtime.tunnels import TunnelManager

log = logging.getLogger("agent_clients.runtime.agent")

AGENT_VERSION = "0.1.0"
RESULT_CACHE_SIZE = 10_000
UNSENT_LIMIT = 10_000
EVENT_QUEUE_LIMIT = 1_000
MAX_FRAME = max(protocol.MAX_TEXT_FRAME, protocol.MAX_BINARY_PAYLOAD + protocol.BINARY_HEADER_SIZE) + 4096
PING_INTERVAL = 20.0
BACKOFF_BASE = 0.5
STABLE_AFTER = 5.0  # a connection that lasted this long resets the backoff
AUTH_CLOSE_CODES = (protocol.CLOSE_UNAUTHORIZED, protocol.CLOSE_FORBIDDEN)
GC_ANSWER_TIMEOUT = 10.0  # seconds the garbage collector waits for each sessions_verdict

T = TypeVar("T")
CommandKey = tuple[str, int]  # (command id, execution)
EXIT_SUPERSEDED = 3


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = 10.0, rng: random.Random | None = None):
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0, ceiling)


class NotConnected(ConnectionError):
    """No control socket at the moment."""


class BackendUnavailable(RuntimeError):
    """The backend cannot say what it holds: the agent does not connect yet."""


class NotLeader(RuntimeError):
    """This replica does not hold the leadership (any more): it must not act."""


class Agent:
    """The runtime. ``await Agent(cfg, backend, leadership).run()`` returns 0 after a drain."""

    def __init__(
        self,
        cfg: AgentConfig,
        backend: Backend,
        leadership: Leadership,
        *,
        version: str = AGENT_VERSION,
        install_signal_handlers: bool = True,
        max_workers: int | None = None,
    ):
        self.cfg = cfg
        self.backend = backend
        self.leadership = leadership
        self.version = version
        self.install_signal_handlers = install_signal_handlers
        self.max_workers = max_workers or max(4, min(32, cfg.max_sessions + 4))
        self.stable_after = STABLE_AFTER
        self.backoff_base = BACKOFF_BASE
        self.sessions_timeout = min(5.0, cfg.heartbeat_interval / 2)

        self._ws: ClientConnection | None = None
        self._send_lock: asyncio.Lock | None = None
        self._threads: asyncio.Semaphore | None = None
        self._shutdown: asyncio.Event | None = None
        self._stop_connection: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._event_ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.tunnels: TunnelManager | None = None
        self._force_stop = False
        self._drain_waiter: asyncio.Future | None = None

        # command bookkeeping, keyed by (command id, execution): a retried command is a new
        # execution and runs again; a redelivery of one execution never does.
        self._results: collections.OrderedDict[CommandKey, tuple[str, dict]] = collections.OrderedDict()
        self._unsent: collections.OrderedDict[CommandKey, tuple[str, dict]] = collections.OrderedDict()
        self._inflight: dict[CommandKey, asyncio.Task] = {}
        self._started: set[CommandKey] = set()  # in flight and past the wait for its session's turn
        self._void: set[CommandKey] = set()  # the control plane gave up on these: skipped if not started
        self._tails: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self.superseded = False  # another process connected as this agent: this one stops
        self.terms_lost = 0  # leadership losses seen; a command that spans one is not answered

        # session cache for heartbeats
        self._sessions: list[SessionStatus] = []
        self._capacity: dict[str, Any] = {"max_sessions": cfg.max_sessions}
        self._refresh: asyncio.Future | None = None
        self.listed_once = False  # hello waits for one real listing: never report a guess
        self.hello_list_timeout = 30.0

        # watch()
        self._events: collections.deque[SessionStatus] = collections.deque(maxlen=EVENT_QUEUE_LIMIT)
        self._watch_stop = threading.Event()

        # the garbage collector: sessions_verdict answers awaited, by request id; the ids
        # already logged as unknown to the control plane (one line each per process)
        self._verdict_waiters: dict[str, asyncio.Future] = {}
        self._unknown_logged: set[str] = set()
        self.gc_rounds = 0

        # observable counters (tests, logs); Prometheus series on METRICS_PORT (agent_clients/runtime/metrics.py)
        self.metrics = AgentMetrics()
        self.metrics.tunnels_open.set_function(lambda: len(self.tunnels) if self.tunnels is not None else 0)
        self.metrics.connected.set_function(lambda: 1 if self._ws is not None else 0)
        self.status = StatusFile(cfg.status_file)  # STATUS_FILE, for a container's health check
        self.connections = 0
        self.connect_attempts = 0
        self.reconnect_delays: list[float] = []

    # --- public ----------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Begin the graceful drain (what SIGTERM/SIGINT do). Thread-unsafe: call on the loop."""
        if self._shutdown is None:
            return
        if self._shutdown.is_set():
            log.warning("second shutdown request: skipping the rest of the drain")
            self._force_stop = True
            if self._drain_waiter is not None and not self._drain_waiter.done():
                self._drain_waiter.cancel()
            return
        log.info("shutdown requested: draining")
        self._shutdown.set()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._send_lock = asyncio.Lock()
        self._threads = asyncio.Semaphore(self.max_workers)
        self._shutdown = asyncio.Event()
        self._stop_connection = asyncio.Event()
        self._connected = asyncio.Event()
        self._event_ready = asyncio.Event()
        # First of all: a status file a crashed predecessor left ("connected") is not ours.
        self.status.set("connecting")
        if self.cfg.metrics_port:  # first: a port that cannot be bound stops the agent before it holds anything
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_bind)
        if self.install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.request_shutdown)
        keeper = asyncio.create_task(self._keep_status(), name="agent-status")
        watcher = self._start_watch()
        connection_loop = asyncio.create_task(self._connection_loop(), name="agent-connection")
        events = asyncio.create_task(self._event_sender(), name="agent-events")
        shutdown = asyncio.create_task(self._shutdown.wait(), name="agent-shutdown")
        try:
            done, _ = await asyncio.wait({connection_loop, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if connection_loop in done:
                connection_loop.result()  # raises what killed it
            if not self.superseded:
                await self._drain(connection_loop)
        finally:
            self.status.set("stopped")
            if self.superseded:
                for task in list(self._inflight.values()):
                    task.cancel()  # their answers would be refused; the current process redoes them
            for task in (events, connection_loop, shutdown, keeper):
                task.cancel()
            await asyncio.gather(events, connection_loop, shutdown, keeper, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            self._watch_stop.set()
            if watcher is not None:
                await asyncio.to_thread(watcher.join, 2)
            with contextlib.suppress(Exception):
                await within(5, self.leadership.release())
            await self._close_leadership()
            with contextlib.suppress(Exception):
                await within(5, asyncio.to_thread(self.backend.close))
            self.metrics.close()
            if self.install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(Exception):
                        loop.remove_signal_handler(sig)
        if self.superseded:
            log.error("agent stopped: superseded by another process with the same agent id")
            return EXIT_SUPERSEDED
        log.info("agent stopped")
        return 0

    async def _close_leadership(self) -> None:
        """Free the leadership's client and threads if it has a ``close``/``aclose``."""
        aclose, close = getattr(self.leadership, "aclose", None), getattr(self.leadership, "close", None)
        try:
            if callable(aclose):
                await within(5, aclose())
            elif callable(close):
                close()
        except Exception as exc:
            log.warning("closing the leadership client failed: %s", exc)

    # --- drain -----------------------------------------------------------------------

    async def _drain(self, connection_loop: asyncio.Task) -> None:
        self.draining = True
        self.status.set("draining")
        with contextlib.suppress(Exception):
            await self._send_heartbeat(fresh=False)
        inflight = [t for t in self._inflight.values() if not t.done()]
        if inflight:
            log.info("draining: waiting up to %.0fs for %d in-flight command(s)", self.cfg.drain_timeout, len(inflight))
            self._drain_waiter = asyncio.ensure_future(asyncio.wait(inflight, timeout=self.cfg.drain_timeout))
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_waiter
            left = [t for t in inflight if not t.done()]
            if left:
                log.warning("drain timeout: %d command(s) still running are abandoned", len(left))
        # Give the answers of the drained commands a moment to reach the control plane.
        if self._unsent and not self._force_stop:
            deadline = time.monotonic() + min(5.0, self.cfg.drain_timeout)
            while self._unsent and time.monotonic() < deadline and not connection_loop.done():
                await self._flush_unsent()
                if self._unsent:
                    await asyncio.sleep(0.1)
        self._stop_connection.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await within(10, asyncio.shield(connection_loop))

    # --- connection ------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        attempt = 0
        while not self._stop_connection.is_set():
            started = time.monotonic()
            established = False
            try:
                self.status.set("connecting" if self.leadership.is_leader else "standby")
                if not await self._until_stopped(self.leadership.acquire()):
                    return
                self.status.set("connecting")
                started = time.monotonic()
                established = await self._serve_once()
            except asyncio.CancelledError:
                raise
            except BackendUnavailable as exc:
                log.error("%s", exc)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    log.error("control plane refused the agent token (HTTP %s)", status)
                else:
                    log.warning("control plane answered HTTP %s to the connect", status)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == protocol.CLOSE_REPLACED:
                    self._stop_superseded()
                    return
                self._log_close(exc)
            except (OSError, TimeoutError) as exc:
                log.warning("cannot connect to %s: %s", self._safe_url(), exc.__class__.__name__ + f" {exc}".rstrip())
            except Exception:
                log.exception("connecting to the control plane failed")
            if self._stop_connection.is_set():
                return
            if established and time.monotonic() - started > self.stable_after:
                attempt = 0
            delay = backoff_delay(attempt, base=self.backoff_base, cap=self.cfg.reconnect_cap)
            attempt += 1
            self.reconnect_delays.append(delay)
            if len(self.reconnect_delays) > 1000:
                del self.reconnect_delays[:500]
            log.info("reconnecting in %.2fs", delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await within(delay, self._stop_connection.wait())

    async def _until_stopped(self, awaitable) -> bool:
        """Await ``awaitable`` unless the connection loop is told to stop first."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.create_task(self._stop_connection.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    def _stop_superseded(self) -> None:
        """Another process connected with this agent's id and token (a second copy started
        without an HA lock): two copies would run every command twice and undo each other's
        work, so this one stops for good and says why."""
        self.superseded = True
        self._stop_connection.set()
        log.error("another process connected as agent %s: this one stops", self.cfg.agent_id)

    def _safe_url(self) -> str:
        return self.cfg.connect_url  # carries the agent id, never the token

    def _log_close(self, exc: ConnectionClosed) -> None:
        rcvd = exc.rcvd
        if rcvd is not None and rcvd.code in AUTH_CLOSE_CODES:
            log.error("control plane refused the agent (close %s: %s)", rcvd.code, rcvd.reason or "no reason")
        elif rcvd is not None:
            log.warning("control plane closed the connection (close %s: %s)", rcvd.code, rcvd.reason or "no reason")
        else:
            log.warning("connection to the control plane lost")

    async def _serve_once(self) -> bool:
        """Connect, say hello, serve until something ends the connection. True if hello went out."""
        if not self.listed_once:
            # The hello tells the control plane what this agent holds; sessions left out
            # are reconciled as missing. So connect only once the backend has answered.
            await self._refresh_sessions(self.hello_list_timeout)
            if not self.listed_once:
                raise BackendUnavailable("the backend has not listed its sessions yet: not connecting")
        self.connect_attempts += 1
        ws = await connect(
            self.cfg.connect_url,
            additional_headers={"Authorization": f"Bearer {self.cfg.token}"},
            max_size=MAX_FRAME,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_INTERVAL,
            open_timeout=10,
            close_timeout=5,
            max_queue=64,
        )
        tunnels = TunnelManager(
            self.backend,
            lambda type_, payload: self._send_on(ws, type_, payload),
            lambda frame: self._send_raw(ws, frame),
            metrics=self.metrics,
        )
        tasks: list[asyncio.Task] = []
        try:
            log.info("connected to %s", self._safe_url())
            await self._refresh_sessions(min(10.0, self.hello_list_timeout))
            hello = {
                "agent_id": self.cfg.agent_id,
                "platform": self.backend.platform,
                "protocol": protocol.PROTOCOL_VERSION,
                "version": self.version,
                "region": self.cfg.region or None,
                "capacity": self._capacity_payload(),
                "sessions": [s.to_dict() for s in self._sessions],
            }
            async with self._send_lock:
                await ws.send(protocol.encode("hello", hello))
                self._ws = ws
                self.tunnels = tunnels
            self.connections += 1
            self._connected.set()
            self.status.set("connected")
            self._event_ready.set()
            log.info("hello sent (%d sessions)", len(self._sessions))
            if self._unsent:
                await self._flush_unsent()
            if self.draining:
                await self._send_heartbeat(fresh=False)
            tasks = [
                asyncio.create_task(self._reader(ws, tunnels), name="agent-reader"),
                asyncio.create_task(self._heartbeats(), name="agent-heartbeat"),
                asyncio.create_task(self._watch_leadership(), name="agent-leadership"),
                asyncio.create_task(self._stop_connection.wait(), name="agent-stop"),
                asyncio.create_task(self._garbage_collector(), name="agent-gc"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, ConnectionClosed):
                    raise exc
                if exc is not None and not isinstance(exc, NotConnected):
                    log.error("%s failed: %r", task.get_name(), exc)
                if task.get_name() == "agent-reader" and exc is None:
                    if ws.close_code == protocol.CLOSE_REPLACED:
                        self._stop_superseded()
                        return True
                    log.warning(
                        "control plane closed the connection (close %s: %s)", ws.close_code, ws.close_reason or "-"
                    )
                elif task.get_name() == "agent-leadership":
                    self._leadership_lost()
            return True
        finally:
            self._ws = None
            self.tunnels = None
            self._connected.clear()
            if not self.draining:
                self.status.set("connecting")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await tunnels.close_all()
            with contextlib.suppress(Exception):
                await within(6, ws.close(1000, "agent shutting down" if self.draining else "agent disconnecting"))
            if self._stop_connection.is_set():
                log.info("disconnected from the control plane")

    async def _watch_leadership(self) -> None:
        await self.leadership.lost()

    def _leadership_lost(self) -> None:
        """Stop acting: cancel the commands in flight (no answer goes out for them; the
        control plane redelivers unfinished commands after the next leader's hello)."""
        self.terms_lost += 1
        inflight = [task for task in self._inflight.values() if not task.done()]
        for task in inflight:
            task.cancel()
        log.warning("leadership lost: disconnecting; %d command(s) in flight cancelled, not answered", len(inflight))

    def _ensure_leader(self) -> None:
        if not self.leadership.is_leader:
            raise NotLeader("not the leader")

    # --- the one writer --------------------------------------------------------------

    async def _send_raw(self, ws: ClientConnection, frame: str | bytes) -> None:
        async with self._send_lock:
            if self._ws is not ws:
                raise NotConnected("connection replaced")
            await ws.send(frame)

    async def _send_on(self, ws: ClientConnection, type_: str, payload: dict) -> None:
        await self._send_raw(ws, protocol.encode(type_, payload))

    async def _send(self, type_: str, payload: dict) -> None:
        """Send on the current connection; NotConnected if there is none."""
        ws = self._ws
        if ws is None:
            raise NotConnected("not connected")
        await self._send_on(ws, type_, payload)

    # --- reader ----------------------------------------------------------------------

    async def _reader(self, ws: ClientConnection, tunnels: TunnelManager) -> None:
        async for frame in ws:
            if isinstance(frame, bytes):
                try:
                    tunnel_id, data = protocol.unpack_data(frame)
                except protocol.ProtocolError as exc:
                    log.warning("ignoring a bad binary frame: %s", exc.reason)
                    continue
                tunnels.data(tunnel_id, data)
                continue
            try:
                message = protocol.decode_control_message(frame)
            except protocol.ProtocolError as exc:
                log.warning("ignoring an invalid control frame: %s", exc.reason)
                continue
            p = message.payload
            try:  # the ids of the command and session it names: in its lines and those of the tasks it starts
                with logfmt.log_context(command_id=p.get("command_id"), session_id=p.get("session_id")):
                    self._dispatch(message, tunnels)
            except Exception:
                log.exception("handling a %s message failed", message.type)

    def _dispatch(self, message: protocol.Message, tunnels: TunnelManager) -> None:
        p = message.payload
        if message.type == "command":
            self._on_command(p)
        elif message.type == "void":
            self._on_void(p)
        elif message.type == "tunnel_open":
            if self.draining:
                self._spawn(self._send("tunnel_error", {"tunnel_id": p["tunnel_id"], "error": "agent is draining"}))
            else:
                tunnels.open(p["tunnel_id"], p["session_id"], p.get("stream") or "vnc", file=p.get("file"))
        elif message.type == "tunnel_close":
            tunnels.close(p["tunnel_id"], p.get("reason"))
        elif message.type == "tunnel_credit":
            tunnels.credit(p["tunnel_id"], p["bytes"])
        elif message.type == "error":
            log.warning("control plane reports an error: %s (ref %s)", p["reason"], p.get("ref"))
        elif message.type == "sessions_verdict":
            waiter = self._verdict_waiters.get(p["request_id"])
            if waiter is not None and not waiter.done():
                waiter.set_result(p)

    def _spawn(self, coro) -> asyncio.Task:
        async def quiet():
            with contextlib.suppress(NotConnected, ConnectionClosed):
                await coro

        task = asyncio.create_task(quiet())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- commands --------------------------------------------------------------------

    def _on_command(self, p: dict) -> None:
        command_id = p["command_id"]
        key: CommandKey = (command_id, p.get("execution") or 1)
        ack = {"command_id": command_id, "execution": key[1]}
        if self.draining:
            log.info("command %s %s left unacked: the agent is draining", command_id, p["type"])
            return
        if key in self._results:
            self._results.move_to_end(key)
            log.info("command %s (execution %d) already finished: re-sending its answer", command_id, key[1])
            self._spawn(self._send("ack", ack))
            self._unsent[key] = self._results[key]
            self._trim_unsent()
            self._spawn(self._deliver(key))
            return
        self._spawn(self._send("ack", ack))
        if key in self._inflight:
            log.info("command %s (execution %d) is already running: acked again", command_id, key[1])
            return
        session_id = p.get("session_id") or None
        previous = self._tails.get(session_id) if session_id else None
        task = asyncio.create_task(self._run_command(p, key, previous), name=f"command-{command_id}")
        self._inflight[key] = task
        if session_id:
            self._tails[session_id] = task

        def done(t: asyncio.Task, key=key, session_id=session_id) -> None:
            self._inflight.pop(key, None)
            self._started.discard(key)
            self._void.discard(key)
            if session_id and self._tails.get(session_id) is t:
                del self._tails[session_id]

        task.add_done_callback(done)

    def _on_void(self, p: dict) -> None:
        """The control plane gave up on this execution (its ack came too late): skip it if it
        has not started; one that runs already is reconciled from its result by the control plane."""
        key: CommandKey = (p["command_id"], p.get("execution") or 1)
        if key not in self._inflight:
            return
        if key in self._started:
            log.warning(
                "command %s is void (%s) but already running: its result will be reconciled", key[0], p["reason"]
            )
            return
        log.warning("command %s is void (%s): it will not run", key[0], p["reason"])
        self._void.add(key)

    async def _run_command(self, p: dict, key: CommandKey, previous: asyncio.Task | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        if key in self._void:
            return
        self._started.add(key)
        command_id, type_, session_id = p["command_id"], p["type"], p.get("session_id") or ""
        execution = key[1]
        started = time.monotonic()
        term = self.terms_lost
        try:
            result = await self._execute(type_, session_id, p.get("payload") or {})
            answer = ("complete", {"command_id": command_id, "execution": execution, "result": result})
            outcome = "completed"
            self.metrics.commands.labels(type_, "completed").inc()
        except BackendError as exc:
            answer = (
                "failed",
                {"command_id": command_id, "execution": execution, "error": exc.message, "retryable": exc.retryable},
            )
            outcome = f"failed ({'retryable' if exc.retryable else 'permanent'}): {exc.detail}"
            self.metrics.commands.labels(type_, "failed").inc()
        except asyncio.CancelledError:
            raise
        except NotLeader:
            log.warning("command %s %s %s not run: leadership lost", command_id, type_, session_id)
            return
        except Exception:
            log.exception("command %s %s %s crashed", command_id, type_, session_id)
            answer = (
                "failed",
                {"command_id": command_id, "execution": execution, "error": "internal agent error", "retryable": True},
            )
            outcome = "failed (internal error)"
            self.metrics.commands.labels(type_, "failed").inc()
        log.info(
            "command %s %s %s (execution %d) → %s in %.1fs",
            command_id,
            type_,
            session_id,
            execution,
            outcome,
            time.monotonic() - started,
        )
        if self.terms_lost != term or not self.leadership.is_leader:
            # The leadership was lost while it ran: no answer (neither now nor after a new
            # hello); a redelivery runs it again (the backends are idempotent).
            log.warning("command %s %s %s: leadership lost while it ran, not answered", command_id, type_, session_id)
            return
        self._results[key] = answer
        if len(self._results) > RESULT_CACHE_SIZE:
            self._results.popitem(last=False)
        self._unsent[key] = answer
        self._trim_unsent()
        await self._deliver(key)

    def _trim_unsent(self) -> None:
        while len(self._unsent) > UNSENT_LIMIT:
            dropped, _ = self._unsent.popitem(last=False)
            log.warning("dropping the unsent answer of command %s (the control plane will redeliver it)", dropped[0])

    async def _deliver(self, key: CommandKey) -> None:
        """Send one kept answer if connected; keep it for the next connection otherwise."""
        ws = self._ws
        if ws is None:
            return
        async with self._send_lock:
            answer = self._unsent.get(key)
            if answer is None or self._ws is not ws:
                return
            try:
                await ws.send(protocol.encode(*answer))
            except ConnectionClosed:
                return
            self._unsent.pop(key, None)

    async def _flush_unsent(self) -> None:
        for key in list(self._unsent):
            await self._deliver(key)
            if self._ws is None:
                return

    async def _in_thread(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run a blocking call in a daemon thread (a hung backend call never blocks exit);
        at most ``max_workers`` at once."""
        async with self._threads:
            return await self._thread_call(fn, *args, **kwargs)

    async def _act(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """A backend call that changes state: only while this replica leads, checked right
        before the call starts (after the wait for a free thread). NotLeader otherwise."""
        async with self._threads:
            self._ensure_leader()
            return await self._thread_call(fn, *args, **kwargs)

    async def _thread_call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        timer = self.metrics.backend_calls.labels(getattr(fn, "__name__", "call")).time()

        def target() -> None:
            try:
                with timer:
                    outcome = (_set_result, fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting task
                outcome = (_set_exception, exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone (process exiting)
                loop.call_soon_threadsafe(outcome[0], future, outcome[1])

        threading.Thread(target=target, name=f"backend-{getattr(fn, '__name__', 'call')}", daemon=True).start()
        return await future

    async def _execute(self, type_: str, session_id: str, payload: dict) -> dict:
        b = self.backend
        if type_ == "list_sessions":
            sessions = await self._in_thread(b.list_sessions)
            self._sessions = list(sessions)
            return {"sessions": [s.to_dict() for s in sessions]}
        if not session_id:
            raise BackendError(f"{type_} needs a session_id", retryable=False)
        if type_ == "create_session":
            spec = SessionSpec.from_payload(session_id, payload)
            status = await self._act(b.create, spec)
        elif type_ == "terminate_session":
            await self._act(b.terminate, session_id, keep_home=bool(payload.get("keep_home")))
            self._sessions = [s for s in self._sessions if s.session_id != session_id]
            return {"session_id": session_id, "state": "terminated"}
        elif type_ == "hibernate_session":
            status = await self._act(b.hibernate, session_id)
        elif type_ == "wake_session":
            status = await self._act(b.wake, session_id)
        elif type_ == "get_session":
            status = await self._in_thread(b.status, session_id)
        else:
            raise BackendError(f"unknown command type {type_!r}", retryable=False)
        self._remember(status)
        return status.to_dict()

    def _remember(self, status: SessionStatus) -> None:
        others = [s for s in self._sessions if s.session_id != status.session_id]
        self._sessions = [*others, status] if status.state != "missing" else others

    # --- the garbage collector -------------------------------------------------------

    async def _garbage_collector(self) -> None:
        """Right after every hello, then every ``gc_interval``: the backend's upkeep
        (``Backend.maintain``), then one collection. A failed round is logged and never ends
        the connection; the next round tries again. Only a connected leader gets here."""
        while True:
            if not self.draining:
                try:
                    repaired = await self._act(self.backend.maintain)
                    if repaired:
                        log.warning("repaired what the platform lost: %s", ", ".join(repaired))
                    await self.collect_garbage()
                except asyncio.CancelledError:
                    raise
                except BackendError as exc:
                    log.warning("garbage collection failed: %s", exc.detail)
                except NotLeader:
                    log.warning("garbage collection skipped: leadership lost")
                except (NotConnected, ConnectionClosed, TimeoutError) as exc:
                    log.warning("garbage collection skipped: no verdict from the control plane (%r)", exc)
                except Exception:
                    log.exception("garbage collection crashed")
            await asyncio.sleep(self.cfg.gc_interval)

    async def collect_garbage(self) -> list[str]:
        """List the sessions the backend holds objects of, ask the control plane for a verdict
        on each (``sessions_query``, in chunks of protocol.MAX_SESSIONS_QUERY), then let the
        backend remove what the control plane has finished (and is older than ``gc_grace``).
        A session the control plane does not answer for is unknown to it (another install
        on this host, or another agent's): left alone. So are sessions with a command running
        here."""
        ws = self._ws
        if ws is None:
            raise NotConnected("not connected")
        asked = time.monotonic()
        found = sorted(await self._in_thread(self.backend.session_ids_found))
        remove: set[str] = set()
        remove_keep_home: set[str] = set()
        for start in range(0, len(found), protocol.MAX_SESSIONS_QUERY):
            chunk = found[start : start + protocol.MAX_SESSIONS_QUERY]
            verdict = await self._ask_verdicts(ws, chunk)
            queried = set(chunk)
            remove |= queried & set(verdict["remove"])
            remove_keep_home |= queried & set(verdict["remove_keep_home"])
            known = queried & {*verdict["live"], *verdict["remove"], *verdict["remove_keep_home"]}
            for sid in sorted(queried - known - self._unknown_logged):
                self._unknown_logged.add(sid)
                log.info("garbage collector: session %s is not known to the control plane: left alone", sid)
        running_here = set(self._tails)  # a command in flight: its objects are in the making or in use
        remove -= running_here | remove_keep_home
        remove_keep_home -= running_here
        removed: list[str] = []
        if remove or remove_keep_home:
            # Objects made after the listing began are younger than the time since: keep them.
            grace = self.cfg.gc_grace + (time.monotonic() - asked)
            removed = await self._act(self.backend.collect_garbage, remove, remove_keep_home, grace)
        self.gc_rounds += 1
        return removed

    async def _ask_verdicts(self, ws: ClientConnection, session_ids: list[str]) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        self._verdict_waiters[request_id] = waiter
        try:
            await self._send_raw(ws, protocol.encode("sessions_query", {"session_ids": session_ids}, id=request_id))
            return await within(GC_ANSWER_TIMEOUT, waiter)
        finally:
            self._verdict_waiters.pop(request_id, None)

    # --- heartbeats and the session cache -------------------------------------------

    def _capacity_payload(self) -> dict[str, Any]:
        return {**self._capacity, "max_sessions": self.cfg.max_sessions}

    async def _refresh_sessions(self, timeout: float | None = None) -> None:
        """Refresh the session list and capacity from the backend in a thread, waiting at
        most ``timeout`` (heartbeats: ``sessions_timeout``, and not at all when a listing is
        still running); on timeout the last known values stay and the listing goes on."""
        if self._refresh is None or self._refresh.done():

            def list_sessions_and_capacity() -> tuple[list[SessionStatus], dict[str, Any]]:
                return list(self.backend.list_sessions()), dict(self.backend.capacity() or {})

            # single-flight, own thread
            self._refresh = asyncio.ensure_future(self._thread_call(list_sessions_and_capacity))
            self._refresh.add_done_callback(self._refreshed)
        elif timeout is None:
            log.debug("backend still listing sessions: reporting the last known list")
            return
        done, _ = await asyncio.wait({self._refresh}, timeout=self.sessions_timeout if timeout is None else timeout)
        if not done:
            log.warning("backend slow to list sessions: reporting the last known list")

    def _refreshed(self, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("listing sessions failed: %s", exc)
            return
        self._sessions, self._capacity = future.result()
        self.listed_once = True

    async def _send_heartbeat(self, *, fresh: bool = True) -> None:
        if fresh:
            await self._refresh_sessions()
        await self._send(
            "heartbeat",
            {
                "capacity": self._capacity_payload(),
                "sessions": [{"session_id": s.session_id, "state": s.state} for s in self._sessions],
                "status": "draining" if self.draining else "online",
            },
        )

    async def _keep_status(self) -> None:
        """Touch the status file while the loop runs: its age tells a health check this
        process still answers (runtime/status.py)."""
        period = touch_period(self.cfg.heartbeat_interval)
        while True:
            await asyncio.sleep(period)
            self.status.touch()

    async def _heartbeats(self) -> None:
        interval = self.cfg.heartbeat_interval
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())
            await self._send_heartbeat()

    # --- session events from backend.watch ------------------------------------------

    def _start_watch(self) -> threading.Thread | None:
        watch = getattr(self.backend, "watch", None)
        if not callable(watch):
            return None
        loop = self._loop

        def emit(status: SessionStatus) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(self._on_event, status)

        def target() -> None:
            try:
                watch(emit, self._watch_stop)
            except Exception:
                log.exception("backend watch stopped with an error")

        thread = threading.Thread(target=target, name="backend-watch", daemon=True)
        thread.start()
        return thread

    def _on_event(self, status: SessionStatus) -> None:
        if status.state not in protocol.REPORTED_STATES:
            log.warning("backend reported session %s in unknown state %r", status.session_id, status.state)
            return
        if len(self._events) == self._events.maxlen:
            log.warning("session event queue full: dropping the oldest event")
        self._events.append(status)
        self._remember(status)
        self._event_ready.set()

    async def _event_sender(self) -> None:
        while True:
            await self._event_ready.wait()
            self._event_ready.clear()
            while self._events and self._ws is not None:
                status = self._events[0]
                try:
                    await self._send(
                        "session_event",
                        {"session_id": status.session_id, "state": status.state, "reason": status.detail or None},
                    )
                except (NotConnected, ConnectionClosed):
                    break
                if self._events and self._events[0] is status:
                    self._events.popleft()
                with logfmt.log_context(session_id=status.session_id):
                    log.info("session %s is %s (event sent)", status.session_id, status.state)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# --- entry point --------------------------------------------------------------------


def _build(path: str, cfg: AgentConfig) -> Any:
    cls = import_dotted(path)
    from_config = getattr(cls, "from_config", None)
    return from_config(cfg) if callable(from_config) else cls()


def main(argv: list[str] | None = None, *, default_backend: str | None = None) -> int:
    """Run an agent until SIGTERM/SIGINT. Returns the process exit code."""
    try:
        cfg = parse_config(argv, default_backend=default_backend)
    except ConfigError as exc:
        print(f"streamspace-agent: {exc}", file=sys.stderr)
        return 2
    logfmt.configure(cfg.log_format, os.environ.get("LOG_LEVEL", "INFO"), agent_id=cfg.agent_id)
    try:
        backend = _build(BACKENDS.get(cfg.backend, cfg.backend), cfg)
        leadership = _build(LEADERSHIPS[cfg.ha_backend], cfg)
    except ConfigError as exc:
        print(f"streamspace-agent: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"streamspace-agent: backend unavailable: {exc.message}", file=sys.stderr)
        return 1
    log.info(
        "agent %s starting: backend %s (%s), region %s, leadership %s",
        cfg.agent_id,
        cfg.backend,
        getattr(backend, "platform", "?"),
        cfg.region or "-",
        cfg.ha_backend,
    )
    try:
        return asyncio.run(Agent(cfg, backend, leadership).run())
    except KeyboardInterrupt:
        return 130
