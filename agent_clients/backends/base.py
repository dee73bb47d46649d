"""The interface every agent backend implements (Docker, Kubernetes, ...).

Modelled on JupyterHub spawners: a small set of blocking, idempotent methods that the
runtime calls from a thread pool, each raising :class:`BackendError` whose
``retryable`` flag says whether trying again can help.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any


class BackendError(Exception):
    """A backend operation failed.

    ``message`` is for the user (it ends up in the session's error_message);
    ``detail`` is for the log only. ``retryable`` is False when repeating the same
    call cannot succeed (bad image name, absurd limits, capacity exhausted).
    """

    def __init__(self, message: str, *, retryable: bool, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.detail = detail or message


# The least CPU (cores) and memory (MB) an agent runs a session with unless told otherwise
# (SESSION_MIN_CPU, SESSION_MIN_MEMORY_MB): the control plane's defaults too.
DEFAULT_MIN_CPU = 0.1
DEFAULT_MIN_MEMORY_MB = 64


@dataclass(frozen=True)
class SessionSpec:
    """What a create_session command asks for, parsed from its payload."""

    session_id: str
    owner: str
    image: str
    vnc_port: int = 5901
    cpu: float = 1.0  # cores
    memory_mb: int = 1024
    env: dict[str, str] = field(default_factory=dict)
    home_path: str = "/home/user"
    keep_home: bool = False
    vnc_password: str = ""
    template: str = ""
    egress: str = "internet"  # agent_clients.backends.egress.MODES
    egress_allow: tuple[str, ...] = ()  # extra destinations: "CIDR", "CIDR:port" or "port"
    sound: bool = False  # the template's sound: the desktop serves an Opus stream on SOUND_PORT
    clipboard_to_desktop: bool = True
    clipboard_to_browser: bool = True
    clipboard_max_to_desktop: int = 1 << 20  # bytes

    def desktop_env(self) -> dict[str, str]:
        """The container's environment: the template's, then the clipboard rules the desktop
        image hands to Xvnc (images/desktop/entrypoint.sh), which a template cannot override."""
        return {
            **self.env,
            "VNC_CLIPBOARD_TO_DESKTOP": "1" if self.clipboard_to_desktop else "0",
            "VNC_CLIPBOARD_TO_BROWSER": "1" if self.clipboard_to_browser else "0",
            "VNC_CLIPBOARD_MAX_TO_DESKTOP": str(max(1, self.clipboard_max_to_desktop)),
        }

    @classmethod
    def from_payload(cls, session_id: str, payload: dict[str, Any]) -> SessionSpec:
        try:
            template = payload.get("template") or {}
            clipboard = template.get("clipboard") or {}
            return cls(
                session_id=str(session_id),
                owner=str(payload.get("owner", "")),
                image=str(template["image"]),
                vnc_port=int(template.get("vnc_port", 5901)),
                cpu=float(payload.get("cpu", 1.0)),
                memory_mb=int(payload.get("memory_mb", 1024)),
                env={str(k): str(v) for k, v in (template.get("env") or {}).items()},
                home_path=str(template.get("volume_mount_path") or "/home/user"),
                keep_home=bool(payload.get("keep_home", False)),
                vnc_password=str(payload.get("vnc_password", "")),
                template=str(template.get("slug", "")),
                egress=str(template.get("egress") or "internet"),
                egress_allow=tuple(str(e) for e in template.get("egress_allow") or ()),
                sound=template.get("sound") is True,
                clipboard_to_desktop=bool(clipboard.get("to_desktop", True)),
                clipboard_to_browser=bool(clipboard.get("to_browser", True)),
                clipboard_max_to_desktop=int(clipboard.get("max_to_desktop", 1 << 20)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"invalid create_session payload: {exc}", retryable=False) from None


@dataclass(frozen=True)
class SessionStatus:
    """What a backend reports about one session it holds.

    ``state`` is one of protocol.REPORTED_STATES: running, starting, hibernated,
    stopped, failed, missing.
    """

    session_id: str
    state: str
    detail: str = ""
    vnc_host: str | None = None
    vnc_port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(abc.ABC):
    """One compute platform. Methods block; the runtime runs them off the event loop."""

    platform: str = ""

    @abc.abstractmethod
    def create(self, spec: SessionSpec) -> SessionStatus:
        """Create and start the session; return only when it runs. Repeating finds it."""

    @abc.abstractmethod
    def terminate(self, session_id: str, *, keep_home: bool = False) -> None:
        """Remove everything the session has (home too unless keep_home). Gone counts as done."""

    @abc.abstractmethod
    def hibernate(self, session_id: str) -> SessionStatus:
        """Stop the session's processes, keep its home. Already stopped counts as done."""

    @abc.abstractmethod
    def wake(self, session_id: str) -> SessionStatus:
        """Start a hibernated session again and return its (maybe new) VNC endpoint."""

    @abc.abstractmethod
    def status(self, session_id: str) -> SessionStatus:
        """The session's current state; state 'missing' if the platform has no trace of it."""

    @abc.abstractmethod
    def list_sessions(self) -> list[SessionStatus]:
        """Every session this agent holds on the platform (the platform is the source of truth)."""

    @abc.abstractmethod
    def vnc_endpoint(self, session_id: str) -> tuple[str, int]:
        """Host and port a TCP connection reaches the session's VNC server on."""

    def session_ids_found(self) -> set[str]:
        """The ids of the sessions this agent has anything of on the platform (the garbage
        collector asks the control plane about each). Default: none (no garbage collector)."""
        return set()

    def collect_garbage(
        self, remove: set[str] | frozenset[str], remove_keep_home: set[str] | frozenset[str], grace: float
    ) -> list[str]:
        """Remove what this agent made for the sessions the control plane finished and that is
        older than ``grace`` seconds: everything of the sessions in ``remove`` (except a home
        that asked to be kept), everything but the home of those in ``remove_keep_home``.
        Nothing of any other session is touched. Returns what was removed. Default: nothing
        (a backend whose platform cleans up after itself, or one that has no garbage
        collector yet, such as Kubernetes)."""
        return []

    def maintain(self) -> list[str]:
        """Upkeep of what the platform may lose behind the agent's back, run only while this
        process leads and is connected (right after every hello, then every
        ``gc_interval``, before the garbage collector). Returns what it repaired. Default:
        nothing (the Docker backend re-installs egress rules a firewall reload removed)."""
        return []

    def capacity(self) -> dict[str, Any]:
        """What the agent reports as its capacity: cpu (cores), memory_mb, max_sessions."""
        return {}

    async def open_vnc_stream(self, session_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An asyncio stream to the session's VNC server. Backends whose VNC is not a plain
        TCP endpoint (a Kubernetes port-forward) override this."""
        host, port = await asyncio.to_thread(self.vnc_endpoint, session_id)
        try:
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            raise BackendError(f"VNC server unreachable: {exc}", retryable=True) from None

    def audio_endpoint(self, session_id: str) -> tuple[str, int]:
        """(host, port) of the session's sound stream (Ogg Opus over TCP). Backends that
        carry sound override this; the others refuse, which the viewer hears as a reason."""
        raise BackendError("this platform does not carry sound", retryable=False)

    async def open_audio_stream(self, session_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An asyncio stream to the session's sound server (see ``audio_endpoint``)."""
        host, port = await asyncio.to_thread(self.audio_endpoint, session_id)
        try:
            return await asyncio.open_connection(host, port)
        except OSError as exc:
            raise BackendError(f"sound server unreachable: {exc}", retryable=True) from None

    def file_transfer(self, session_id: str, request: dict[str, Any], stream: Any) -> None:
        """Run one file transfer in the session's home (blocking, in its own thread):
        ``request`` is {op: list|get|put, path, size?} with a path already checked by
        ``protocol.file_path_problem``; ``stream`` is an ``agent_clients.runtime.files.FileStream``
        (header lines and bytes, as that module describes). Refusals raise
        ``runtime.files.FileError``. Default: not available on this platform."""
        raise BackendError(f"file transfer is not available on {self.platform or 'this'} agents", retryable=False)

    def close(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Release clients and pools."""


# Backends are built with ``BackendClass.from_config(config)`` where config is an
# ``agent_clients.config.AgentConfig``; leadership backends likewise. A backend may
# also implement ``watch(emit, stop)``: a blocking loop (run in a thread) that calls
# ``emit(SessionStatus)`` when a session changes by itself (a container died), and
# returns when the ``threading.Event`` ``stop`` is set.
